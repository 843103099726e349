"""Model families behind one loader: `load_adapter(path)` reads config.json and picks the family.
Importing this package does not import torch (the torch-free device reads `covspec.models.common`
through it); the families' modules and `VLMAdapter` load on first use."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covspec.errors import ModelLoadError
from covspec.models.common import DecodeState, VisualTokens, read_config

if TYPE_CHECKING:
    import torch

    from covspec.models.base import VLMAdapter

# family -> (module, adapter class, the config.json model_type values it serves)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "llava": ("covspec.models.llava", "LlavaAdapter", ("llava",)),
    "qwen2_5_vl": ("covspec.models.qwen2_5_vl", "Qwen25VLAdapter", ("qwen2_5_vl",)),
    "idefics3": ("covspec.models.idefics3", "Idefics3Adapter", ("idefics3",)),
}

__all__ = ["FAMILIES", "DecodeState", "VLMAdapter", "VisualTokens", "adapter_class", "family_of", "load_adapter"]


def family_of(model_type: str) -> str | None:
    for family, (_, _, model_types) in FAMILIES.items():
        if model_type in model_types:
            return family
    return None


def adapter_class(family: str) -> type[VLMAdapter]:
    module, name, _ = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def _supported() -> str:
    return ", ".join(t for _, _, types in FAMILIES.values() for t in types)


def __getattr__(name: str) -> Any:
    if name == "VLMAdapter":  # torch: imported when asked for
        from covspec.models.base import VLMAdapter

        return VLMAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_adapter(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                 expect_family: str | None = None) -> VLMAdapter:
    """Loads a local checkpoint folder as the adapter of its family. Every way the folder can be
    wrong (absent, not a checkpoint, broken config, another family, missing weights) is a
    ModelLoadError that names the folder and the cause."""
    if expect_family is not None and expect_family not in FAMILIES:
        raise ModelLoadError(f"unknown family {expect_family!r} (supported: {', '.join(FAMILIES)})")
    folder = Path(path)
    config = read_config(folder)
    model_type = config["model_type"]
    family = family_of(model_type)
    if family is None:
        raise ModelLoadError(f"model folder {folder}: model_type {model_type!r} is not a supported "
                             f"vision-language family (supported model_type: {_supported()})")
    if expect_family is not None and family != expect_family:
        raise ModelLoadError(f"model folder {folder}: expected a {expect_family} checkpoint, "
                             f"found model_type {model_type!r} ({family})")
    import torch

    return adapter_class(family).from_pretrained(folder, dtype=dtype or torch.float32, device=device)
