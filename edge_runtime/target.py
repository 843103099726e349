"""What the edge serves: a target checkpoint folder, or an edge bundle (`covspec export`) whose
manifest is verified (checksums, format version) and whose recorded backend is run:

- "pytorch": the bundle's Hugging Face checkpoint with the PyTorch adapter;
- "onnx": the bundle's ONNX programs under ONNX Runtime (the exported-programs adapter);
- "tensorrt": the serialized engine (decoder) with the vision ONNX, where TensorRT and a GPU are
  present; elsewhere the bundle's checkpoint, said so in the returned reason. Never run here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from covspec.bundles.bundle import BundleError, load_bundle
from covspec.bundles.manifest import MANIFEST
from covspec.errors import CovspecError
from covspec.models import load_adapter
from covspec.models.base import CachedDecoderAdapter, VLMAdapter
from covspec.models.placement import dtype_name, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from covspec.edge_runtime.settings import EdgeSettings

log = logging.getLogger("covspec.edge")


def as_adapter(view: Any) -> VLMAdapter:
    """A duck-typed target (models.torch_view.TorchView: an exported bundle seen through torch) where a
    VLMAdapter is expected: it speaks the interface the edge drives without deriving from it."""
    return cast(VLMAdapter, view)


def place_target(adapter: VLMAdapter, device: str = "cpu", dtype: str = "float32") -> VLMAdapter:
    """Puts a loaded target on `device` in `dtype` (a no-op where it is there already). Only the PyTorch
    decoders move: an exported program (ONNX) runs where and as it was exported, so anything but
    cpu/float32 is refused for it."""
    where, kind = resolve_device(device), resolve_dtype(dtype)
    if isinstance(adapter, CachedDecoderAdapter):
        if adapter.device != where or adapter.dtype != kind:
            adapter.place(where, kind)
        return adapter
    if where.type != "cpu" or kind != resolve_dtype("float32"):
        raise CovspecError(f"a {type(adapter).__name__} target runs on the CPU in float32 only; "
                           f"--device {device} --dtype {dtype} need a PyTorch checkpoint")
    return adapter


def static_target(adapter: VLMAdapter, settings: EdgeSettings) -> VLMAdapter:
    """The adapter on the static verify path when the settings ask for it (a slot per session, one spare)."""
    if not (settings.static_cache or settings.cuda_graphs):
        return adapter
    if not isinstance(adapter, CachedDecoderAdapter):
        raise CovspecError(f"--static-cache/--cuda-graphs need a PyTorch checkpoint, not a {type(adapter).__name__}")
    from covspec.edge_runtime.static_target import StaticTarget

    target = StaticTarget.create(adapter, slots=settings.max_sessions + 1, max_len=settings.static_len,
                                 cuda_graphs=settings.cuda_graphs)
    graphs = f"{target.verifier.warm()} CUDA graphs" if target.verifier.cuda_graphs else "eager passes"
    log.info("static verify path: %d slots x %d positions (%.1f MiB), windows padded to %s, %s",
             settings.max_sessions + 1, target.verifier.pool.max_len, target.verifier.pool.bytes / 2**20,
             ",".join(map(str, target.verifier.buckets)), graphs)
    return target


def load_target(path: str | Path, threads: int | None = None, device: str = "cpu",
                dtype: str = "float32") -> tuple[VLMAdapter, str]:
    """(adapter, what was loaded and why), the PyTorch target on `device` in `dtype`."""
    path = Path(path)
    where, kind = resolve_device(device), resolve_dtype(dtype)
    placed = f"{where}, {dtype_name(kind)}"
    if not (path / MANIFEST).is_file():
        return load_adapter(path, dtype=kind, device=str(where)), f"checkpoint {path} (PyTorch, {placed})"
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
        from covspec.models.torch_view import TorchView

        adapter = place_target(as_adapter(TorchView(BundleAdapter(bundle, backend="onnx", threads=threads))),
                               device, dtype)
        return adapter, f"edge bundle {path}: ONNX Runtime"
    if backend == "tensorrt":
        from covspec.export.tensorrt_engine import tensorrt_unavailable

        missing = tensorrt_unavailable()
        if missing is None:
            from covspec.bundles.adapter import BundleAdapter
            from covspec.models.torch_view import TorchView

            return (as_adapter(TorchView(BundleAdapter(bundle, backend="tensorrt", threads=threads))),
                    f"edge bundle {path}: TensorRT engine")
        return (load_adapter(checkpoint, dtype=kind, device=str(where)),
                f"edge bundle {path}: its checkpoint with PyTorch, {placed} (TensorRT engine not usable here: {missing})")
    if backend != "pytorch":
        raise CovspecError(f"bundle {path}: unknown edge backend {backend!r} in {MANIFEST}")
    return load_adapter(checkpoint, dtype=kind, device=str(where)), f"edge bundle {path}: checkpoint with PyTorch, {placed}"
