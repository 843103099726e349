"""Static shapes for the verify pass: a window's length and a batch's size padded up to a few buckets.

Windows (the root and the drafted tokens) are padded to the next of BUCKETS, batches of sessions to
the next of BATCH_BUCKETS, so that every verify pass has one of a few shapes and each shape can be
captured once as a CUDA graph. Powers of two: padding adds less than one window's own length, and
on a GPU a pass over a big target is bound by reading its weights, so the padded tokens cost little
(a 7B pass over 16 tokens takes about what one over 9 does) while 6 x 4 shapes keep the graphs few.

Padding is sound without a mask of its own: a padded token comes after every real token of its
window, and attention is causal, so no real position sees it; its keys and values go to cache
positions past the session's length, which the next pass overwrites and no pass reads (the static
cache's mask stops at each query's own position). A padded batch row runs on the scratch slot.
"""

from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 32)  # window lengths (root + drafts) of the static passes
BATCH_BUCKETS = (1, 2, 4, 8)  # sessions in one static pass


def bucket_for(n: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket that holds n (n >= 1), or None when n exceeds them all (the pass then runs
    unbucketed)."""
    if n < 1:
        raise ValueError(f"a window holds at least one token, got {n}")
    return next((b for b in sorted(buckets) if b >= n), None)


def pad_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """ids [n] padded to [size] by repeating the last id (any id would do: no real position sees it)."""
    n = int(ids.numel())
    if not 1 <= n <= size:
        raise ValueError(f"cannot pad a window of {n} tokens to {size}")
    return torch.cat([ids, ids[-1:].expand(size - n)])


def check_buckets(buckets: tuple[int, ...]) -> tuple[int, ...]:
    """Sorted, unique, positive buckets; ValueError otherwise."""
    if not buckets or min(buckets) < 1:
        raise ValueError(f"buckets must be positive lengths, got {buckets}")
    return tuple(sorted(set(buckets)))
