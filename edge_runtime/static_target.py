"""The edge's target on the static verify path (`--static-cache`, `--cuda-graphs`): the adapter the
sessions drive, with their caches in a StaticVerifier's pool instead of DynamicCaches.

Everything about images and prompts is the wrapped adapter's. A prefill runs on a DynamicCache as
before and is then copied into a slot of the pool; `forward` and `truncate` are the verifier's (a
window longer than the largest bucket runs in bucket-sized pieces); the round's batched VERIFYs run
as one bucketed pass, its batched OPENs as one packed prefill copied into their slots (`run_batch`, Windows whose keys and values are already in the slots: `commit`
only moves the length). A slot goes back to the pool when its state is dropped (the session freed).
"""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

import torch

from covspec.edge_runtime.batching import WindowPass, prefill_batch
from covspec.edge_runtime.static_verify import StaticVerifier
from covspec.models.base import CachedDecoderAdapter, DecodeState, PrefillInputs, VisualTokens, VLMAdapter


class StaticTarget(VLMAdapter):
    """A CachedDecoderAdapter whose decode states live in a static pool."""

    def __init__(self, inner: CachedDecoderAdapter, verifier: StaticVerifier):
        super().__init__(inner.model, inner.tokenizer, inner.path)
        self.inner = inner
        self.verifier = verifier
        self.family = inner.family  # type: ignore[misc]  # the wrapped adapter's family, per instance

    @classmethod
    def create(cls, inner: CachedDecoderAdapter, slots: int, max_len: int, cuda_graphs: bool) -> StaticTarget:
        limit = getattr(inner.text_config, "max_position_embeddings", None) or max_len
        return cls(inner, StaticVerifier.create(inner, slots, min(max_len, int(limit)), cuda_graphs=cuda_graphs))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> VLMAdapter:
        raise NotImplementedError("wrap a loaded adapter: StaticTarget.create(adapter, ...)")

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        return self.inner.encode_image(pixels)

    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        return self.inner.prompt_embeddings(prompt)

    def _slot_state(self, state: DecodeState) -> DecodeState:
        """A prefilled DynamicCache state copied into a slot, given back when the new state is dropped."""
        try:
            static = self.verifier.open(state)
        except RuntimeError:  # every slot taken: freed sessions may still await collection
            gc.collect()
            static = self.verifier.open(state)
        weakref.finalize(static.cache, self.verifier.pool.give_back, type(static.cache)(static.cache.slot))
        return static

    def prefill(self, visual: VisualTokens, prompt: str, kept: torch.Tensor | None = None):
        logits, state = self.inner.prefill(visual, prompt, kept=kept)
        return logits, self._slot_state(state)

    def prefill_inputs(self, visual: VisualTokens, prompt: str, kept: torch.Tensor | None = None) -> PrefillInputs:
        return self.inner.prefill_inputs(visual, prompt, kept)

    def prefill_batch(self, inputs: list[PrefillInputs]) -> list[tuple[torch.Tensor, DecodeState]]:
        """`batching.prefill_batch` (one packed pass on DynamicCaches), each state then copied into a slot."""
        return [(logits, self._slot_state(state)) for logits, state in prefill_batch(self.inner, inputs)]

    def forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        """The window's logits [k, V], all k kept; in pieces of the largest bucket when longer."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            return torch.empty(0, self.vocab_size)
        pieces = ids.split(self.verifier.max_window)
        return torch.cat([self.verifier.forward(state, piece) for piece in pieces])

    def truncate(self, state: DecodeState, length: int) -> None:
        self.verifier.truncate(state, length)

    def fork_state(self, state: DecodeState) -> DecodeState:
        raise NotImplementedError("a static state owns its slot: it cannot be copied")

    def run_batch(self, states: list[DecodeState], ids_list: list[torch.Tensor]) -> list[WindowPass]:
        """`batching.run_batch` on static states: one bucketed pass (in groups of the largest batch
        bucket); each WindowPass's keys and values are already past its state's length."""
        rows = self.verifier.batch_buckets[-1]
        start = time.perf_counter()
        windows = []
        for at in range(0, len(states), rows):
            group, ids = states[at:at + rows], ids_list[at:at + rows]
            logits = self.verifier.verify(group, ids)
            windows += [WindowPass(torch.as_tensor(i, dtype=torch.long).flatten().cpu(), rows_, [], [], length=s.length)
                        for i, rows_, s in zip(ids, logits, group, strict=True)]
        for window in windows:
            window.pass_s = time.perf_counter() - start
        return windows
