"""The one small interface the rest of CoVSpec uses to talk to a vision-language model.

Each model family lives in its own module (llava.py, qwen2_5_vl.py, idefics3.py) and implements
`VLMAdapter`. Nothing outside `covspec/models/` knows which family it is driving.

The decode state is explicit: `prefill` returns a `DecodeState`, `forward` extends it by k
tokens and returns their logits in one pass, `truncate` rolls it back. That is all speculative
decoding needs: score a draft window, keep the accepted prefix, drop the rest.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from covspec.errors import ModelLoadError, PromptError


@dataclass
class VisualTokens:
    """An image after the vision tower and projector, plus what the pruner scores it by."""

    embeds: torch.Tensor  # [N, d_text] visual tokens in the text model's embedding space
    activity: torch.Tensor  # [N] per-token activity (L2 norm of the vision feature before projection)
    attention: torch.Tensor | None = None  # [N] attention each token receives in the vision encoder's last layer
    grid: tuple[int, int] | None = None  # (rows, cols) of the token grid where the tokens form one

    @property
    def count(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class DecodeState:
    """A sequence's KV cache and where it stands. `length` counts every position in the cache."""

    cache: Any  # the family's cache object (transformers' DynamicCache)
    length: int
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific (e.g. Qwen2.5-VL's rope delta)


class VLMAdapter(ABC):
    """A loaded VLM behind the interface the runtimes drive."""

    family: ClassVar[str]
    # the `model_type` values in config.json this adapter accepts
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: torch.nn.Module, tokenizer: Any, path: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.path = path

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> VLMAdapter:
        """Loads a local Hugging Face folder of this family (never a hub download)."""

    # --- images ------------------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The family's image preprocessing: an RGB image to the tensors its vision tower takes."""

    @abstractmethod
    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        """Vision tower + projector: visual tokens [N, d] in the text model's embedding space."""

    # --- text --------------------------------------------------------------------------------
    @abstractmethod
    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        """Input embeddings [T, d] of the prompt's own text tokens (the pruner's query)."""

    @abstractmethod
    def prefill(self, visual: VisualTokens, prompt: str,
                kept: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Runs the chat-formatted prompt with the image's visual tokens (only `kept`, sorted
        indices into [0, N), when given). Returns the last position's logits [V] and the state."""

    @abstractmethod
    def forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        """Appends ids [k] to the state in one forward pass; returns their logits [k, V]."""

    @abstractmethod
    def truncate(self, state: DecodeState, length: int) -> None:
        """Rolls the state back so that it holds its first `length` positions."""

    # --- tokenizer ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Width of the logits (may exceed the tokenizer's size: padded embedding tables)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, list | tuple) else {int(ids)}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's vocabulary (token -> id), identical across a draft/target pair
        exactly when they tokenize alike."""
        return tokenizer_fingerprint(self.tokenizer)

    # --- shared checks -------------------------------------------------------------------
    @staticmethod
    def check_prompt(prompt: str) -> str:
        if prompt is None or not prompt.strip():
            raise PromptError("the prompt is empty: ask a question about the image")
        return prompt.strip()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def read_config(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint's config.json, turning every way it can be absent or broken into a
    ModelLoadError that names the folder."""
    folder = Path(path)
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder}: does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder}: is not a folder (give a Hugging Face checkpoint folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model folder {folder}: no config.json (not a Hugging Face checkpoint)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"model folder {folder}: config.json is not valid JSON ({err})") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"model folder {folder}: config.json has no model_type")
    return config
