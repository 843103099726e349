#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the pinned stack.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it reinstalls only when
# requirements.txt or pyproject.toml changed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COVSPEC_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[env] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.covspec-stamp"
want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log="$venv/install.log"
  echo "[env] installing the pinned stack (first time: about 2 minutes; pip's output goes to $log)"
  pip_install() {  # pip and setuptools talk a lot (index locations, package-data notes): shown only on failure
    "$venv/bin/python" -m pip install -q "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "[env] pip install $* failed (whole log: $log)"; exit 1; }
  }
  : > "$log"
  pip_install --upgrade pip
  # torch first and pinned: pip takes the CPU build from local disk.
  pip_install "torch==2.13.0"
  pip_install -r "$root/requirements.txt"
  pip_install --no-deps -e "$root"
  # the torch-free ExecuTorch runtime's C shim (device_runtime/native), built with g++ against the wheel
  "$venv/bin/python" -m covspec.device_runtime.et_native build >/dev/null ||
    echo "[env] the native ExecuTorch shim did not build (g++ missing?): its tests will skip, saying why"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
