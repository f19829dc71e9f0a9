"""The public service under real TLS (certificates made here with `cryptography`), real API keys and real limits,
against the session's real tritonserver: plaintext and wrong CAs refused, mTLS, certificate and key rotation
while a stream runs, per-key limits hit and released, session ownership, idle streams that cannot starve others."""

from __future__ import annotations

import queue
import ssl
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_support import ServiceProcess
from tls_support import CA, bearer, make_keys, tls_channel, write_keys

from moss_speech.model_repository.launcher import free_port
from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.api import speech_pb2_grpc

pytestmark = pytest.mark.slow


class Secured:
    def __init__(self, triton_url: str, folder: Path, mtls: bool = False, **env: str) -> None:
        self.ca, self.other_ca = CA("test CA"), CA("someone else's CA")
        self.cert_file, self.key_file = self.ca.issue("localhost", server=True).write(folder, "server")
        self.keys_file = folder / "api-keys"
        self.keys = make_keys("alice", "bob")
        write_keys(self.keys_file, self.keys)
        self.client = self.ca.issue("client", server=False)
        tls = {
            "MOSS_SPEECH_PLAINTEXT": "false",
            "MOSS_SPEECH_AUTH": "api_keys",
            "MOSS_SPEECH_REFLECTION": "false",
            "MOSS_SPEECH_TLS_CERT_FILE": str(self.cert_file),
            "MOSS_SPEECH_TLS_KEY_FILE": str(self.key_file),
            "MOSS_SPEECH_API_KEYS_FILE": str(self.keys_file),
            "MOSS_SPEECH_HEALTH_PORT": str(free_port()),
        }
        if mtls:
            (folder / "client-ca.crt").write_bytes(self.ca.pem)
            tls["MOSS_SPEECH_TLS_CLIENT_CA_FILE"] = str(folder / "client-ca.crt")
        self.proc = ServiceProcess(triton_url, folder / "service.log", **tls, **env).start()
        self.address = self.proc.address

    def channel(self, client=None) -> grpc.Channel:
        return tls_channel(self.address, self.ca.pem, client)

    def stub(self, channel: grpc.Channel) -> speech_pb2_grpc.MossSpeechStub:
        return speech_pb2_grpc.MossSpeechStub(channel)


@pytest.fixture(scope="module")
def secured(triton, tmp_path_factory):
    svc = Secured(
        triton.grpc_url,
        tmp_path_factory.mktemp("secured"),
        MOSS_SPEECH_MAX_STREAMS_PER_KEY="2",
        MOSS_SPEECH_STREAM_IDLE_SECONDS="1.5",
        MOSS_SPEECH_TURNS_PER_MINUTE_PER_KEY="40",
        MOSS_SPEECH_MAX_SESSIONS_PER_KEY="3",
    )
    yield svc
    svc.proc.stop()
    print("\n".join(svc.proc.logs().splitlines()[-30:]))


def _health(channel: grpc.Channel) -> str:
    try:
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as e:
        return e.code().name


def _ask(stub, key: str, session_id: str = "", timeout: float = 60):
    return stub.Converse(
        pb.ConverseRequest(session_id=session_id, text="hello", output=pb.OUTPUT_MODALITY_TEXT),
        metadata=bearer(key),
        timeout=timeout,
    )


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# --- TLS -------------------------------------------------------------------------------------------------------


def test_plaintext_refused_on_the_tls_port(secured) -> None:
    with grpc.insecure_channel(secured.address) as ch:
        assert _health(ch) == "UNAVAILABLE"
    with secured.channel() as ch:
        assert _health(ch) == "SERVING"


def test_reflection_is_off_unless_enabled(secured) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with secured.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        assert (
            _code(lambda: next(stub.ServerReflectionInfo(req, metadata=bearer(secured.keys["alice"]), timeout=10)))
            == grpc.StatusCode.UNIMPLEMENTED
        )


def test_wrong_ca_refused(secured) -> None:
    with tls_channel(secured.address, secured.other_ca.pem) as ch:
        assert _health(ch) == "UNAVAILABLE"


