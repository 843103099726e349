"""LLaVA-style models (`LlavaForConditionalGeneration`): a CLIP or SigLIP vision tower, an MLP
projector, a Llama or Qwen2 text model. Also the project's own demo checkpoints.

The prompt is always `PROMPT_TEMPLATE` (LLaVA-1.5's), even when the tokenizer ships a chat template:
one format for every LLaVA checkpoint, and the one the demo models are trained on. `llava_prompt_ids`
is the contract between inference and the demo's training sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from covspec.models.base import (
    CachedDecoderAdapter,
    PrefillInputs,
    VisualTokens,
    received_attention,
    select_kept,
)
from covspec.models.llava_inputs import (  # noqa: F401 (re-exported)
    IMAGE_PLACEHOLDER,
    PROMPT_TEMPLATE,
    ClipPreprocessor,
    llava_prompt_ids,
)


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
        return {"pixel_values": torch.from_numpy(self.preprocessor(image))}

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
