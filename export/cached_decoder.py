"""The LLaVA-family text model over a KV cache held inside the program (mutable buffers), for the
ExecuTorch multimodal layout: ExecuTorch's own LLM ops write and read the cache
(`llama::update_cache`, `llama::custom_sdpa` from executorch.extension.llm.custom_ops), so every
method of the .pte that holds a `CachedDecoder` under the same name shares one cache
(`share_mutable_buffers=True`).

Cache slots are contiguous per call: tokens of one call take slots start..start+k-1 and query i sees
slots 0..start+i (custom_sdpa's causal mode at start_pos = start). A token's RoPE position is a
separate input (a pruned prefill keeps unpruned positions while the cache stays dense). Rollback is
free: the caller keeps its own length and writes the next tokens at earlier slots; a stale slot past
the length is never seen by a query before it is overwritten.
"""

from __future__ import annotations

import torch

from covspec.export.graphs import DecoderShape, Rope, TextStack, rotate_half
from covspec.models.base import CachedDecoderAdapter


def load_custom_ops() -> None:
    """Registers llama::update_cache / llama::custom_sdpa (export-time meta kernels and, in this process,
    the ExecuTorch runtime kernels)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


class CachedDecoder(TextStack):
    """input_pos: [k] (1-D RoPE) or [3, k] (M-RoPE). Holds the input embedding (`embed_tokens`, read by the methods around it) and the output head.

    forward(embeds [1, k, d] f32, input_pos [k] int64, start [1] int64) -> logits [1, k, V] f32.

    Writes the k keys/values at cache slots start..start+k-1 (buffers k_cache_i / v_cache_i
    [1, S, kvH, hd]) and attends slots 0..start+i with RoPE at input_pos."""

    def __init__(self, adapter: CachedDecoderAdapter, shape: DecoderShape):
        super().__init__(adapter, shape)
        load_custom_ops()
        self.rope = Rope(adapter, shape.head_dim)
        for i in range(shape.layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, shape.max_len, shape.kv_heads, shape.head_dim))
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, shape.max_len, shape.kv_heads, shape.head_dim))

    def k_cache(self, i: int) -> torch.Tensor:
        return getattr(self, f"k_cache_{i}")  # [1, S, kvH, hd]

    def v_cache(self, i: int) -> torch.Tensor:
        return getattr(self, f"v_cache_{i}")

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        s = self.shape
        k = embeds.shape[1]
        pos = start[0].item()
        torch._check_is_size(pos)
        torch._check(pos + k <= s.max_len)
        cos, sin = self.rope(input_pos)  # [k, hd]
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, k, 1, hd]
        x = embeds
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, k, s.heads, s.head_dim)  # [1, k, H, hd]
            kk = attn.k_proj(h).view(1, k, s.kv_heads, s.head_dim)  # [1, k, kvH, hd]
            v = attn.v_proj(h).view(1, k, s.kv_heads, s.head_dim)
            q = q * cos + rotate_half(q) * sin
            kk = kk * cos + rotate_half(kk) * sin
            k_cache, v_cache = self.k_cache(i), self.v_cache(i)
            torch.ops.llama.update_cache(kk, k_cache, pos)
            torch.ops.llama.update_cache(v, v_cache, pos)
            out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, pos, None, 0, True, attn.scaling)  # [1, k, H, hd]
            x = x + attn.o_proj(out.reshape(1, k, s.heads * s.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x)).float()  # [1, k, V]
