#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the package into it.
# Usage: source pipelines/setup_env.sh   (sets PY to the venv's python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DFKD_VENV:-$ROOT/.venv}"
STAMP="$VENV/.dfkd-installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pipelines/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing torch, torchvision and the project (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -c "$ROOT/pipelines/constraints.txt" torch torchvision
  "$VENV/bin/python" -m pip install -q -c "$ROOT/pipelines/constraints.txt" -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
PY="$VENV/bin/python"
export PY
