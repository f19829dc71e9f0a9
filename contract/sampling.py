"""Sampling parameters: the one definition of their names, defaults and limits.

Converted once at each edge: proto `Sampling` <-> `SamplingParams` in the service, `SamplingParams` <-> the
`SAMPLING` tensor (its JSON, `to_json` / `from_json`) in the service's Triton client and the `llm` adapter.
The service's settings and the `generate` CLI take their defaults and limits from `FIELDS`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# name -> (default, limits, meaning). Defaults are the reference demo's.
FIELDS: dict[str, tuple[Any, dict[str, Any], str]] = {
    "do_sample": (True, {}, "sample; false = greedy (argmax, ties go to the lowest index)"),
    "temperature": (0.6, {"ge": 0.0, "le": 10.0}, "logits are divided by it before top-k / top-p; 0 = greedy"),
    "top_p": (0.95, {"gt": 0.0, "le": 1.0}, "nucleus mass kept after top-k (1 = off)"),
    "top_k": (20, {"ge": 0}, "candidates kept, ties at the k-th value included (0 = off)"),
    "repetition_penalty": (
        1.1,
        {"gt": 0.0, "le": 10.0},
        "per channel over its whole history, prompt included (1 = none)",
    ),
    "max_new_tokens": (500, {"ge": 1}, "cap on generated steps (rows)"),
    "min_new_tokens": (0, {"ge": 0}, "steps before the end of speech may be sampled"),
    "seed": (None, {"ge": 0, "lt": 2**63}, "random seed of the sampler (unset = random)"),
}


def sampling_field(name: str, description: str | None = None) -> Any:
    """A pydantic Field with the contract's default and limits for `name` (for schemas that repeat a field)."""
    default, limits, meaning = FIELDS[name]
    return Field(default, description=description or meaning, **limits)


class SamplingParams(BaseModel):
    """How one sequence is sampled: temperature -> top-k -> top-p, or greedy."""

    model_config = ConfigDict(extra="forbid")

    do_sample: bool = sampling_field("do_sample")
    temperature: float = sampling_field("temperature")
    top_p: float = sampling_field("top_p")
    top_k: int = sampling_field("top_k")
    repetition_penalty: float = sampling_field("repetition_penalty")
    max_new_tokens: int = sampling_field("max_new_tokens")
    min_new_tokens: int = sampling_field("min_new_tokens")
    seed: int | None = sampling_field("seed")

    @model_validator(mode="after")
    def _temperature_zero_is_greedy(self) -> SamplingParams:
        if self.temperature == 0:
            if self.do_sample and "do_sample" in self.model_fields_set:
                raise ValueError("temperature 0 means greedy; sampling (do_sample=true) needs temperature > 0")
            self.do_sample = False
        return self

    @classmethod
    def greedy(cls, **kw: Any) -> SamplingParams:
        return cls(**{"do_sample": False, "repetition_penalty": 1.0, **kw})

    # --- the SAMPLING tensor -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str | None) -> SamplingParams:
        """Missing or empty -> all defaults; unknown fields and values out of limits raise ValidationError."""
        return cls.model_validate_json(text or "{}")
