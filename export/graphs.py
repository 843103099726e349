"""The two exportable graphs of a LLaVA-family draft, built from the loaded Hugging Face model's own
submodules (so quantizing their Linear layers quantizes the graphs):

- `VisionGraph`: pixels [1, 3, H, W] -> visual tokens [N, d], activity [N] (and, where the tower is a
  pre-norm ViT, the attention each token receives [N]): what `LlavaAdapter.encode_image` computes.
- `StaticDecoderGraph`: the text model and lm_head over a static KV cache passed in and out.

The decoder's cache is an explicit input and output, `cache [L, 2, kv_heads, S, head_dim]`, so one
graph serves ExecuTorch and ONNX alike, and rollback is free: a caller keeps its own length and
simply writes the next tokens at earlier slots. Query i attends cache slots 0..slots[i]; slots past
the length hold stale keys/values that no query sees before they are overwritten. A token's cache slot
and its RoPE position are separate inputs: a pruned prefill keeps every token's unpruned position
(positions skip the dropped visual tokens) while the cache stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from covspec.models.base import CachedDecoderAdapter


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_len: int  # S: cache slots
    rope_rows: int = 1  # rows of a position: 1 (RoPE) or 3 (M-RoPE: temporal, height, width)

    @property
    def cache_shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, self.max_len, self.head_dim)


def decoder_shape(adapter: CachedDecoderAdapter, max_len: int | None = None) -> DecoderShape:
    text = adapter.text_config
    attn = adapter.language_model.layers[0].self_attn
    heads = int(text.num_attention_heads)
    limit = int(getattr(text, "max_position_embeddings", 256) or 256)
    return DecoderShape(layers=len(adapter.language_model.layers),
                        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), heads=heads,
                        head_dim=int(attn.head_dim), hidden=int(text.hidden_size), vocab=adapter.vocab_size,
                        max_len=min(max_len or limit, limit),
                        rope_rows=int(rope_rows(adapter, int(attn.head_dim)).max()) + 1)


def rope_rows(adapter: CachedDecoderAdapter, head_dim: int) -> torch.Tensor:
    """Which row of the positions each rotary frequency reads [hd/2]: all 0 for 1-D RoPE; for
    M-RoPE (Qwen2.5-VL, `mrope_section` [t, h, w] in frequencies) rows 0, 1, 2 section by section."""
    params = getattr(adapter.text_config, "rope_parameters", None) or {}
    sections = params.get("mrope_section") if isinstance(params, dict) else None
    if not sections:
        return torch.zeros(head_dim // 2, dtype=torch.long)
    return torch.cat([torch.full((int(n),), i % 3, dtype=torch.long) for i, n in enumerate(sections)])


class Rope(nn.Module):
    """cos, sin [k, hd] of positions [k] (1-D RoPE) or [R, k] (M-RoPE rows: temporal, height, width)."""

    def __init__(self, adapter: CachedDecoderAdapter, head_dim: int):
        super().__init__()
        rotary = adapter.language_model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.register_buffer("rows", rope_rows(adapter, head_dim), persistent=False)
        self.scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.n_rows = int(self.rows.max()) + 1

    def forward(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = input_pos.shape[-1]
        pos = input_pos.reshape(-1, k).expand(self.n_rows, k).float()  # [R, k]
        freqs = pos[self.rows].t() * self.inv_freq[None, :]  # [k, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TextStack(nn.Module):
    """The parts of the target's text model every exported decoder runs: token embeddings, the
    decoder layers, the final norm and the LM head (the Hugging Face modules themselves, so the
    weights are shared, not copied), and the decoder's static shape."""

    def __init__(self, adapter: CachedDecoderAdapter, shape: DecoderShape):
        super().__init__()
        lm = adapter.language_model
        self.embed_tokens = adapter.model.get_input_embeddings()
        self.layers = lm.layers
        self.norm = lm.norm
        self.lm_head = adapter.model.lm_head
        self.shape = shape


