"""`covspec device flash` to a folder, through the shell path ssh/adb use (a stand-in `ssh` that runs
the remote command locally), and over real ssh to an OpenSSH server the test starts on loopback."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from covspec.bundles.bundle import BundleError, load_bundle
from covspec.device_runtime.flash import FlashError, FolderTarget, ShellTarget, flash, parse_target
from covspec.export.manifest import MANIFEST, write_manifest
from covspec.tools.procs import free_port


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "decoder.pte").write_bytes(bytes(range(256)) * 16)
    (folder / "vision.pte").write_bytes(b"vision" * 100)
    (folder / "checkpoint" / "config.json").write_text('{"model_type": "llava"}')
    write_manifest(folder, {"kind": "device"})
    return folder


def fake_ssh(tmp_path: Path) -> list[str]:
    """An `ssh` that ignores its options and host and runs the last argument with sh."""
    script = tmp_path / "fake-ssh"
    script.write_text('#!/bin/sh\nfor a; do last="$a"; done\nexec sh -c "$last"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)]


def no_temp_files(folder: Path) -> bool:
    return not any(".flash-" in p.name for p in folder.rglob("*"))


def test_flash_to_folder_then_nothing_to_do(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    first = flash(bundle, str(dest))
    assert sorted(first.copied) == sorted(["decoder.pte", "vision.pte", "checkpoint/config.json", MANIFEST])
    assert first.verified == 4 and no_temp_files(dest)
    assert load_bundle(dest).manifest == load_bundle(bundle).manifest
    second = flash(bundle, str(dest))
    assert second.copied == [] and len(second.skipped) == 4


def test_corrupted_file_on_target_is_repaired_alone(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    flash(bundle, str(dest))
    data = bytearray((dest / "decoder.pte").read_bytes())
    data[100] ^= 0x55
    (dest / "decoder.pte").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.pte: sha256"):
        load_bundle(dest)
    report = flash(bundle, str(dest))
    assert report.copied == ["decoder.pte", MANIFEST]
    load_bundle(dest)


def test_truncated_bundle_is_refused_and_target_untouched(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    data = (bundle / "vision.pte").read_bytes()
    (bundle / "vision.pte").write_bytes(data[:10])
    with pytest.raises(BundleError, match="vision.pte: size 10 bytes"):
        flash(bundle, str(dest))
    assert not dest.exists()


def test_verification_failure_is_reported(bundle: Path, tmp_path: Path) -> None:
    class LossyTarget(FolderTarget):
        def put(self, source: Path, name: str) -> None:
            super().put(source, name)
            if name == "vision.pte":
                (self.root / name).write_bytes(b"garbled")

    with pytest.raises(FlashError, match="vision.pte does not match the manifest"):
        flash(bundle, LossyTarget(tmp_path / "device"))


def test_flash_over_the_shell_path(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "remote dir" / "bundle"  # a space: paths are quoted for the remote shell
    target = parse_target(f"ssh://me@localhost:2222{dest}", ssh=fake_ssh(tmp_path))
    assert isinstance(target, ShellTarget) and target.run[-3:] == ["-p", "2222", "me@localhost"]
    assert len(flash(bundle, target).copied) == 4
    load_bundle(dest)
    assert no_temp_files(dest)
    (dest / "checkpoint" / "config.json").write_text("{}")
    assert flash(bundle, target).copied == ["checkpoint/config.json", MANIFEST]
    assert flash(bundle, target).copied == []
    load_bundle(dest)


def test_target_parsing() -> None:
    adb = parse_target("adb://emulator-5554/data/local/tmp/covspec")
    assert isinstance(adb, ShellTarget) and adb.run == ["adb", "-s", "emulator-5554", "shell"]
    assert adb.root == "/data/local/tmp/covspec"
    assert isinstance(parse_target("/tmp/x"), FolderTarget)
    for bad in ("ssh://host", "adb://serial", "ftp://host/x"):
        with pytest.raises(ValueError):
            parse_target(bad)


# --- a real sshd on loopback ------------------------------------------------------------------------
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """Debian's OpenSSH server on 127.0.0.1, run by the test as this user with its own host key and
    one authorized client key; yields the ssh client argv prefix (key, no host-key prompts) and port."""
    if SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("no OpenSSH server here (Debian: apt-get install openssh-server; scripts/test.sh tries it)")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "client.pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    port = free_port()
    config = root / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host'}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "LogLevel ERROR", ""]))
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    ssh = ["ssh", "-i", str(root / "client"), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
           "-o", f"UserKnownHostsFile={root / 'known_hosts'}", "-o", "LogLevel=ERROR"]
    user = pwd.getpwuid(os.getuid()).pw_name
    deadline = time.monotonic() + 20
    while True:
        probe = subprocess.run([*ssh, "-p", str(port), f"{user}@127.0.0.1", "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            break
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            err = (server.stderr.read() if server.poll() is not None else b"").decode(errors="replace")
            pytest.skip(f"sshd could not be started here: {err.strip() or probe.stderr.decode(errors='replace').strip()}")
        time.sleep(0.2)
    yield ssh, port, user
    server.terminate()
    server.wait(timeout=10)


def test_flash_over_real_ssh(bundle: Path, tmp_path: Path, sshd) -> None:
    ssh, port, user = sshd
    dest = tmp_path / "phone" / "covspec bundle"
    target = parse_target(f"ssh://{user}@127.0.0.1:{port}{dest}", ssh=ssh)
    first = flash(bundle, target)
    assert sorted(first.copied) == sorted(["decoder.pte", "vision.pte", "checkpoint/config.json", MANIFEST])
    assert load_bundle(dest).manifest == load_bundle(bundle).manifest and no_temp_files(dest)
    assert flash(bundle, target).copied == []  # every checksum already matches on the target
    data = bytearray((dest / "vision.pte").read_bytes())
    data[7] ^= 0x01
    (dest / "vision.pte").write_bytes(bytes(data))
    repaired = flash(bundle, target)
    assert repaired.copied == ["vision.pte", MANIFEST] and sorted(repaired.skipped) == ["checkpoint/config.json", "decoder.pte"]
    load_bundle(dest)


def test_truncated_bundle_is_refused_before_ssh_copies_anything(bundle: Path, tmp_path: Path, sshd) -> None:
    ssh, port, user = sshd
    dest = tmp_path / "phone"
    (bundle / "decoder.pte").write_bytes((bundle / "decoder.pte").read_bytes()[:-1])
    with pytest.raises(BundleError, match="decoder.pte: size"):
        flash(bundle, parse_target(f"ssh://{user}@127.0.0.1:{port}{dest}", ssh=ssh))
    assert not dest.exists()
