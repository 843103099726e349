"""Batched verification: the windows of several sessions scored in one target forward pass.

Each session keeps its own DynamicCache (past lengths L_i differ). For a batch of B windows
(ids_i of n_i tokens: the root and the drafted tokens) a padded batch is built:

    row i of each layer's keys/values:  [ 0 ... 0 | past_i (L_i) | new_i (n_i) | pad ... ]
                                          P - L_i                   N - n_i
    P = max L_i (past, left-padded), N = max n_i (new tokens, right-padded)

One text-model pass runs the [B, N] new tokens against the padded past with a 2D attention mask
[B, P + N] (1 where a key is real) and each row's own positions (the session's `_positions`, so
pruned prefills and Qwen2.5-VL's M-RoPE rope delta carry over: [B, N] or [3, B, N]). A real query
never sees a padded key (masked on the left, causally after it on the right), so row i's logits
are the logits a forward on session i alone gives, up to float rounding.

The pass leaves every session's cache untouched: it returns each window's logits and new
keys/values (`Window`), and `commit` appends the first n of them to the session's cache (after
verification, the root and the accepted drafts). `forward_batch` commits all of them: the same
effect as `adapter.forward` on each session.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from covspec.models.base import CachedDecoderAdapter, DecodeState, VLMAdapter


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


def padded_past(states: list[DecodeState], layer: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer`'s keys and values of every state, left-padded with zeros to `past` positions:
    [B, h_kv, P, d_head] each."""
    first = states[0].cache.layers[layer].keys  # [1, h_kv, L_0, d_head]
    shape = (len(states), first.shape[1], past, first.shape[3])
    keys = first.new_zeros(shape)
    values = first.new_zeros(shape)
    for i, state in enumerate(states):
        cached = state.cache.layers[layer]
        n = cached.keys.shape[-2]
        keys[i, :, past - n:] = cached.keys[0]
        values[i, :, past - n:] = cached.values[0]
    return keys, values


def padded_cache(adapter: CachedDecoderAdapter, states: list[DecodeState], past: int):
    """A fresh DynamicCache holding every state's past, left-padded: [B, h_kv, P, d_head] per layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=adapter.text_config)
    for layer in range(len(states[0].cache.layers)):
        cache.update(*padded_past(states, layer, past), layer)
    return cache


def batch_inputs(adapter: CachedDecoderAdapter, states: list[DecodeState], ids_list: list[torch.Tensor],
                 past: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeds [B, N, d], positions [B, N] or [3, B, N], mask [B, P + N]) of the right-padded windows."""
    ids = torch.zeros(len(ids_list), new, dtype=torch.long)  # [B, N]; padding: token 0 (masked out)
    mask = torch.zeros(len(ids_list), past + new, dtype=torch.long)  # [B, P + N]
    for i, (state, row) in enumerate(zip(states, ids_list, strict=True)):
        ids[i, :row.numel()] = row
        mask[i, past - state.length:past + row.numel()] = 1
    embeds = adapter.embed(ids.flatten()).view(len(ids_list), new, -1)  # [B, N, d]
    # each row at its session's own next positions: [1, N] -> [B, N], or [3, 1, N] -> [3, B, N]
    positions = torch.cat([adapter._positions(state, new) for state in states], dim=-2)
    return embeds, positions, mask


def window_logits(adapter: CachedDecoderAdapter, hidden: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The lm_head on the real positions only: hidden [B, N, d] -> [n_i, V] float32 per row."""
    real = torch.arange(hidden.shape[1])[None] < torch.tensor(sizes)[:, None]  # [B, N]
    return list(adapter.model.lm_head(hidden[real.to(hidden.device)]).float().split(sizes))  # [sum n_i, V] split


def new_keys_values(cache, row: int, past: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Row `row`'s first n new positions in the batched cache: per layer [1, h_kv, n, d_head] (copies)."""
    keys = [layer.keys[row:row + 1, :, past:past + n].clone() for layer in cache.layers]
    values = [layer.values[row:row + 1, :, past:past + n].clone() for layer in cache.layers]
    return keys, values


def run_batch(adapter: CachedDecoderAdapter, states: list[DecodeState],
              ids_list: list[torch.Tensor]) -> list[Window]:
    """One pass over the windows ids_list[i] ([n_i] token ids, n_i >= 1) of states[i]: each window's
    logits [n_i, V] and new keys/values. The states are not changed."""
    ids_list = [torch.as_tensor(ids, dtype=torch.long).flatten().cpu() for ids in ids_list]
    sizes = [int(ids.numel()) for ids in ids_list]
    if min(sizes) < 1:
        raise ValueError("every window needs at least one token (its root)")
    past, new = max(s.length for s in states), max(sizes)  # P, N
    start = time.perf_counter()
    with torch.inference_mode():
        cache = padded_cache(adapter, states, past)
        embeds, positions, mask = batch_inputs(adapter, states, ids_list, past, new)
        out = adapter.language_model(inputs_embeds=embeds.to(adapter.model.dtype), attention_mask=mask.to(adapter.device),
                                     position_ids=positions.to(adapter.device), past_key_values=cache, use_cache=True)
        logits = window_logits(adapter, out.last_hidden_state, sizes)
        windows = [Window(ids, rows, *new_keys_values(cache, i, past, n), length=state.length)
                   for i, (ids, rows, n, state) in enumerate(zip(ids_list, logits, sizes, states, strict=True))]
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
