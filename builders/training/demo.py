"""`moss-speech train --recipe demo`: the frozen recipe at toy scale, on CPU in minutes.

1. A synthetic fact task: people x relations -> values ("what is the color of anna" -> "red"). A tiny split model
   (word-level vocabulary, real special tokens, real checkpoint layout) learns every fact from text only.
2. The questions are spoken with espeak-ng (several speeds/pitches) and encoded by the tiny codec's speech encoder.
   The tiny codec has random weights, so its codes are a deterministic but arbitrary function of the audio
   (and a coarse one: it uses few distinct codes; the report gives how many questions stay distinguishable).
3. Speech training (the default recipe: stage 1 "frozen", stage 2 "joint") sees spoken questions for only part
   of the facts; for each person one relation is held out, so every name and relation word is heard, but the
   held-out combinations only ever appeared in text. The same budget is spent on an unfrozen baseline.
4. Report: text accuracy before/after, accuracy of text answers to held-out spoken questions (transfer), and
   the same for the baseline.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from moss_speech.builders.config import MossSpeechConfig
from moss_speech.builders.llm.checkpoint import init_random, load_model, save_checkpoint, write_generation_config
from moss_speech.builders.llm.generate import SamplingParams, generate
from moss_speech.builders.llm.model import MossSpeechForCausalLM
from moss_speech.builders.llm.prompt import DEFAULT_SYSTEM_PROMPTS, PromptBuilder, Turn
from moss_speech.builders.llm.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    added_token,
    write_tokenizer_config,
)
from moss_speech.builders.llm.tokens import SpecialTokens
from moss_speech.builders.training.config import GROUPS, TEXT_GROUPS, StageConfig, TrainConfig, default_stages
from moss_speech.builders.training.data import Sample, make_sample
from moss_speech.builders.training.freeze import checksums
from moss_speech.builders.training.trainer import Trainer

PEOPLE = [
    "anna",
    "bruno",
    "carla",
    "dmitri",
    "elena",
    "felix",
    "greta",
    "hugo",
    "irene",
    "jonas",
    "kevin",
    "lara",
    "marco",
    "nina",
    "oscar",
    "paula",
]
RELATIONS = {
    "color": ["red", "green", "blue", "yellow", "purple", "orange"],
    "city": ["paris", "london", "tokyo", "cairo", "lima", "oslo"],
    "pet": ["dog", "cat", "horse", "snake", "rabbit", "parrot"],
}
REPEAT_PROMPT = "repeat what you hear ."
TRAIN_VOICES = [(130, 40), (155, 50), (180, 60)]  # espeak-ng (words per minute, pitch) renderings for training
EVAL_VOICE = (145, 55)  # a rendering never used in training


def question(person: str, relation: str) -> str:
    return f"what is the {relation} of {person}"


def make_facts(seed: int) -> dict[tuple[str, str], str]:
    rng = random.Random(seed)
    return {(p, r): rng.choice(vals) for p in PEOPLE for r, vals in RELATIONS.items()}


def held_out(facts) -> set[tuple[str, str]]:
    """One relation per person, rotating: every name and every relation word is still heard in training."""
    rels = list(RELATIONS)
    return {(p, rels[i % len(rels)]) for i, p in enumerate(PEOPLE)}


# ---- toy tokenizer and model ------------------------------------------------------------------------------
def write_word_tokenizer(path: Path) -> Tokenizer:
    """Word-level tokenizer: every word of the task and the system prompts, "\\n" and punctuation, then the
    Qwen special tokens in their real order (so SOSP, <|im_end|>, ... keep their relative layout)."""
    words = set(PEOPLE) | set(RELATIONS) | {v for vals in RELATIONS.values() for v in vals}
    for text in (*DEFAULT_SYSTEM_PROMPTS.values(), question("x", "y"), REPEAT_PROMPT, "system user assistant"):
        words |= {w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)}
    words -= {"x", "y"}
    vocab = {"[UNK]": 0, "\n": 1}
    for w in sorted(words):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    data = json.loads(tok.to_str())
    first = len(vocab)
    added = ["\n", *SPECIAL_TOKENS]
    data["added_tokens"] = [added_token(vocab["\n"], "\n", special=False)]
    data["added_tokens"] += [added_token(first + i, c) for i, c in enumerate(added[1:])]
    data["model"]["vocab"].update({c: first + i for i, c in enumerate(added[1:])})
    path.mkdir(parents=True, exist_ok=True)
    (path / TOKENIZER_FILE).write_text(json.dumps(data))
    tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    assert tok.encode("<|im_start|>user\nwhat is the color of anna<|im_end|>\n").ids[-1] == 1
    return tok


def toy_config(tok: Tokenizer) -> MossSpeechConfig:
    """Real layout and audio vocabulary; a small text vocabulary with the special ids inside it."""
    sid = tok.token_to_id
    vocab = (tok.get_vocab_size() + 7) // 8 * 8
    return MossSpeechConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_shared_layers=3,
        num_modality_layers=1,
        num_hidden_layers=4,
        max_window_layers=4,
        max_position_embeddings=512,
        bos_token_id=sid("<|endoftext|>"),
        eos_token_id=sid("<|im_end|>"),
        sosp_token_id=sid("<|object_ref_start|>"),
        modality_pad_token_id=sid("<think>"),
    )


def write_demo_checkpoint(path: Path, seed: int = 0) -> tuple[PromptBuilder, MossSpeechForCausalLM]:
    """The demo's initial checkpoint, complete in the fnlp layout: the word-level tokenizer (tokenizer.json,
    tokenizer_config.json), config.json and generation_config.json naming that tokenizer's ids, random fp32
    weights. Every stage checkpoint the trainer writes carries these files, so each one builds and serves."""
    tok = write_word_tokenizer(path)
    cfg = toy_config(tok)
    model = init_random(MossSpeechForCausalLM(cfg), seed)
    save_checkpoint(model, path, dtype=torch.float32)
    write_tokenizer_config(path, cfg.max_position_embeddings)
    write_generation_config(
        path,
        cfg,
        stop_ids=[tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")],
        pad_id=tok.token_to_id("<|endoftext|>"),
    )
    return PromptBuilder(tok, cfg, SpecialTokens.from_dir(path, cfg, tok)), model


# ---- speech --------------------------------------------------------------------------------------------------
class Speaker:
    """espeak-ng -> tiny codec speech encoder -> codes, cached per (text, voice)."""

    def __init__(self, codec_dir: Path):
        from moss_speech.builders.codec.codec import SpeechCodec

        self.codec = SpeechCodec(codec_dir)
        self.cache: dict[tuple[str, tuple[int, int]], list[int]] = {}

    def codes(self, text: str, voice: tuple[int, int]) -> list[int]:
        key = (text, voice)
        if key not in self.cache:
            wav = subprocess.run(
                ["espeak-ng", "--stdout", "-s", str(voice[0]), "-p", str(voice[1]), text],
                capture_output=True,
                check=True,
            ).stdout
            audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
            self.cache[key] = [int(c) for c in self.codec.encode(audio, sr)]
        return self.cache[key]


# ---- data ----------------------------------------------------------------------------------------------------
def build_data(builder: PromptBuilder, speaker: Speaker, facts, held) -> dict[str, list[Sample]]:
    text = [make_sample(builder, [Turn("user", text=question(p, r))], answer_text=v) for (p, r), v in facts.items()]
    speech = []
    for (p, r), v in facts.items():
        if (p, r) in held:
            continue
        for voice in TRAIN_VOICES:  # s2t: spoken question -> text answer
            speech.append(
                make_sample(builder, [Turn("user", codes=speaker.codes(question(p, r), voice))], answer_text=v)
            )
        # t2s: text question -> spoken answer (trains the audio tail; one voice)
        speech.append(
            make_sample(builder, [Turn("user", text=question(p, r))], answer_codes=speaker.codes(v, TRAIN_VOICES[1]))
        )
    # "repeat": single spoken words -> the word in text (alignment data, no facts in it)
    words = PEOPLE + list(RELATIONS) + [v for vals in RELATIONS.values() for v in vals]
    for w in words:
        for voice in TRAIN_VOICES:
            speech.append(
                make_sample(
                    builder, [Turn("user", codes=speaker.codes(w, voice))], answer_text=w, system_prompt=REPEAT_PROMPT
                )
            )
    return {"text": text, "speech": speech}


# ---- evaluation ----------------------------------------------------------------------------------------------
def answers(model, builder, turns: list[Turn]) -> list[str]:
    """Greedy first answer word for each prompt: argmax of the text head at the prompt's last row, which is what
    `generate(..., SamplingParams.greedy())` emits at step 1 (checked on the first prompt). All prompts run as
    one packed forward (block-diagonal attention), which keeps evaluation cheap on a busy CPU."""
    from moss_speech.builders.training.data import IGNORE, Sample, pack
    from moss_speech.builders.training.trainer import packed_hidden

    prompts = [builder.build([t], "text") for t in turns]
    fake = [Sample(p, 1, 0) for p in prompts]  # no targets: only grid/positions/doc are used
    seq_len = sum(p.shape[0] for p in prompts)
    batch = pack(fake, seq_len, model.config.modality_pad_token_id, (model.config.bos_token_id, 0))[0]
    assert (batch.text_targets == IGNORE).all()
    text_h, _ = packed_hidden(model, batch.grid, batch.positions, batch.doc, audio_tail=False)
    ends = torch.tensor([p.shape[0] for p in prompts]).cumsum(0) - 1
    ids = model.text_lm_head(text_h[0, ends]).argmax(-1).tolist()
    first = generate(model, [prompts[0]], SamplingParams.greedy(max_new_tokens=1), builder.tokens)[0].text_tokens[0]
    assert first == ids[0], "packed evaluation disagrees with generate()"
    return [builder.tokenizer.id_to_token(i) for i in ids]


@torch.no_grad()
def evaluate(model, builder, speaker, facts, held) -> dict[str, float]:
    model.eval()
    keys = list(facts)
    text = answers(model, builder, [Turn("user", text=question(p, r)) for p, r in keys])
    spoken = answers(model, builder, [Turn("user", codes=speaker.codes(question(p, r), EVAL_VOICE)) for p, r in keys])
    ok_text = [a == facts[k] for a, k in zip(text, keys, strict=True)]
    ok_held = [a == facts[k] for a, k in zip(spoken, keys, strict=True) if k in held]
    ok_seen = [a == facts[k] for a, k in zip(spoken, keys, strict=True) if k not in held]
    return {
        "text": float(np.mean(ok_text)),
        "spoken_held_out": float(np.mean(ok_held)),
        "spoken_trained": float(np.mean(ok_seen)),
    }


def distinguishable(speaker, facts, held) -> float:
    """Share of held-out spoken questions (eval rendering) whose codes no question with another answer shares:
    an upper bound on what any model can get from this codec's codes."""
    seqs: dict[tuple, set[str]] = {}
    for (p, r), v in facts.items():
        seqs.setdefault(tuple(speaker.codes(question(p, r), EVAL_VOICE)), set()).add(v)
    return float(np.mean([len(seqs[tuple(speaker.codes(question(p, r), EVAL_VOICE))]) == 1 for p, r in held]))


