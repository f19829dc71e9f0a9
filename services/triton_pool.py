"""Request-level balancing over every Triton replica.

A Kubernetes ClusterIP Service balances TCP connections, and a gRPC channel keeps one HTTP/2 connection: one
orchestrator would send every request to one Triton pod. The pool instead resolves every endpoint itself and keeps
one `TritonClient` (one channel) per endpoint:
- `triton_url` is `host:port`, a comma list of them, or `dns:///name:port` (a headless Service: one A/AAAA record
  per ready pod), re-resolved every `resolve_seconds` so pods the HPA adds get traffic and removed ones are dropped;
- a turn of a session goes to the endpoint with the highest rendezvous hash of (session id, endpoint) among the
  healthy ones: the same replica while it is healthy (its KV prefix cache holds the conversation), and when it
  fails or leaves only its sessions move (to their next-highest endpoint), nobody else's;
- a sessionless turn goes to the healthy endpoint with the fewest turns in flight from this orchestrator;
- an endpoint is skipped after `unhealthy_after` readiness checks fail in a row (one slow answer from a busy
  replica must not send all traffic to the others until the next check) or at once when a call fails with
  UNAVAILABLE, until a check passes again; a turn that failed before anything streamed is retried once on the next
  endpoint;
- the cancel control request goes to the endpoint that runs the request (the pool remembers it per request id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlparse

import grpc

from moss_speech.services.logging import get_logger
from moss_speech.services.triton_client import TritonCallError, TritonClient, TurnChunk, TurnInput

log = get_logger("triton-pool")


def rendezvous(key: str, endpoints: list[str]) -> list[str]:
    """Endpoints by decreasing highest-random-weight score for `key` (stable, minimal movement)."""

    def score(ep: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}|{ep}".encode(), digest_size=8).digest(), "big")

    return sorted(endpoints, key=score, reverse=True)


def parse_targets(url: str) -> tuple[str | None, list[str]]:
    """(`name:port` to resolve, or None; the fixed endpoints)."""
    url = url.strip()
    if url.startswith("dns:"):
        rest = urlparse(url).path.lstrip("/") or url.split("dns:", 1)[1].lstrip("/")
        if ":" not in rest:
            raise ValueError(f"triton_url {url!r}: a dns:/// name needs a port (dns:///triton-headless:8001)")
        return rest, []
    eps = [e.strip() for e in url.split(",") if e.strip()]
    if not eps:
        raise ValueError("triton_url names no endpoint")
    return None, eps


def resolve(name_port: str) -> list[str]:
    """Every address of `name:port` as `addr:port` (IPv6 in brackets), sorted."""
    host, _, port = name_port.rpartition(":")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    out = {(f"[{i[4][0]}]" if i[0] == socket.AF_INET6 else i[4][0]) + f":{port}" for i in infos}
    return sorted(out)


class TritonPool:
    """The `TritonClient` interface (ready, voices, generate, cancel, close) over many endpoints."""

    def __init__(
        self,
        url: str,
        *models: str,
        resolve_seconds: float = 10.0,
        unhealthy_after: int = 3,
        client_factory: Callable[..., TritonClient] = TritonClient,
        resolver: Callable[[str], list[str]] = resolve,
    ) -> None:
        self.url = url
        self.models = models
        self.resolve_seconds = resolve_seconds
        self.unhealthy_after = unhealthy_after
        self._factory, self._resolver = client_factory, resolver
        self._name, fixed = parse_targets(url)
        self.clients: dict[str, TritonClient] = {}
        self.healthy: dict[str, bool] = {}
        self.inflight: dict[str, int] = {}
        self.failed_checks: dict[str, int] = {}  # readiness checks failed in a row
        self._passed: set[str] = set()  # endpoints that have passed a readiness check
        self.turns: dict[str, int] = {}  # turns started per endpoint (tests, benchmark)
        self._owner: dict[str, str] = {}  # request id -> endpoint running it
        self._resolved_at = 0.0
        for ep in fixed:
            self._add(ep)

    # --- membership ----------------------------------------------------------------------------------------
    def _add(self, ep: str) -> None:
        self.clients[ep] = self._factory(ep, *self.models)
        self.healthy.setdefault(ep, True)  # optimistic until the first readiness check
        self.inflight.setdefault(ep, 0)
        self.failed_checks.setdefault(ep, 0)
        self.turns.setdefault(ep, 0)

    async def refresh(self, force: bool = False) -> None:
        """Re-resolve a dns:/// name (pods that came or went); a no-op for fixed endpoints."""
        if self._name is None or (not force and time.monotonic() - self._resolved_at < self.resolve_seconds):
            return
        self._resolved_at = time.monotonic()
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, self._resolver, self._name)
        except OSError as e:
            log.warning("cannot resolve Triton name", extra={"fields": {"name": self._name, "error": str(e)}})
            return
        if not found:
            return  # keep what we have rather than drop every endpoint on an empty answer
        for ep in found:
            if ep not in self.clients:
                log.info("triton endpoint added", extra={"fields": {"endpoint": ep}})
                self._add(ep)
        for ep in [e for e in self.clients if e not in found]:
            log.info("triton endpoint removed", extra={"fields": {"endpoint": ep}})
            client = self.clients.pop(ep)
            self.healthy.pop(ep, None)
            self.failed_checks.pop(ep, None)
            self._passed.discard(ep)
            asyncio.ensure_future(client.close())  # lets its open turns drain first

    @property
    def endpoints(self) -> list[str]:
        return sorted(self.clients)

    def _candidates(self) -> list[str]:
        up = [ep for ep in self.endpoints if self.healthy.get(ep)]
        return up or self.endpoints  # none known healthy: try them all rather than refuse

    def pick(self, session_id: str = "", exclude: frozenset[str] = frozenset()) -> str:
        eps = [ep for ep in self._candidates() if ep not in exclude] or [
            ep for ep in self.endpoints if ep not in exclude
        ]
        if not eps:
            raise TritonCallError(grpc.StatusCode.UNAVAILABLE, "no Triton endpoint is available", "unavailable")
        if session_id:
            return rendezvous(session_id, eps)[0]
        return min(eps, key=lambda ep: (self.inflight[ep], self.turns[ep]))

    # --- the TritonClient interface ------------------------------------------------------------------------
    async def ready(self, timeout: float = 2.0) -> bool:
        """Check every endpoint (updates which are skipped); ready when at least one is usable."""
        await self.refresh(force=not self.clients)
        eps = self.endpoints
        results = await asyncio.gather(*(self.clients[ep].ready(timeout) for ep in eps))
        for ep, ok in zip(eps, results, strict=True):
            self.failed_checks[ep] = 0 if ok else self.failed_checks[ep] + 1
            if ok:
                self._passed.add(ep)
            # Up at the first pass; an endpoint that has passed before goes down after `unhealthy_after` failures
            # in a row (or a failed call); one that never passed is down until it does.
            usable = ok or (
                ep in self._passed and self.healthy.get(ep, False) and self.failed_checks[ep] < self.unhealthy_after
            )
            if self.healthy.get(ep) != usable:
                log.info("triton endpoint " + ("ready" if usable else "not ready"), extra={"fields": {"endpoint": ep}})
            self.healthy[ep] = usable
        return any(self.healthy[ep] for ep in eps)

    async def voices(self, timeout: float = 5.0) -> list[str]:
        return await self.clients[self.pick()].voices(timeout)

    def client(self, session_id: str = "") -> TritonClient:
        """A client for one-off calls (model config, voice models)."""
        return self.clients[self.pick(session_id)]

    async def generate(self, turn: TurnInput, timeout: float | None) -> AsyncIterator[TurnChunk]:
        session_id = getattr(turn, "session_id", "") or ""
        tried: set[str] = set()
        while True:
            ep = self.pick(session_id, frozenset(tried))
            tried.add(ep)
            self.inflight[ep] += 1
            self.turns[ep] += 1
            self._owner[turn.request_id] = ep
            started = False
            try:
                async for chunk in self.clients[ep].generate(turn, timeout):
                    started = True
                    yield chunk
                return
            except TritonCallError as e:
                if e.code != grpc.StatusCode.UNAVAILABLE or started:
                    raise
                self.healthy[ep] = False  # skipped until its readiness check passes again
                if len(tried) >= len(self.clients):
                    raise
                log.warning(
                    "triton endpoint failed; retrying the turn on another",
                    extra={"fields": {"endpoint": ep, "error": e.message}},
                )
            finally:
                self.inflight[ep] -= 1
                self._owner.pop(turn.request_id, None)

    async def cancel(self, request_id: str, timeout: float = 5.0) -> bool:
        ep = self._owner.get(request_id)
        if ep is not None and ep in self.clients:
            return await self.clients[ep].cancel(request_id, timeout)
        results = await asyncio.gather(*(c.cancel(request_id, timeout) for c in self.clients.values()))
        return any(results)

    async def close(self) -> None:
        for client in list(self.clients.values()):
            with contextlib.suppress(Exception):
                await client.close()
