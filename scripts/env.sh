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

# DeepSpeed on CPU JIT-compiles its shared-memory all-reduce op (deepspeed_shm_comm) the first time
# ranks form a group: that needs a C++ compiler and the Python headers, and takes minutes with
# no output.  Do it once here, saying so (cached in $TORCH_EXTENSIONS_DIR).
qgalore_build_ds_ops() {
  local ext="$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm"
  if compgen -G "$ext/*.so" > /dev/null; then return 0; fi
  local cxx="${CXX:-$(command -v c++ || command -v g++ || true)}"
  local headers
  headers="$(python -c 'import os, sysconfig; print(int(os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))))')"
  if [ -z "$cxx" ] || [ "$headers" != 1 ]; then
    echo "[env] WARNING: DeepSpeed on CPU compiles its op deepspeed_shm_comm at the first multi-rank run and needs" \
         "a C++ compiler ($([ -z "$cxx" ] && echo missing || echo "$cxx: ok")) and the Python headers" \
         "($([ "$headers" = 1 ] && echo ok || echo "Python.h missing")). Install them (Debian/Ubuntu:" \
         "apt-get install g++ python3-dev), then source scripts/env.sh again. Single-process use works without." >&2
    return 0
  fi
  echo "[env] building DeepSpeed's CPU op deepspeed_shm_comm into $ext with $cxx (once; a few minutes) ..." >&2
  if python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)" \
      > "$TORCH_EXTENSIONS_DIR/build_shm_comm.log" 2>&1; then
    echo "[env] deepspeed_shm_comm built" >&2
  else
    echo "[env] WARNING: building deepspeed_shm_comm failed; see $TORCH_EXTENSIONS_DIR/build_shm_comm.log" >&2
  fi
}
mkdir -p "$TORCH_EXTENSIONS_DIR"
qgalore_build_ds_ops
