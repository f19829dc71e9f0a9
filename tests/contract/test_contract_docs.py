"""docs/contracts.md carries the contract's tables as `moss_speech.contract.docs` renders them."""

from pathlib import Path

from moss_speech.contract import docs
from moss_speech.contract import tensors as T
from moss_speech.contract.window import META_FIELDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"


def test_contracts_doc_is_up_to_date():
    text = DOC.read_text()
    assert docs.with_tables(text) == text, "regenerate: python -m moss_speech.contract.docs --write docs/contracts.md"


def test_rendered_tables_name_every_tensor_window_field_and_sampling_field():
    rendered = docs.render()
    for model in (*T.PYTHON_MODELS, *T.ENSEMBLES):
        for t in (*model.inputs, *model.outputs):
            assert f"`{t.name}`" in rendered
    for name in META_FIELDS:
        assert f"`{name}`" in rendered
    assert "`max_new_tokens` | `500`" in rendered
