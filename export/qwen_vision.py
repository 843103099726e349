"""Qwen2.5-VL's vision tower for one fixed grid, as one exportable graph.

The tower's own forward computes its rotary positions, window index and cu_seqlens from grid_thw
with `.tolist()` (aten._local_scalar_dense: data-dependent, torch.export raises) and splits attention
per window by `lengths.tolist()`. Here the grid is fixed at export: the rotary cos/sin (in window
order), the window index, its inverse and the window attention mask (block-diagonal [P, P], from
cu_window_seqlens) are precomputed buffers, and each block's attention is one masked
scaled_dot_product_attention (full-attention blocks: unmasked, one image being one sequence).

    forward(pixel_values [P, C * t * p * p]) -> (embeds [N, d], activity [N])

(`Qwen25VLAdapter.encode_image` for an image whose grid is this one; N = P / merge^2; no received
attention: the tower's attention is windowed, as in the eager adapter.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QWEN_IMAGE_SIDE = 112  # the fixed image side (pixels) of an exported Qwen2.5-VL vision tower


def fixed_grid(adapter: Any, side: int = QWEN_IMAGE_SIDE) -> tuple[int, int]:
    """(rows, cols) in patches of a side x side image after the adapter's preprocessing."""
    from PIL import Image

    grid = adapter.preprocess(Image.new("RGB", (side, side)))["image_grid_thw"][0]
    return int(grid[1]), int(grid[2])


class QwenVisionGraph(nn.Module):
    with_attention = False

    def __init__(self, adapter: Any, grid: tuple[int, int]):
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        visual = adapter.model.model.visual
        self.visual = visual
        self.grid = grid
        grid_thw = torch.tensor([[1, grid[0], grid[1]]])
        merge = int(visual.spatial_merge_size)
        self.unit = merge * merge
        patches = grid[0] * grid[1]
        position_ids = get_vision_position_ids(grid_thw, merge)
        window_index, cu_window = get_vision_window_index(grid_thw, merge, visual.window_size, visual.patch_size)
        with torch.no_grad():
            cos, sin = visual.rotary_pos_emb(torch.zeros(patches, 1), position_ids)  # [P, hd] each
        order = (window_index[:, None] * self.unit + torch.arange(self.unit)).flatten()  # patch order in windows
        self.register_buffer("cos", cos[order].float(), persistent=False)
        self.register_buffer("sin", sin[order].float(), persistent=False)
        self.register_buffer("window_order", order, persistent=False)
        self.register_buffer("reverse", torch.argsort(window_index), persistent=False)
        segment = torch.searchsorted(torch.as_tensor(cu_window)[1:].long(), torch.arange(patches), right=True)
        self.register_buffer("window_mask", segment[:, None] == segment[None, :], persistent=False)  # [P, P]
        self.full_blocks = {int(i) for i in visual.fullatt_block_indexes}
        conv = visual.patch_embed.proj  # Conv3d, stride == kernel: a Linear over the flattened patch
        self.patch = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.patch.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.patch.bias.copy_(conv.bias)

    def attention(self, attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        p = x.shape[0]
        q, k, v = attn.qkv(x).reshape(p, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [P, H, hd]
        q, k = apply_rotary_pos_emb_vision(q, k, self.cos, self.sin)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, P, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out[0].transpose(0, 1).reshape(p, -1))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch(pixel_values)[self.window_order]  # [P, d_v], window order
        for i, block in enumerate(self.visual.blocks):
            mask = None if i in self.full_blocks else self.window_mask
            x = x + self.attention(block.attn, block.norm1(x), mask)
            x = x + block.mlp(block.norm2(x))
        embeds = self.visual.merger(x)[self.reverse]  # [N, d], raster order
        activity = x.reshape(-1, self.unit * x.shape[-1]).float().norm(dim=-1)[self.reverse]  # [N]
        return embeds, activity
