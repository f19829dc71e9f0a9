"""The service imports no torch and no model code (unit tier: one interpreter start, about a second)."""

import subprocess
import sys

FORBIDDEN = ("torch", "moss_speech.builders.llm", "moss_speech.builders.codec", "moss_speech.model_repository.runtime")


def imported_modules(statement: str) -> list[str]:
    """Every module `statement` imports, as `python -X importtime` reports them (stderr, one per line)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, check=True
    )
    lines = [line for line in run.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    return [line.rsplit("|", 1)[1].strip() for line in lines[1:]]  # the first line is the header


def test_importtime_lists_what_it_imports():
    # guards the parser: what a statement imports is seen, nested imports included
    loaded = imported_modules("import moss_speech.contract.sampling")
    assert {"moss_speech.contract.sampling", "pydantic", "pydantic_core"} <= set(loaded)


def test_service_imports_no_torch_and_no_model_code():
    loaded = imported_modules("import moss_speech.services.server")
    assert "moss_speech.services.server" in loaded
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"`import moss_speech.services.server` loads {bad[:10]}"
