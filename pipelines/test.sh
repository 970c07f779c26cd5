#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the test suite on the CPU, one test per core
# (pytest-xdist; DFKD_TEST_WORKERS=0 runs them in this process). --run-slow adds the long tests (CI passes it).
set -euo pipefail
cd "$(dirname "$0")/.."
source pipelines/setup_env.sh
exec "$PY" -m pytest -q -n "${DFKD_TEST_WORKERS:-auto}" --dist loadfile "$@"
