"""Bucketed static-shape verification: windows padded to a few lengths, sessions' keys and values in a
static cache on the device (edge_runtime.static_cache), and each (batch, window) shape's pass
captured once as a CUDA graph when asked for (on CUDA only: asked for elsewhere, an error), or the very
same passes run eagerly.

    verify(states, windows):  B windows of n_i tokens -> one pass over [B', b] tokens
        b  = bucket_for(max n_i)              (edge_runtime.buckets.BUCKETS)
        B' = bucket_for(B, BATCH_BUCKETS)     (rows past B run on the scratch slot)

A pass writes each window's keys and values into its session's slot past the session's length and
changes no length: `commit` keeps the first n (the root and the accepted drafts), `truncate` sets
the length back. The logits of the real positions come back float32 on the CPU, like every adapter's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from covspec.edge_runtime.batching import attention_implementation, no_mask
from covspec.edge_runtime.buckets import BATCH_BUCKETS, BUCKETS, bucket_for, check_buckets, pad_ids
from covspec.edge_runtime.static_cache import SCRATCH, STATIC_ATTENTION, StaticLayout, StaticPool, StaticSlot
from covspec.errors import CovspecError
from covspec.models.base import CachedDecoderAdapter, DecodeState


class CudaGraphsUnavailable(CovspecError, ValueError):
    """CUDA graphs asked for where the target is not on CUDA (never a silent fallback to eager passes)."""


@dataclass
class PassInputs:
    """One static pass's inputs on the device: what a captured graph copies into its own buffers."""

    embeds: torch.Tensor  # [B', b, d] model dtype
    positions: torch.Tensor  # [B', b], or [3, B', b] for M-RoPE
    slots: torch.Tensor  # [B'] long
    lengths: torch.Tensor  # [B'] long


def eager_pass(adapter: CachedDecoderAdapter, pool: StaticPool, inputs: PassInputs) -> torch.Tensor:
    """The text model and lm_head over [B', b] tokens on the static cache: logits [B', b, V] (model dtype)."""
    layout = StaticLayout(pool, inputs.slots, inputs.lengths)
    with attention_implementation(adapter, STATIC_ATTENTION):
        out = adapter.language_model(inputs_embeds=inputs.embeds, attention_mask=no_mask(adapter.device),
                                     position_ids=inputs.positions, use_cache=False, covspec_static=layout)
    return adapter.model.lm_head(out.last_hidden_state)


@dataclass
class CapturedPass:
    """One shape's pass captured as a CUDA graph, with the buffers it reads and writes."""

    graph: torch.cuda.CUDAGraph
    inputs: PassInputs
    logits: torch.Tensor  # [B', b, V], rewritten by every replay

    def __call__(self, inputs: PassInputs) -> torch.Tensor:
        for own, new in zip(vars(self.inputs).values(), vars(inputs).values(), strict=True):
            own.copy_(new)
        self.graph.replay()
        return self.logits


