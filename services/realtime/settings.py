"""Gateway settings, from `MOSS_REALTIME_*` environment variables (one object per process)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RealtimeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MOSS_REALTIME_", case_sensitive=False, extra="ignore", validate_default=True
    )

    service_url: str = Field("localhost:50051", min_length=1, description="The public gRPC service, `host:port`.")
    service_tls_ca_file: str = Field(
        "",
        description="PEM CA that signed the service's certificate: when set, the gateway calls the service over TLS "
        "(empty = plaintext, for a service started with `plaintext`).",
    )
    service_tls_cert_file: str = Field(
        "", description="PEM client certificate for a service that requires mTLS (with `service_tls_key_file`)."
    )
    service_tls_key_file: str = Field("", description="PEM private key of `service_tls_cert_file`.")
    service_tls_server_name: str = Field(
        "", description="Name to check the service's certificate against, when it differs from `service_url`'s host."
    )
    host: str = Field("0.0.0.0", description="Bind address of the WebSocket/HTTP server.")
    port: int = Field(8080, ge=0, le=65535, description="Port of `/v1/realtime`, the page, `/metrics`, probes.")
    max_connections: int = Field(64, ge=1, description="Open WebSockets at most; more get HTTP 503.")
    max_message_bytes: int = Field(
        2 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest WebSocket message; larger ones close the socket (1009), as the protocol requires.",
    )
    max_append_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest decoded `input_audio_buffer.append` (bigger: an `error`)."
    )
    max_buffer_seconds: float = Field(
        60.0, gt=0, description="Most input audio held per connection (the buffer plus unanswered items)."
    )
    max_items: int = Field(256, ge=8, description="Conversation items remembered per connection (oldest dropped).")
    max_pending_items: int = Field(32, ge=1, description="User items waiting for a response, at most.")
    max_text_chars: int = Field(4000, ge=1, description="Longest text of one user item.")
    response_timeout_seconds: float = Field(120.0, gt=0, description="Deadline of one response's gRPC call.")
    default_voice: str = Field("default", min_length=1, description="Voice when the client sets none.")
    vad_threshold: float = Field(0.5, ge=0, le=1, description="Default server-VAD speech probability threshold.")
    vad_prefix_padding_ms: int = Field(300, ge=0, le=5000, description="Default audio kept before speech starts.")
    vad_silence_duration_ms: int = Field(500, ge=0, le=10000, description="Default silence that ends a turn.")
    api_keys_file: str = Field(
        "",
        description="Key hashes (the service's `api_keys_file`): when set, the WebSocket handshake needs "
        "`Authorization: Bearer <key>` (HTTP 401 otherwise); the key also travels to the service.",
    )
    log_level: str = Field("INFO", description="Lowest level of log records.")
    log_format: str = Field("json", description="json | text")
