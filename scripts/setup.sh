#!/usr/bin/env bash
# Everything a fresh machine needs, from the project's own files: the client in .venv (with the extras
# named in $1, e.g. "test,distilabel,ray" for the tests; none for the quickstart) and the real vLLM CPU
# server in .venv-vllm (kept apart: vllm pins other versions).
# Idempotent; used by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -U pip
extras="${1:-}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
bash scripts/setup-vllm.sh .venv-vllm
