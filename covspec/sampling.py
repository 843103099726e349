"""Sampling parameters and the functions that turn logits into a token, in numpy: what the device
(drafting, the decoupled correction, draft-only answers) and the reference decode loop use. The edge
samples the target on tensors with the same definitions (covspec/sampling_torch.py; a test holds the
two equal).

Greedy is `temperature == 0`. Otherwise logits are divided by the temperature, then truncated by
top-k and top-p (nucleus), renormalised, and sampled with an explicit numpy Generator (`params.rng()`)
so that a seed reproduces a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k truncation
    top_p: float = 1.0  # 1 means no nucleus truncation
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def rng(self) -> np.random.Generator:
        """The device's random source: seeded by `seed`, else fresh entropy."""
        return np.random.default_rng(self.seed)

    def generator(self) -> Any:
        """The edge's random source, a torch.Generator (imports torch)."""
        import torch

        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def softmax(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> [..., V] float32 (entries of -inf get 0)."""
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return (z / z.sum(-1, keepdims=True)).astype(np.float32)


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a sampler draws from: logits [..., V] -> probs [..., V] (float32),
    with temperature, top-k and top-p applied. Greedy gives a one-hot on the argmax."""
    logits = np.asarray(logits, dtype=np.float32)
    v = logits.shape[-1]
    if params.greedy:
        one_hot = np.zeros_like(logits)
        np.put_along_axis(one_hot, logits.argmax(-1)[..., None], 1.0, -1)
        return one_hot
    logits = logits / np.float32(params.temperature)
    if params.top_k and params.top_k < v:
        kth = np.partition(logits, v - params.top_k, axis=-1)[..., v - params.top_k, None]  # k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    if params.top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")  # descending
        sorted_probs = softmax(np.take_along_axis(logits, order, -1))
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (np.cumsum(sorted_probs, -1) - sorted_probs) >= params.top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    return softmax(logits)


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token id drawn from probs [V] (need not sum to exactly 1; a zero never comes out)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The next token from the logits [V] of one position."""
    if params.greedy:
        return int(np.argmax(logits))
    return sample(probabilities(logits, params), rng)


def correct_decoupled(support_ids: np.ndarray, support_probs: np.ndarray, q: np.ndarray,
                      rng: np.random.Generator) -> int:
    """Device side of CoVSpec's decoupled verification (covspec.speculative.verify_decoupled): draws
    the correction from norm(max(0, p - q)) where p is known on its support (ids [m], probs [m]) and
    q [V] is the draft's full distribution at the rejected position."""
    ids = np.asarray(support_ids, dtype=np.int64)
    p = np.asarray(support_probs, dtype=np.float32)
    r = np.maximum(p - np.asarray(q, dtype=np.float32)[ids], 0.0)  # [m]
    if r.sum() <= 0:  # p <= q on all of p's support: only possible up to rounding; fall back to p
        r = p
    return int(ids[sample(r, rng)])
