"""`covspec device flash` to a folder, through the shell path ssh/adb use (a stand-in `ssh` that runs
the remote command locally), and over real ssh to an OpenSSH server the test starts on loopback.

Fast: the bundle alone (--runtime none), and a stand-in runtime payload (a few small files, an install.sh
that only writes its stamp): installed beside the bundle, nothing copied again, a corrupted runtime file
repaired alone, the target's platform read over its shell and a target of another machine refused before
anything is copied. Slow: this machine's real runtime (wheelhouse, native shim, launcher; built or taken
from ~/.cache/covspec/device-runtime) flashed to a folder and over ssh with a tiny LLaVA bundle, then the
flashed launcher answers through a real edge, covspec identical to target_only, from a venv in which
neither torch nor transformers can be imported."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from covspec.bundles.bundle import BundleError, load_bundle
from covspec.bundles.manifest import MANIFEST, write_manifest
from covspec.device_runtime.flash import FlashError, FolderTarget, ShellTarget, flash, parse_target
from covspec.device_runtime.platforms import PROBE, Platform, local_platform, mismatch, parse_probe
from covspec.device_runtime.runtime_payload import RUNTIME_MANIFEST, glibc_needed, write_runtime_manifest
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


BUNDLE = ["bundle/decoder.pte", "bundle/vision.pte", "bundle/checkpoint/config.json", f"bundle/{MANIFEST}"]


def fake_ssh(tmp_path: Path, machine: str | None = None) -> list[str]:
    """An `ssh` that ignores its options and host and runs the last argument with sh; with `machine`,
    the remote `uname -m` says that machine."""
    script = tmp_path / "fake-ssh"
    fake_uname = ""
    if machine:
        (tmp_path / "fakebin").mkdir(exist_ok=True)
        (tmp_path / "fakebin" / "uname").write_text(f"#!/bin/sh\necho {machine}\n")
        (tmp_path / "fakebin" / "uname").chmod(0o755)
        fake_uname = f'PATH="{tmp_path / "fakebin"}:$PATH" '
    script.write_text(f'#!/bin/sh\nfor a; do last="$a"; done\n{fake_uname}exec sh -c "$last"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)]


def no_temp_files(folder: Path) -> bool:
    return not any(".flash-" in p.name for p in folder.rglob("*"))


def test_flash_to_folder_then_nothing_to_do(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    first = flash(bundle, str(dest), runtime="none")
    assert sorted(first.copied) == sorted(BUNDLE) and first.runtime == ""
    assert first.verified == 4 and no_temp_files(dest) and not (dest / "runtime").exists()
    assert load_bundle(dest / "bundle").manifest == load_bundle(bundle).manifest
    second = flash(bundle, str(dest), runtime="none")
    assert second.copied == [] and len(second.skipped) == 4


def test_corrupted_file_on_target_is_repaired_alone(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    flash(bundle, str(dest), runtime="none")
    data = bytearray((dest / "bundle" / "decoder.pte").read_bytes())
    data[100] ^= 0x55
    (dest / "bundle" / "decoder.pte").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.pte: sha256"):
        load_bundle(dest / "bundle")
    report = flash(bundle, str(dest), runtime="none")
    assert report.copied == ["bundle/decoder.pte", f"bundle/{MANIFEST}"]
    load_bundle(dest / "bundle")


def test_truncated_bundle_is_refused_and_target_untouched(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    data = (bundle / "vision.pte").read_bytes()
    (bundle / "vision.pte").write_bytes(data[:10])
    with pytest.raises(BundleError, match="vision.pte: size 10 bytes"):
        flash(bundle, str(dest), runtime="none")
    assert not dest.exists()


def test_verification_failure_is_reported(bundle: Path, tmp_path: Path) -> None:
    class LossyTarget(FolderTarget):
        def put(self, source: Path, name: str) -> None:
            super().put(source, name)
            if name == "bundle/vision.pte":
                (self.root / name).write_bytes(b"garbled")

    with pytest.raises(FlashError, match="bundle/vision.pte does not match the manifest"):
        flash(bundle, LossyTarget(tmp_path / "device"), runtime="none")


def test_flash_over_the_shell_path(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "remote dir" / "covspec"  # a space: paths are quoted for the remote shell
    target = parse_target(f"ssh://me@localhost:2222{dest}", ssh=fake_ssh(tmp_path))
    assert isinstance(target, ShellTarget) and target.run[-3:] == ["-p", "2222", "me@localhost"]
    assert len(flash(bundle, target, runtime="none").copied) == 4
    load_bundle(dest / "bundle")
    assert no_temp_files(dest)
    (dest / "bundle" / "checkpoint" / "config.json").write_text("{}")
    assert flash(bundle, target, runtime="none").copied == ["bundle/checkpoint/config.json", f"bundle/{MANIFEST}"]
    assert flash(bundle, target, runtime="none").copied == []
    load_bundle(dest / "bundle")


def test_target_parsing() -> None:
    adb = parse_target("adb://emulator-5554/data/local/tmp/covspec")
    assert isinstance(adb, ShellTarget) and adb.run == ["adb", "-s", "emulator-5554", "shell"]
    assert adb.root == "/data/local/tmp/covspec" and not adb.installs  # adb: the launcher installs on first run
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
    first = flash(bundle, target, runtime="none")
    assert sorted(first.copied) == sorted(BUNDLE)
    assert load_bundle(dest / "bundle").manifest == load_bundle(bundle).manifest and no_temp_files(dest)
    assert flash(bundle, target, runtime="none").copied == []  # every checksum already matches on the target
    data = bytearray((dest / "bundle" / "vision.pte").read_bytes())
    data[7] ^= 0x01
    (dest / "bundle" / "vision.pte").write_bytes(bytes(data))
    repaired = flash(bundle, target, runtime="none")
    assert repaired.copied == ["bundle/vision.pte", f"bundle/{MANIFEST}"]
    assert sorted(repaired.skipped) == ["bundle/checkpoint/config.json", "bundle/decoder.pte"]
    load_bundle(dest / "bundle")


def test_truncated_bundle_is_refused_before_ssh_copies_anything(bundle: Path, tmp_path: Path, sshd) -> None:
    ssh, port, user = sshd
    dest = tmp_path / "phone"
    (bundle / "decoder.pte").write_bytes((bundle / "decoder.pte").read_bytes()[:-1])
    with pytest.raises(BundleError, match="decoder.pte: size"):
        flash(bundle, parse_target(f"ssh://{user}@127.0.0.1:{port}{dest}", ssh=ssh), runtime="none")
    assert not dest.exists()


# --- the runtime: a stand-in payload (fast) ----------------------------------------------------------
RUNTIME = ["bin/covspec-device", "runtime/install.sh", "runtime/lib/libfake.so", "runtime/wheels/fake-1.0-py3-none-any.whl",
           RUNTIME_MANIFEST]


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    """A runtime payload for this machine with runtime_payload's layout and manifest, but stand-in files:
    its install.sh only writes the stamp a real one writes once its venv is made."""
    folder = tmp_path / "payload"
    for name, text in [("bin/covspec-device", "#!/bin/sh\necho launcher\n"),
                       ("runtime/install.sh", '#!/bin/sh\nrt=$(cd "$(dirname "$0")" && pwd)\nmkdir -p "$rt/venv"\n'
                                              'cp "$rt/runtime.json" "$rt/venv/covspec-runtime.json"\n'),
                       ("runtime/lib/libfake.so", "\0GLIBC_2.17\0GLIBC_2.4\0" * 50),
                       ("runtime/wheels/fake-1.0-py3-none-any.whl", "wheel" * 1000)]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    write_runtime_manifest(folder, local_platform())
    return folder


def test_runtime_is_installed_beside_the_bundle_then_nothing_to_do(bundle: Path, payload: Path, tmp_path: Path) -> None:
    dest = tmp_path / "device"
    first = flash(bundle, str(dest), runtime=payload)
    assert sorted(first.copied) == sorted(BUNDLE + RUNTIME) and first.verified == 9 and no_temp_files(dest)
    assert first.install == "made the venv" and os.access(dest / "bin" / "covspec-device", os.X_OK)
    assert first.runtime.startswith(local_platform().machine) and "glibc >= 2.17" in first.runtime
    second = flash(bundle, str(dest), runtime=payload)
    assert second.copied == [] and len(second.skipped) == 9 and second.install == "venv already made"


def test_corrupted_runtime_file_is_repaired_alone_over_the_shell_path(bundle: Path, payload: Path,
                                                                      tmp_path: Path) -> None:
    dest = tmp_path / "phone"
    target = parse_target(f"ssh://me@phone{dest}", ssh=fake_ssh(tmp_path))
    flash(bundle, target, runtime=payload)
    wheel = dest / "runtime" / "wheels" / "fake-1.0-py3-none-any.whl"
    wheel.write_bytes(wheel.read_bytes()[:-1] + b"X")
    repaired = flash(bundle, target, runtime=payload)
    assert repaired.copied == ["runtime/wheels/fake-1.0-py3-none-any.whl", RUNTIME_MANIFEST]
    assert wheel.read_bytes() == (payload / "runtime/wheels/fake-1.0-py3-none-any.whl").read_bytes()
    assert repaired.install == "venv already made"  # the same runtime.json: its venv is not made again


def test_target_of_another_machine_is_refused_before_anything_is_copied(bundle: Path, payload: Path,
                                                                       tmp_path: Path) -> None:
    dest = tmp_path / "jetson"
    here = local_platform().machine
    other = "aarch64" if here != "aarch64" else "x86_64"
    target = parse_target(f"ssh://me@jetson{dest}", ssh=fake_ssh(tmp_path, machine=other))
    with pytest.raises(FlashError) as err:  # a runtime given for another machine (auto makes one for it)
        flash(bundle, target, runtime=payload)
    message = str(err.value)
    assert f"is {other}, Python" in message and f"is for {here}, Python" in message
    assert f"the machine is {other}, not {here}" in message and "--runtime PATH" in message
    assert f"runtime_payload build --platform linux-{other}" in message and "--runtime none" in message
    (tmp_path / "r").mkdir()
    riscv = parse_target(f"ssh://me@board{dest}", ssh=fake_ssh(tmp_path / "r", machine="riscv64"))
    with pytest.raises(FlashError, match="riscv64 has no executorch/onnxruntime wheels"):
        flash(bundle, riscv, runtime="auto")  # refused from the probe, before any runtime is built
    assert not dest.exists()
    assert len(flash(bundle, target, runtime="none").copied) == 4  # the bundle alone still goes


def test_platform_probe_and_mismatches() -> None:
    assert parse_probe(subprocess.run(["sh", "-c", PROBE], capture_output=True, text=True).stdout) == local_platform()
    jetson = parse_probe("machine=aarch64\npython=Python 3.10.12\nlibc=glibc 2.35\n")
    assert jetson == Platform("aarch64", "3.10", "2.35")
    android = parse_probe("machine=aarch64\npython=/system/bin/sh: python3: inaccessible or not found\nlibc=\n")
    assert android == Platform("aarch64", "", "")
    runtime = {"machine": "aarch64", "python": "3.10", "glibc": "2.28"}
    assert mismatch(runtime, jetson) is None
    assert mismatch(runtime, android) == "it has no python3; its C library is not glibc (Android's bionic or musl)"
    assert mismatch({**runtime, "glibc": "2.38"}, jetson) == "its glibc 2.35 is older than the 2.38 the runtime needs"
    assert mismatch({**runtime, "python": "3.11"}, jetson) == "its python3 is 3.10, not 3.11"
    assert parse_probe("machine=arm64\n").machine == "aarch64"


def test_glibc_needed_reads_symbols_and_wheel_tags(tmp_path: Path) -> None:
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\0GLIBC_2.2.5\0GLIBC_2.32\0GLIBC_2.4\0")
    assert glibc_needed([lib], []) == "2.32"
    wheels = ["numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
              "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl", "idna-3.20-py3-none-any.whl"]
    assert glibc_needed([], wheels) == "2.27"  # a wheel runs on the lowest of its tags
    assert glibc_needed([], wheels[2:]) == ""


def test_cli_refuses_a_foreign_target_naming_both_platforms(bundle: Path, payload: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture, monkeypatch) -> None:
    from covspec.cli import main

    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "ssh"
    fake.write_text(f"#!/bin/sh\nexec {fake_ssh(tmp_path, machine='riscv64')[0]} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    code = main(["device", "flash", "--bundle", str(bundle), "--to", f"ssh://me@board{tmp_path / 'b'}",
                 "--runtime", str(payload)])
    err = capsys.readouterr().err
    assert code == 2 and "is riscv64" in err and "--runtime PATH" in err and "Traceback" not in err


# --- slow: this machine's real runtime, a tiny LLaVA bundle, answers through a real edge ---------------
PROMPT = "what is the color ?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """A tiny LLaVA checkpoint, its device bundle (.pte and ONNX, fp32), an edge serving the checkpoint on
    loopback (in this process, a thread), and an image."""
    import threading

    from PIL import Image
    from tiny_models import build_llava

    from covspec.edge_runtime.server import EdgeServer, EdgeSettings
    from covspec.edge_runtime.target import load_target
    from covspec.export.device_bundle import build_device_bundle

    root = tmp_path_factory.mktemp("exported")
    tiny = build_llava(root / "llava")
    bundle = build_device_bundle(tiny, root / "device", quant="none", formats=("pte", "onnx"), max_len=96)
    image = root / "picture.png"
    Image.new("RGB", (40, 36), (200, 30, 30)).save(image)
    server = EdgeServer(load_target(tiny)[0], EdgeSettings(bind="tcp://127.0.0.1:*"))
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [server.serve_once(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    yield bundle, server.endpoint, image
    stop.set()
    thread.join()
    server.close()


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine's runtime (what --runtime auto flashes: built, or from ~/.cache/covspec/device-runtime),
    copied so that a rebuild while the tests run (the tree edited meanwhile) does not change it under them."""
    from covspec.device_runtime.runtime_payload import build_payload, load_payload

    frozen = tmp_path_factory.mktemp("runtime") / "payload"
    shutil.copytree(build_payload(), frozen, ignore=shutil.ignore_patterns(".*"))
    load_payload(frozen)
    return frozen


