#!/usr/bin/env bash
# One prepared GPU check (parts a-e, each with its own time cap; results in --out). See pipelines/gpu_check.py.
#   here (PyPI + npm):      bash pipelines/gpu_check.sh --prepare gpu_carry
#   there (GPU, offline):   bash pipelines/gpu_check.sh --carry gpu_carry --out runs/gpu_check
#   on the CPU (dry run):   bash pipelines/gpu_check.sh --dry-run --out runs/gpu_check_dry
# Python: $PYTHON if set; for --prepare and --dry-run the project's .venv (set up on first use, as pipelines/test.sh
# does); on the GPU machine its own python3, into which nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  case " $* " in
    *" --prepare "*|*" --dry-run "*) source pipelines/setup_env.sh ;;
    *) PY=python3 ;;
  esac
fi
exec "$PY" pipelines/gpu_check.py "$@"
