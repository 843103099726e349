"""The draft model as the device runtime drives it: numpy arrays in and out, no torch in sight.

`DraftModel` is the VLMAdapter interface with numpy at its edges. An exported bundle implements it
natively (`covspec.bundles.adapter.BundleAdapter`, torch-free); a Hugging Face adapter is seen
through `NumpyView` (covspec/models/numpy_view.py, which needs torch). The drafter, the pruner, the
samplers and the device's per-answer logic are written once, against this protocol, so the torch-based
device and the torch-free one run the same code.

    preprocess(image)                 -> dict of the vision program's inputs (opaque here)
    encode_image(pixels)              -> VisualTokens: embeds [N, d] float32, activity [N], attention [N] | None
    prompt_embeddings(prompt)         -> [T, d] float32 (the pruner's query)
    prefill(visual, prompt, kept [k]) -> (logits [V] float32, DecodeState)
    forward(state, ids [k] int64)     -> logits [k, V] float32
    truncate(state, length), fork_state(state), decode(ids), fingerprint(), check_prompt(prompt)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from covspec.models.common import DecodeState, VisualTokens, to_numpy, visual_to_numpy  # noqa: F401 (re-exported)


@runtime_checkable
class DraftModel(Protocol):
    numpy_io: bool  # True: arrays in and out are numpy
    tokenizer: Any
    family: str  # the model family, HELLO's
    path: Any  # where it was loaded from (HELLO names it), or None

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> set[int]: ...

    def preprocess(self, image: Image.Image) -> dict[str, Any]: ...

    def encode_image(self, pixels: dict[str, Any]) -> VisualTokens: ...

    def prompt_embeddings(self, prompt: str) -> np.ndarray: ...

    def prefill(self, visual: VisualTokens, prompt: str,
                kept: np.ndarray | None = None) -> tuple[np.ndarray, DecodeState]: ...

    def forward(self, state: DecodeState, ids: np.ndarray) -> np.ndarray: ...

    def truncate(self, state: DecodeState, length: int) -> None: ...

    def fork_state(self, state: DecodeState) -> DecodeState: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...

    def check_prompt(self, prompt: str) -> str: ...


def as_draft(model: Any) -> DraftModel:
    """`model` itself when its arrays are numpy (a bundle), else its NumpyView (a torch adapter)."""
    if getattr(model, "numpy_io", False):
        return model
    from covspec.models.numpy_view import NumpyView  # torch: only a torch adapter gets here

    return NumpyView(model)
