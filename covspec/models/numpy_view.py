"""`NumpyView`: a Hugging Face (torch) adapter seen as a `DraftModel` (numpy in and out), so that the
device logic written once against numpy (covspec/drafter.py, pruning.py, sampling.py) drives it too.
Tensors are converted at this boundary only: logits to float32 numpy on the CPU, ids and kept indices
to LongTensors, visual tokens both ways. Everything else (tokenizer, truncate, fork_state, decode,
the model itself) is the adapter's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from covspec.models.common import DecodeState, VisualTokens, to_numpy, visual_to_numpy


class NumpyView:
    numpy_io = True

    def __init__(self, adapter: Any):
        self.adapter = adapter

    def __getattr__(self, name: str) -> Any:  # tokenizer, vocab_size, eos_token_ids, decode, truncate, ...
        return getattr(self.adapter, name)

    @torch.inference_mode()
    def encode_image(self, pixels: dict[str, Any]) -> VisualTokens:
        return visual_to_numpy(self.adapter.encode_image(pixels))

    @torch.inference_mode()
    def prompt_embeddings(self, prompt: str) -> np.ndarray:
        return to_numpy(self.adapter.prompt_embeddings(prompt), np.float32)  # [T, d]

    @torch.inference_mode()
    def prefill(self, visual: VisualTokens, prompt: str,
                kept: np.ndarray | None = None) -> tuple[np.ndarray, DecodeState]:
        tensors = VisualTokens(embeds=_tensor(visual.embeds), activity=_tensor(visual.activity),
                               attention=None if visual.attention is None else _tensor(visual.attention),
                               grid=visual.grid)
        logits, state = self.adapter.prefill(tensors, prompt,
                                             kept=None if kept is None else torch.as_tensor(np.asarray(kept)).long())
        return to_numpy(logits, np.float32), state

    @torch.inference_mode()
    def forward(self, state: DecodeState, ids: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).flatten()
        return to_numpy(self.adapter.forward(state, ids), np.float32)  # [k, V]


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
