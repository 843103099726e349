"""Where a model runs: a device name (cpu, cuda, cuda:N) and a dtype name, checked before anything
is loaded, so that a request for CUDA where none is present, or a dtype we do not serve, is one
clear error that names what was asked for."""

from __future__ import annotations

import re

import torch

from covspec.errors import CovspecError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name of DTYPES (or one of its dtypes) -> the torch dtype; CovspecError otherwise."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise CovspecError(f"dtype {name} is not served (choose one of {', '.join(DTYPES)})")
        return name
    if name not in DTYPES:
        raise CovspecError(f"dtype {name!r} is not served (choose one of {', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """cpu | cuda | cuda:N -> the torch device, checked to be present; CovspecError otherwise."""
    text = str(name)
    if not DEVICE_PATTERN.fullmatch(text):
        raise CovspecError(f"device {text!r} is not one of cpu, cuda, cuda:N")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CovspecError(f"device {text!r} asked for, but CUDA is not available here "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    device = torch.device(text)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise CovspecError(f"device {text!r} asked for, but only {count} CUDA device(s) are present")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """The DTYPES name of a dtype (its repr for any other)."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))
