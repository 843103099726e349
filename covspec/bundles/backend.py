"""The device's draft and what runs it: a bundle's runtime (the one asked for, or for "auto" the one
the bundle has programs for: ExecuTorch's .pte when present, else ONNX), or a checkpoint on PyTorch.
Shared by the API, the CLI and the bench's device workers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from covspec.errors import CovspecError

if TYPE_CHECKING:
    from covspec.bundles.adapter import BundleAdapter
    from covspec.models.base import VLMAdapter


def bundle_backend(bundle: str | Path, backend: str = "auto") -> str:
    """`backend`, or for "auto" the one the device bundle has programs for: executorch (its .pte)
    when present, else onnx."""
    if backend != "auto":
        return backend
    from covspec.bundles.bundle import BundleError, load_bundle

    try:
        manifest = load_bundle(bundle).manifest
    except BundleError as err:
        raise CovspecError(str(err)) from err
    if manifest.get("kind", "device") != "device":
        raise CovspecError(f"bundle {bundle}: is an {manifest['kind']} bundle; a device runs the device bundle "
                           "(covspec export's OUT/device)")
    programs = manifest.get("programs", {})
    for name, fmt in (("executorch", "pte"), ("onnx", "onnx")):
        if fmt in programs:
            return name
    raise CovspecError(f"bundle {bundle}: has neither ExecuTorch nor ONNX programs (re-export it with covspec export)")


def load_draft(model: str | Path | None = None, bundle: str | Path | None = None, backend: str = "auto",
               threads: int | None = None) -> VLMAdapter | BundleAdapter:
    """The device's draft: an exported device bundle run by `backend` (executorch, onnx, or auto: see
    bundle_backend), or a Hugging Face checkpoint folder (`model`). Exactly one of the two."""
    if (model is None) == (bundle is None):
        raise CovspecError("give the draft as --bundle DIR (an exported device bundle) or --model PATH (a checkpoint)")
    if bundle is not None:
        from covspec.bundles.adapter import BundleAdapter
        from covspec.bundles.bundle import BundleError

        backend = bundle_backend(bundle, backend)
        try:
            return BundleAdapter(bundle, backend=backend, threads=threads)
        except BundleError as err:  # its message names the bundle already
            raise CovspecError(str(err)) from err
        except ValueError as err:
            raise CovspecError(f"--backend: {err}") from err
    from covspec.models import load_adapter

    assert model is not None  # one of the two, checked above
    return load_adapter(model)
