#!/usr/bin/env bash
# Set up (once) and run the whole test suite on the CPU, slow end-to-end tests included:
#     bash run_tests.sh [pytest args]          (plain `.venv/bin/python -m pytest` is the fast run)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest -q -m "slow or not slow" "$@"
