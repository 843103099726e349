"""`covspec device flash --bundle DIR --to TARGET [--runtime auto|none|PATH]`: puts a bundle, the device
runtime and its launcher on a device, and checks they arrived.

TARGET is a local folder, `ssh://[user@]host[:port]/path` or `adb://SERIAL/path`; it receives

    bundle/                 the bundle (its manifest.json)
    runtime/, bin/          the runtime (runtime/runtime.json; device_runtime/runtime_payload.py) and the
                            launcher bin/covspec-device, which answers with the bundle through an edge

The source bundle and runtime are verified first; with a runtime, the target's platform (machine,
python3, glibc) is read over its shell, or given for a folder (an SD card image, a rootfs) with
`--platform linux-aarch64 --python 3.11`; `--runtime auto` makes the runtime for that platform (on another
machine than this one: its wheels downloaded for its tags, the native shim cross-compiled;
runtime_payload.py), a platform nothing can be made for (Android, armv7, an old Python or glibc) is refused
naming what is supported and the fix, and a given runtime made for another platform is refused before
anything is copied. Files whose sha256 on the target already matches are skipped; the others are written under a
temporary name and renamed into place. If anything of a bundle or runtime is copied, its manifest is
removed first and written last, so a half-flashed target never carries a manifest that claims files it
lacks. Every file's checksum is then read back from the target side and compared. Last, on folder and
ssh targets of this machine's platform, runtime/install.sh makes the runtime's venv offline from its wheels
(once per runtime); a folder for another platform and adb targets (untested here: no device was reachable)
make it on the launcher's first start, with the target's own Python.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlsplit

from covspec.bundles.bundle import Bundle, load_bundle
from covspec.bundles.manifest import MANIFEST, sha256_file
from covspec.device_runtime.platforms import (
    PROBE,
    Platform,
    describe_runtime,
    local_platform,
    mismatch,
    parse_probe,
    unbuildable,
)
from covspec.device_runtime.runtime_payload import (
    INSTALLER,
    LAUNCHER,
    RUNTIME_MANIFEST,
    Payload,
    PayloadError,
    build_payload,
    load_payload,
)
from covspec.errors import CovspecError

BUNDLE_DIR = "bundle"


class FlashError(CovspecError):
    """The bundle could not be put on the target intact."""


class Target(Protocol):
    @property
    def description(self) -> str: ...

    def checksums(self, names: list[str]) -> dict[str, str]:
        """sha256 of each of `names` that exists on the target."""
        ...

    def put(self, source: Path, name: str) -> None:
        """Writes `source` as `name` atomically (temporary name, then rename)."""
        ...

    def remove(self, name: str) -> None: ...

    def shell(self, script: str) -> str:
        """Runs `script` with the target's sh; its stdout. FlashError (with its stderr) when it fails."""
        ...

    def path(self, name: str) -> str:
        """`name`'s absolute path on the target, quoted for its shell."""
        ...


def temp_name(name: str) -> str:
    path = PurePosixPath(name)
    return str(path.with_name(f".{path.name}.flash-{uuid.uuid4().hex[:8]}.tmp"))


@dataclass
class FolderTarget:
    root: Path
    installs: bool = True  # runtime/install.sh is run at flash time

    @property
    def description(self) -> str:
        return str(self.root)

    def checksums(self, names: list[str]) -> dict[str, str]:
        return {n: sha256_file(self.root / n) for n in names if (self.root / n).is_file()}

    def put(self, source: Path, name: str) -> None:
        final = self.root / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / temp_name(name)
        try:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def shell(self, script: str) -> str:
        return run_shell(["sh", "-c", script], self.description, script)

    def path(self, name: str) -> str:
        return shlex.quote(str((self.root / name).absolute()))


def run_shell(argv: list[str], description: str, script: str, stdin: Path | None = None) -> str:
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        try:
            done = subprocess.run(argv, stdin=f, capture_output=True, timeout=900)
        except FileNotFoundError:
            tool = Path(argv[0]).name
            how = ("Android's platform-tools (apt install adb)" if tool == "adb"
                   else "an OpenSSH client (apt install openssh-client)" if tool == "ssh" else tool)
            raise FlashError(f"{description}: {tool} is not installed here: install {how} and put "
                             f"{tool} on PATH") from None
    if done.returncode != 0:
        raise FlashError(f"{description}: {script.split()[0]} ... failed "
                         f"({done.stderr.decode(errors='replace').strip() or done.returncode})")
    return done.stdout.decode()


