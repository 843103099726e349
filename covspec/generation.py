"""Target-only (or draft-only) generation on the adapter interface, token by token.

This is the reference decode loop: the runtimes drive the same adapter calls (encode_image,
prefill, forward), so what they produce can be compared token for token with this.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from covspec.models.draft import as_draft
from covspec.pruning import merged_visual
from covspec.sampling import SamplingParams, next_token

GREEDY = SamplingParams()


@dataclass
class GenerationResult:
    ids: list[int]  # generated token ids, without the stop token
    text: str
    stop_reason: str  # "eos" or "length"
    prefill_s: float = 0.0  # image encoding + prefill, up to the first token
    decode_s: float = 0.0  # every later step
    step_s: list[float] = field(default_factory=list)


def generate(
    model: Any,
    image: Image.Image,
    prompt: str,
    params: SamplingParams = GREEDY,
    max_new_tokens: int = 64,
    kept: np.ndarray | None = None,
    merge: bool = False,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Generates an answer to `prompt` about `image`, calling `on_token(id)` as each token comes.
    `kept`: the visual tokens the prefill reads (all when None); `merge`: the dropped ones merged
    into them first (covspec.pruning.merge_pruned). `model`: a DraftModel or a torch VLMAdapter (seen
    through covspec.models.numpy_view.NumpyView)."""
    adapter = as_draft(model)
    prompt = adapter.check_prompt(prompt)
    rng = None if params.greedy else params.rng()
    stop_ids = adapter.eos_token_ids

    start = time.perf_counter()
    visual = adapter.encode_image(adapter.preprocess(image))
    if merge:
        visual = merged_visual(visual, None if kept is None else np.asarray(kept))
    logits, state = adapter.prefill(visual, prompt, kept=kept)
    token = next_token(logits, params, rng)
    prefill_s = time.perf_counter() - start

    ids: list[int] = []
    step_s: list[float] = []
    stop_reason = "length"
    while True:
        if token in stop_ids:
            stop_reason = "eos"
            break
        ids.append(token)
        if on_token is not None:
            on_token(token)
        if len(ids) >= max_new_tokens:
            break
        t0 = time.perf_counter()
        logits = adapter.forward(state, np.asarray([token], dtype=np.int64))[-1]  # [V]
        token = next_token(logits, params, rng)
        step_s.append(time.perf_counter() - t0)
    return GenerationResult(ids=ids, text=adapter.decode(ids), stop_reason=stop_reason,
                            prefill_s=prefill_s, decode_s=sum(step_s), step_s=step_s)
