#!/usr/bin/env bash
# Run once on a machine with a GPU and vLLM (deploy/install.sh gpu): memories against the oracle, and their cost.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${MEMSERVE_PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
exec "$py" -m bench.gpu_check "$@"
