"""The bundle manifest: what a bundle folder holds and how it is checked.

`manifest.json` sits next to the files it lists: format version, every file with its size and
sha256, and what a runtime needs to drive the files (family, shapes, tokenizer fingerprint, quant
scheme, tool versions, calibration profile). Written by export, read by the device runtime and flash.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 2: the .pte in ExecuTorch's multimodal layout (one model.pte); 1: vision.pte + decoder.pte
MANIFEST = "manifest.json"
TOOLS = ("covspec", "torch", "transformers", "executorch", "torchao", "onnx", "onnxscript", "onnxruntime",
         "tokenizers")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` but the manifest: relative posix path -> {size, sha256}."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST:
            out[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = None
    return versions


def write_manifest(folder: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Writes folder/manifest.json: `body` plus format version, tool versions and the file list."""
    manifest = {"format_version": FORMAT_VERSION, **body, "tools": tool_versions(),
                "files": file_entries(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest
