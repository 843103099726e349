"""Checks of the draft itself, for tests that run a device path end to end.

Greedy verification is lossless: a device whose draft is wrong still answers as the target, only
slower, so comparing answers cannot see it. These helpers check the draft instead:

- `teacher_forced(draft, ...)`: the draft's logits along an answer in one pass after its prefill
  (no rollback, no branch, no window): row j is what the draft predicts after answer[:j + 1].
- `reference_accepted(guess, answer, rounds)`: what each greedy round of the device should have
  accepted, given only the answer and the draft's teacher-forced guesses: a round whose window
  starts after answer[:L] accepts the run of guesses guess[L], guess[L + 1], ... that equal the
  answer's tokens, at most its window; the next round starts after L + accepted + 1 (the edge's
  correction or bonus token). Independent of the device's cache, rollback, branching and windows.
- `assert_rounds_match(...)`: the device's recorded rounds against that reference, per round.

The exported draft and its eager self agree on greedy tokens (fp32 bundles) except at near-ties,
so a few rounds may differ (`tolerance`); a draft with wrong logits, positions or a stale cache
after rollback differs in many.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covspec.images import load_image
from covspec.models.draft import as_draft


def teacher_forced(draft, image_bytes: bytes, prompt: str, answer: Sequence[int]) -> np.ndarray:
    """The draft's logits [len(answer), V] along `answer` (one forward over it after the prefill)."""
    d = as_draft(draft)
    visual = d.encode_image(d.preprocess(load_image(image_bytes)))
    _, state = d.prefill(visual, prompt)
    return np.asarray(d.forward(state, np.asarray(answer, dtype=np.int64)), dtype=np.float32)


def guesses(logits: np.ndarray) -> np.ndarray:
    """guess[j]: the draft's greedy token for answer[j] given answer[:j], j = 0..len(answer)
    (guess[0] unused: -1; guess[len(answer)]: after the whole answer, where an EOS ended it)."""
    return np.concatenate([[-1], logits.argmax(-1)]).astype(np.int64)


def reference_accepted(guess: np.ndarray, answer: Sequence[int], drafted: Sequence[int],
                       eos: set[int], ended: bool) -> list[int]:
    """Per round (its window length `drafted[i]`), the tokens a correct greedy draft has accepted.
    `ended`: the answer ended with an EOS (not in `answer`), which the draft may draft and have accepted."""
    def matches(j: int) -> bool:
        if j < len(answer):
            return int(guess[j]) == answer[j]
        return ended and j == len(answer) and int(guess[j]) in eos

    out, start = [], 1  # the first token is the target's (OPENED)
    for k in drafted:
        m = 0
        while m < k and matches(start + m):
            m += 1
        out.append(m)
        start += m + 1
    return out


def round_pairs(rounds) -> tuple[list[int], list[int]]:
    """(drafted, accepted) per round of an Answer's rounds, or of dicts with those keys."""
    get = (lambda r, k: r[k]) if rounds and isinstance(rounds[0], dict) else getattr
    return [int(get(r, "drafted")) for r in rounds], [int(get(r, "accepted")) for r in rounds]


def assert_rounds_match(draft_logits: dict[str, np.ndarray], answers: dict[str, list[int]],
                        rounds: dict[str, object], eos: set[int], max_new_tokens: int, tolerance: float = 0.05,
                        label: str = "", min_rounds: int = 10) -> dict[str, float]:
    """For every answer (key: a request), the device's accepted count per round equals the reference
    (teacher-forced eager draft) in all but `tolerance` of the rounds (at least one allowed), and the
    draft is neither perfect nor useless (some rounds rejected, some tokens accepted), so rejection,
    rollback and correction were exercised. An answer shorter than `max_new_tokens` ended with one of
    the `eos` ids. `min_rounds` 0: a mode whose policy may hand the rest to the edge (adaptive: how many
    rounds it drafts depends on timing) is checked on the rounds it drafted, however few. Returns the
    device's and the reference's acceptance."""
    n_rounds = differ = device_acc = ref_acc = drafted_total = 0
    for key, answer in answers.items():
        drafted, accepted = round_pairs(rounds[key])
        reference = reference_accepted(guesses(draft_logits[key]), answer, drafted, eos,
                                       ended=len(answer) < max_new_tokens)
        n_rounds += len(drafted)
        differ += sum(a != r for a, r in zip(accepted, reference, strict=True))
        device_acc += sum(accepted)
        ref_acc += sum(reference)
        drafted_total += sum(drafted)
    rejected = sum(1 for key, answer in answers.items()
                   for d, a in zip(*round_pairs(rounds[key]), strict=True) if a < d)
    if min_rounds:
        assert n_rounds >= min_rounds, f"{label}: only {n_rounds} rounds drafted: too few to check the draft"
        assert rejected >= 2, f"{label}: the draft was rejected in {rejected} rounds: the pair is too alike to test"
        assert device_acc > 0, f"{label}: the device's draft never had a token accepted"
    allowed = max(1, int(tolerance * n_rounds))
    summary = {"rounds": n_rounds, "rounds_differing": differ, "device_acceptance": device_acc / max(drafted_total, 1),
               "reference_acceptance": ref_acc / max(drafted_total, 1)}
    assert differ <= allowed, (f"{label}: the device's draft accepted other counts than the eager draft in "
                               f"{differ} of {n_rounds} rounds (allowed {allowed}): {summary}")
    return summary


def assert_logits_agree(got: np.ndarray, want: np.ndarray, atol: float, min_agreement: float = 0.97,
                        label: str = "") -> dict[str, float]:
    """Logits [T, V] of an exported draft against its eager self: max difference within `atol` and
    greedy tokens (argmax) equal at `min_agreement` of the positions at least."""
    assert got.shape == want.shape, (label, got.shape, want.shape)
    diff = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    assert diff <= atol, f"{label}: logits differ from the eager draft's by {diff:.3g} (> {atol})"
    assert agree >= min_agreement, f"{label}: greedy tokens agree with the eager draft at {agree:.3f} of positions"
    return {"max_abs_diff": diff, "greedy_agreement": agree}
