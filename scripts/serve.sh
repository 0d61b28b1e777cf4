#!/usr/bin/env bash
# Sets everything up (once) and serves SmolLM2-135M-Instruct with the chat page on http://127.0.0.1:8000/.
# Extra arguments go to `python -m chatstream_asgi serve` (e.g. --engine mock, --port 9000 --concurrency 8).
# CHATSTREAM_VENV names the virtualenv (default .venv). A later start skips the setup unless
# pyproject.toml or scripts/setup.sh changed since (scripts/setup.sh --check: a fingerprint, no imports).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CHATSTREAM_VENV:-.venv}
scripts/setup.sh --check "$venv" || scripts/setup.sh "$venv"
exec "$venv/bin/python" -m chatstream_asgi serve "$@"