def capture(adapter: CachedDecoderAdapter, pool: StaticPool, example: PassInputs, memory=None,
            warmup: int = 2) -> CapturedPass:
    """Captures the pass of example's shape (on CUDA): warmed up on a side stream, then recorded with
    every row on the scratch slot at length 0, so that capturing touches no session."""
    static = PassInputs(example.embeds.clone(), torch.zeros_like(example.positions),
                        torch.full_like(example.slots, SCRATCH), torch.zeros_like(example.lengths))
    stream = torch.cuda.Stream(device=example.embeds.device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            eager_pass(adapter, pool, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=memory):
        logits = eager_pass(adapter, pool, static)
    return CapturedPass(graph, static, logits)


@dataclass
class StaticVerifier:
    """Verify passes over sessions held in a static pool; `cuda_graphs` replays captured passes on CUDA."""

    adapter: CachedDecoderAdapter
    pool: StaticPool
    buckets: tuple[int, ...] = BUCKETS
    batch_buckets: tuple[int, ...] = BATCH_BUCKETS
    cuda_graphs: bool = False
    graphs: dict[tuple[int, int], CapturedPass] = field(default_factory=dict)
    memory: object = None  # the graphs' shared memory pool
    runner: Callable[[CachedDecoderAdapter, StaticPool, PassInputs], torch.Tensor] | None = None  # replaces
    # eager_pass when set (e.g. torch.compile(eager_pass, mode="reduce-overhead"), measured by gpu_check)

    @classmethod
    def create(cls, adapter: CachedDecoderAdapter, slots: int, max_len: int, cuda_graphs: bool = False,
               buckets: tuple[int, ...] = BUCKETS, batch_buckets: tuple[int, ...] = BATCH_BUCKETS) -> StaticVerifier:
        """A pool of `slots` sessions of `max_len` positions on the adapter's device, in its dtype, its
        passes captured as CUDA graphs when `cuda_graphs` (the adapter must be on CUDA: asked for
        elsewhere, CudaGraphsUnavailable; without them the same passes run eagerly on any device)."""
        if cuda_graphs and adapter.device.type != "cuda":
            raise CudaGraphsUnavailable(f"CUDA graphs need the target on a CUDA device; it is on {adapter.device}: "
                                        "drop --cuda-graphs (--static-cache runs the same static path without "
                                        "graphs), or serve with --device cuda")
        pool = StaticPool.allocate(adapter.text_config, slots, max_len, adapter.device, adapter.dtype)
        return cls(adapter, pool, check_buckets(buckets), check_buckets(batch_buckets), cuda_graphs)

    @property
    def max_window(self) -> int:
        return self.buckets[-1]

    def open(self, state: DecodeState) -> DecodeState:
        """A static state holding a prefilled (DynamicCache) state's positions in a slot of its own."""
        slot = self.pool.take()
        try:
            self.pool.load(slot, [(layer.keys, layer.values) for layer in state.cache.layers])
        except BaseException:
            self.pool.give_back(slot)
            raise
        return DecodeState(cache=slot, length=state.length, extra=dict(state.extra))

    def close(self, state: DecodeState) -> None:
        self.pool.give_back(state.cache)

    def inputs(self, states: list[DecodeState], ids_list: list[torch.Tensor], b: int, rows: int) -> PassInputs:
        """The windows padded to b tokens and the batch to `rows` rows (scratch rows at length 0)."""
        adapter, device = self.adapter, self.adapter.device
        for state in states:
            if state.length + b > self.pool.max_len:
                raise ValueError(f"a window of {b} after {state.length} positions passes the static cache's {self.pool.max_len}")
        ids = torch.stack([pad_ids(i, b) for i in ids_list])  # [B, b]
        embeds = adapter.embed(ids.flatten()).view(len(states), b, -1)  # [B, b, d]
        positions = [adapter._positions(state, b) for state in states]  # [1, b] or [3, 1, b] each
        positions += [torch.zeros_like(positions[0])] * (rows - len(states))
        pad = rows - len(states)
        embeds = torch.cat([embeds, embeds.new_zeros(pad, b, embeds.shape[-1])]).to(adapter.dtype)
        slots = [s.cache.slot for s in states] + [SCRATCH] * pad
        lengths = [s.length for s in states] + [0] * pad
        return PassInputs(embeds, torch.cat(positions, dim=-2).to(device), torch.tensor(slots, device=device),
                          torch.tensor(lengths, device=device))

    def run(self, inputs: PassInputs) -> torch.Tensor:
        """logits [B', b, V]: the captured graph of this shape (captured on first use), or the eager pass."""
        if not self.cuda_graphs:
            return (self.runner or eager_pass)(self.adapter, self.pool, inputs)
        key = tuple(inputs.embeds.shape[:2])
        if key not in self.graphs:
            if self.memory is None:
                self.memory = torch.cuda.graph_pool_handle()
            self.graphs[key] = capture(self.adapter, self.pool, inputs, self.memory)
        return self.graphs[key](inputs)

    def shapes(self):
        """Every (rows, bucket) shape's inputs, all rows on the scratch slot at length 0."""
        scratch = DecodeState(cache=StaticSlot(SCRATCH), length=0, extra={"rope_delta": 0})
        for rows in self.batch_buckets:
            for b in self.buckets:
                yield self.inputs([scratch], [torch.ones(b, dtype=torch.long)], b, rows)

    def warm(self) -> int:
        """Captures every shape's graph now (CUDA graphs only), so that no request waits for a capture;
        touches no session's slot. Returns the number of graphs held."""
        if self.cuda_graphs:
            with torch.inference_mode():
                for inputs in self.shapes():
                    self.run(inputs)
        return len(self.graphs)

    def verify(self, states: list[DecodeState], ids_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """One static pass over each states[i]'s window ids_list[i] ([n_i], root first): logits [n_i, V]
        float32 on the CPU. The windows' keys and values lie past each length until `commit`."""
        ids_list = [torch.as_tensor(i, dtype=torch.long).flatten().cpu() for i in ids_list]
        sizes = [int(i.numel()) for i in ids_list]
        b, rows = bucket_for(max(sizes), self.buckets), bucket_for(len(states), self.batch_buckets)
        if b is None or rows is None:
            raise ValueError(f"{len(states)} windows of up to {max(sizes)} tokens exceed the buckets "
                             f"({self.batch_buckets[-1]} x {self.buckets[-1]})")
        with torch.inference_mode():
            logits = self.run(self.inputs(states, ids_list, b, rows))
            return [logits[i, :n].float().cpu() for i, n in enumerate(sizes)]

    def commit(self, state: DecodeState, n: int) -> None:
        """Keeps the first n positions of the window just verified on this state."""
        state.length += n

    def truncate(self, state: DecodeState, length: int) -> None:
        if not 0 <= length <= state.length:
            raise ValueError(f"cannot truncate a state of {state.length} positions to {length}")
        state.length = length

    def forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        """`adapter.forward` on a static state: the window's logits [n, V], all n positions kept."""
        logits = self.verify([state], [ids])[0]
        self.commit(state, int(logits.shape[0]))
        return logits
