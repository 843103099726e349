"""What differs per model family in an export: the vision graph and the prompt entry of the manifest.
The decoder is the same for every family whose text model is Llama/Qwen2-like with 1-D RoPE
(`CachedDecoder` reads the adapter's language_model, lm_head and input embeddings).

- llava: `VisionGraph` (CLIP/SigLIP tower + projector), `LlavaAdapter.encode_image` as one graph.
- idefics3 (SmolVLM): `Idefics3VisionGraph`: one global image of the tower's fixed size; vision tower,
  pixel shuffle and connector inside the graph; activity and received attention as the eager adapter.
  Position ids are a buffer (0..P-1): the tower's embeddings compute them with aten.bucketize, which
  ExecuTorch does not lower (not in the Core ATen opset).
- qwen2_5_vl: `QwenVisionGraph` (export/qwen_vision.py) for one fixed grid (a QWEN_IMAGE_SIDE square
  image): rotary positions, window index and window mask precomputed; the decoder takes M-RoPE
  positions [3, k] as an input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from covspec.export.graphs import VisionGraph
from covspec.models.base import VLMAdapter, received_attention

EXPORTABLE_FAMILIES = ("llava", "idefics3", "qwen2_5_vl")


class Idefics3VisionGraph(nn.Module):
    """forward(pixels [1, 3, S, S]) -> (embeds [N, d], activity [N], attention [N]):
    `Idefics3Adapter.encode_image` as one graph (N = (S / patch / scale)^2)."""

    def __init__(self, adapter: Any):
        super().__init__()
        model = adapter.model.model
        self.tower = model.vision_model
        self.connector = model.connector
        self.scale = int(adapter.scale)
        size = int(adapter.model.config.vision_config.image_size)
        patches = (size // int(adapter.model.config.vision_config.patch_size)) ** 2
        self.register_buffer("position_ids", torch.arange(patches)[None], persistent=False)  # [1, P]
        probe = adapter.encode_image({"pixel_values": torch.zeros(1, 3, size, size)})
        self.with_attention = probe.attention is not None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # the tower's own forward, for one full image: its embeddings bucketize a patch mask into
        # position ids (aten.bucketize, no ExecuTorch kernel); a full image's are 0..P-1
        embeddings = self.tower.embeddings
        hidden = embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [1, P, d_v]
        hidden = hidden + embeddings.position_embedding(self.position_ids)
        layers = self.tower.encoder.layers
        for layer in layers[:-1]:
            hidden = layer(hidden, None)
        before_last = hidden  # the last layer's input: what received_attention reads
        patches = self.tower.post_layernorm(layers[-1](hidden, None))  # [1, P, d_v]
        shuffled = self.connector.pixel_shuffle(patches, self.scale)  # [1, N, d_v * scale^2]
        embeds = self.connector.modality_projection(shuffled)[0]  # [N, d]
        activity = shuffled[0].float().norm(dim=-1)  # [N]
        if not self.with_attention:
            return embeds, activity
        attention = received_attention(layers[-1], before_last[0])  # [P]
        attention = self.connector.pixel_shuffle(attention.view(1, -1, 1), self.scale)[0].mean(-1)  # [N]
        return embeds, activity, attention


def vision_graph(adapter: VLMAdapter) -> nn.Module:
    if adapter.family == "idefics3":
        return Idefics3VisionGraph(adapter)
    if adapter.family == "qwen2_5_vl":
        from covspec.export.qwen_vision import QwenVisionGraph, fixed_grid

        return QwenVisionGraph(adapter, fixed_grid(adapter))
    return VisionGraph(adapter)


def vision_example(adapter: Any) -> torch.Tensor:
    """The pixels the vision graph takes (its fixed shape)."""
    if adapter.family == "qwen2_5_vl":
        from PIL import Image

        from covspec.export.qwen_vision import QWEN_IMAGE_SIDE

        return adapter.preprocess(Image.new("RGB", (QWEN_IMAGE_SIDE, QWEN_IMAGE_SIDE)))["pixel_values"]  # [P, C*t*p*p]
    size = int(adapter.model.config.vision_config.image_size)
    return torch.zeros(1, 3, size, size)


def vision_extra(graph: nn.Module) -> dict[str, Any]:
    grid = getattr(graph, "grid", None)
    return {} if grid is None else {"grid_thw": [1, *grid], "image_side": _qwen_side()}


def _qwen_side() -> int:
    from covspec.export.qwen_vision import QWEN_IMAGE_SIDE

    return QWEN_IMAGE_SIDE


def vision_outputs(graph: nn.Module) -> list[str]:
    return ["embeds", "activity", "attention"] if graph.with_attention else ["embeds", "activity"]


def prompt_entry(adapter: Any) -> dict[str, Any]:
    """How the runtime builds the prompt around the visual tokens."""
    if adapter.family in ("idefics3", "qwen2_5_vl"):
        import importlib

        module = importlib.import_module(f"covspec.models.{adapter.family}")
        return {"before_image": module.PROMPT_BEFORE_IMAGE, "after_image": module.PROMPT_AFTER_IMAGE,
                "image_token_id": adapter.image_token_id,
                "placeholder_ids": sorted(int(i) for i in adapter.placeholder_ids)}
    from covspec.models.llava import PROMPT_TEMPLATE

    return {"template": PROMPT_TEMPLATE, "image_token_id": adapter.image_token_id}

