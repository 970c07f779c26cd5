#!/usr/bin/env bash
# Stage-two throughput on this machine: training from memory vs from the shards vs with stored logits,
# and decode speed per worker. Sets up .venv (first run: a few minutes), then runs the benchmark.
# Results: runs/bench_throughput/results.md (and .csv). Options: see pipelines/bench_throughput.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
source pipelines/setup_env.sh
exec "$PY" pipelines/bench_throughput.py "$@"
