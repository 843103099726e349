"""covspec.export: turns a draft/target pair of Hugging Face checkpoints into a device bundle
(ExecuTorch `.pte` and ONNX programs, quantized) and an edge bundle (TensorRT / ONNX / PyTorch).

    build_bundles(draft, target, out, quant="int8", formats=("pte", "onnx")) -> (device_dir, edge_dir)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_bundles"]


def build_bundles(draft: str | Path, target: str | Path, out: str | Path, quant: str = "int8",
                  formats: tuple[str, ...] = ("pte", "onnx"), edge_backend: str = "auto",
                  max_len: int | None = None, calibration: str | Path | dict[str, Any] | None = None,
                  quiet: bool = False) -> tuple[Path, Path]:
    """Writes out/device and out/edge, each with its manifest.json, showing progress with rich.
    `calibration`: a profile (dict, or the path of its JSON file) recorded in the device manifest."""
    import json

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from covspec.export.device_bundle import build_device_bundle
    from covspec.export.edge_bundle import build_edge_bundle

    out = Path(out)
    if isinstance(calibration, str | Path):
        from covspec.calibration.profile import load_profile

        load_profile(calibration)  # a clear error for a profile that is not one
        calibration = {"file": Path(calibration).name, **json.loads(Path(calibration).read_text())}
    console = Console(stderr=True, quiet=quiet)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=False) as progress:
        task = progress.add_task("export", total=None)

        def step(what: str) -> None:
            progress.update(task, description=what)
            progress.console.print(f"  {what}")

        device = build_device_bundle(Path(draft), out / "device", quant=quant, formats=formats, max_len=max_len,
                                     calibration=calibration, step=step)
        edge = build_edge_bundle(Path(target), out / "edge", backend=edge_backend, max_len=max_len, step=step,
                                 draft=Path(draft))
        progress.update(task, description="done")
    return device, edge
