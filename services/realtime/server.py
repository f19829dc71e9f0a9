"""The gateway process: WebSocket `/v1/realtime`, the browser page, `/metrics`, `/healthz`, `/readyz`, on one port.

Point an OpenAI Realtime client at `http://HOST:PORT/v1` (the SDK appends `/realtime?model=...`). `/readyz` is 200
only while the gRPC service reports SERVING; connections past `max_connections` get HTTP 503 at the handshake.
"""

from __future__ import annotations

import asyncio
import mimetypes
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from moss_speech.services.auth import ApiKeys, AuthError, authenticate
from moss_speech.services.lifecycle import wait_for_stop_signal
from moss_speech.services.logging import get_logger, setup_logging
from moss_speech.services.realtime.bridge import Bridge, ServiceTLS
from moss_speech.services.realtime.connection import Connection
from moss_speech.services.realtime.metrics import RealtimeMetrics
from moss_speech.services.realtime.settings import RealtimeSettings
from moss_speech.services.realtime.vad import shared_session

log = get_logger("realtime")
STATIC = Path(__file__).parent / "static"
FORWARDED_HEADERS = ("authorization",)  # travel to the gRPC service as metadata


def _response(status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
    )
    return Response(status.value, status.phrase, headers, body)


class RealtimeServer:
    def __init__(self, settings: RealtimeSettings) -> None:
        self.settings = settings
        self.metrics = RealtimeMetrics()
        tls = None
        if settings.service_tls_ca_file:
            tls = ServiceTLS(
                settings.service_tls_ca_file,
                settings.service_tls_cert_file,
                settings.service_tls_key_file,
                settings.service_tls_server_name,
            )
        self.bridge = Bridge(settings.service_url, tls)
        # The service's key check at the handshake (services.auth), when the gateway has the key file.
        self.keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
        self.active = 0
        self.ready = False
        self.port = 0
        self._server = None
        self._health_task: asyncio.Task | None = None
        self._static = {p.name: p for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else {}

    async def start(self) -> int:
        shared_session()  # load the VAD model before taking traffic
        s = self.settings
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            max_size=s.max_message_bytes,
            max_queue=64,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._health_task = asyncio.create_task(self._health_loop())
        log.info(
            "realtime gateway serving",
            extra={"fields": {"host": s.host, "port": self.port, "service_url": s.service_url}},
        )
        return self.port

    async def _health_loop(self) -> None:
        while True:
            self.ready = await self.bridge.serving()
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        await self.bridge.close()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path.rstrip("/").endswith("/realtime"):
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return _response(HTTPStatus.UPGRADE_REQUIRED, b"/v1/realtime is a WebSocket endpoint\n")
            if self.keys is not None:
                try:
                    authenticate(request.headers.get("Authorization"), self.keys)
                except AuthError:
                    self.metrics.rejected.labels("unauthenticated").inc()
                    return _response(HTTPStatus.UNAUTHORIZED, b"missing or invalid API key\n")
            if self.active >= self.settings.max_connections:
                self.metrics.rejected.labels("max_connections").inc()
                return _response(HTTPStatus.SERVICE_UNAVAILABLE, b"too many realtime connections\n")
            return None
        if path == "/healthz":
            return _response(HTTPStatus.OK, b"ok\n")
        if path == "/readyz":
            return (
                _response(HTTPStatus.OK, b"ready\n")
                if self.ready
                else _response(HTTPStatus.SERVICE_UNAVAILABLE, b"speech service not serving\n")
            )
        if path == "/metrics":
            return _response(HTTPStatus.OK, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
        name = "index.html" if path in ("/", "") else path.removeprefix("/static/")
        if name in self._static and (path in ("/", "") or path.startswith("/static/")):
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            if name.endswith(".js"):
                kind = "text/javascript"
            return _response(HTTPStatus.OK, self._static[name].read_bytes(), f"{kind}; charset=utf-8")
        self.metrics.rejected.labels("not_found").inc()
        return _response(HTTPStatus.NOT_FOUND, b"not found\n")

    async def _handle(self, ws: ServerConnection) -> None:
        self.active += 1
        self.metrics.connections.set(self.active)
        try:
            if self.active > self.settings.max_connections:  # handshakes that raced past the check above
                self.metrics.rejected.labels("max_connections").inc()
                await ws.close(1013, "too many realtime connections")
                return
            metadata = tuple((k, ws.request.headers[k]) for k in FORWARDED_HEADERS if k in ws.request.headers)
            query = parse_qs(urlsplit(ws.request.path).query)
            model = (query.get("model") or ["moss-speech"])[0][:64]
            await Connection(ws, self.bridge, self.settings, self.metrics, metadata, model).run()
        finally:
            self.active -= 1
            self.metrics.connections.set(self.active)


async def serve_forever(settings: RealtimeSettings, on_ready=None) -> None:
    """Run until SIGTERM/SIGINT."""
    setup_logging(settings.log_level, settings.log_format)  # type: ignore[arg-type]
    server = RealtimeServer(settings)
    await server.start()
    if on_ready:
        on_ready(server)
    await wait_for_stop_signal()
    await server.stop()
