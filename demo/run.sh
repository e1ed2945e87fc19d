#!/usr/bin/env bash
# The local demo, from a fresh clone: set up .venv, then run demo/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/dev-setup
exec .venv/bin/python demo/run.py "$@"
