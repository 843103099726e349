"""What the edge serves: a target checkpoint folder, or an edge bundle (`covspec export`) whose
manifest is verified (checksums, format version) and whose recorded backend is run:

- "pytorch": the bundle's Hugging Face checkpoint with the PyTorch adapter;
- "onnx": the bundle's ONNX programs under ONNX Runtime (the exported-programs adapter);
- "tensorrt": the serialized engine (decoder) with the vision ONNX, where TensorRT and a GPU are
  present; elsewhere the bundle's checkpoint, said so in the returned reason. Never run here.
"""

from __future__ import annotations

from pathlib import Path

from covspec.bundles.bundle import BundleError, load_bundle
from covspec.errors import CovspecError
from covspec.export.manifest import MANIFEST
from covspec.models import load_adapter
from covspec.models.base import VLMAdapter


def load_target(path: str | Path, threads: int | None = None) -> tuple[VLMAdapter, str]:
    """(adapter, what was loaded and why)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return load_adapter(path), f"checkpoint {path} (PyTorch)"
    try:
        bundle = load_bundle(path)
    except BundleError as err:
        raise CovspecError(str(err)) from err
    manifest = bundle.manifest
    if manifest.get("kind") != "edge":
        raise CovspecError(f"bundle {path}: a {manifest.get('kind')!r} bundle, the edge serves an edge bundle "
                           "(covspec export writes OUT/edge) or a checkpoint folder")
    backend = manifest.get("backend")
    checkpoint = path / manifest.get("checkpoint", "checkpoint")
    if backend == "onnx":
        from covspec.bundles.adapter import BundleAdapter

        return BundleAdapter(bundle, backend="onnx", threads=threads), f"edge bundle {path}: ONNX Runtime"
    if backend == "tensorrt":
        from covspec.export.tensorrt_engine import tensorrt_unavailable

        missing = tensorrt_unavailable()
        if missing is None:
            from covspec.bundles.adapter import BundleAdapter

            return BundleAdapter(bundle, backend="tensorrt", threads=threads), f"edge bundle {path}: TensorRT engine"
        return load_adapter(checkpoint), f"edge bundle {path}: its checkpoint with PyTorch (TensorRT engine not usable here: {missing})"
    if backend != "pytorch":
        raise CovspecError(f"bundle {path}: unknown edge backend {backend!r} in {MANIFEST}")
    return load_adapter(checkpoint), f"edge bundle {path}: checkpoint with PyTorch"
