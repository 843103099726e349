"""Batched verification: the windows of several sessions scored in one target forward pass.

Each session keeps its own DynamicCache (past lengths L_i differ). The B windows (ids_i of n_i
tokens: the root and the drafted tokens) are packed into one row, without padding:

    each layer's keys/values:  [ past_1 | past_2 | ... | past_B | new_1 | new_2 | ... | new_B ]
                                 L_1      L_2            L_B      n_1     n_2           n_B

One text-model pass runs the [1, sum n_i] new tokens at their sessions' own positions (the
session's `_positions`, so pruned prefills and Qwen2.5-VL's M-RoPE rope delta carry over: [1, n]
or [3, 1, n]) with a block mask [1, 1, sum n_i, sum L_i + sum n_i]: a token of window i sees
past_i and the tokens of new_i up to itself, nothing else. So window i's logits are the logits a
forward on session i alone gives, up to float rounding, and the projections and MLPs, which cost
the most, run on the real tokens only (a padded [B, max n_i] batch wasted half of them on
windows of uneven lengths).

The pass leaves every session's cache untouched: it returns each window's logits and new
keys/values (`Window`), and `commit` appends the first n of them to the session's cache (after
verification, the root and the accepted drafts). `forward_batch` commits all of them: the same
effect as `adapter.forward` on each session.

Prefills batch the same way with empty pasts (`prefill_batch`): the B prompts are packed into one
row, each token seeing its own prompt causally, and each session's fresh cache takes its prompt's
slice of the packed keys and values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from covspec.models.base import CachedDecoderAdapter, DecodeState, PrefillInputs, VLMAdapter


@dataclass
class Window:
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


def packed_cache(adapter: CachedDecoderAdapter, states: list[DecodeState]):
    """A fresh cache holding every state's past one after the other: [1, h_kv, sum L_i, d_head] per
    layer."""
    cache = adapter.new_cache()
    for layer, packed in enumerate(cache.layers):
        set_layer(packed, torch.cat([state.cache.layers[layer].keys for state in states], dim=-2),
                  torch.cat([state.cache.layers[layer].values for state in states], dim=-2))
    return cache


def packed_pass(adapter: CachedDecoderAdapter, cache, pasts: list[int], embeds: torch.Tensor,
                positions: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The text model over windows of sizes n_i packed into one row, embeds [sum n, d] at positions
    [1, sum n] (or [3, 1, sum n]), window i after the i-th past (L_i = pasts[i]) in `cache`:
    hidden states [sum n, d]. The new keys and values are appended to `cache`."""
    out = adapter.language_model(inputs_embeds=embeds[None].to(adapter.model.dtype),
                                 attention_mask=block_mask(pasts, sizes).to(adapter.device),
                                 position_ids=positions.to(adapter.device), past_key_values=cache, use_cache=True)
    return out.last_hidden_state[0]


def block_mask(pasts: list[int], sizes: list[int]) -> torch.Tensor:
    """[1, 1, sum n_i, sum L_i + sum n_i] bool, True where a query may attend: window i's tokens see
    their own past and, causally, their own window."""
    total_past, total_new = sum(pasts), sum(sizes)
    mask = torch.zeros(total_new, total_past + total_new, dtype=torch.bool)
    past_at, new_at = 0, 0
    for past, n in zip(pasts, sizes, strict=True):
        rows = slice(new_at, new_at + n)
        mask[rows, past_at:past_at + past] = True
        mask[rows, total_past + new_at:total_past + new_at + n] = torch.ones(n, n, dtype=torch.bool).tril()
        past_at, new_at = past_at + past, new_at + n
    return mask[None, None]


def new_keys_values(cache, offset: int, sizes: list[int]) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Each window's new positions in the packed cache (they start at `offset`): per window, per
    layer [1, h_kv, n_i, d_head] keys and values (views of one copy of the new positions)."""
    total = sum(sizes)
    keys = torch.stack([layer.keys[:, :, offset:offset + total] for layer in cache.layers])  # [layers, 1, h_kv, sum n, d]
    values = torch.stack([layer.values[:, :, offset:offset + total] for layer in cache.layers])
    return [(list(k.unbind(0)), list(v.unbind(0)))
            for k, v in zip(keys.split(sizes, dim=-2), values.split(sizes, dim=-2), strict=True)]


def run_batch(adapter: CachedDecoderAdapter, states: list[DecodeState],
              ids_list: list[torch.Tensor]) -> list[Window]:
    """One pass over the windows ids_list[i] ([n_i] token ids, n_i >= 1) of states[i]: each window's
    logits [n_i, V] and new keys/values. The states are not changed."""
    ids_list = [torch.as_tensor(ids, dtype=torch.long).flatten().cpu() for ids in ids_list]
    sizes = [int(ids.numel()) for ids in ids_list]
    if min(sizes) < 1:
        raise ValueError("every window needs at least one token (its root)")
    pasts = [state.length for state in states]
    start = time.perf_counter()
    with torch.inference_mode():
        cache = packed_cache(adapter, states)
        # each window at its session's own next positions: [1, n_i] -> [1, sum n] (or [3, 1, sum n])
        positions = torch.cat([adapter._positions(state, n) for state, n in zip(states, sizes, strict=True)], dim=-1)
        hidden = packed_pass(adapter, cache, pasts, adapter.embed(torch.cat(ids_list)), positions, sizes)
        logits = adapter.model.lm_head(hidden).float().split(sizes)  # [n_i, V] each
        windows = [Window(ids, rows, keys, values, length=state.length)
                   for ids, rows, (keys, values), state in zip(ids_list, logits, new_keys_values(cache, sum(pasts), sizes),
                                                               states, strict=True)]
    for window in windows:
        window.pass_s = time.perf_counter() - start
    return windows


def commit(state: DecodeState, window: Window, n: int) -> None:
    """Appends the window's first n positions to the state's cache (n <= window.size)."""
    if window.length != state.length:
        raise ValueError(f"a window computed after {window.length} positions, the state holds {state.length}")
    if not 0 <= n <= window.size:
        raise ValueError(f"cannot commit {n} of a window of {window.size} positions")
    if n == 0:
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
    with torch.inference_mode():
        cache = adapter.new_cache()
        hidden = packed_pass(adapter, cache, [0] * len(inputs), torch.cat([x.embeds for x in inputs]),
                             torch.cat([x.positions for x in inputs], dim=-1), sizes)  # [sum T, d]
        logits = adapter.model.lm_head(hidden[ends - 1]).float()  # [B, V]: each prompt's last position
    results = []
    for i, (x, size) in enumerate(zip(inputs, sizes, strict=True)):
        start = int(ends[i]) - size
        state = DecodeState(cache=adapter.new_cache(), length=size, extra=dict(x.extra))
        for own, shared in zip(state.cache.layers, cache.layers, strict=True):
            set_layer(own, shared.keys[:, :, start:start + size].clone(), shared.values[:, :, start:start + size].clone())
        results.append((logits[i], state))
    return results
