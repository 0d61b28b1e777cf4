#!/usr/bin/env bash
# Builds a fresh virtualenv, installs everything the tests need (redis-server and chromium too,
# when run as root), lints, and runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-test
rm -rf "$venv"
# ray (about 250 MB) and llamacpp: llama-cpp-python builds llama.cpp from source, about 15 minutes on
# 2 cores the first time; pip keeps the wheel in its cache, so later fresh venvs install it in seconds.
scripts/setup.sh "$venv" transformers,server,redis,remote,examples,ray,llamacpp,test
if ! command -v redis-server >/dev/null || [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "Installing redis-server and chromium (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium >/dev/null
  else
    echo "note: redis-server and/or chromium missing and not root: those tests will be skipped" >&2
  fi
fi
echo "Lint (ruff), then the suite (pytest)" >&2
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/pylint" --disable=all --enable=duplicate-code --min-similarity-lines=6 --score=n chatstream_asgi
exec "$venv/bin/python" -m pytest "$@"
