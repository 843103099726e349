"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

Preprocessing is the real processor's, in PIL + numpy: resize to multiples of patch * merge (28)
within [min_pixels, max_pixels] keeping the aspect ratio, rescale, normalize, then flatten into
patches of temporal_patch_size x 14 x 14 in the (merge-block, row, column) order the vision tower
expects: pixel_values [rows * cols, 3 * 2 * 14 * 14] and image_grid_thw [[1, rows, cols]].

Positions are M-RoPE ([3, 1, T]: temporal, height, width), computed here, outside the model, for the
full visual grid with the model's own `get_rope_index`. A pruned prefill keeps its visual tokens'
original (t, h, w) positions and the text after the image keeps its original positions too; decoding
continues at text position `length + rope_delta` (DecodeState.extra["rope_delta"]).

The prompt is the Qwen chat format with the default system message that the real chat template adds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covspec.bundles.families import patchify
from covspec.errors import ImageError
from covspec.models.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CachedDecoderAdapter,
    DecodeState,
    PrefillInputs,
    VisualTokens,
    check_no_placeholder,
    encode_text,
    normalize,
    pil_resize,
    select_kept,
)

SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_BEFORE_IMAGE = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
PROMPT_AFTER_IMAGE = "<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image {width}x{height}: aspect ratio over 200, which Qwen2.5-VL cannot take")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class QwenPreprocessor:
    def __init__(self, settings: dict[str, Any] | None, vision_config: Any):
        s = settings or {}
        size = s.get("size") or {}
        self.min_pixels = int(s.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(s.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        self.mean = s.get("image_mean", OPENAI_CLIP_MEAN)
        self.std = s.get("image_std", OPENAI_CLIP_STD)
        self.rescale_factor = float(s.get("rescale_factor", 1 / 255))
        self.resample = int(s.get("resample", Image.Resampling.BICUBIC))
        # the vision tower's geometry is the model's, whatever the preprocessor file says
        self.patch = int(vision_config.patch_size)
        self.temporal = int(vision_config.temporal_patch_size)
        self.merge = int(vision_config.spatial_merge_size)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        image = image.convert("RGB")
        height, width = smart_resize(image.height, image.width, self.patch * self.merge,
                                     self.min_pixels, self.max_pixels)
        pixels = normalize(np.asarray(pil_resize(image, height, width, self.resample)),
                           self.rescale_factor, self.mean, self.std)  # [C, H, W]
        return {"pixel_values": torch.from_numpy(self.patchify(pixels)),
                "image_grid_thw": torch.tensor([[1, height // self.patch, width // self.patch]])}

    def patchify(self, pixels: np.ndarray) -> np.ndarray:
        """[C, H, W] -> [rows * cols, C * temporal * patch * patch] (covspec.bundles.families.patchify)."""
        return patchify(pixels, self.patch, self.merge, self.temporal)


class Qwen25VLAdapter(CachedDecoderAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    hf_class = "Qwen2_5_VLForConditionalGeneration"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, path: Path | None = None,
                 preprocessor: dict[str, Any] | None = None):
        super().__init__(model, tokenizer, path)
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.placeholder_ids = {int(config.image_token_id), int(config.video_token_id),
                                int(config.vision_start_token_id), int(config.vision_end_token_id)}
        self.merge = int(config.vision_config.spatial_merge_size)
        self.preprocessor = QwenPreprocessor(preprocessor, config.vision_config)

    # --- images ------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return self.preprocessor(image)

    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        """Vision tower + patch merger (the projector). Activity: L2 norm of the merger's input (the
        merge x merge patch features of a token). The tower's attention is windowed, so no cheap
        per-token attention: left None."""
        from transformers.vision_utils import get_vision_window_index

        visual = self.model.model.visual
        grid_thw = pixels["image_grid_thw"].to(self.device)
        captured: list[torch.Tensor] = []
        hook = visual.merger.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
        try:
            with torch.inference_mode():
                out = visual(pixels["pixel_values"].to(self.device, self.model.dtype), grid_thw=grid_thw)
        finally:
            hook.remove()
        embeds = out.pooler_output  # [N, d_text], N = rows/2 * cols/2, raster order
        window_index, _ = get_vision_window_index(grid_thw, self.merge, visual.window_size, visual.patch_size)
        unit = self.merge * self.merge
        features = captured[0].reshape(-1, unit * captured[0].shape[-1])  # [N, 4 * d_vision], window order
        activity = features.float().norm(dim=-1)[torch.argsort(window_index.to(features.device))]
        _, rows, cols = (int(v) for v in pixels["image_grid_thw"][0])
        return VisualTokens(embeds=embeds, activity=activity, attention=None,
                            grid=(rows // self.merge, cols // self.merge))

    # --- text --------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, n_image_tokens: int) -> tuple[list[int], int]:
        """The chat-formatted prompt's ids with n image pads, and where the first pad stands."""
        before = encode_text(self.tokenizer, PROMPT_BEFORE_IMAGE)
        after = encode_text(self.tokenizer, PROMPT_AFTER_IMAGE.format(prompt=self.check_prompt(prompt)))
        check_no_placeholder(after[1:], self.placeholder_ids, self.tokenizer)
        return before + [self.image_token_id] * n_image_tokens + after, len(before)

    def rope_positions(self, ids: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, 1, T] of an unpruned sequence (ids [T]) and its rope delta
        (next text position minus T)."""
        rows, cols = grid
        grid_thw = torch.tensor([[1, rows * self.merge, cols * self.merge]])
        mm_token_type_ids = (ids == self.image_token_id).int()[None]
        positions, delta = self.model.model.get_rope_index(ids[None], mm_token_type_ids=mm_token_type_ids,
                                                           image_grid_thw=grid_thw)
        return positions, int(delta.flatten()[0])

    def prefill_inputs(self, visual: VisualTokens, prompt: str, kept: torch.Tensor | None = None) -> PrefillInputs:
        if visual.grid is None:
            raise ValueError("Qwen2.5-VL visual tokens need their grid")
        kept = select_kept(visual, kept)
        ids_list, start = self.prompt_ids(prompt, visual.count)
        ids = torch.tensor(ids_list, dtype=torch.long)
        positions, _ = self.rope_positions(ids, visual.grid)  # [3, 1, T] for the full grid
        n, T = visual.count, ids.numel()
        keep = torch.cat([torch.arange(start), start + kept, torch.arange(start + n, T)])  # [T']
        ids, positions = ids[keep], positions[:, :, keep]
        with torch.inference_mode():
            embeds = self.embed(ids).clone()  # [T', d]
            embeds[start:start + kept.numel()] = visual.embeds[kept.to(self.device)].to(embeds.dtype)
        # the next text position is one past the largest so far, whatever was pruned
        delta = int(positions.max()) + 1 - int(keep.numel())
        return PrefillInputs(embeds, positions, {"rope_delta": delta})

    def _positions(self, state: DecodeState, k: int) -> torch.Tensor:
        """Text positions of the next k tokens: [3, 1, k], the same on all three axes."""
        text = torch.arange(state.length, state.length + k) + int(state.extra["rope_delta"])
        return text.view(1, 1, k).expand(3, 1, k)
