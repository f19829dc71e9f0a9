"""Unit tests of the security pieces without Triton: the key file and its rotation, per-key limits and their retry
times, error-message scrubbing, the launcher's bind address and stale shared-memory cleanup."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from moss_speech.services.auth import ANONYMOUS, ApiKeys, AuthError, KeyFileError, authenticate, hash_key
from moss_speech.services.limits import Limiter, LimitError, Limits
from moss_speech.services.server import public_message


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_key_file_checks_and_rotation(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# comment\n\nalice:{hash_key('k-alice')}\n")
    clock = Clock()
    keys = ApiKeys(path, clock=clock)
    assert authenticate("Bearer k-alice", keys) == "alice"
    assert authenticate("bearer  k-alice ", keys) == "alice"
    for bad in (None, "", "Bearer", "Basic k-alice", "Bearer k-bob", "Bearer " + "k" * 300):
        with pytest.raises(AuthError):
            authenticate(bad, keys)
    path.write_text(f"bob:{hash_key('k-bob')}\n")  # rotation: seen after the next check interval
    clock.t += 1.5
    assert authenticate("Bearer k-bob", keys) == "bob"
    with pytest.raises(AuthError):
        authenticate("Bearer k-alice", keys)
    path.write_text("garbage line\n")  # a broken update keeps the last good keys
    clock.t += 1.5
    assert authenticate("Bearer k-bob", keys) == "bob"
    assert authenticate(None, None) == ANONYMOUS  # auth off


@pytest.mark.parametrize(
    "text", ["alice\n", "alice:abc\n", f"a b:{hash_key('x')}\n", f"a:{hash_key('x')}\na:{hash_key('y')}\n"]
)
def test_malformed_key_file_refused_at_start_without_echoing_hashes(tmp_path, text: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(KeyFileError) as e:
        ApiKeys(path)
    assert hash_key("x") not in str(e.value)


def test_missing_key_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="API key file"):
        ApiKeys(tmp_path / "absent")


def test_new_key_command_prints_a_usable_line(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "moss_speech.services.auth", "new", "ci"], capture_output=True, text=True, check=True
    ).stdout
    key = out.split("it is not stored): ")[1].split()[0]
    line = out.split("line for the key file: ")[1].strip()
    (tmp_path / "keys").write_text(line + "\n")
    assert authenticate(f"Bearer {key}", ApiKeys(tmp_path / "keys")) == "ci"


def test_stream_limits_per_key_and_global_released_on_exit() -> None:
    lim = Limiter(Limits(max_streams=3, max_streams_per_key=2, turns_per_minute=100, audio_seconds_per_minute=10))
    with lim.stream("a"), lim.stream("a"):
        with pytest.raises(LimitError):
            with lim.stream("a"):
                pass
        with lim.stream("b"):
            with pytest.raises(LimitError, match="concurrent calls"):
                with lim.stream("c"):
                    pass
    assert lim.streams == 0
    with lim.stream("a"), lim.stream("a"):
        pass


def test_turn_and_audio_rates_with_retry_after() -> None:
    clock = Clock()
    lim = Limiter(
        Limits(max_streams=9, max_streams_per_key=9, turns_per_minute=2, audio_seconds_per_minute=10), clock=clock
    )
    lim.turn("a")
    clock.t += 10
    lim.turn("a", 6.0)
    with pytest.raises(LimitError) as e:
        lim.turn("a")
    assert e.value.retry_after == pytest.approx(50.0)
    lim.turn("b")  # other keys unaffected
    clock.t += 51
    lim.turn("a")  # the first turn left the window
    with pytest.raises(LimitError) as e:
        lim.turn("a", 5.0)  # 6 + 5 > 10 s of audio in the window
    assert 0 < e.value.retry_after <= 60
    with pytest.raises(LimitError, match="more than the per-minute"):
        lim.turn("c", 11.0)


@pytest.mark.parametrize(
    "raw",
    [
        "cannot decode audio: Error opening <_io.BytesIO object at 0x7f3a2b1c0d90>: Format not recognised.",
        "Triton at triton-0.triton.svc:8001 is unavailable: failed to connect to all addresses; last error: "
        "UNKNOWN: ipv4:10.0.0.12:8001: Connection refused",
        "in ensemble 's2s', [request id: x] llm: failed at /opt/tritonserver/backends/python/model.py line 3",
        'vocoder failed: Traceback (most recent call last):\n  File "/x/y.py"',
    ],
)
def test_public_message_drops_internals(raw: str) -> None:
    msg = public_message(raw, ("s2s", "t2s", "llm", "vocoder", "speech_encoder"))
    for leak in ("0x7f", "BytesIO", "8001", "10.0.0.12", "/opt/", "s2s", "llm", "vocoder", "Traceback", ".py"):
        assert leak not in msg, (leak, msg)


def test_launcher_binds_what_it_is_told_and_removes_stale_shm(tmp_path) -> None:
    from moss_speech.model_repository.launcher import SHM_PREFIX, TritonServer

    try:
        srv = TritonServer(tmp_path, grpc_port=18001, http_port=18000, metrics_port=18002, shm_dir=tmp_path)
    except FileNotFoundError:
        pytest.skip("no tritonserver binary")
    cmd = srv.command()
    assert {"--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(cmd)
    assert f"--backend-config=python,shm-region-prefix-name={srv.shm_prefix}" in cmd
    everywhere = TritonServer(tmp_path, grpc_port=18001, http_port=18000, metrics_port=18002, bind_address="0.0.0.0")
    assert "--grpc-address=0.0.0.0" in everywhere.command()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f"{srv.shm_prefix}aaaa": False,  # ours, from before a crash: removed
        f"{SHM_PREFIX}{dead.pid}_9000_bbbb": False,  # a launcher that no longer exists: removed
        f"{SHM_PREFIX}{os.getppid()}_9000_cccc": True,  # a live launcher's: kept
        "triton_python_backend_shm_region_dddd": True,  # not ours: kept
    }
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 16)
    removed = srv.remove_stale_shm()
    assert sorted(removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(n for n, k in names.items() if k)


def test_realtime_gateway_checks_the_same_keys_at_the_handshake(tmp_path) -> None:
    """The gateway's WebSocket handshake uses services.auth.authenticate with the service's key file."""
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    from moss_speech.services.realtime.server import RealtimeServer
    from moss_speech.services.realtime.settings import RealtimeSettings

    (tmp_path / "keys").write_text(f"web:{hash_key('k-web')}\n")

    async def statuses() -> list:
        # Inside a running loop, as in `moss-speech realtime`: the gateway's gRPC channel belongs to it.
        gw = RealtimeServer(RealtimeSettings(api_keys_file=str(tmp_path / "keys")))

        def handshake(auth: str | None):
            headers = Headers([("Upgrade", "websocket")] + ([("Authorization", auth)] if auth else []))
            return gw._process_request(None, Request("/v1/realtime", headers))

        try:
            return [handshake(None), handshake("Bearer wrong"), handshake("Bearer k-web")]
        finally:
            await gw.bridge.close()

    missing, wrong, right = asyncio.run(statuses())
    assert missing.status_code == 401
    assert wrong.status_code == 401
    assert right is None  # accepted: the handshake proceeds