@dataclass
class ShellTarget:
    """A target reached through a command that runs a shell command on it: ssh or `adb shell`.
    `run` is that command's argv prefix; file bodies travel on stdin (`cat > tmp && mv tmp name`)."""

    run: list[str]
    root: str
    description: str
    installs: bool = True  # False on adb: the launcher makes the venv on its first run

    def shell(self, script: str, stdin: Path | None = None) -> str:
        return run_shell([*self.run, script], self.description, script, stdin)

    def path(self, name: str) -> str:
        return shlex.quote(str(PurePosixPath(self.root) / name))

    def checksums(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        paths = " ".join(self.path(n) for n in names)
        out = self.shell(f"for f in {paths}; do [ -f \"$f\" ] && sha256sum \"$f\"; done; true")
        by_path = {str(PurePosixPath(self.root) / n): n for n in names}
        found = {}
        for line in out.splitlines():
            digest, _, path = line.partition("  ")
            if path in by_path:
                found[by_path[path]] = digest
        return found

    def put(self, source: Path, name: str) -> None:
        final = self.path(name)
        tmp = self.path(temp_name(name))
        parent = shlex.quote(str((PurePosixPath(self.root) / name).parent))
        self.shell(f"mkdir -p {parent} && cat > {tmp} && mv -f {tmp} {final} || {{ rm -f {tmp}; exit 1; }}",
                 stdin=source)

    def remove(self, name: str) -> None:
        self.shell(f"rm -f {self.path(name)}")


def parse_target(to: str, ssh: list[str] | None = None, adb: list[str] | None = None) -> Target:
    """A folder path, ssh://[user@]host[:port]/path or adb://SERIAL/path. `ssh`/`adb` override the
    client commands (tests, or extra options)."""
    if to.startswith("ssh://"):
        url = urlsplit(to)
        if not url.hostname or not url.path or url.path == "/":
            raise ValueError(f"{to}: expected ssh://[user@]host[:port]/path")
        host = f"{url.username}@{url.hostname}" if url.username else url.hostname
        prefix = ssh or ["ssh", "-o", "BatchMode=yes"]
        port = ["-p", str(url.port)] if url.port else []
        return ShellTarget([*prefix, *port, host], url.path, to)
    if to.startswith("adb://"):
        serial, _, path = to[len("adb://"):].partition("/")
        if not serial or not path:
            raise ValueError(f"{to}: expected adb://SERIAL/path")
        return ShellTarget([*(adb or ["adb"]), "-s", serial, "shell"], "/" + path, to, installs=False)
    if "://" in to:
        raise ValueError(f"{to}: unknown target (a folder, ssh://user@host/path or adb://SERIAL/path)")
    return FolderTarget(Path(to))


@dataclass
class FlashReport:
    target: str
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    verified: int = 0
    runtime: str = ""  # the runtime's platform, "" when none was flashed
    install: str = ""  # what runtime/install.sh did: "made the venv", "venv already made", "on first run"
    launcher: str = ""  # the launcher's path on the target
    note: str = ""  # what was and was not installed, where that is not the whole runtime (adb)


def flash(bundle_dir: str | Path, to: str | Target, runtime: str | Path = "auto", log=print,
          platform: Platform | None = None) -> FlashReport:
    """Copies the bundle to TARGET/bundle and, unless `runtime` is "none", the runtime (`auto`: made on this
    machine for the target's platform, built or cached; else a payload folder) to TARGET/runtime and
    TARGET/bin, only the files that differ; verifies them there, then installs the runtime's venv (folder
    and ssh targets of this machine's platform). `platform`: a folder target's, as given (--platform)."""
    bundle = load_bundle(bundle_dir)  # refuses a bundle whose manifest does not match its files
    target = parse_target(to) if isinstance(to, str) else to
    if platform is not None and not isinstance(target, FolderTarget):
        raise FlashError(f"{target.description}: --platform/--python are for a folder target; an ssh or adb "
                         "target is asked for its own (uname -m, python3 -V, glibc)")
    payload = None
    if str(runtime) != "none":
        # first: an unreachable, unsupported or foreign target costs no build
        there = platform or parse_probe(target.shell(PROBE))
        here = local_platform()
        if str(runtime) == "auto":
            problem = unbuildable(there)
            if problem:
                raise FlashError(f"{target.description} is {there.describe()}: no covspec device runtime can be "
                                 f"made for it: {problem}")
        native = there.machine == here.machine and there.python == here.python
        if isinstance(target, FolderTarget) and platform is not None and not native:
            target.installs = False  # another platform's Python makes the venv, at the launcher's first start
        payload = resolve_runtime(runtime, log, None if native else there)
        check_platform(target, there, payload.platform,
                       "built here" if str(runtime) == "auto" else f"at {payload.folder}")
    groups = [(bundle_files(bundle), f"{BUNDLE_DIR}/{MANIFEST}")]
    if payload is not None:
        groups.append((payload_files(payload), RUNTIME_MANIFEST))
    report = FlashReport(target.description)
    for files, manifest in groups:
        copied, skipped = sync(target, files, manifest)
        report.copied += copied
        report.skipped += skipped
    expected = {name: digest for files, _ in groups for name, (_, digest) in files.items()}
    arrived = target.checksums(list(expected))
    bad = [n for n, digest in expected.items() if arrived.get(n) != digest]
    if bad:
        raise FlashError(f"{target.description}: after copying, {', '.join(bad)} "
                         f"{'does' if len(bad) == 1 else 'do'} not match the manifest")
    report.verified = len(expected)
    if payload is not None:
        report.runtime = describe_runtime(payload.platform)
        report.install = install(target)
        report.launcher = target.path(LAUNCHER)
    elif isinstance(target, ShellTarget) and target.description.startswith("adb://"):
        report.note = ADB_NOTE
    return report


ADB_NOTE = ("installed on the Android device: bundle/ (the .pte programs and tokenizer an app's ExecuTorch "
            "LlmModule loads, manifest.json with their sha256) and nothing else; NOT installed: the Python device "
            "runtime and its launcher (they need glibc Linux and python3; Android has bionic), so nothing on the "
            "device answers yet: the app speaks the wire protocol (transport/protocol.py) itself, or calls the "
            "native shim's C API (device_runtime/native/et_shim.cpp); see docs/deployment.md, section Android")


def resolve_runtime(runtime: str | Path, log, target: Platform | None = None) -> Payload:
    """`auto`: the payload made here for `target` (None: this machine); else the folder given."""
    try:
        folder = build_payload(log=log, target=target) if str(runtime) == "auto" else Path(runtime)
        return load_payload(folder)
    except PayloadError as err:
        raise FlashError(f"runtime: {err}") from None


def check_platform(target: Target, there: Platform, runtime: dict, built: str) -> None:
    """Refuses a target the runtime cannot run on, before anything is copied, naming both platforms."""
    problem = mismatch(runtime, there)
    if problem is None:
        return
    flags = f"--platform linux-{there.machine} --python {there.python or '3.11'}"
    raise FlashError(f"{target.description} is {there.describe()}, but the runtime {built} is for "
                     f"{describe_runtime(runtime)} ({problem}). Flash with --runtime auto (made here for the "
                     f"target's platform), or give --runtime PATH of a runtime made for it (`python -m "
                     f"covspec.device_runtime.runtime_payload build {flags}`), or copy the bundle alone with "
                     "--runtime none")


def bundle_files(bundle: Bundle) -> dict[str, tuple[Path, str]]:
    """Target name -> (source file, sha256) of the bundle's files and its manifest."""
    files = {f"{BUNDLE_DIR}/{name}": (bundle.folder / name, entry["sha256"])
             for name, entry in bundle.manifest["files"].items()}
    files[f"{BUNDLE_DIR}/{MANIFEST}"] = (bundle.folder / MANIFEST, sha256_file(bundle.folder / MANIFEST))
    return files


def payload_files(payload: Payload) -> dict[str, tuple[Path, str]]:
    files = {name: (payload.folder / name, digest) for name, digest in payload.files().items()}
    files[RUNTIME_MANIFEST] = (payload.folder / RUNTIME_MANIFEST, sha256_file(payload.folder / RUNTIME_MANIFEST))
    return files


def sync(target: Target, files: dict[str, tuple[Path, str]], manifest: str) -> tuple[list[str], list[str]]:
    """Copies the files whose sha256 differs on the target; when anything is copied, `manifest` is removed
    first and written last. Returns (copied, skipped)."""
    present = target.checksums(list(files))
    stale = [n for n in files if n != manifest and present.get(n) != files[n][1]]
    skipped = [n for n in files if n != manifest and n not in stale]
    if not stale and present.get(manifest) == files[manifest][1]:
        return [], [*skipped, manifest]
    target.remove(manifest)
    for name in stale:
        target.put(files[name][0], name)
    target.put(files[manifest][0], manifest)
    return [*stale, manifest], skipped


def install(target: Target) -> str:
    """Makes the launcher and installer executable and, where the target installs at flash time, runs
    runtime/install.sh (offline; nothing to do when its venv was made from this runtime.json)."""
    launcher, installer = target.path(LAUNCHER), target.path(INSTALLER)
    target.shell(f"chmod 755 {launcher} {installer}")
    stamp = target.path("runtime/venv/covspec-runtime.json")
    if not getattr(target, "installs", True):
        if isinstance(target, FolderTarget):
            made = target.shell(f"cmp -s {target.path(RUNTIME_MANIFEST)} {stamp} && echo ready; true")
            return ("venv already made" if made.strip() == "ready" else
                    "venv made on the target by the launcher's first start, with the target's own Python (offline)")
        return "venv made on the launcher's first run (adb: untested, no device was reachable)"
    out = target.shell(f"if cmp -s {target.path(RUNTIME_MANIFEST)} {stamp}; then echo ready; "
                       f"else sh {installer} && echo made; fi")
    return "venv already made" if out.strip().endswith("ready") else "made the venv"