def over(remote: list[str]):
    """Runs an argv locally (remote == []) or as one quoted command line over ssh."""
    return lambda argv: [*remote, shlex.join(argv)] if remote else argv


def answer(launch: list[str], edge: str, image: Path, *extra: str) -> dict:
    """One `covspec-device run --json` through the flashed launcher (a fresh process), its record.
    `launch`: [*ssh prefix, launcher] or [launcher]."""
    import json

    *remote, launcher = launch
    argv = [launcher, "run", "--edge", edge, "--image", str(image), "--prompt", PROMPT, "--json",
            "--max-new-tokens", "12", *extra]
    done = subprocess.run(over(remote)(argv), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def check_answers(launch: list[str], edge: str, image: Path) -> list[int]:
    """covspec on the bundle's .pte (native shim) and its ONNX programs equals target_only; with fixed
    windows (covspec_no_adaptive) the device drafts and the edge verifies windows."""
    reference = answer(launch, edge, image, "--mode", "target_only")["ids"]
    assert reference
    for backend in ("executorch", "onnx"):
        assert answer(launch, edge, image, "--mode", "covspec", "--backend", backend)["ids"] == reference, backend
        fixed = answer(launch, edge, image, "--mode", "covspec_no_adaptive", "--backend", backend)
        assert fixed["ids"] == reference and fixed["rounds"] >= 1 and fixed["drafted"] >= 1, (backend, fixed)
    return reference


def torch_free(venv_python: list[str]) -> None:
    """Neither torch nor transformers can be imported by the flashed runtime's Python at all."""
    probe = ("import importlib.util as u, sys; "
             "print([m for m in ('torch', 'transformers') if u.find_spec(m) or m in sys.modules])")
    *remote, python = venv_python
    done = subprocess.run(over(remote)([python, "-I", "-c", probe]), capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_flashed_launcher_answers_through_an_edge_from_a_folder(exported, runtime: Path, tmp_path: Path) -> None:
    import time

    bundle, edge, image = exported
    dest = tmp_path / "device"
    start = time.monotonic()
    first = flash(bundle, str(dest), runtime)
    seconds = time.monotonic() - start
    assert first.install == "made the venv" and first.launcher == str(dest / "bin" / "covspec-device")
    assert any(n.startswith("runtime/lib/libcovspec_et.so") for n in first.copied)
    torch_free([str(dest / "runtime" / "venv" / "bin" / "python")])
    ids = check_answers([str(dest / "bin" / "covspec-device")], edge, image)
    again = flash(bundle, str(dest), runtime)
    assert again.copied == [] and again.install == "venv already made"
    wheel = next((dest / "runtime" / "wheels").glob("numpy-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    repaired = flash(bundle, str(dest), runtime)
    assert repaired.copied == [f"runtime/wheels/{wheel.name}", RUNTIME_MANIFEST]
    assert repaired.install == "venv already made"
    print(f"flash to a folder with the runtime: {seconds:.1f} s (venv made); covspec = target_only, {len(ids)} tokens")


@pytest.mark.slow
def test_flashed_launcher_answers_through_an_edge_over_ssh(exported, runtime: Path, tmp_path: Path, sshd) -> None:
    ssh, port, user = sshd
    bundle, edge, image = exported
    dest = tmp_path / "jetson" / "covspec"
    target = parse_target(f"ssh://{user}@127.0.0.1:{port}{dest}", ssh=ssh)
    first = flash(bundle, target, runtime)
    assert first.install == "made the venv" and load_bundle(dest / "bundle").manifest == load_bundle(bundle).manifest
    remote = [*ssh, "-p", str(port), f"{user}@127.0.0.1"]
    torch_free([*remote, str(dest / "runtime" / "venv" / "bin" / "python")])
    check_answers([*remote, str(dest / "bin" / "covspec-device")], edge, image)
    assert flash(bundle, target, runtime).copied == []


def test_the_device_wheel_carries_no_demo_weights():
    """The covspec wheel a flash ships is built from the package dirs less covspec/demo/weights."""
    from covspec.device_runtime.runtime_payload import DEMO_WEIGHTS, REPO, source_tree

    _, files = source_tree()
    rel = [p.relative_to(REPO) for p in files]
    assert Path("covspec/demo/task.py") in rel and Path("device_runtime/client.py") in rel
    assert (REPO / DEMO_WEIGHTS).is_dir() and not [p for p in rel if p.is_relative_to(DEMO_WEIGHTS)]
