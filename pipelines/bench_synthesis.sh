#!/usr/bin/env bash
# Stage-one speed against its compute limit, per method (generator, muse, deepinversion), on this machine.
# Sets up .venv (first run: a few minutes), then runs the CPU cases; --only resnet50@224 --device cuda on a GPU.
# Results: runs/bench_synthesis/results.md (and .csv). Options: see pipelines/bench_synthesis.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
source pipelines/setup_env.sh
exec "$PY" pipelines/bench_synthesis.py "$@"
