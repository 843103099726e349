"""Batched verification: the windows of several sessions scored in one target forward pass.

Each session keeps its own DynamicCache (past lengths L_i differ). The B windows (ids_i of n_i
tokens: the root and the drafted tokens) are packed into one row, without padding:

    hidden states, projections, MLPs:  [ new_1 | new_2 | ... | new_B ]      [1, sum n_i, d]
                                         n_1     n_2           n_B

One text-model pass runs the [1, sum n_i] new tokens at their sessions' own positions (the
session's `_positions`, so pruned prefills and Qwen2.5-VL's M-RoPE rope delta carry over: [1, n]
or [3, 1, n]). Attention is the one place where windows differ: the pass runs with our own
attention function (`packed_attention`, registered with transformers' AttentionInterface and
switched on for the pass alone), which gives each window's queries its own session's past keys
and values plus its own window, causally ([n_i, L_i + n_i]), and nothing of the others. So window
i's logits are the logits a forward on session i alone gives, up to float rounding; the
projections and MLPs, which cost the most, run on the real tokens only (a padded [B, max n_i]
batch wasted half of them on windows of uneven lengths); and no packed cache of every past is
built (a first version concatenated every past into one cache, copied again on every layer's
update, with a block mask over all of it: masked attention that grew with B^2, 44 ms for 8 windows
of 17 tokens against 26 ms now). Each window still reads its session's past through one
concatenation with its new keys per layer, as a single-session forward does.

The pass leaves every session's cache untouched: it returns each window's logits and new
keys/values (`WindowPass`, as the attention function saw them), and `commit` appends the first n of
them to the session's cache (after verification, the root and the accepted drafts).
`forward_batch` commits all of them: the same effect as `adapter.forward` on each session.

Prefills batch the same way with empty pasts (`prefill_batch`): the B prompts are packed into one
row, each token seeing its own prompt causally, and each session's fresh cache takes its prompt's
slice of the new keys and values.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from covspec.edge_runtime.static_cache import StaticSlot
from covspec.models.base import CachedDecoderAdapter, DecodeState, PrefillInputs, VLMAdapter


@dataclass
class WindowPass:
    """One session's share of a batched pass: not yet in its cache."""

    ids: torch.Tensor  # [n] the window fed (root first)
    logits: torch.Tensor  # [n, V] float32
    keys: list[torch.Tensor]  # per layer [1, h_kv, n, d_head]
    values: list[torch.Tensor]  # per layer [1, h_kv, n, d_head]
    length: int  # the state's length the window was computed after (a stale window is not committed)
    pass_s: float = 0.0  # how long the shared pass took

    @property
    def size(self) -> int:
        return int(self.logits.shape[0])


def can_batch(adapter: VLMAdapter, states: list[DecodeState]) -> bool:
    """Whether these states can share a pass: a decoder run on transformers DynamicCaches whose layers
    are all plain (full-attention, unquantized, initialized) DynamicLayers of one dtype."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(adapter, CachedDecoderAdapter) or not states:
        return False
    dtypes = set()
    for state in states:
        cache = state.cache
        if type(cache) is not DynamicCache or not cache.layers:
            return False
        for layer in cache.layers:
            if type(layer) is not DynamicLayer or not layer.is_initialized or layer.get_seq_length() != state.length:
                return False
            dtypes.add(layer.keys.dtype)
    return len(dtypes) == 1 and len({len(s.cache.layers) for s in states}) == 1


def can_prefill_batch(adapter: VLMAdapter) -> bool:
    """Whether prefills can share a pass: a decoder whose fresh caches are plain DynamicLayers."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(adapter, CachedDecoderAdapter):
        return False
    cache = adapter.new_cache()
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def set_layer(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Makes a fresh cache layer hold these keys and values [1, h_kv, L, d_head] (as `update` would,
    without copying them again)."""
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


PACKED_ATTENTION = "covspec_packed"  # our attention function's name in transformers' AttentionInterface


@lru_cache(maxsize=8)
def no_mask(device: torch.device) -> torch.Tensor:
    """A 4D mask on the model's device: transformers then skips building one of its own (our attention
    functions build each window's)."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


@dataclass
class PackedLayout:
    """What `packed_attention` needs to know about the packed row, and what it leaves behind."""

    sizes: list[int]  # n_i, the windows' lengths in row order
    pasts: list[DecodeState] | None  # each window's session (its cache is read, never written); None: prefills
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, h_kv, sum n, d_head] new keys
    values: dict[int, torch.Tensor] = field(default_factory=dict)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     covspec_layout: PackedLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over a packed row, window by window: query [1, H, sum n, D] and the new key and
    value [1, H_kv, sum n, D] (positions already applied) -> [1, sum n, H, D], window i's queries
    attending over its session's past and, causally, its own window. The new keys and values are
    kept in the layout for the sessions' caches."""
    if covspec_layout is None:
        raise RuntimeError("packed_attention runs only inside packed_pass")
    layer = module.layer_idx
    covspec_layout.keys[layer], covspec_layout.values[layer] = key, value
    gqa = query.shape[1] != key.shape[1]
    out, at = [], 0
    for i, n in enumerate(covspec_layout.sizes):
        q, k, v = query[:, :, at:at + n], key[:, :, at:at + n], value[:, :, at:at + n]
        if covspec_layout.pasts is None or covspec_layout.pasts[i].length == 0:
            out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
        else:
            past = covspec_layout.pasts[i].cache.layers[layer]
            k, v = torch.cat([past.keys, k], dim=-2), torch.cat([past.values, v], dim=-2)  # [1, H_kv, L_i + n_i, D]
            mask = causal_after(k.shape[-2] - n, n, q.device)
            out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
        at += n
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@lru_cache(maxsize=256)  # at most 256 masks of at most context x window bools
def causal_after(past: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, past + n] bool on `device`, True where a query may attend: the whole past and its window
    up to itself (made once per shape and device: no host-to-device copy per layer)."""
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(diagonal=past)


@contextmanager
def attention_implementation(adapter: CachedDecoderAdapter, name: str):
    """Switches the text model's attention function for the duration of one pass. The switch is on
    the model's config, so no other thread may run the same adapter meanwhile (the edge serves from
    one loop)."""
    config = adapter.language_model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def packed_pass(adapter: CachedDecoderAdapter, layout: PackedLayout, embeds: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """The text model over windows of sizes layout.sizes packed into one row, embeds [sum n, d] at
    positions [1, sum n] (or [3, 1, sum n]), each after its own session's past: hidden states
    [sum n, d]. The new keys and values are left in `layout`."""
    with attention_implementation(adapter, PACKED_ATTENTION):
        out = adapter.language_model(inputs_embeds=embeds[None].to(adapter.device, adapter.model.dtype),
                                     attention_mask=no_mask(adapter.device),
                                     position_ids=positions.to(adapter.device), use_cache=False,
                                     covspec_layout=layout)
    return out.last_hidden_state[0]


def new_keys_values(layout: PackedLayout) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Each window's new positions: per window, per layer [1, h_kv, n_i, d_head] keys and values
    (views of the pass's new keys and values)."""
    layers = sorted(layout.keys)
    keys = torch.stack([layout.keys[i] for i in layers])  # [layers, 1, h_kv, sum n, d]
    values = torch.stack([layout.values[i] for i in layers])
    return [(list(k.unbind(0)), list(v.unbind(0)))
            for k, v in zip(keys.split(layout.sizes, dim=-2), values.split(layout.sizes, dim=-2), strict=True)]


