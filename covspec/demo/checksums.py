"""Checksums of the demo pair's files, so that shipped weights are used only when intact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
ROLES = ("target", "draft")
# what defines the models (the training log, covspec_demo.json, holds wall times and is not checked)
CHECKED = ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    return {f"{role}/{name}": sha256(folder / role / name) for role in ROLES for name in CHECKED
            if (folder / role / name).is_file()}


def write_manifest(folder: Path) -> dict:
    manifest = {"files": checksums(folder)}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def check_manifest(folder: Path) -> list[str]:
    """What is wrong with the pair in `folder` (empty when every file matches the manifest)."""
    path = folder / MANIFEST_NAME
    try:
        expected = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"no readable {MANIFEST_NAME}"]
    problems = []
    for role in ROLES:
        for name in CHECKED:
            key = f"{role}/{name}"
            file = folder / role / name
            if key not in expected:
                problems.append(f"{key} not in the manifest")
            elif not file.is_file():
                problems.append(f"{key} missing")
            elif sha256(file) != expected[key]:
                problems.append(f"{key} checksum differs")
    return problems
