#!/usr/bin/env bash
# Runs the whole test suite (all tiers) in .venv, creating it from constraints.txt when needed.
# Data comes from the same variables a user sets; defaults point at ../shared/datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
export OPPEN_MNIST_DIR=${OPPEN_MNIST_DIR:-$(cd .. && pwd)/shared/datasets/mnist}
export OPPEN_WIKITEXT_DIR=${OPPEN_WIKITEXT_DIR:-$(cd .. && pwd)/shared/datasets/wikitext-2}
exec "$VENV/bin/python" -m pytest "$@"
