#!/usr/bin/env bash
# The project's test command: sets up .venv, then `ruff check`, `mypy` (its files and settings:
# pyproject.toml's [tool.mypy]) and `pytest`.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
# Debian tools some tests use, installed when missing (best effort, root with apt only; each test that
# needs one skips naming it otherwise): OpenSSH's server (the ssh flash tests), the aarch64 cross
# compiler and `file` (the cross-built native shim), HAProxy (`haproxy -c` on deploy/haproxy.cfg)
want=()
{ [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null; } || want+=(openssh-server)
command -v aarch64-linux-gnu-g++ >/dev/null || want+=(g++-aarch64-linux-gnu)
command -v file >/dev/null || want+=(file)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || want+=(haproxy)
if [ "${#want[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing ${want[*]} (Debian) for the tests that use them"
  export DEBIAN_FRONTEND=noninteractive
  timeout 420 bash -c "apt-get install -y -q --no-install-recommends ${want[*]} >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends ${want[*]} >/dev/null 2>&1; }" ||
    echo "[test] ${want[*]} could not be installed: the tests that need them skip, saying why"
fi
echo "[test] ruff check"
ruff check .
echo "[test] mypy (the runtimes, the wire, the bundles)"
mypy
echo "[test] pytest"
python -m pytest "$@"
