#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source pipelines/setup_env.sh
exec "$PY" -m pytest -q "$@"