def test_certificate_rotation_is_picked_up_without_restart(secured) -> None:
    """A rotated certificate (files swapped like a Secret update) serves new connections; the old CA's clients
    of the new certificate fail, the new CA's succeed."""
    new_ca = CA("rotated CA")
    folder = secured.cert_file.parent
    c, k = new_ca.issue("localhost", server=True).write(folder / "next", "server")
    k.replace(secured.key_file)
    c.replace(secured.cert_file)
    secured.ca, old = new_ca, secured.ca
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with tls_channel(secured.address, new_ca.pem) as ch:
            if _health(ch) == "SERVING":
                break
        time.sleep(0.3)
    with tls_channel(secured.address, new_ca.pem) as ch:
        assert _health(ch) == "SERVING"
    served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", secured.proc.port)))
    assert served == ssl.PEM_cert_to_DER_cert(secured.cert_file.read_text())
    with tls_channel(secured.address, old.pem) as ch:
        assert _health(ch) == "UNAVAILABLE"


# --- API keys --------------------------------------------------------------------------------------------------


def test_keys_missing_wrong_and_right(secured) -> None:
    with secured.channel() as ch:
        stub = secured.stub(ch)
        assert _code(lambda: stub.ListVoices(pb.ListVoicesRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        for bad in ("Bearer nope", "Basic abc", "Bearer " + "x" * 5000, "Bearer"):
            code = _code(
                lambda b=bad: stub.ListVoices(pb.ListVoicesRequest(), timeout=10, metadata=(("authorization", b),))
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED, bad
        assert _health(ch) == "SERVING"  # health is exempt
        stub.ListVoices(pb.ListVoicesRequest(), timeout=10, metadata=bearer(secured.keys["alice"]))
        _ask(stub, secured.keys["alice"])  # a turn logs "turn done" with the caller's key id
    logs = secured.proc.logs()
    assert secured.keys["alice"] not in logs and secured.keys["bob"] not in logs
    assert '"key_id": "alice"' in logs
    metrics = secured.proc.metrics()
    assert 'key_id="alice"' in metrics and secured.keys["alice"] not in metrics


def test_key_rotation_during_a_running_stream(secured) -> None:
    """A stream authenticated with a key keeps running after the key is rotated out; new calls with the old key
    are refused within about a second, and the new key works, without a restart."""
    old_key = secured.keys["alice"]
    inbox: queue.Queue = queue.Queue()
    send: queue.Queue = queue.Queue()

    def requests():
        yield pb.StreamConverseRequest(config=pb.StreamConfig(output=pb.OUTPUT_MODALITY_TEXT))
        while (msg := send.get()) is not None:
            yield msg

    with secured.channel() as ch:
        stub = secured.stub(ch)
        call = stub.StreamConverse(requests(), metadata=bearer(old_key), timeout=120)
        reader = threading.Thread(target=lambda: [inbox.put(m) for m in call], daemon=True)
        reader.start()

        def turn():
            send.put(pb.StreamConverseRequest(text="hi"))
            send.put(pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn()))
            while True:
                m = inbox.get(timeout=60)
                if m.WhichOneof("kind") == "final":
                    return m

        turn()
        rotated = dict(secured.keys, alice=make_keys("alice")["alice"])
        write_keys(secured.keys_file, rotated)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _code(lambda: _ask(stub, old_key)) != grpc.StatusCode.UNAUTHENTICATED:
            time.sleep(0.2)
        assert _code(lambda: _ask(stub, old_key)) == grpc.StatusCode.UNAUTHENTICATED
        assert turn().final.turn_index == 1  # the running stream carries on
        send.put(None)
        reader.join(30)
        _ask(stub, rotated["alice"])
        secured.keys = rotated


# --- ownership -------------------------------------------------------------------------------------------------


def test_one_key_cannot_see_anothers_session(secured) -> None:
    alice, bob = secured.keys["alice"], secured.keys["bob"]
    with secured.channel() as ch:
        stub = secured.stub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest(), metadata=bearer(alice), timeout=10).session_id
        for call in (
            lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bearer(bob), timeout=10),
            lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=bearer(bob), timeout=10),
            lambda: stub.TruncateReply(pb.TruncateReplyRequest(session_id=sid), metadata=bearer(bob), timeout=10),
            lambda: _ask(stub, bob, sid),
        ):
            assert _code(call) == grpc.StatusCode.NOT_FOUND
        _ask(stub, alice, sid)
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bearer(alice), timeout=10).turns == 1
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=bearer(alice), timeout=10)


