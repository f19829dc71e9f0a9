"""Layering: the runtimes load built artifacts and never import the export side; the exporters (ONNX graphs,
TensorRT engines) import model code and never a runtime. `build.py`, which orchestrates a build, may run the served
codec runtime on the graphs it just exported (built-in voices are precomputed by the code that serves them).
Checked twice: by importing the modules in a fresh interpreter (what really gets
loaded) and by reading their source (imports inside functions, which an import alone does not run)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_DIR = ROOT / "model_repository" / "runtime"
EXPORT_DIR = ROOT / "builders" / "export"
RUNTIME_PKG = "moss_speech.model_repository.runtime"
EXPORT_PKG = "moss_speech.builders.export"


ORCHESTRATION = {"build"}  # export-side modules allowed to run a runtime


def modules(folder: Path, package: str, skip: set[str] = frozenset()) -> list[str]:
    return [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__" and p.stem not in skip]


def loaded_after_import(names: list[str]) -> list[str]:
    """Every moss_speech module a fresh interpreter holds after importing `names`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('moss_speech'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def imported_names(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file, function bodies included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.slow
def test_runtime_modules_do_not_load_the_exporter():
    names = modules(RUNTIME_DIR, RUNTIME_PKG)
    assert f"{RUNTIME_PKG}.codec_runtime" in names
    loaded = loaded_after_import(names)
    assert f"{RUNTIME_PKG}.codec_runtime" in loaded  # the check ran on what it meant to
    assert [m for m in loaded if m.startswith(EXPORT_PKG)] == []


@pytest.mark.slow
def test_export_modules_do_not_load_a_runtime():
    loaded = loaded_after_import(modules(EXPORT_DIR, EXPORT_PKG, ORCHESTRATION))
    assert f"{EXPORT_PKG}.onnx_codec" in loaded
    assert [m for m in loaded if m.startswith(RUNTIME_PKG)] == []


@pytest.mark.parametrize(
    "folder,forbidden",
    [(RUNTIME_DIR, EXPORT_PKG), (EXPORT_DIR, RUNTIME_PKG)],
    ids=["runtime-imports-no-export", "export-imports-no-runtime"],
)
def test_no_such_import_even_inside_functions(folder, forbidden):
    offenders = {
        p.name: sorted(n for n in imported_names(p) if n == forbidden or n.startswith(forbidden + "."))
        for p in sorted(folder.glob("*.py"))
        if not (folder == EXPORT_DIR and p.stem in ORCHESTRATION)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_source_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(f"def f():\n    from {EXPORT_PKG}.onnx_codec import read_manifest\n")
    assert f"{EXPORT_PKG}.onnx_codec.read_manifest" in imported_names(probe)
