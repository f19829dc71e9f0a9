# Sourced by the GPU-machine scripts (gpu_session.sh, gpu_serving.sh): install carried wheels into /tmp/site and
# make `moss_speech` importable without installing the project, from the folder mapping setup.py declares.
# Usage: source bench/gpu_env.sh [WHEELS_DIR]
if [ -n "${1:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$1"/*.whl || exit 1
fi
mkdir -p /tmp/pkg/moss_speech && touch /tmp/pkg/moss_speech/__init__.py
python3 - <<'PY' || exit 1
import ast, os
tree = ast.parse(open("setup.py").read())
folders = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "FOLDERS")
for folder, name in folders.items():
    link = os.path.join("/tmp/pkg", *name.split("."))  # moss_speech.<sub> -> ./<folder>
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(folder), link)
PY
export PYTHONPATH=/tmp/site:/tmp/pkg:$PWD PYTHONUNBUFFERED=1
