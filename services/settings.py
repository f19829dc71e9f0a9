"""Orchestrator (public gRPC service) settings: one object per process, from `MOSS_SPEECH_*` env vars.

`ServiceSettings` is the single source for these names and defaults. Two artifacts are generated from it and
kept in sync by tests:
- the env-var table in docs/deploy.md (`env_table_markdown`),
- the `orchestrator.settings` section of the Helm chart's values.schema.json (`chart_settings_schema`).
The chart turns each key under `orchestrator.settings` into `MOSS_SPEECH_<KEY>`.

Regenerate both after changing a field:
    python -m moss_speech.services.settings --write-schema helm/moss-speech/values.schema.json \
        --write-docs docs/deploy.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moss_speech.contract import tensors as T
from moss_speech.contract.audio import MAX_AUDIO_SECONDS
from moss_speech.contract.docs import replace_between
from moss_speech.contract.sampling import sampling_field

ENV_PREFIX = "MOSS_SPEECH_"

SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "min_new_tokens")

# Markers around the generated table in docs/deploy.md.
DOCS_BEGIN = "<!-- BEGIN GENERATED: ServiceSettings env vars -->"
DOCS_END = "<!-- END GENERATED: ServiceSettings env vars -->"


class ServiceSettings(BaseSettings):
    """Everything the orchestrator reads at start-up. Every field maps to `MOSS_SPEECH_<FIELD>`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", validate_default=True
    )

    # --- network --------------------------------------------------------------------------------------
    triton_url: str = Field(
        "localhost:8001",
        min_length=1,
        description="Triton gRPC endpoints: `host:port`, a comma list of them, or `dns:///name:port` (every address "
        "of a headless Service, re-resolved every `triton_resolve_seconds`). Requests are spread over "
        "them: a session's turns stay on one replica (rendezvous hashing), others go to the least loaded.",
    )
    triton_resolve_seconds: float = Field(
        10.0, gt=0, description="Interval of re-resolving a `dns:///` Triton name (pods that come and go), seconds."
    )
    grpc_port: int = Field(50051, ge=1, le=65535, description="Port of the public gRPC API and `grpc.health.v1`.")
    metrics_port: int = Field(9090, ge=1, le=65535, description="Port of the Prometheus `/metrics` HTTP endpoint.")
    bind_address: str = Field(
        "[::]",
        min_length=1,
        description="Address the public gRPC port binds (`[::]` = every interface; `127.0.0.1` = loopback only).",
    )
    metrics_bind_address: str = Field(
        "0.0.0.0",
        min_length=1,
        description="Address the metrics port binds; the chart never publishes it on the public Service.",
    )
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Plaintext port serving only `grpc.health.v1` (for kubelet probes, which cannot speak TLS); "
        "0 = health only on the public port. The chart sets it to `orchestrator.healthPort`.",
    )

    # --- security (docs/security.md) ------------------------------------------------------------------
    plaintext: bool = Field(
        False, description="Serve the public port without TLS. Off by default: only for loopback/local stacks."
    )
    tls_cert_file: str = Field(
        "/etc/moss-speech/tls/tls.crt",
        description="PEM server certificate chain (re-read when the file changes, e.g. rotated by cert-manager).",
    )
    tls_key_file: str = Field("/etc/moss-speech/tls/tls.key", description="PEM private key of `tls_cert_file`.")
    tls_client_ca_file: str = Field(
        "", description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."
    )
    auth: Literal["api_keys", "none"] = Field(
        "api_keys",
        description="`api_keys`: every RPC but health needs `authorization: Bearer <key>`; `none`: "
        "no authentication (local stacks only).",
    )
    api_keys_file: str = Field(
        "/etc/moss-speech/keys/api-keys",
        description="Key hashes, one `key_id:sha256hex` line each (`python -m moss_speech.services.auth new ID`); "
        "re-read when it changes, so keys rotate without a restart.",
    )
    reflection: bool = Field(False, description="Serve gRPC server reflection.")

    # --- per-key and global limits --------------------------------------------------------------------
    max_streams: int = Field(512, ge=1, description="Most concurrent Converse/StreamConverse calls in all.")
    max_streams_per_key: int = Field(32, ge=1, description="Most concurrent Converse/StreamConverse calls per key.")
    max_sessions_per_key: int = Field(64, ge=1, description="Most sessions one key holds at a time.")
    turns_per_minute_per_key: int = Field(600, ge=1, description="Turns one key may start per minute.")
    audio_seconds_per_minute_per_key: float = Field(
        1800.0, gt=0, description="Seconds of input audio one key may send per minute."
    )
    stream_idle_seconds: float = Field(
        30.0,
        gt=0,
        description="A stream whose client sends nothing for this long (outside a running turn) is "
        "closed with DEADLINE_EXCEEDED, seconds.",
    )
    max_system_prompt_chars: int = Field(4000, ge=1, description="Longest system prompt accepted, characters.")
    max_new_tokens_limit: int = Field(
        1000, ge=1, description="Largest `max_new_tokens` a request may ask for (also capped by the served context)."
    )
    max_audio_buffer_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Most bytes of encoded audio buffered for one streamed turn."
    )

    # --- request limits -------------------------------------------------------------------------------
    max_audio_seconds: float = Field(
        MAX_AUDIO_SECONDS,
        gt=0,
        description="Longest input audio accepted in one turn, seconds (keep <= the repository's, "
        "`moss-speech build --max-audio-seconds`).",
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent, bytes."
    )
    max_text_chars: int = Field(4000, ge=1, description="Longest text input accepted in one turn, characters.")
    request_timeout_seconds: float = Field(120.0, gt=0, description="Deadline for one turn against Triton, seconds.")

    # --- sessions -------------------------------------------------------------------------------------
    session_ttl_seconds: float = Field(
        900.0, gt=0, description="Idle time after which a session's history is dropped, seconds."
    )
    max_sessions: int = Field(1000, ge=1, description="Most sessions held in memory; the oldest idle one is evicted.")
    max_context_tokens: int = Field(
        4096, ge=64, description="History budget per session in LLM positions; older turns are truncated first."
    )

    sessions_backend: Literal["memory", "redis"] = Field(
        "memory",
        description="Where sessions live: `memory` (this process; one replica only) or `redis` (shared by every "
        "replica, survives restarts).",
    )
    redis_url: str = Field(
        "",
        pattern=r"^$|^rediss?://",
        description="Redis URL for `sessions_backend=redis` (`redis://[:password@]host:6379/0`; the chart reads it "
        "from a Secret).",
    )
    redis_key_prefix: str = Field("moss-speech:", description="Prefix of every Redis key the service writes.")
    session_lock_lease_seconds: float = Field(
        30.0,
        gt=0,
        description="Lease of a session's cross-replica busy lock, renewed while a turn runs; a crashed replica's "
        "lock expires after it, seconds.",
    )

    # --- lifecycle ------------------------------------------------------------------------------------
    drain_seconds: float = Field(
        30.0,
        ge=0,
        description="Graceful shutdown bound: on SIGTERM stop accepting, let open streams finish for at "
        "most this long, seconds.",
    )

    # --- generation defaults (a request may override) -------------------------------------------------
    default_voice: str = Field("default", min_length=1, description="Voice used when a request names none.")
    # Defaults and limits are the contract's (moss_speech.contract.sampling).
    temperature: float = sampling_field("temperature", "Default sampling temperature (0 = greedy).")
    top_p: float = sampling_field("top_p", "Default nucleus sampling mass.")
    top_k: int = sampling_field("top_k", "Default top-k (0 = disabled).")
    repetition_penalty: float = sampling_field("repetition_penalty", "Default repetition penalty (1 = none).")
    max_new_tokens: int = sampling_field("max_new_tokens", "Default cap on generated steps per turn.")
    min_new_tokens: int = sampling_field("min_new_tokens", "Default minimum generated steps before a stop is allowed.")

    # --- Triton model names ---------------------------------------------------------------------------
    s2s_model: str = Field(T.S2S.name, min_length=1, description="Triton ensemble for speech input.")
    t2s_model: str = Field(T.T2S.name, min_length=1, description="Triton ensemble for text input.")
    llm_model: str = Field(
        T.LLM.name,
        min_length=1,
        description="Triton LLM model; receives the cancel control request when a client goes away.",
    )
    vocoder_model: str = Field(
        T.VOCODER.name, min_length=1, description="Triton vocoder model; its `voices` config parameter lists voices."
    )
    health_check_seconds: float = Field(
        1.0, gt=0, description="Interval of Triton readiness checks (grpc.health.v1 status), seconds."
    )

    # --- logging --------------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level of log records written to stderr."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="Log line format: one JSON object per line, or plain text."
    )

    # --- tracing --------------------------------------------------------------------------------------
    otlp_endpoint: str = Field(
        "",
        pattern=r"^(https?://[^\s/]+(:[0-9]+)?/?)?$",
        description="OpenTelemetry: OTLP/HTTP collector base URL (`http://host:4318`); spans go to its `/v1/traces`. "
        "Empty = tracing off. Needs the `tracing` extra.",
    )

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling fields this service sets; a request's own fields override them."""
        return {name: getattr(self, name) for name in SAMPLING_DEFAULTS}

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSettings:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")
        if self.sessions_backend == "redis" and not self.redis_url:
            raise ValueError("sessions_backend=redis needs redis_url (MOSS_SPEECH_REDIS_URL)")
        ports = [p for p in (self.grpc_port, self.metrics_port, self.health_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"grpc_port, metrics_port and health_port must differ, got {ports}")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) > max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        return self


