"""`covspec device flash --bundle DIR --to TARGET`: puts a bundle on a device and checks it arrived.

TARGET is a local folder, `ssh://[user@]host[:port]/path` or `adb://SERIAL/path`. The source bundle is
verified first (a bundle whose manifest does not match its files is refused). Files whose sha256 on
the target already matches are skipped; the others are written under a temporary name and renamed
into place. If anything is copied, the target's manifest.json is removed first and written last, so a
half-flashed target never carries a manifest that claims files it lacks. Every file's checksum is then
read back from the target side and compared with the manifest.
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

from covspec.bundles.bundle import load_bundle
from covspec.export.manifest import MANIFEST, sha256_file


class FlashError(Exception):
    """The bundle could not be put on the target intact."""


class Target(Protocol):
    description: str

    def checksums(self, names: list[str]) -> dict[str, str]:
        """sha256 of each of `names` that exists on the target."""
        ...

    def put(self, source: Path, name: str) -> None:
        """Writes `source` as `name` atomically (temporary name, then rename)."""
        ...

    def remove(self, name: str) -> None: ...


def temp_name(name: str) -> str:
    path = PurePosixPath(name)
    return str(path.with_name(f".{path.name}.flash-{uuid.uuid4().hex[:8]}.tmp"))


@dataclass
class FolderTarget:
    root: Path

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


@dataclass
class ShellTarget:
    """A target reached through a command that runs a shell command on it: ssh or `adb shell`.
    `run` is that command's argv prefix; file bodies travel on stdin (`cat > tmp && mv tmp name`)."""

    run: list[str]
    root: str
    description: str

    def _sh(self, script: str, stdin: Path | None = None) -> str:
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
            try:
                done = subprocess.run([*self.run, script], stdin=f, capture_output=True, timeout=600)
            except FileNotFoundError:
                tool = Path(self.run[0]).name
                how = ("Android's platform-tools (apt install adb)" if tool == "adb"
                       else "an OpenSSH client (apt install openssh-client)" if tool == "ssh" else tool)
                raise FlashError(f"{self.description}: {tool} is not installed here: install {how} and put "
                                 f"{tool} on PATH") from None
        if done.returncode != 0:
            raise FlashError(f"{self.description}: {script.split()[0]} ... failed "
                             f"({done.stderr.decode(errors='replace').strip() or done.returncode})")
        return done.stdout.decode()

    def _path(self, name: str) -> str:
        return shlex.quote(str(PurePosixPath(self.root) / name))

    def checksums(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        paths = " ".join(self._path(n) for n in names)
        out = self._sh(f"for f in {paths}; do [ -f \"$f\" ] && sha256sum \"$f\"; done; true")
        by_path = {str(PurePosixPath(self.root) / n): n for n in names}
        found = {}
        for line in out.splitlines():
            digest, _, path = line.partition("  ")
            if path in by_path:
                found[by_path[path]] = digest
        return found

    def put(self, source: Path, name: str) -> None:
        final = self._path(name)
        tmp = self._path(temp_name(name))
        parent = shlex.quote(str((PurePosixPath(self.root) / name).parent))
        self._sh(f"mkdir -p {parent} && cat > {tmp} && mv -f {tmp} {final} || {{ rm -f {tmp}; exit 1; }}",
                 stdin=source)

    def remove(self, name: str) -> None:
        self._sh(f"rm -f {self._path(name)}")


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
        return ShellTarget([*(adb or ["adb"]), "-s", serial, "shell"], "/" + path, to)
    if "://" in to:
        raise ValueError(f"{to}: unknown target (a folder, ssh://user@host/path or adb://SERIAL/path)")
    return FolderTarget(Path(to))


@dataclass
class FlashReport:
    target: str
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    verified: int = 0


def flash(bundle_dir: str | Path, to: str | Target) -> FlashReport:
    """Copies the bundle to the target (only the files that differ) and verifies it there."""
    bundle = load_bundle(bundle_dir)  # refuses a bundle whose manifest does not match its files
    target = parse_target(to) if isinstance(to, str) else to
    expected = {name: entry["sha256"] for name, entry in bundle.manifest["files"].items()}
    expected[MANIFEST] = sha256_file(bundle.folder / MANIFEST)
    present = target.checksums(list(expected))
    report = FlashReport(target.description)
    stale = [n for n in expected if n != MANIFEST and present.get(n) != expected[n]]
    report.skipped = [n for n in expected if n != MANIFEST and n not in stale]
    if stale or present.get(MANIFEST) != expected[MANIFEST]:
        target.remove(MANIFEST)
        for name in stale:
            target.put(bundle.folder / name, name)
        target.put(bundle.folder / MANIFEST, MANIFEST)
        report.copied = [*stale, MANIFEST]
    else:
        report.skipped.append(MANIFEST)
    arrived = target.checksums(list(expected))
    bad = [n for n, digest in expected.items() if arrived.get(n) != digest]
    if bad:
        raise FlashError(f"{target.description}: after copying, {', '.join(bad)} "
                         f"{'does' if len(bad) == 1 else 'do'} not match the manifest")
    report.verified = len(expected)
    return report
