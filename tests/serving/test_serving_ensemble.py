"""The streaming speech-to-speech ensemble on a real tritonserver: token-identical to in-process generation,
audio equal to the in-process streamed decode, concurrency, cancellation, errors and metrics."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from tritonharness import Stream, has_outputs, metric

from moss_speech.builders.llm.generate import SamplingParams, generate
from moss_speech.builders.llm.model import MossSpeechForCausalLM
from moss_speech.builders.llm.prompt import PromptBuilder, Turn
from moss_speech.contract.serving import ServingConfig
from moss_speech.model_repository.runtime.factory import load_codec_runtime
from moss_speech.model_repository.runtime.scheduler import Engine, Request
from moss_speech.model_repository.runtime.torch_llm import TorchLLMRuntime

pytestmark = pytest.mark.slow  # a real tritonserver (and service)
GREEDY = {"do_sample": False, "repetition_penalty": 1.0}


def speech(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds), dtype=np.float32) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def s2s_inputs(audio, sampling, output="speech", history=None):
    inputs = {
        "AUDIO": audio[None],
        "SAMPLING": np.array([[json.dumps(sampling).encode()]], dtype=object),
        "OUTPUT_MODALITY": np.array([[output.encode()]], dtype=object),
    }
    if history is not None:
        inputs["HISTORY"] = history[None].astype(np.int64)
    return inputs


def turn(results) -> dict:
    """Assemble one streamed answer: rows, text tokens, audio ordered by chunk sequence, usage, history rows."""
    rows, text, chunks, usage, turn_rows = [], [], {}, None, None
    results = [r for r in results if has_outputs(r)]
    assert [int(r.as_numpy("SEQ").reshape(-1)[0]) for r in results] == list(range(len(results))), "out of order"
    for r in results:
        rows += r.as_numpy("ROWS").reshape(-1, 2).tolist()
        text += r.as_numpy("TEXT_TOKENS").reshape(-1).tolist()
        seq = int(r.as_numpy("AUDIO_SEQ").reshape(-1)[0])
        if seq >= 0:
            assert seq not in chunks
            chunks[seq] = r.as_numpy("AUDIO_CHUNK").reshape(-1)
        raw = r.as_numpy("USAGE").reshape(-1)[0]
        if raw:
            usage = json.loads(raw)
            turn_rows = r.as_numpy("TURN_ROWS").reshape(-1, 2)
    assert sorted(chunks) == list(range(len(chunks))), "audio chunks have gaps"
    audio = np.concatenate([chunks[i] for i in range(len(chunks))]) if chunks else np.zeros(0, np.float32)
    return {"rows": rows, "text": text, "audio": audio, "usage": usage, "turn_rows": turn_rows}


def ask(srv, inputs, model="s2s", timeout=120):
    stream = Stream(srv.grpc_url)
    try:
        rid = uuid.uuid4().hex
        stream.send(model, inputs, request_id=rid, parameters={"request_id": rid})
        return turn(stream.collect(timeout))
    finally:
        stream.close()


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """In-process pieces with the same artifacts the server uses."""
    model = MossSpeechForCausalLM.from_pretrained(tiny_bundle)
    return {"model": model, "prompts": PromptBuilder.from_dir(tiny_bundle, model.config)}


def in_process(reference, codec, codes, params, output="speech"):
    """The in-process answer: generation through the same engine rules, windows decoded by the same codec."""
    engine = Engine(TorchLLMRuntime(reference["model"], max_slots=1, max_context=1024), reference["prompts"])
    updates = []
    engine.submit(Request("x", Turn("user", codes=codes), output, params=params), updates.append)
    while not (updates and updates[-1].final):
        engine.step()
    windows = [w for u in updates for w in u.windows]
    pcm = codec.decode_windows(windows)
    return {
        "rows": [list(r) for u in updates for r in u.rows],
        "audio": np.concatenate(pcm) if pcm else np.zeros(0, np.float32),
    }


@pytest.fixture(scope="module")
def codec(cpu_repo, tiny_bundle):
    from moss_speech.builders.export.build import codec_graphs_dir

    serving = ServingConfig.model_validate(json.loads((cpu_repo / "manifest.json").read_text())["serving"])
    return load_codec_runtime(serving, tiny_bundle / "codec", codec_graphs_dir(cpu_repo))  # every codec graph


def test_every_model_is_ready(served):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(served.grpc_url)
    for name in ("speech_encoder", "llm", "vocoder", "s2s", "t2s"):
        assert client.is_model_ready(name), name


def test_speech_to_speech_matches_in_process(served, reference, codec):
    audio = speech(1.5, 220)
    params = SamplingParams.greedy(max_new_tokens=24)
    got = ask(served, s2s_inputs(audio, GREEDY | {"max_new_tokens": 24}))
    codes = codec.encode_pcm([audio])[0].tolist()  # the served user turn is checked through turn_rows below
    prompt = reference["prompts"].continue_conversation(None, Turn("user", codes=codes), "speech")
    ref = generate(reference["model"], [prompt], params)[0]
    assert got["rows"] == ref.rows.tolist()  # token-identical
    assert got["usage"]["prompt_tokens"] == prompt.shape[0]
    want = in_process(reference, codec, codes, params)
    assert got["rows"] == want["rows"]
    assert got["audio"].shape == want["audio"].shape and got["audio"].size == 1920 * len(ref.speech_codes)
    np.testing.assert_allclose(got["audio"], want["audio"], atol=1e-4)
    # the history rows are exactly the user turn + the assistant turn the prompt builder makes
    expected = reference["prompts"].exchange_rows(Turn("user", codes=codes), "speech", ref.rows)
    assert got["turn_rows"].tolist() == expected.tolist()


def test_four_concurrent_streams_each_equal_their_solo_result(served):
    cases = [(speech(0.6 + 0.3 * i, 150 + 70 * i), 10 + 3 * i) for i in range(4)]
    solo = [ask(served, s2s_inputs(a, GREEDY | {"max_new_tokens": n})) for a, n in cases]
    together: list = [None] * 4

    def run(i):
        a, n = cases[i]
        together[i] = ask(served, s2s_inputs(a, GREEDY | {"max_new_tokens": n}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for s, t in zip(solo, together, strict=True):
        assert t is not None and t["rows"] == s["rows"]
        np.testing.assert_allclose(t["audio"], s["audio"], atol=1e-4)


def test_text_in_text_out(served, reference):
    inputs = {
        "TEXT": np.array([[b"What is the capital of France?"]], dtype=object),
        "OUTPUT_MODALITY": np.array([[b"text"]], dtype=object),
        "SAMPLING": np.array([[json.dumps(GREEDY | {"max_new_tokens": 12}).encode()]], dtype=object),
    }
    got = ask(served, inputs, model="t2s")
    prompt = reference["prompts"].continue_conversation(
        None, Turn("user", text="What is the capital of France?"), "text"
    )
    ref = generate(reference["model"], [prompt], SamplingParams.greedy(max_new_tokens=12))[0]
    assert got["rows"] == ref.rows.tolist()
    assert got["text"] == ref.text_tokens


def test_history_continues_the_conversation(served, reference, codec):
    first = ask(served, s2s_inputs(speech(0.8, 300), GREEDY | {"max_new_tokens": 8}))
    second = ask(served, s2s_inputs(speech(0.5, 500), GREEDY | {"max_new_tokens": 8}, history=first["turn_rows"]))
    codes = codec.encode_pcm([speech(0.5, 500)])[0].tolist()
    prompt = reference["prompts"].continue_conversation(
        torch.tensor(first["turn_rows"]), Turn("user", codes=codes), "speech"
    )
    assert second["usage"]["prompt_tokens"] == prompt.shape[0]
    ref = generate(reference["model"], [prompt], SamplingParams.greedy(max_new_tokens=8))[0]
    assert second["rows"] == ref.rows.tolist()


def active_sequences(srv) -> float | None:
    return metric(srv.metrics(), "moss_speech_llm_active_sequences")


def test_cancellation_stops_generation_and_frees_the_slot(served):
    rid = uuid.uuid4().hex
    stream = Stream(served.grpc_url)
    # long enough to run for tens of seconds if nothing stopped it
    stream.send(
        "s2s",
        s2s_inputs(speech(0.5, 200), GREEDY | {"max_new_tokens": 900}),
        request_id=rid,
        parameters={"request_id": rid},
    )
    result, error = stream.next(timeout=60)
    assert error is None
    assert active_sequences(served) == 1
    t0 = time.monotonic()
    stream.close(cancel=True)
    control = Stream(served.grpc_url)
    control.send("llm", {"CANCEL_REQUEST_ID": np.array([[rid.encode()]], dtype=object)})
    control.collect(timeout=30)
    control.close()
    while active_sequences(served) != 0:
        assert time.monotonic() - t0 < 10, "the KV slot was not freed after the cancel"
        time.sleep(0.1)
    # and the server keeps serving
    assert ask(served, s2s_inputs(speech(0.5, 250), GREEDY | {"max_new_tokens": 4}))["usage"]["generated_tokens"] == 4


@pytest.mark.parametrize(
    "inputs,match",
    [
        (lambda: s2s_inputs(np.zeros(0, np.float32), GREEDY), "AUDIO is empty"),
        (lambda: s2s_inputs(np.full(1600, np.nan, np.float32), GREEDY), "NaN"),
        (lambda: s2s_inputs(speech(0.5, 200), {"temperature": -1}), "temperature"),
        (lambda: s2s_inputs(speech(0.5, 200), {"bogus": 1}), "bogus"),
        (lambda: s2s_inputs(speech(0.5, 200), GREEDY, output="video"), "output modality"),
        (lambda: s2s_inputs(speech(0.5, 200), GREEDY, history=np.full((1200, 2), 100)), "1024 tokens"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served, inputs, match):
    stream = Stream(served.grpc_url)
    try:
        stream.send("s2s", inputs())
        with pytest.raises(RuntimeError, match=match):
            stream.collect(timeout=60)
    finally:
        stream.close()
    assert ask(served, s2s_inputs(speech(0.4, 250), GREEDY | {"max_new_tokens": 3}))["usage"]["generated_tokens"] == 3


def test_triton_metrics_count_the_requests(served):
    before = metric(served.metrics(), "nv_inference_request_success", model="s2s") or 0
    ask(served, s2s_inputs(speech(0.4, 350), GREEDY | {"max_new_tokens": 3}))
    text = served.metrics()
    assert metric(text, "nv_inference_request_success", model="s2s") == before + 1
    assert metric(text, "nv_inference_request_success", model="vocoder") >= 1
    assert metric(text, "nv_inference_count", model="speech_encoder") >= 1


def test_chart_metric_names_exist_on_the_running_server(served):
    """The Triton metric names the chart's autoscaling and dashboards use are what this tritonserver exports
    (GPU metrics only exist on GPU servers)."""
    from moss_speech.services.metrics import TRITON_GPU_MEMORY_USED_BYTES, TRITON_GPU_UTILIZATION, TRITON_METRICS

    exported = {line.split()[2] for line in served.metrics().splitlines() if line.startswith("# TYPE ")}
    expected = TRITON_METRICS - {TRITON_GPU_UTILIZATION, TRITON_GPU_MEMORY_USED_BYTES}
    assert expected <= exported, sorted(expected - exported)
