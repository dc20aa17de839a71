#!/usr/bin/env bash
# Set up (once) and run the whole pipeline on a small embedded default: bash quickstart.sh
# Every stage's real command is printed before it runs; see quickstart.py.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
exec .venv/bin/python quickstart.py "$@"
