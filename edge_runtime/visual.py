"""An OPEN's image on the target's side: decoded within the pixel bound, through the vision encoder,
and the visual tokens the device kept (target pruning)."""

from __future__ import annotations

import numpy as np
import torch

from covspec.images import load_image
from covspec.models.base import VisualTokens, VLMAdapter
from covspec.transport import protocol as wire


def kept_indices(msg: wire.Open) -> torch.Tensor | None:
    """The OPEN's kept visual-token indices [m] (target pruning), or None."""
    return None if msg.kept is None else torch.from_numpy(msg.kept.astype(np.int64))


def encode(adapter: VLMAdapter, msg: wire.Open, max_pixels: int) -> VisualTokens:
    """The OPEN's image through the target's vision side (ImageError when it is not a valid one)."""
    return adapter.encode_image(adapter.preprocess(load_image(msg.image, max_pixels=max_pixels)))
