#!/usr/bin/env bash
# The main job end to end on this machine: set up, start a local vLLM server with the embedded tiny
# model, generate with ClientvLLM, print the results, stop the server. README.rst gives this command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/quickstart.py "$@"
