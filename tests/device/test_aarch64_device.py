"""aarch64 Linux as a device platform: `covspec device flash --platform linux-aarch64 --python 3.11` from this
x86_64 machine, and the emulated aarch64 device of scripts/aarch64_device.sh.

Fast: the target platforms a runtime can and cannot be made for (Android, armv7, Python 3.10, musl, old glibc:
refused naming what is supported and the fix, before anything is copied); the probe picking a python3.11
beside an old python3; `flash --to adb://` with --runtime none saying what it installs and what not; a
runtime flashed for aarch64 refused at start on this x86_64 machine, both platforms named; the aarch64
runtime's wheelhouse (only aarch64 or pure wheels, no torch/transformers/torchao) and, where
aarch64-linux-gnu-g++ is here, its cross-built shim (`file`: ARM aarch64, RUNPATH $ORIGIN).
Slow: scripts/aarch64_figures.py: the demo bundle flashed into the emulated device and onto this machine,
8 held-out prompts through an x86 edge on loopback in covspec and covspec_no_placement (and the draft check
with the timing-fed choices pinned, covspec_no_placement@4), .pte and ONNX.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from covspec.bundles.manifest import write_manifest
from covspec.device_runtime.flash import FlashError, flash, parse_target
from covspec.device_runtime.platforms import (
    UNKNOWN,
    Platform,
    check_here,
    from_flags,
    local_platform,
    parse_probe,
    unbuildable,
)
from covspec.device_runtime.runtime_payload import RUNTIME_MANIFEST, write_runtime_manifest, write_scripts

REPO = Path(__file__).resolve().parents[2]
AARCH64 = Platform("aarch64", "3.11", UNKNOWN)
pytestmark = pytest.mark.skipif(local_platform().machine != "x86_64", reason="cross-platform flashing from x86_64")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.pte").write_bytes(bytes(range(256)) * 8)
    write_manifest(folder, {"kind": "device"})
    return folder


def shell_stub(tmp_path: Path, name: str, machine: str, python: str, libc: str, android: str = "") -> list[str]:
    """An ssh/adb stand-in running the remote command locally, where `uname -m`, `python3 -V`, getconf and
    getprop say what the test wants."""
    bin_dir = tmp_path / f"{name}-bin"
    bin_dir.mkdir()
    tools = [("uname", f"echo {machine}"), ("python3", f"echo 'Python {python}'"), ("getconf", f"echo '{libc}'"),
             ("getprop", f"echo '{android}'"), *((f"python3.{minor}", "exit 127") for minor in (11, 12, 13))]
    for tool, text in tools:
        (bin_dir / tool).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\nfor a; do last="$a"; done\nPATH="{bin_dir}:$PATH" exec sh -c "$last"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)]


def test_aarch64_platforms_that_cannot_be_built_for_are_named_with_the_fix() -> None:
    assert unbuildable(Platform("aarch64", "3.11", "2.35")) is None
    assert unbuildable(from_flags("linux-aarch64", "3.12")) is None
    android = unbuildable(Platform("aarch64", "", "", android="14"))
    assert "Android 14" in android and "--runtime none" in android and "docs/deployment.md" in android
    armv7 = unbuildable(Platform("armv7l", "3.11", "2.36"))
    assert "armv7l" in armv7 and "x86_64 or aarch64" in armv7 and "64-bit OS" in armv7
    jetpack = unbuildable(Platform("aarch64", "3.10", "2.35"))
    assert "python3 is 3.10" in jetpack and "apt-get install python3.11" in jetpack
    assert "not glibc" in unbuildable(Platform("aarch64", "3.11", ""))
    assert "glibc 2.27 is older than 2.28" in unbuildable(Platform("aarch64", "3.11", "2.27"))
    with pytest.raises(ValueError, match="linux-MACHINE"):
        from_flags("android-arm64", "3.11")
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        from_flags("linux-aarch64", "three")
    assert from_flags("linux-arm64", "3.11", "2.35") == Platform("aarch64", "3.11", "2.35")


def test_aarch64_probe_takes_a_newer_python_beside_an_old_python3() -> None:
    jetson = parse_probe("machine=aarch64\npython=Python 3.10.12\nlibc=glibc 2.35\nalt=python3.11\nandroid=\n")
    assert jetson == Platform("aarch64", "3.11", "2.35", "python3.11") and unbuildable(jetson) is None
    assert "(python3.11)" in jetson.describe()


def test_aarch64_unbuildable_targets_refused_before_anything_is_copied(bundle: Path, tmp_path: Path) -> None:
    cases = {"pi": ("armv7l", "3.11.2", "glibc 2.36", "", "armv7l has no executorch"),
             "jetpack": ("aarch64", "3.10.12", "glibc 2.35", "", "apt-get install python3.11"),
             "phone": ("aarch64", "", "", "14", "Android 14")}
    for name, (machine, python, libc, android, says) in cases.items():
        dest = tmp_path / f"{name}-root"
        target = parse_target(f"ssh://me@{name}{dest}", ssh=shell_stub(tmp_path, name, machine, python, libc, android))
        with pytest.raises(FlashError) as err:
            flash(bundle, target, runtime="auto")
        assert says in str(err.value) and "no covspec device runtime can be made" in str(err.value), err.value
        assert not dest.exists()


def test_aarch64_adb_bundle_only_says_what_it_installs_and_what_not(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sdcard"
    adb = shell_stub(tmp_path, "adb", "aarch64", "", "", "14")
    target = parse_target(f"adb://SERIAL{dest}", adb=adb)
    target.run = [adb[0]]  # the stub takes the command as its last argument, as `adb -s SERIAL shell CMD` does
    report = flash(bundle, target, runtime="none")
    assert report.runtime == "" and (dest / "bundle" / "model.pte").is_file()
    assert "NOT installed: the Python device runtime" in report.note and "protocol" in report.note


def aarch64_payload(tmp_path: Path) -> Path:
    """A runtime made for aarch64 with the real scripts and manifest, and a stand-in wheel."""
    folder = tmp_path / "payload-aarch64"
    (folder / "runtime" / "wheels").mkdir(parents=True, exist_ok=True)
    (folder / "runtime" / "wheels" / "fake-1.0-py3-none-any.whl").write_text("wheel")
    write_scripts(folder, AARCH64)
    write_runtime_manifest(folder, AARCH64)
    return folder


def test_aarch64_runtime_is_refused_at_start_on_x86_naming_both(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "sdcard"
    report = flash(bundle, str(dest), runtime=aarch64_payload(tmp_path), platform=from_flags("linux-aarch64", "3.11"))
    assert "first start" in report.install and not (dest / "runtime" / "venv").exists()
    assert flash(bundle, str(dest), runtime=aarch64_payload(tmp_path),
                 platform=from_flags("linux-aarch64", "3.11")).copied == []  # reflash: nothing copied
    started = subprocess.run([str(dest / "bin" / "covspec-device"), "--help"], capture_output=True, text=True,
                             env=dict(os.environ, COVSPEC_PYTHON=sys.executable))
    assert started.returncode == 3
    assert "flashed for aarch64, Python 3.11, but this device is x86_64" in started.stderr, started.stderr
    assert "--platform linux-x86_64" in started.stderr and not (dest / "runtime" / "venv").exists()
    with pytest.raises(SystemExit) as err:  # the launcher's own check, where a venv is already there
        check_here(str(dest / RUNTIME_MANIFEST))
    assert "flashed for aarch64, Python 3.11" in str(err.value) and "this device is x86_64" in str(err.value)


def test_aarch64_folder_flags_only_for_folders(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(FlashError, match="for a folder target"):
        flash(bundle, "ssh://me@jetson/opt/covspec", platform=from_flags("linux-aarch64", "3.11"))


def test_aarch64_runtime_wheelhouse_and_cross_built_shim(tmp_path: Path) -> None:
    """The real aarch64 runtime made here (pip download for aarch64 tags; cached in ~/.cache/covspec)."""
    from covspec.device_runtime.runtime_payload import PayloadError, build_payload, load_payload

    lines: list[str] = []
    try:
        folder = build_payload(log=lines.append, target=AARCH64)
    except PayloadError as err:
        pytest.skip(f"the aarch64 runtime could not be made here (no PyPI?): {str(err)[-300:]}")
    payload = load_payload(folder)
    assert payload.platform["machine"] == "aarch64" and payload.platform["python"] == "3.11"
    wheels = [Path(n).name for n in payload.files() if n.endswith(".whl")]
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"covspec", "numpy", "onnxruntime", "pyzmq", "tokenizers", "pillow", "msgpack"} <= names
    assert not names & {"torch", "transformers", "torchao", "executorch"}, names
    binary = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert binary and all("aarch64" in w for w in binary), binary
    shim = folder / "runtime" / "lib" / "libcovspec_et.so"
    if not shim.is_file():
        pytest.skip("no aarch64-linux-gnu-g++ here (scripts/aarch64_device.sh setup installs it): "
                    "the wheelhouse was checked, the cross-built shim was not")
    if shutil.which("file"):
        assert "ARM aarch64" in subprocess.run(["file", str(shim)], capture_output=True, text=True).stdout
    assert shim.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine EM_AARCH64
    assert b"$ORIGIN" in shim.read_bytes() and payload.manifest["native_shim"]


@pytest.mark.slow
def test_aarch64_emulated_device_answers_like_the_x86_device(tmp_path: Path) -> None:
    """scripts/aarch64_figures.py (minutes: the demo export once, the venv made under emulation, 32 answers
    emulated): every answer equal to target_only's, the device's own acceptance within 0.05 of x86's."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "aarch64_figures.py"), "--out", str(tmp_path),
                           "--prompts", "8"], capture_output=True, text=True, timeout=3 * 3600)
    if done.returncode == 77:
        pytest.skip(f"no emulated aarch64 device here: {done.stderr.strip()[-300:]}")
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert (tmp_path / "figures.json").is_file(), f"no figures written (exit {done.returncode}): {done.stderr[-3000:]}"
    figures = json.loads((tmp_path / "figures.json").read_text())
    arm = figures["aarch64"]
    assert arm["answers"]["machine"] == "aarch64" and arm["answers"]["modules"] == []
    assert "ARM aarch64" in arm["native_file"]
    assert not set(arm["venv_packages"]) & {"torch", "transformers", "torchao", "executorch"}
    assert all("x86_64" not in w for w in arm["wheels"])
    assert ": 0 files copied" in arm["reflash_report"], arm["reflash_report"]
    assert len(figures["checks"]) == 14 and all(figures["checks"].values()), figures["checks"]
    for backend in ("executorch", "onnx"):  # the draft check drafted on both devices, the same rounds
        pinned = [arm["answers"][f"{backend}/covspec_no_placement@4"], figures["x86_64"]["answers"][
            f"{backend}/covspec_no_placement@4"]]
        assert sum(r["rounds"] for r in pinned[0]) >= 8
        assert [r["drafted"] for r in pinned[0]] == [r["drafted"] for r in pinned[1]]
