"""LLaVA-style models (`LlavaForConditionalGeneration`): a CLIP or SigLIP vision tower, an MLP
projector, a Llama or Qwen2 text model. Also the project's own demo checkpoints.

The prompt is always `PROMPT_TEMPLATE` (LLaVA-1.5's), even when the tokenizer ships a chat template:
one format for every LLaVA checkpoint, and the one the demo models are trained on. `llava_prompt_ids`
is the contract between inference and the demo's training sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covspec.models.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CachedDecoderAdapter,
    PrefillInputs,
    VisualTokens,
    bos_prefix,
    center_crop,
    check_no_placeholder,
    encode_text,
    normalize,
    pil_resize,
    received_attention,
    select_kept,
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

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> pixel_values [1, 3, H, W] float32."""
        image = image.convert("RGB")
        if self.do_resize:
            image = pil_resize(image, *self.target_size(image.height, image.width), resample=self.resample)
        pixels = np.asarray(image)
        if self.do_center_crop:
            pixels = center_crop(pixels, *self.crop)
        out = normalize(pixels, self.rescale_factor if self.do_rescale else None,
                        self.mean if self.do_normalize else None, self.std if self.do_normalize else None)
        return torch.from_numpy(out)[None]


class LlavaAdapter(CachedDecoderAdapter):
    family = "llava"
    model_types = ("llava",)
    hf_class = "LlavaForConditionalGeneration"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, path: Path | None = None,
                 preprocessor: dict[str, Any] | None = None):
        super().__init__(model, tokenizer, path)
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.feature_layer = config.vision_feature_layer  # int or list of ints
        self.select_strategy = config.vision_feature_select_strategy  # "default" drops CLS
        self.preprocessor = ClipPreprocessor(preprocessor, int(config.vision_config.image_size))

    # --- images ------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.preprocessor(image)}

    def _encoder_layers(self) -> torch.nn.ModuleList:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def _layer_indices(self) -> list[int]:
        """The vision feature layers as indices into hidden_states (0 = embeddings)."""
        layers = self.feature_layer if isinstance(self.feature_layer, list | tuple) else [self.feature_layer]
        n = len(self._encoder_layers()) + 1
        return [int(i) % n for i in layers]

    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        model = self.model.model
        pixel_values = pixels["pixel_values"].to(self.device, self.model.dtype)
        with torch.inference_mode():
            out = model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            hidden = out.hidden_states  # (layers + 1) x [1, 1 + P, d_vision], hidden[0] = embeddings
            start = 1 if self.select_strategy == "default" else 0
            indices = self._layer_indices()
            features = torch.cat([hidden[i][:, start:] for i in indices], dim=-1)  # [1, N, d_vision * L]
            embeds = model.multi_modal_projector(features)[0]  # [N, d_text]
            activity = features[0].float().norm(dim=-1)  # [N]
            attention = self._received_attention(hidden, max(indices), start)
        return VisualTokens(embeds=embeds, activity=activity, attention=attention, grid=self._grid(embeds.shape[0]))

    def _received_attention(self, hidden: tuple[torch.Tensor, ...], index: int, start: int) -> torch.Tensor | None:
        """Attention each token receives in the last vision layer used (the layer whose output is
        hidden[index]), mean over heads and query positions: [N]. Recomputed from that layer's input
        and q/k projections (cheap: one [heads, T, T] product), so the tower can run with SDPA."""
        if index == 0:
            return None  # features straight from the embeddings: no attention layer used
        attention = received_attention(self._encoder_layers()[index - 1], hidden[index - 1][0])
        return None if attention is None else attention[start:]

    @staticmethod
    def _grid(n: int) -> tuple[int, int] | None:
        side = int(round(n ** 0.5))
        return (side, side) if side * side == n else None

    # --- text --------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        return llava_prompt_ids(self.tokenizer, self.check_prompt(prompt), n_image_tokens, self.image_token_id)

    def prefill_inputs(self, visual: VisualTokens, prompt: str, kept: torch.Tensor | None = None) -> PrefillInputs:
        kept = select_kept(visual, kept)
        ids = torch.tensor(self.prompt_ids(prompt, int(kept.numel())), dtype=torch.long)
        with torch.inference_mode():
            embeds = self.embed(ids).clone()  # [T, d]
            is_image = ids == self.image_token_id
            embeds[is_image.to(self.device)] = visual.embeds[kept.to(self.device)].to(embeds.dtype)
        # kept visual tokens keep their unpruned positions
        image_start = int(is_image.nonzero()[0, 0]) if kept.numel() else int(ids.numel())
        return self.pruned_inputs(embeds, image_start, kept, visual.count)
