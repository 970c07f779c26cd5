#!/usr/bin/env bash
# Every synthesis method side by side (MNIST 28 px, 32 px RGB and MNIST-M 32 px, 3 distillation seeds): sets up .venv
# (first run: a few minutes), then runs pipelines/bench_methods.py; results in runs/bench_methods/.
set -euo pipefail
cd "$(dirname "$0")/.."
source pipelines/setup_env.sh
# MNIST-M's photographs come from the scikit-image wheel's bundled images (files only: no dependencies)
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('skimage') is None)" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps "scikit-image==0.26.0"
exec "$PY" pipelines/bench_methods.py "$@"
