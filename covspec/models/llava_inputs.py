"""LLaVA's inputs without torch: its prompt format and its CLIP-style image preprocessing, shared by
the Hugging Face adapter (covspec/models/llava.py) and the torch-free bundle runtime
(covspec/bundles/families.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from covspec.models.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    bos_prefix,
    center_crop,
    check_no_placeholder,
    encode_text,
    normalize,
    pil_resize,
)

PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"


def llava_prompt_ids(tokenizer: Any, prompt: str, n_image_tokens: int, image_token_id: int) -> list[int]:
    """Input ids of `PROMPT_TEMPLATE` for `prompt`, with `n_image_tokens` copies of `image_token_id`
    where `<image>` stands. The text before and after the placeholder is tokenized separately
    (without special tokens); BOS leads when the tokenizer has one and adds it by itself."""
    before, after = PROMPT_TEMPLATE.split(IMAGE_PLACEHOLDER)
    before_ids = encode_text(tokenizer, before)
    after_ids = encode_text(tokenizer, after.format(prompt=prompt))
    check_no_placeholder(before_ids + after_ids, {int(image_token_id)}, tokenizer)
    return bos_prefix(tokenizer) + before_ids + [int(image_token_id)] * n_image_tokens + after_ids


class ClipPreprocessor:
    """CLIP-style preprocessing with PIL + numpy: resize (shortest edge, or to height x width),
    center crop, rescale, normalize. Settings from preprocessor_config.json when the checkpoint has
    one, else from the vision tower's image_size and CLIP's mean/std."""

    def __init__(self, settings: dict[str, Any] | None, image_size: int):
        s = settings or {}
        size = s.get("size", {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = s.get("crop_size", {"height": image_size, "width": image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        self.size: dict[str, int] = size
        self.crop = (int(crop["height"]), int(crop["width"]))
        self.do_resize = bool(s.get("do_resize", True))
        self.do_center_crop = bool(s.get("do_center_crop", True))
        self.do_rescale = bool(s.get("do_rescale", True))
        self.rescale_factor = float(s.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(s.get("do_normalize", True))
        self.mean = s.get("image_mean", OPENAI_CLIP_MEAN)
        self.std = s.get("image_std", OPENAI_CLIP_STD)
        self.resample = int(s.get("resample", Image.Resampling.BICUBIC))

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            short_side = int(self.size["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = short_side, int(short_side * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return int(self.size["height"]), int(self.size["width"])

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB image -> pixel_values [1, 3, H, W] float32."""
        image = image.convert("RGB")
        if self.do_resize:
            image = pil_resize(image, *self.target_size(image.height, image.width), resample=self.resample)
        pixels = np.asarray(image)
        if self.do_center_crop:
            pixels = center_crop(pixels, *self.crop)
        out = normalize(pixels, self.rescale_factor if self.do_rescale else None,
                        self.mean if self.do_normalize else None, self.std if self.do_normalize else None)
        return out[None]
