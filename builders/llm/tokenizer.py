"""The Qwen tokenizer from a checkpoint directory (the `tokenizers` library), and a tiny stand-in.

The tiny tokenizer is byte-level BPE with no merges (one token per byte) whose special tokens sit at their
real Qwen3 ids, so prompts built with it have the real special-token ids in the real places.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"

# Qwen3's added tokens from <|endoftext|> on, in id order (151643 ...). 151646 is SOSP for MOSS-Speech and
# 151667 the modality pad; the last two are the MOSS additions the reference text decoder maps to "." / ":"
# (their ids in the real tokenizer are not public; the code never relies on them).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>", "<|empty|>", "<|end_empty|>",
]
FIRST_SPECIAL_ID = 151643


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}")
    return Tokenizer.from_file(str(file))


def write_tiny_tokenizer(path: Path) -> None:
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    # Filler entries push the added tokens to their real ids (tokenizers numbers them after the vocab).
    for i in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[f"<|reserved_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    data = json.loads(tok.to_str())
    data["added_tokens"] = [
        {"id": FIRST_SPECIAL_ID + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, c in enumerate(SPECIAL_TOKENS)
    ]
    (path / TOKENIZER_FILE).write_text(json.dumps(data, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 40960,
    }, indent=2) + "\n")
    loaded = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    for i, c in enumerate(SPECIAL_TOKENS):  # fail loudly if the library ever renumbers them
        assert loaded.token_to_id(c) == FIRST_SPECIAL_ID + i, c
