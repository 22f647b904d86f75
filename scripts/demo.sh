#!/usr/bin/env bash
# One command: install (first run only) and run the tiny end-to-end demo. Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m lynx_core demo "$@"
