#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs the client in .venv and runs pytest.
# README.rst gives this very command; .ci/run runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m ruff check vllmclient tests
.venv/bin/python -m pytest "$@"
