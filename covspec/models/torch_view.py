"""`TorchView`: a numpy `DraftModel` (an exported bundle) seen as a torch `VLMAdapter`, for the edge,
whose verification works on tensors: an edge bundle's ONNX or TensorRT target. The inverse of
covspec/models/numpy_view.py; arrays are converted at this boundary only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from covspec.models.common import DecodeState, VisualTokens, to_numpy
from covspec.models.draft import DraftModel


class TorchView:
    def __init__(self, model: DraftModel):
        self.numpy_model = model

    def __getattr__(self, name: str) -> Any:  # tokenizer, vocab_size, eos_token_ids, decode, truncate, ...
        return getattr(self.numpy_model, name)

    def preprocess(self, image: Any) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.numpy_model.preprocess(image).items()}

    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        v = self.numpy_model.encode_image({k: to_numpy(t) for k, t in pixels.items()})
        return VisualTokens(embeds=torch.from_numpy(v.embeds), activity=torch.from_numpy(v.activity),
                            attention=None if v.attention is None else torch.from_numpy(v.attention), grid=v.grid)

    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        return torch.from_numpy(self.numpy_model.prompt_embeddings(prompt))

    def prefill(self, visual: VisualTokens, prompt: str,
                kept: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        arrays = VisualTokens(embeds=to_numpy(visual.embeds, np.float32), activity=to_numpy(visual.activity),
                              attention=None if visual.attention is None else to_numpy(visual.attention),
                              grid=visual.grid)
        logits, state = self.numpy_model.prefill(arrays, prompt, None if kept is None else to_numpy(kept))
        return torch.from_numpy(logits), state

    def forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.numpy_model.forward(state, to_numpy(ids, np.int64)))
