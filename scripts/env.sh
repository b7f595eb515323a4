# Source me: creates (once) and activates the project's virtual environment in .venv.
# The environment is rebuilt when a requirements file changes (a stamp holds their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QGALORE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp_of() { cat "$ROOT"/requirements/*.txt "$ROOT"/setup.cfg | sha256sum | cut -c1-16; }
if [ ! -f "$VENV/.stamp" ] || [ "$(cat "$VENV/.stamp")" != "$(stamp_of)" ]; then
  echo "[env] building $VENV (torch CPU build first, then the pinned stack) ..." >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, pinned: anything that pulls an unpinned torch would fetch multi-GB CUDA wheels.
  "$VENV/bin/python" -m pip install -q -c "$ROOT/requirements/constraints-cpu.txt" torch >&2
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements/cpu.txt" \
      -c "$ROOT/requirements/constraints-cpu.txt" >&2
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
  stamp_of > "$VENV/.stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="$ROOT/.torch_ext"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
