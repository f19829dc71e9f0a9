"""Checkpoints with their own vocabularies build and serve, and stop on their own end token.

Nothing is trained: the small-vocabulary tiny checkpoint (and the demo recipe's initial checkpoint) are steered
(`steer_to_stop`) so that greedy decoding emits EOSP at step min_new_tokens and the checkpoint's <|im_end|> right
after. Served through `build_repository` and a real tritonserver, the answer must end on that id with stop reason
"stop_token" (not max_new_tokens) and equal in-process generation row for row.
"""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pytest
from tritonharness import Stream, has_outputs, tritonserver_available

from moss_speech.builders.export.build import build_repository
from moss_speech.builders.llm.checkpoint import load_model, save_checkpoint, steer_to_stop
from moss_speech.builders.llm.generate import SamplingParams, generate
from moss_speech.builders.llm.prompt import PromptBuilder, Turn
from moss_speech.builders.llm.tokens import SpecialTokens
from moss_speech.contract.serving import ServingConfig

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not tritonserver_available(), reason="no tritonserver (triton-local extra)"),
]

MIN_NEW, MAX_NEW = 4, 40  # EOSP at step 4, the end token at step 5, far below max_new_tokens
SAMPLING = {"do_sample": False, "repetition_penalty": 1.0, "min_new_tokens": MIN_NEW, "max_new_tokens": MAX_NEW}


def steered_copy(src, dst, codec_src):
    """`src` checkpoint's files with steered weights in `dst`, the tiny codec in dst/codec."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("codec", "*.safetensors", "*.index.json"))
    tokens = SpecialTokens.from_dir(src)
    save_checkpoint(steer_to_stop(load_model(src), tokens.im_end_id, tokens.eosp_id), dst)
    shutil.copytree(codec_src, dst / "codec")
    return dst


def serve(ckpt, out):
    from moss_speech.model_repository.launcher import TritonServer

    build_repository(
        ckpt,
        ckpt / "codec",
        "cpu",
        out,
        ServingConfig.for_target("cpu", max_slots=2, max_context=256, vocoder_instances=1),
        progress=False,
    )
    srv = TritonServer(out, http_port=None, grpc_port=None, metrics_port=None, ready_timeout=300)
    srv.start()
    return srv


def ask_text(srv, text: str, output: str) -> dict:
    """One t2s turn: every streamed row, the usage of the final response."""
    inputs = {
        "TEXT": np.array([[text.encode()]], dtype=object),
        "OUTPUT_MODALITY": np.array([[output.encode()]], dtype=object),
        "SAMPLING": np.array([[json.dumps(SAMPLING).encode()]], dtype=object),
    }
    stream = Stream(srv.grpc_url)
    try:
        rid = uuid.uuid4().hex
        stream.send("t2s", inputs, request_id=rid, parameters={"request_id": rid})
        results = [r for r in stream.collect(180) if has_outputs(r)]
    finally:
        stream.close()
    rows, usage, samples = [], None, 0
    for r in results:
        rows += r.as_numpy("ROWS").reshape(-1, 2).tolist()
        samples += r.as_numpy("AUDIO_CHUNK").size
        raw = r.as_numpy("USAGE").reshape(-1)[0]
        if raw:
            usage = json.loads(raw)
    return {"rows": rows, "usage": usage, "samples": samples}


def check_stops_on_its_end_token(srv, ckpt, question: str):
    model = load_model(ckpt)
    builder = PromptBuilder.from_dir(ckpt, model.config)
    tokens = builder.tokens
    for output, steps in (("speech", MIN_NEW + 1), ("text", 1)):
        got = ask_text(srv, question, output)
        assert got["usage"]["stop_reason"] == "stop_token", got["usage"]
        assert got["usage"]["generated_tokens"] == steps < MAX_NEW
        assert got["rows"][-1][0] == tokens.im_end_id
        prompt = builder.continue_conversation(None, Turn("user", text=question), output)
        ref = generate(model, [prompt], SamplingParams.greedy(min_new_tokens=MIN_NEW, max_new_tokens=MAX_NEW), tokens)[
            0
        ]
        assert got["rows"] == ref.rows.tolist()  # token-identical to in-process
        if output == "speech":
            assert got["rows"][-2][1] == tokens.eosp_id
            assert got["samples"] == 1920 * len(ref.speech_codes) > 0  # the codes before EOSP were spoken


@pytest.fixture(scope="module")
def small_served(tiny_small_bundle, tmp_path_factory):
    ckpt = steered_copy(
        tiny_small_bundle, tmp_path_factory.mktemp("small-steered") / "ckpt", tiny_small_bundle / "codec"
    )
    srv = serve(ckpt, tmp_path_factory.mktemp("small-repo"))
    yield srv, ckpt
    srv.stop()


def test_small_vocabulary_checkpoint_stops_on_its_end_token_when_served(small_served):
    srv, ckpt = small_served
    tokens = SpecialTokens.from_dir(ckpt)
    assert tokens.im_end_id == 258 and 151645 not in tokens.stop_ids  # its own id, not Qwen's
    check_stops_on_its_end_token(srv, ckpt, "hello there")


@pytest.fixture(scope="module")
def demo_served(tiny_small_bundle, tmp_path_factory):
    """The checkpoint `moss-speech train --recipe demo` starts from (and copies into every stage checkpoint)."""
    from moss_speech.builders.training.demo import write_demo_checkpoint

    init = tmp_path_factory.mktemp("demo") / "init"
    write_demo_checkpoint(init, seed=0)
    ckpt = steered_copy(init, tmp_path_factory.mktemp("demo-steered") / "ckpt", tiny_small_bundle / "codec")
    srv = serve(ckpt, tmp_path_factory.mktemp("demo-repo"))
    yield srv, ckpt
    srv.stop()


def test_demo_recipe_checkpoint_builds_and_stops_on_its_end_token_when_served(demo_served):
    srv, ckpt = demo_served
    tokens = SpecialTokens.from_dir(ckpt)
    assert tokens.sosp_id < 100 and tokens.modality_pad_id < 100  # the demo's word vocabulary (sosp 62, pad 83)
    check_stops_on_its_end_token(srv, ckpt, "what is the color of anna")
