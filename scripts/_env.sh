# Sourced by demo.sh and test.sh: create or reuse the project virtualenv, install the project.
# - No torch anywhere: install torch==2.13.0 (the CPU build this platform serves locally).
# - A torch already importable by the system python (e.g. a CUDA build on a GPU box) is kept:
#   the venv then sees system site-packages and pip leaves torch alone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELASTIC_FT_VENV:-$ROOT/.venv}"
PY_SYS="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY_SYS" -c "import torch" >/dev/null 2>&1; then
    echo "[env] system torch found: $("$PY_SYS" -c 'import torch; print(torch.__version__)'); venv will reuse it"
    "$PY_SYS" -m venv --system-site-packages "$VENV"
  else
    "$PY_SYS" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>/dev/null
fi

stamp="$VENV/.elastic_ft.stamp"
want="$(cat "$ROOT/pyproject.toml" | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[env] installing torch==2.13.0 (CPU build)"
    "$VENV/bin/python" -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  fi
  echo "[env] installing elastic_ft and its dependencies (about a minute on a fresh venv)"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import elastic_ft, ray, deepspeed, peft, transformers" 
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
# DeepSpeed JIT-compiled ops land here once and are reused by every later run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
