#!/usr/bin/env bash
# The local demo, from a fresh clone: set up .venv (scripts/dev-setup), then run demo/demo.py
# with it. Works with a bare PATH: everything it runs comes from .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/dev-setup
export PATH="$PWD/.venv/bin:$PATH"
exec python demo/demo.py "$@"
