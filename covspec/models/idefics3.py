"""SmolVLM / Idefics3 (`Idefics3ForConditionalGeneration`): SigLIP-style vision tower, pixel shuffle
+ linear connector, Llama text model.

Preprocessing is the real processor's with image splitting off: resize so that the longest edge is
size["longest_edge"] (LANCZOS), then to the vision encoder's square size, rescale, normalize
(mean = std = 0.5 unless preprocessor_config.json says otherwise). One global image, so
pixel_values [1, 3, S, S] and (S / patch / scale_factor)^2 visual tokens.

Prompt, as SmolVLM's chat template and processor make it for one image before the text:
"<|im_start|>User:<fake_token_around_image><global-img><image>*n<fake_token_around_image>{prompt}
<end_of_utterance>\\nAssistant:".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covspec.bundles.families import MAX_IMAGE_SIZE, longest_edge_size  # noqa: F401  (re-exported)
from covspec.models.base import (
    CachedDecoderAdapter,
    PrefillInputs,
    VisualTokens,
    check_no_placeholder,
    encode_text,
    normalize,
    pil_resize,
    received_attention,
    select_kept,
)

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
PROMPT_BEFORE_IMAGE = f"<|im_start|>User:{FAKE_TOKEN}{GLOBAL_IMAGE_TOKEN}"
PROMPT_AFTER_IMAGE = FAKE_TOKEN + "{prompt}<end_of_utterance>\nAssistant:"


class Idefics3Preprocessor:
    def __init__(self, settings: dict[str, Any] | None, image_size: int):
        s = settings or {}
        self.longest_edge = (s.get("size") or {}).get("longest_edge")
        self.square = int((s.get("max_image_size") or {}).get("longest_edge", image_size))
        if self.square != image_size:
            self.square = image_size  # the tower's position embeddings are for image_size
        self.do_resize = bool(s.get("do_resize", True))
        self.rescale_factor = float(s.get("rescale_factor", 1 / 255))
        self.mean = s.get("image_mean", (0.5, 0.5, 0.5))
        self.std = s.get("image_std", (0.5, 0.5, 0.5))
        self.resample = int(s.get("resample", Image.Resampling.LANCZOS))

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """RGB image -> pixel_values [1, 3, S, S] (one global image)."""
        image = image.convert("RGB")
        if self.do_resize and self.longest_edge:
            image = pil_resize(image, *longest_edge_size(image.height, image.width, int(self.longest_edge)),
                               resample=self.resample)
        image = pil_resize(image, self.square, self.square, resample=self.resample)
        pixels = normalize(np.asarray(image), self.rescale_factor, self.mean, self.std)
        return {"pixel_values": torch.from_numpy(pixels)[None]}


class Idefics3Adapter(CachedDecoderAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    hf_class = "Idefics3ForConditionalGeneration"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, path: Path | None = None,
                 preprocessor: dict[str, Any] | None = None):
        super().__init__(model, tokenizer, path)
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.scale = int(config.scale_factor)
        self.placeholder_ids = {self.image_token_id, *(int(i) for i in (
            tokenizer.convert_tokens_to_ids(FAKE_TOKEN), tokenizer.convert_tokens_to_ids(GLOBAL_IMAGE_TOKEN))
            if i is not None and i != tokenizer.unk_token_id)}
        self.preprocessor = Idefics3Preprocessor(preprocessor, int(config.vision_config.image_size))

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    # --- images ------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return self.preprocessor(image)

    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        """Vision tower -> pixel shuffle -> projection. Activity: L2 norm of a token's pixel-shuffled
        feature (its scale x scale patches). Attention: mean over a token's patches of the attention
        each patch receives in the tower's last layer."""
        model = self.model.model
        pixel_values = pixels["pixel_values"].to(self.device, self.model.dtype)
        with torch.inference_mode():
            out = model.vision_model(pixel_values=pixel_values, output_hidden_states=True)
            patches = out.last_hidden_state  # [1, P, d_vision], P = side^2
            shuffled = model.connector.pixel_shuffle(patches, self.scale)  # [1, N, d_vision * scale^2]
            embeds = model.connector.modality_projection(shuffled)[0]  # [N, d_text]
            activity = shuffled[0].float().norm(dim=-1)
            attention = received_attention(model.vision_model.encoder.layers[-1], out.hidden_states[-2][0])
            if attention is not None:  # [P] -> [N]: same grouping as the pixel shuffle
                attention = model.connector.pixel_shuffle(attention.view(1, -1, 1), self.scale)[0].mean(-1)
        side = int(round(embeds.shape[0] ** 0.5))
        return VisualTokens(embeds=embeds, activity=activity, attention=attention, grid=(side, side))

    # --- text --------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, n_image_tokens: int) -> tuple[list[int], int]:
        """The prompt's ids with n image tokens, and where the first image token stands."""
        before = encode_text(self.tokenizer, PROMPT_BEFORE_IMAGE)
        after = encode_text(self.tokenizer, PROMPT_AFTER_IMAGE.format(prompt=self.check_prompt(prompt)))
        check_no_placeholder(after[1:], self.placeholder_ids, self.tokenizer)
        return before + [self.image_token_id] * n_image_tokens + after, len(before)

    def prefill_inputs(self, visual: VisualTokens, prompt: str, kept: torch.Tensor | None = None) -> PrefillInputs:
        kept = select_kept(visual, kept)
        ids_list, start = self.prompt_ids(prompt, int(kept.numel()))
        ids = torch.tensor(ids_list, dtype=torch.long)
        with torch.inference_mode():
            embeds = self.embed(ids).clone()  # [T, d]
            embeds[start:start + kept.numel()] = visual.embeds[kept.to(self.device)].to(embeds.dtype)
        # kept visual tokens keep their unpruned positions (as for LLaVA)
        return self.pruned_inputs(embeds, start, kept, visual.count)
