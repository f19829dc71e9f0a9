"""The Qwen tokenizer from a checkpoint directory (the `tokenizers` library), and a tiny stand-in.

The tiny tokenizer is byte-level BPE with no merges (one token per byte). In the real layout its special tokens
sit at their real Qwen3 ids, so prompts built with it have the real special-token ids in the real places; the
small-vocabulary variant puts them right after the 256 byte tokens. Nothing reads ids from here: every id the
model uses comes from the checkpoint's files (`tokens.SpecialTokens`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"

# Qwen3's added tokens from <|endoftext|> on, in id order (151643 ...). The 4th (151646) is SOSP for MOSS-Speech
# and the 25th (151667) the modality pad; the last two are the MOSS additions the reference text decoder maps to
# "." / ":" (their ids in the real tokenizer are not public; the code never relies on them).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|empty|>",
    "<|end_empty|>",
]
SOSP_TOKEN, MODALITY_PAD_TOKEN = "<|object_ref_start|>", "<think>"
QWEN_FIRST_SPECIAL_ID = 151643  # the real layout's first added id: what the tiny writer reproduces


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}")
    return Tokenizer.from_file(str(file))


def write_tokenizer_config(path: Path, model_max_length: int = 40960) -> None:
    """tokenizer_config.json as Qwen ships it: eos and pad named by their text (ids come from tokenizer.json)."""
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": model_max_length,
            },
            indent=2,
        )
        + "\n"
    )


def added_token(token_id: int, content: str, special: bool = True) -> dict:
    """One `added_tokens` record of tokenizer.json: matched whole, never normalised or split."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def write_tiny_tokenizer(path: Path, first_special_id: int = QWEN_FIRST_SPECIAL_ID) -> Tokenizer:
    """Write tokenizer.json + tokenizer_config.json with the special tokens from `first_special_id` on
    (at least 256: the byte tokens come first). Returns the loaded tokenizer."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    if first_special_id < len(byte_chars):
        raise ValueError(f"first_special_id must be >= {len(byte_chars)} (the byte tokens), got {first_special_id}")
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    # Filler entries push the added tokens to their ids (tokenizers numbers them after the vocab).
    for i in range(len(vocab), first_special_id):
        vocab[f"<|reserved_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    data = json.loads(tok.to_str())
    data["added_tokens"] = [added_token(first_special_id + i, c) for i, c in enumerate(SPECIAL_TOKENS)]
    (path / TOKENIZER_FILE).write_text(json.dumps(data, ensure_ascii=False))
    write_tokenizer_config(path)
    loaded = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    for i, c in enumerate(SPECIAL_TOKENS):  # fail loudly if the library ever renumbers them
        assert loaded.token_to_id(c) == first_special_id + i, c
    return loaded