class StaticDecoderGraph(TextStack):
    """forward(ids [1, k] int64, image_embeds [1, k, d] f32, is_image [1, k] bool, input_pos [k] int64,
    slots [k] int64, cache [L, 2, kvH, S, hd] f32) -> (logits [1, k, V] f32, cache [L, 2, kvH, S, hd] f32).

    Token i's input embedding is image_embeds[0, i] where is_image[0, i], else the embedding of ids[0, i];
    its RoPE position is input_pos[i], its cache slot slots[i] (increasing)."""

    def __init__(self, adapter: CachedDecoderAdapter, shape: DecoderShape):
        super().__init__(adapter, shape)
        self.rope = Rope(adapter, shape.head_dim)
        self.register_buffer("slot_ids", torch.arange(shape.max_len), persistent=False)

    def forward(self, ids: torch.Tensor, image_embeds: torch.Tensor, is_image: torch.Tensor,
                input_pos: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shape
        k = ids.shape[1]
        x = torch.where(is_image[..., None], image_embeds, self.embed_tokens(ids))  # [1, k, d]
        cos, sin = self.rope(input_pos)  # [k, hd]
        visible = self.slot_ids[None, :] <= slots[:, None]  # [k, S]
        bias = torch.where(visible, 0.0, torch.finfo(torch.float32).min)  # [k, S]
        onehot = (self.slot_ids[None, :] == slots[:, None]).float()  # [k, S]
        written = (onehot.sum(dim=0) > 0)[None, :, None]  # [1, S, 1]
        groups = s.heads // s.kv_heads
        new_cache = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).reshape(k, s.heads, s.head_dim).transpose(0, 1)  # [H, k, hd]
            kk = attn.k_proj(h).reshape(k, s.kv_heads, s.head_dim).transpose(0, 1)  # [kvH, k, hd]
            v = attn.v_proj(h).reshape(k, s.kv_heads, s.head_dim).transpose(0, 1)
            q = q * cos + rotate_half(q) * sin
            kk = kk * cos + rotate_half(kk) * sin
            # write the k new keys/values into their slots: exact (one-hot matmul, then select)
            keys = torch.where(written, torch.matmul(onehot.t(), kk), cache[i, 0])  # [kvH, S, hd]
            values = torch.where(written, torch.matmul(onehot.t(), v), cache[i, 1])
            new_cache.append(torch.stack((keys, values)))
            keys_h = keys[:, None].expand(s.kv_heads, groups, s.max_len, s.head_dim).reshape(
                s.heads, s.max_len, s.head_dim)  # [H, S, hd]: each kv head serves `groups` query heads
            values_h = values[:, None].expand(s.kv_heads, groups, s.max_len, s.head_dim).reshape(
                s.heads, s.max_len, s.head_dim)
            scores = torch.matmul(q, keys_h.transpose(1, 2)) * attn.scaling + bias  # [H, k, S]
            out = torch.matmul(torch.softmax(scores, dim=-1), values_h)  # [H, k, hd]
            out = out.transpose(0, 1).reshape(1, k, s.heads * s.head_dim)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(self.norm(x)).float()  # [1, k, V]
        return logits, torch.stack(new_cache)


class VisionGraph(nn.Module):
    """forward(pixels [1, 3, H, W]) -> (embeds [N, d], activity [N]) or, with attention, also
    attention [N]: `LlavaAdapter.encode_image` as one graph."""

    def __init__(self, adapter: CachedDecoderAdapter):
        super().__init__()
        self.adapter = adapter
        self.tower = adapter.model.model.vision_tower
        self.projector = adapter.model.model.multi_modal_projector
        self.start = 1 if adapter.select_strategy == "default" else 0
        self.indices = adapter._layer_indices()
        size = int(adapter.model.config.vision_config.image_size)
        probe = adapter.encode_image({"pixel_values": torch.zeros(1, 3, size, size)})
        self.with_attention = probe.attention is not None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.tower(pixels, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states  # (layers + 1) x [1, 1 + P, d_vision]
        features = torch.cat([hidden[i][:, self.start:] for i in self.indices], dim=-1)  # [1, N, d_v * L]
        embeds = self.projector(features)[0]  # [N, d]
        activity = features[0].float().norm(dim=-1)  # [N]
        if not self.with_attention:
            return embeds, activity
        attention = self.adapter._received_attention(hidden, max(self.indices), self.start)
        return embeds, activity, attention


DECODER_INPUTS = ["ids", "image_embeds", "is_image", "input_pos", "slots", "cache"]
DECODER_OUTPUTS = ["logits", "cache_out"]
VISION_INPUTS = ["pixels"]


def decoder_example(shape: DecoderShape, k: int = 4) -> tuple[torch.Tensor, ...]:
    """Example inputs for k tokens (k >= 2, so that export keeps k symbolic)."""
    return (torch.zeros(1, k, dtype=torch.long), torch.zeros(1, k, shape.hidden),
            torch.zeros(1, k, dtype=torch.bool), position_example(shape, k), torch.arange(k),
            torch.zeros(shape.cache_shape))


def position_example(shape: DecoderShape, k: int) -> torch.Tensor:
    """input_pos for k tokens: [k], or [3, k] for M-RoPE."""
    return torch.arange(k) if shape.rope_rows == 1 else torch.arange(k).expand(shape.rope_rows, k).contiguous()


def position_dims(shape: DecoderShape, k: object) -> dict[int, object]:
    return {0: k} if shape.rope_rows == 1 else {1: k}


def decoder_dynamic_shapes(max_chunk: int, shape: DecoderShape | None = None) -> tuple[dict[int, object] | None, ...]:
    """k symbolic in [1, max_chunk]: one graph serves single steps, draft windows and prefill chunks."""
    k = torch.export.Dim("k", min=1, max=max_chunk)
    return ({1: k}, {1: k}, {1: k}, {0: k} if shape is None else position_dims(shape, k), {0: k}, None)


def vision_outputs(graph: VisionGraph) -> list[str]:
    return ["embeds", "activity", "attention"] if graph.with_attention else ["embeds", "activity"]
