#!/usr/bin/env bash
# The project's test command: sets up .venv, then `ruff check` and `pytest`.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
python -m pytest "$@"
