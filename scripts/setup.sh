#!/usr/bin/env bash
# Everything a fresh machine needs, from the project's own files: the client in .venv (with the
# test, distilabel and ray extras) and the real vLLM CPU server in .venv-vllm (kept apart: vllm pins other versions).
# Idempotent; used by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -U pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,distilabel,ray]'  # ray: tests/test_ray.py
bash scripts/setup-vllm.sh .venv-vllm
