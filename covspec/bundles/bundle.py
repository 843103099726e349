"""Loading a bundle folder: `load_bundle(dir)` reads manifest.json and refuses, with an error naming the
file, a bundle whose format version is not this runtime's, whose listed file is missing, truncated
(size differs) or altered (sha256 differs), or which lacks a program its manifest names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covspec.bundles.manifest import FORMAT_VERSION, MANIFEST, sha256_file
from covspec.errors import CovspecError

PROGRAM_PARTS = ("model", "vision", "decoder")  # the keys of a manifest's programs[fmt] that name files
REEXPORT = ("re-export it with this version of covspec: covspec export --draft DRAFT --target TARGET "
            "--out OUT, then use OUT/device or OUT/edge")


class BundleError(CovspecError):
    """A bundle folder that cannot be used as it is."""


@dataclass
class Bundle:
    folder: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        return self.folder / name

    def program(self, backend_format: str, part: str) -> Path:
        """The file of `part` in format "pte" ("model": the one multimodal .pte) or "onnx"/"tensorrt"
        ("vision" or "decoder")."""
        programs = self.manifest.get("programs", {})
        if backend_format not in programs:
            have = ", ".join(programs) or "none"
            why = self.manifest.get("unsupported", {}).get(backend_format)
            raise BundleError(f"bundle {self.folder}: has no {backend_format} programs (it has: {have})"
                              + (f"; export failed: {why['error']}" if why else ""))
        if part not in programs[backend_format]:
            raise BundleError(f"bundle {self.folder}: its {backend_format} programs have no {part!r} "
                              f"(they have: {', '.join(k for k in PROGRAM_PARTS if k in programs[backend_format])})")
        return self.folder / programs[backend_format][part]


def read_manifest(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder}: not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {folder}: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"bundle {folder}: {MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"bundle {folder}: {MANIFEST} lists no files")
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:  # the device runtime is the older side
        raise BundleError(f"bundle {folder}: {MANIFEST} has format version {version}, newer than this device "
                          f"runtime reads (version {FORMAT_VERSION}); update the runtime: reflash with `covspec "
                          "device flash` from the exporting covspec, or pip install -U 'covspec[device]'")
    if version != FORMAT_VERSION:
        old = " (version 1: vision.pte + decoder.pte, before the ExecuTorch multimodal layout)" if version == 1 else ""
        raise BundleError(f"bundle {folder}: {MANIFEST} has format version {version!r}{old}, this runtime reads "
                          f"version {FORMAT_VERSION}; {REEXPORT}")
    return manifest


def check_file(folder: Path, name: str, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """None when folder/name matches its manifest entry, else what is wrong with it."""
    path = folder / name
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"{name}: size {size} bytes, the manifest says {entry.get('size')} (truncated or replaced)"
    if checksum and sha256_file(path) != entry.get("sha256"):
        return f"{name}: sha256 does not match the manifest (corrupted or altered)"
    return None


def verify_files(folder: Path, manifest: dict[str, Any], checksum: bool = True) -> list[str]:
    """Every problem with the listed files, one line each (empty when the bundle is intact)."""
    problems = []
    for name, entry in manifest["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: not a path inside the bundle")
            continue
        problem = check_file(folder, name, entry, checksum)
        if problem:
            problems.append(problem)
    for fmt, parts in manifest.get("programs", {}).items():
        for part in PROGRAM_PARTS:
            name = parts.get(part)
            if name and name not in manifest["files"]:
                problems.append(f"{name}: the {fmt} {part} program is not among the listed files")
    return problems


def load_bundle(folder: str | Path, checksum: bool = True) -> Bundle:
    """Reads and verifies a bundle folder. Raises BundleError naming every bad file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = verify_files(folder, manifest, checksum)
    if problems:
        raise BundleError(f"bundle {folder}: " + "; ".join(problems))
    return Bundle(folder, manifest)
