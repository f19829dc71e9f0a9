"""The named window that replaces WINDOW_META's index list: explicit fields, explicit (de)serialisation."""

from dataclasses import fields

import numpy as np
import pytest

from moss_speech.contract import tensors as T
from moss_speech.contract.window import META_FIELDS, Window


def test_meta_fields_are_the_first_window_fields_in_wire_order():
    names = [f.name for f in fields(Window)]
    assert tuple(names[: len(META_FIELDS)]) == META_FIELDS
    # The wire order the llm and vocoder adapters shipped with (a change here breaks running repositories).
    assert META_FIELDS == (
        "n_context",
        "n_chunk",
        "first_position",
        "finalize",
        "chunk_index",
        "has_window",
        "response_index",
    )
    assert T.WINDOW_META.dims == (len(META_FIELDS),)


def test_window_round_trips_through_tensors():
    w = Window(
        n_context=20,
        n_chunk=5,
        first_position=37,
        finalize=True,
        chunk_index=4,
        has_window=True,
        response_index=9,
        tokens=tuple(range(25)),
        voice_id="alice",
    )
    arrays = w.to_tensors()
    assert set(arrays) == {T.WINDOW_TOKENS.name, T.WINDOW_META.name, T.VOICE_ID.name}
    assert arrays[T.WINDOW_META.name].tolist() == [[20, 5, 37, 1, 4, 1, 9]]
    for spec in (T.WINDOW_TOKENS, T.WINDOW_META, T.VOICE_ID):
        assert arrays[spec.name].dtype == spec.numpy_dtype
        assert arrays[spec.name].ndim == len(spec.dims) + 1  # batch dimension of one
    voice = arrays[T.VOICE_ID.name].reshape(-1)[0].decode()
    assert Window.from_tensors(arrays[T.WINDOW_TOKENS.name], arrays[T.WINDOW_META.name], voice) == w


def test_response_without_a_window():
    w = Window(response_index=3)
    assert w.meta() == [0, 0, 0, 0, -1, 0, 3]
    arrays = w.to_tensors()
    assert arrays[T.WINDOW_TOKENS.name].shape == (1, 0)
    back = Window.from_tensors(arrays[T.WINDOW_TOKENS.name], arrays[T.WINDOW_META.name], None)
    assert back == w and not back.has_window and back.voice_id == "default"


@pytest.mark.parametrize("size", [0, 6, 8])
def test_malformed_meta_is_a_clear_error(size):
    with pytest.raises(ValueError, match="WINDOW_META has .* expected 7"):
        Window.from_tensors(None, np.zeros((1, size), np.int64))