def env_var(field: str) -> str:
    return ENV_PREFIX + field.upper()


def field_defaults() -> dict[str, Any]:
    """Pydantic defaults, by field name."""
    return {name: info.default for name, info in ServiceSettings.model_fields.items()}


def _type_name(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}
    return names.get(prop.get("type"), "?")


def env_table_markdown() -> str:
    """The docs table of env vars: one row per field, in declaration order."""
    props = ServiceSettings.model_json_schema()["properties"]
    rows = ["| Variable | Type | Default | Description |", "|---|---|---|---|"]
    for name in ServiceSettings.model_fields:
        prop = props[name]
        rows.append(
            f"| `{env_var(name)}` | {_type_name(prop)} | `{json.dumps(prop['default'])}` | {prop['description']} |"
        )
    return "\n".join(rows) + "\n"


def chart_settings_schema() -> dict[str, Any]:
    """JSON schema (draft-07 subset, no $refs) of the chart's `orchestrator.settings`; unknown keys fail."""
    props = {}
    for name, prop in ServiceSettings.model_json_schema()["properties"].items():
        props[name] = {k: v for k, v in prop.items() if k != "title"}
    return {
        "type": "object",
        "description": "ServiceSettings fields (env MOSS_SPEECH_<KEY>); generated from "
        "moss_speech.services.settings, do not edit by hand.",
        "additionalProperties": False,
        "properties": props,
    }


# --- keeping the generated artifacts in sync ----------------------------------------------------------


def schema_with_settings(chart_schema: dict[str, Any]) -> dict[str, Any]:
    """The chart's values.schema.json with its orchestrator.settings section replaced by the generated one."""
    chart_schema["properties"]["orchestrator"]["properties"]["settings"] = chart_settings_schema()
    return chart_schema


def docs_with_table(text: str) -> str:
    """docs text with the generated env table between DOCS_BEGIN and DOCS_END replaced."""
    return replace_between(text, DOCS_BEGIN, DOCS_END, env_table_markdown())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-schema", type=Path, help="update this values.schema.json in place")
    parser.add_argument("--write-docs", type=Path, help="update the env table in this markdown file in place")
    args = parser.parse_args(argv)
    if args.write_schema:
        schema = schema_with_settings(json.loads(args.write_schema.read_text()))
        args.write_schema.write_text(json.dumps(schema, indent=2) + "\n")
    if args.write_docs:
        args.write_docs.write_text(docs_with_table(args.write_docs.read_text()))
    if not (args.write_schema or args.write_docs):
        print(env_table_markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
