#!/usr/bin/env bash
# The embedded default on a fresh machine: creates .venv from constraints.txt when needed, then
#   scripts/oppen-local.sh          start the stack, run train-mnist/local --watch, print a summary
#   scripts/oppen-local.sh up|status|down
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec .venv/bin/python -m oppen.local_stack "${1:-demo}" "${@:2}"
