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
  echo "[env] installing the pinned stack (first time: about 2 minutes)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: pip takes the CPU build from local disk.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -r "$root/requirements.txt"
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  # the torch-free ExecuTorch runtime's C shim (device_runtime/native), built with g++ against the wheel
  "$venv/bin/python" -m covspec.device_runtime.et_native build >/dev/null ||
    echo "[env] the native ExecuTorch shim did not build (g++ missing?): its tests will skip, saying why"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