def test_session_cap_per_key_never_evicts_another_keys_session(secured) -> None:
    alice, bob = secured.keys["alice"], secured.keys["bob"]
    with secured.channel() as ch:
        stub = secured.stub(ch)
        mine = stub.CreateSession(pb.CreateSessionRequest(), metadata=bearer(bob), timeout=10).session_id
        made, refused = [], 0
        for _ in range(6):
            try:
                made.append(
                    stub.CreateSession(pb.CreateSessionRequest(), metadata=bearer(alice), timeout=10).session_id
                )
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
        assert len(made) == 3 and refused == 3
        assert stub.GetSession(pb.GetSessionRequest(session_id=mine), metadata=bearer(bob), timeout=10)
        for sid in made:  # released: alice can create again
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=bearer(alice), timeout=10)
        stub.CreateSession(pb.CreateSessionRequest(), metadata=bearer(alice), timeout=10)


# --- limits ----------------------------------------------------------------------------------------------------


def _open_silent_stream(stub, key: str, hold: threading.Event):
    """A stream that sends its config, then nothing until `hold` is set."""

    def requests():
        yield pb.StreamConverseRequest(config=pb.StreamConfig(output=pb.OUTPUT_MODALITY_TEXT))
        hold.wait(30)

    return stub.StreamConverse(requests(), metadata=bearer(key), timeout=60)


def test_concurrent_stream_limit_hit_with_retry_info_and_released(secured) -> None:
    bob = secured.keys["bob"]
    with secured.channel() as ch:
        stub = secured.stub(ch)
        hold = threading.Event()
        calls = [_open_silent_stream(stub, bob, hold) for _ in range(2)]
        time.sleep(0.5)
        try:
            _ask(stub, bob)
            pytest.fail("a third concurrent call of the key was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing = dict(e.trailing_metadata() or ())
            assert int(trailing["retry-after-ms"]) > 0
            assert "grpc-status-details-bin" in trailing
        _ask(stub, secured.keys["alice"])  # another key is not affected
        hold.set()  # the clients half-close: their streams end (OK) unless the idle timeout came first
        for c in calls:
            try:
                list(c)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _ask(stub, bob)  # released


def test_idle_streams_do_not_starve_others(secured) -> None:
    """Streams that open and send nothing are closed after stream_idle_seconds with DEADLINE_EXCEEDED, freeing
    their slots; meanwhile another key keeps being served."""
    alice, bob = secured.keys["alice"], secured.keys["bob"]
    with secured.channel() as ch:
        stub = secured.stub(ch)
        hold = threading.Event()
        t0 = time.monotonic()
        calls = [_open_silent_stream(stub, bob, hold) for _ in range(2)]
        _ask(stub, alice)
        codes = []
        for c in calls:
            try:
                list(c)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        assert time.monotonic() - t0 < 15
        hold.set()
        _ask(stub, bob)


# --- mTLS ------------------------------------------------------------------------------------------------------


def test_mtls_requires_a_client_certificate_from_the_client_ca(triton, tmp_path) -> None:
    svc = Secured(triton.grpc_url, tmp_path, mtls=True)
    try:
        key = svc.keys["alice"]
        with svc.channel() as ch:  # no client certificate
            assert (
                _code(lambda: svc.stub(ch).ListVoices(pb.ListVoicesRequest(), metadata=bearer(key), timeout=10))
                == grpc.StatusCode.UNAVAILABLE
            )
        with svc.channel(svc.other_ca.issue("intruder", server=False)) as ch:  # wrong client certificate
            assert (
                _code(lambda: svc.stub(ch).ListVoices(pb.ListVoicesRequest(), metadata=bearer(key), timeout=10))
                == grpc.StatusCode.UNAVAILABLE
            )
        with svc.channel(svc.client) as ch:
            svc.stub(ch).ListVoices(pb.ListVoicesRequest(), metadata=bearer(key), timeout=10)
    finally:
        svc.proc.stop()
