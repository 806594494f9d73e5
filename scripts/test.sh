#!/usr/bin/env bash
# The whole test suite from a fresh clone: unit tests against the fake server, integration tests and
# the notebook against the real vLLM server. README.rst gives this very command; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,distilabel,ray  # the integrations' tests run too (tests/test_distilabel.py, test_ray.py)
.venv/bin/python -m ruff check vllmclient tests benchmarks examples
.venv/bin/python -m mypy --strict vllmclient
.venv/bin/python -m pytest -m "integration or not integration" "$@"
