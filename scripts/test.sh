#!/usr/bin/env bash
# The project's test command: sets up .venv, then `ruff check`, `mypy` (its files and settings:
# pyproject.toml's [tool.mypy]) and `pytest`.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
# the flash tests start a real OpenSSH server on loopback: install Debian's when missing (best effort)
if [ ! -x /usr/sbin/sshd ] && ! command -v sshd >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing openssh-server for the ssh flash tests"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 bash -c 'apt-get install -y -q openssh-server >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q openssh-server >/dev/null 2>&1; }' ||
    echo "[test] openssh-server could not be installed: the real-ssh flash tests will skip, saying why"
fi
echo "[test] ruff check"
ruff check .
echo "[test] mypy (the runtimes, the wire, the bundles)"
mypy
echo "[test] pytest"
python -m pytest "$@"
