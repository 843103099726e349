"""A static KV cache on the target's device: one preallocated buffer per layer holding every session's
keys and values in a slot, so that a verify pass has static shapes and can be captured as a CUDA graph.

    keys[layer], values[layer]:  [slots + 1, h_kv, max_len, d_head]   (slot 0: scratch, for padded rows)

A session owns one slot and a length; a pass over its window writes the window's keys and values at
positions length .. length + bucket - 1 and attends over the whole slot with a mask that admits the
positions up to each query's own. Truncating is setting the length (what lies past it is never read,
and is overwritten by the next pass), committing n tokens is adding n to it.

This replaces transformers' DynamicCache (a list of tensors per session, concatenated anew on each
pass, with shapes that change on every token) for the static verify path only
(edge_runtime.static_verify); prefills still run on a DynamicCache, copied into the slot after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

STATIC_ATTENTION = "covspec_static"  # our attention function's name in transformers' AttentionInterface
SCRATCH = 0  # the slot padded batch rows write to


@dataclass
class StaticSlot:
    """A session's place in the pool (DecodeState.cache of a static state)."""

    slot: int


@dataclass
class StaticPool:
    """The preallocated keys and values of every session, per layer [slots + 1, h_kv, max_len, d_head]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    max_len: int
    free: list[int] = field(default_factory=list)

    @classmethod
    def allocate(cls, config: Any, slots: int, max_len: int, device: torch.device, dtype: torch.dtype) -> StaticPool:
        """Zeroed buffers for `slots` sessions of at most `max_len` positions (config: the text model's)."""
        h_kv = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        d_head = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        shape = (slots + 1, h_kv, max_len, d_head)
        layers = int(config.num_hidden_layers)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        return cls(keys, values, max_len, free=list(range(slots, SCRATCH, -1)))

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def take(self) -> StaticSlot:
        if not self.free:
            raise RuntimeError(f"the static cache's {len(self.keys[0]) - 1} slots are all taken")
        return StaticSlot(self.free.pop())

    def give_back(self, slot: StaticSlot) -> None:
        if slot.slot != SCRATCH and slot.slot not in self.free:
            self.free.append(slot.slot)

    def load(self, slot: StaticSlot, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copies a prefilled cache (per layer keys, values [1, h_kv, L, d_head]) into the slot's first L positions."""
        length = int(layers[0][0].shape[-2])
        if length > self.max_len:
            raise ValueError(f"a prefill of {length} positions does not fit the static cache's {self.max_len}")
        for own_k, own_v, (k, v) in zip(self.keys, self.values, layers, strict=True):
            own_k[slot.slot, :, :length] = k[0]
            own_v[slot.slot, :, :length] = v[0]


@dataclass
class StaticLayout:
    """What `static_attention` needs for one pass: the pool, and per batch row its slot and length
    (device tensors [B], so that a captured graph reads them anew on every replay)."""

    pool: StaticPool
    slots: torch.Tensor  # [B] long
    lengths: torch.Tensor  # [B] long


def static_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     covspec_static: StaticLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, b, D] and the new key and value [B, H_kv, b, D] (positions applied) -> [B, b, H, D]:
    the new keys and values written into each row's slot at length .. length + b - 1, then each query
    attending over its slot up to its own position. Tensor operations only (no host sync): capturable."""
    if covspec_static is None:
        raise RuntimeError("static_attention runs only inside a static pass")
    layout, layer = covspec_static, module.layer_idx
    b = query.shape[2]
    pool_k, pool_v = layout.pool.keys[layer], layout.pool.values[layer]
    positions = layout.lengths[:, None] + torch.arange(b, device=query.device)  # [B, b]
    rows = layout.slots[:, None].expand_as(positions)
    pool_k[rows, :, positions] = key.transpose(1, 2).to(pool_k.dtype)  # [B, b, H_kv, D]
    pool_v[rows, :, positions] = value.transpose(1, 2).to(pool_v.dtype)
    k, v = pool_k[layout.slots], pool_v[layout.slots]  # [B, H_kv, max_len, D]
    mask = torch.arange(layout.pool.max_len, device=query.device) <= positions[:, :, None]  # [B, b, max_len]
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask[:, None], scale=scaling,
                                         enable_gqa=query.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(STATIC_ATTENTION, static_attention)
