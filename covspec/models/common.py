"""What the runtimes share about models without needing torch: the visual tokens and decode state
the adapters pass around, and the torch-free helpers of loading, image preprocessing and prompt
tokenization. The device process imports only this (and `covspec.models.draft`), never the families'
torch modules; `covspec.models.base` re-exports every name here.

Arrays are numpy on the device side (`covspec.models.draft.DraftModel`) and torch tensors inside the
Hugging Face adapters; the dataclasses below hold either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from covspec.errors import ModelLoadError, PromptError


@dataclass
class VisualTokens:
    """An image after the vision tower and projector, plus what the pruner scores it by."""

    embeds: Any  # [N, d_text] visual tokens in the text model's embedding space
    activity: Any  # [N] per-token activity (L2 norm of the vision feature before projection)
    attention: Any | None = None  # [N] attention each token receives in the vision encoder's last layer
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



OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_json_file(path: Path) -> dict[str, Any] | None:
    """A JSON file next to config.json (preprocessor_config.json, ...): None when absent,
    ModelLoadError when broken."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"model folder {path.parent}: {path.name} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"model folder {path.parent}: {path.name} is not a JSON object")
    return data


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def pil_resize(image: Image.Image, height: int, width: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=resample)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop of an [H, W, C] array, zero-padding (centred) where the image is smaller, as
    transformers' center_crop does."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        new_h, new_w = max(h, height), max(w, width)
        padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
        top, left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, new_h, new_w
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]


def normalize(pixels: np.ndarray, rescale: float | None, mean: Any, std: Any) -> np.ndarray:
    """[H, W, C] uint8 -> [C, H, W] float32, rescaled and normalized."""
    out = pixels.astype(np.float32)
    if rescale is not None:
        out = out * np.float32(rescale)
    if mean is not None and std is not None:
        out = (out - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer has a BOS token and adds it by itself to an encoded text, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer.encode("a", add_special_tokens=True)
    return [int(bos)] if probe and probe[0] == bos else []


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)] if text else []


def check_no_placeholder(ids: list[int], forbidden: set[int], tokenizer: Any) -> None:
    """The prompt's text must not contain the image placeholder token(s): they would be taken for
    visual tokens."""
    found = forbidden.intersection(ids)
    if found:
        names = ", ".join(sorted(str(tokenizer.convert_ids_to_tokens(i)) for i in found))
        raise PromptError(f"the prompt contains the image placeholder token {names}: remove it")


def check_prompt(prompt: str) -> str:
    if prompt is None or not prompt.strip():
        raise PromptError("the prompt is empty: ask a question about the image")
    return prompt.strip()


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """An array or a tensor (on any torch device, any dtype) as a numpy array, without importing torch."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach()
        if x.dtype.is_floating_point:
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


def visual_to_numpy(visual: VisualTokens) -> VisualTokens:
    """The visual tokens with float32 numpy embeds, activity and attention."""
    return VisualTokens(embeds=to_numpy(visual.embeds, np.float32), activity=to_numpy(visual.activity, np.float32),
                        attention=None if visual.attention is None else to_numpy(visual.attention, np.float32),
                        grid=visual.grid)