def run_batch(adapter: CachedDecoderAdapter, states: list[DecodeState],
              ids_list: list[torch.Tensor]) -> list[WindowPass]:
    """One pass over the windows ids_list[i] ([n_i] token ids, n_i >= 1) of states[i]: each window's
    logits [n_i, V] and new keys/values. The states are not changed."""
    ids_list = [torch.as_tensor(ids, dtype=torch.long).flatten().cpu() for ids in ids_list]
    sizes = [int(ids.numel()) for ids in ids_list]
    if min(sizes) < 1:
        raise ValueError("every window needs at least one token (its root)")
    layout = PackedLayout(sizes, list(states))
    start = time.perf_counter()
    with torch.inference_mode():
        # each window at its session's own next positions: [1, n_i] -> [1, sum n] (or [3, 1, sum n])
        positions = torch.cat([adapter._positions(state, n) for state, n in zip(states, sizes, strict=True)], dim=-1)
        hidden = packed_pass(adapter, layout, adapter.embed(torch.cat(ids_list)), positions)
        logits = adapter.model.lm_head(hidden).float().cpu().split(sizes)  # [n_i, V] each, float32 on the CPU
        windows = [WindowPass(ids, rows, keys, values, length=state.length)
                   for ids, rows, (keys, values), state in zip(ids_list, logits, new_keys_values(layout), states,
                                                               strict=True)]
    for window in windows:
        window.pass_s = time.perf_counter() - start
    return windows


def commit(state: DecodeState, window: WindowPass, n: int) -> None:
    """Appends the window's first n positions to the state's cache (n <= window.size)."""
    if window.length != state.length:
        raise ValueError(f"a window computed after {window.length} positions, the state holds {state.length}")
    if not 0 <= n <= window.size:
        raise ValueError(f"cannot commit {n} of a window of {window.size} positions")
    if n == 0:
        return
    if isinstance(state.cache, StaticSlot):  # a static pass wrote the window into the slot already
        state.length += n
        return
    for layer, keys, values in zip(state.cache.layers, window.keys, window.values, strict=True):
        layer.update(keys[:, :, :n], values[:, :, :n])
    state.length += n


def forward_batch(adapter: CachedDecoderAdapter, states: list[DecodeState],
                  ids_list: list[torch.Tensor]) -> list[torch.Tensor]:
    """`adapter.forward(states[i], ids_list[i])` for every i, in one pass: the logits [n_i, V] of
    each window, every state extended by its window."""
    windows = run_batch(adapter, states, ids_list)
    for state, window in zip(states, windows, strict=True):
        commit(state, window, window.size)
    return [w.logits for w in windows]


def prefill_batch(adapter: CachedDecoderAdapter, inputs: list[PrefillInputs]) -> list[tuple[torch.Tensor, DecodeState]]:
    """`adapter.start(inputs[i])` for every i in one pass: each prompt's last logits [V] and its state."""
    sizes = [int(x.embeds.shape[0]) for x in inputs]  # T_i
    for size in sizes:
        adapter.check_length(size)
    ends = torch.tensor(sizes).cumsum(0)  # where each prompt ends in the packed row
    layout = PackedLayout(sizes, None)
    with torch.inference_mode():
        hidden = packed_pass(adapter, layout, torch.cat([x.embeds for x in inputs]),
                             torch.cat([x.positions for x in inputs], dim=-1))  # [sum T, d]
        # [B, V]: each prompt's last position, float32 on the CPU
        logits = adapter.model.lm_head(hidden[(ends - 1).to(hidden.device)]).float().cpu()
    results = []
    for i, (x, (keys, values)) in enumerate(zip(inputs, new_keys_values(layout), strict=True)):
        state = DecodeState(cache=adapter.new_cache(), length=sizes[i], extra=dict(x.extra))
        for own, k, v in zip(state.cache.layers, keys, values, strict=True):
            set_layer(own, k.clone(), v.clone())
        results.append((logits[i], state))
    return results
