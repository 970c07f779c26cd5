#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv (first run: a few minutes), then run the MNIST
# pipeline (teacher -> synthesis -> distillation -> results table in runs/mnist/results.md and results/mnist.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source pipelines/setup_env.sh
exec "$PY" pipelines/mnist.py "$@"
