"""The gateway reaches a service that serves TLS (the chart's default): a real gRPC server over TLS with
certificates made in the test; the gateway's channel verifies it with the CA, and refuses it without."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from tls_support import CA  # noqa: E402

from moss_speech.model_repository.launcher import free_port  # noqa: E402
from moss_speech.services.realtime.bridge import Bridge, ServiceTLS  # noqa: E402


async def _serve_tls(tmp: Path, client_ca: bytes | None = None) -> tuple[grpc.aio.Server, int]:
    ca = CA("test-ca")
    server_cert = ca.issue("localhost", server=True)
    (tmp / "ca.crt").write_bytes(ca.pem)
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await _set_serving(servicer)
    creds = grpc.ssl_server_credentials(
        [(server_cert.key, server_cert.cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    port = server.add_secure_port(f"127.0.0.1:{free_port()}", creds)
    await server.start()
    return server, port


async def _set_serving(servicer) -> None:
    result = servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if asyncio.iscoroutine(result):
        await result


def test_gateway_verifies_the_service_certificate(tmp_path):
    async def run() -> tuple[bool, bool]:
        server, port = await _serve_tls(tmp_path)
        try:
            with_ca = Bridge(f"localhost:{port}", ServiceTLS(str(tmp_path / "ca.crt")))
            plaintext = Bridge(f"localhost:{port}")
            ok = await with_ca.serving(timeout=5)
            refused = await plaintext.serving(timeout=2)
            await with_ca.close()
            await plaintext.close()
            return ok, refused
        finally:
            await server.stop(None)

    ok, plaintext_ok = asyncio.run(run())
    assert ok, "the gateway could not reach a TLS service with its CA"
    assert not plaintext_ok, "a plaintext channel reached a TLS-only port"


def test_gateway_refuses_a_certificate_from_another_ca(tmp_path):
    async def run() -> bool:
        server, port = await _serve_tls(tmp_path)
        other = tmp_path / "other"
        other.mkdir()
        (other / "ca.crt").write_bytes(CA("someone-else").pem)
        try:
            bridge = Bridge(f"localhost:{port}", ServiceTLS(str(other / "ca.crt")))
            result = await bridge.serving(timeout=2)
            await bridge.close()
            return result
        finally:
            await server.stop(None)

    assert not asyncio.run(run()), "the gateway trusted a certificate its CA did not sign"


def test_gateway_presents_a_client_certificate_under_mtls(tmp_path):
    client_ca = CA("clients")
    client = client_ca.issue("realtime-gateway", server=False)
    cert, key = client.write(tmp_path / "client", "gateway")

    async def run() -> tuple[bool, bool]:
        server, port = await _serve_tls(tmp_path, client_ca=client_ca.pem)
        try:
            with_cert = Bridge(f"localhost:{port}", ServiceTLS(str(tmp_path / "ca.crt"), str(cert), str(key)))
            without = Bridge(f"localhost:{port}", ServiceTLS(str(tmp_path / "ca.crt")))
            a, b = await with_cert.serving(timeout=5), await without.serving(timeout=2)
            await with_cert.close()
            await without.close()
            return a, b
        finally:
            await server.stop(None)

    ok, anonymous_ok = asyncio.run(run())
    assert ok, "the gateway's client certificate was not accepted under mTLS"
    assert not anonymous_ok, "a gateway without a client certificate passed mTLS"
