#!/usr/bin/env bash
# One prepared GPU check (parts a-e, each with its own time cap; results in --out). See pipelines/gpu_check.py.
#   here (PyPI + npm):      bash pipelines/gpu_check.sh --prepare gpu_carry
#   there (GPU, offline):   bash pipelines/gpu_check.sh --carry gpu_carry --out runs/gpu_check
#   on the CPU (dry run):   bash pipelines/gpu_check.sh --dry-run --out runs/gpu_check_dry
# Python: $PYTHON, else this checkout's .venv, else python3 (the GPU machine's own; nothing is installed into it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" pipelines/gpu_check.py "$@"
