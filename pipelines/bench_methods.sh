#!/usr/bin/env bash
# Every synthesis method side by side (MNIST 28 px and 32 px RGB, 3 distillation seeds): sets up .venv
# (first run: a few minutes), then runs pipelines/bench_methods.py; results in runs/bench_methods/.
set -euo pipefail
cd "$(dirname "$0")/.."
source pipelines/setup_env.sh
exec "$PY" pipelines/bench_methods.py "$@"