# ---- the experiment -----------------------------------------------------------------------------------------
def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict:
    t_start = time.time()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scale = 0.1 if quick else 1.0
    n = lambda steps: max(2, int(steps * scale))  # noqa: E731

    from moss_speech.builders.codec.tiny import write_tiny_codec

    codec_dir = out / "codec"
    if not (codec_dir / "config.json").is_file():
        write_tiny_codec(codec_dir, seed=seed)
    base = out / "init"
    builder, model = write_demo_checkpoint(base, seed)
    cfg = model.config
    speaker = Speaker(codec_dir)
    facts = make_facts(seed)
    held = held_out(facts)
    data = build_data(builder, speaker, facts, held)
    print(
        f"toy model: vocab {cfg.vocab_size} (special ids {cfg.sosp_token_id}=SOSP, "
        f"{cfg.modality_pad_token_id}=pad), audio vocab {cfg.audio_vocab_size}, hidden {cfg.hidden_size}, "
        f"{cfg.num_shared_layers}+{cfg.num_modality_layers} layers; {len(facts)} facts, {len(held)} held out "
        f"from speech; samples: text {len(data['text'])}, speech {len(data['speech'])}"
    )
    ceiling = distinguishable(speaker, facts, held)
    print(f"held-out spoken questions distinguishable by their codes: {ceiling:.0%}")
    srcs = {"speech": {"path": "-"}, "text": {"path": "-"}}
    results: dict = {"distinguishable_held_out": ceiling}

    # 1. Text pretraining: the "pretrained text LLM" (text groups only; audio groups stay at their init).
    pre = StageConfig(
        name="text-pretrain",
        steps=n(300),
        train={g: 1e-2 for g in TEXT_GROUPS},
        data={"text": 1.0},
        batch_size=4,
        seq_len=128,
        warmup_steps=20,
    )
    pre_cfg = TrainConfig(init=base, out=out / "pretrain", data=srcs, stages=[pre], log_every=50, seed=seed)
    Trainer(model, pre_cfg, data).run()
    pretrained = out / "pretrain" / "1-text-pretrain"
    results["pretrained"] = evaluate(load_model(pretrained), builder, speaker, facts, held)
    print(f"pretrained text model: {results['pretrained']}")

    # 2. The recipe and 3. the unfrozen baseline, same stages / data / steps.
    recipe = [
        s.model_copy(update={"batch_size": 4, "seq_len": 128})
        for s in default_stages(audio_lr=1e-2, text_lr=1e-3, steps=(n(150), n(100)))
    ]
    baseline = [s.model_copy(update={"name": f"unfrozen-{s.name}", "train": {g: 1e-2 for g in GROUPS}}) for s in recipe]
    for name, stages in (("recipe", recipe), ("baseline", baseline)):
        run_cfg = TrainConfig(init=pretrained, out=out / name, data=srcs, stages=stages, log_every=50, seed=seed)
        model = load_model(pretrained)
        text_sums = checksums(model, list(TEXT_GROUPS))
        per_stage = {}

        def on_stage_end(i, stage, m, per_stage=per_stage, text_sums=text_sums):
            scores = evaluate(m, builder, speaker, facts, held)
            scores["text_weights_unchanged"] = checksums(m, list(TEXT_GROUPS)) == text_sums
            per_stage[stage.name] = scores
            print(f"{stage.name}: {scores}")

        Trainer(model, run_cfg, data, on_stage_end=on_stage_end).run()
        results[name] = per_stage
    results["seconds"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return results


def results_table(r: dict) -> str:
    rows = [("pretrained text model (before speech)", r["pretrained"], "-")]
    for name in ("recipe", "baseline"):
        for stage, s in r[name].items():
            rows.append((f"{name}: after {stage}", s, "yes" if s["text_weights_unchanged"] else "no"))
    lines = [
        "| model | text QA acc | spoken held-out acc | spoken trained-fact acc | text weights unchanged |",
        "|---|---|---|---|---|",
    ]
    for label, s, same in rows:
        lines.append(f"| {label} | {s['text']:.0%} | {s['spoken_held_out']:.0%} | {s['spoken_trained']:.0%} | {same} |")
    lines.append(
        f"\nheld-out spoken questions distinguishable by their codes (ceiling): "
        f"{r['distinguishable_held_out']:.0%}; run time {r['seconds']} s"
    )
    return "\n".join(lines)
