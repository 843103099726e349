"""The embedded default: a procedurally generated visual QA task and the draft/target pair trained on it.

The pair ships in covspec/demo/weights/{target,draft}/ with a manifest of checksums. `build()` uses
the shipped weights when they match the manifest, otherwise (or with force=True) retrains them from
the seed, deterministically, and writes a fresh manifest.
"""

from __future__ import annotations

from pathlib import Path

from covspec.demo.checksums import MANIFEST_NAME, check_manifest, write_manifest

WEIGHTS = Path(__file__).resolve().parent / "weights"

__all__ = ["WEIGHTS", "build", "build_fine_draft", "default_draft_path", "default_target_path"]


def default_target_path() -> Path:
    return WEIGHTS / "target"


def default_draft_path() -> Path:
    return WEIGHTS / "draft"


def build(force: bool = False, out: Path | None = None) -> Path:
    """The folder holding target/ and draft/: the shipped pair if intact (checksums match the
    manifest) and not `force`, else trained now (about half an hour on 2 cores) and written there."""
    from rich.console import Console

    console = Console(stderr=True)
    folder = Path(out) if out is not None else WEIGHTS
    if not force:
        problems = check_manifest(folder)
        if not problems:
            console.print(f"demo pair in {folder}: checksums match {MANIFEST_NAME}")
            return folder
        console.print(f"demo pair in {folder} needs training: " + "; ".join(problems[:3]))
    from covspec.demo.train import train_pair

    before = _read(folder / MANIFEST_NAME)
    train_pair(folder)
    manifest = write_manifest(folder)
    if before is not None:
        same = before.get("files") == manifest["files"]
        console.print("rebuilt weights are identical to the previous manifest" if same
                      else "rebuilt weights differ from the previous manifest")
    return folder


def build_fine_draft(out: Path | None = None) -> Path:
    """Trains the pruning study's fine-patch draft (train.FINE_DRAFT, about 7 minutes on 2 cores)
    against the shipped target and writes it to out (default: weights/draft_fine)."""
    import shutil
    import tempfile

    from covspec.demo.train import FINE_DRAFT, train_pair

    out = Path(out) if out is not None else WEIGHTS / "draft_fine"
    with tempfile.TemporaryDirectory() as tmp:
        train_pair(Path(tmp), FINE_DRAFT, target_from=default_target_path())
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(tmp) / "draft", out)
    return out


def _read(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
