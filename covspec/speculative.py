"""Verification and correction for speculative decoding: plain functions, no sockets, no models.

The edge calls `verify_*` with the target's logits for a drafted window; the device calls
`correct_decoupled` when the edge reports a rejection in the decoupled scheme.

Notation for a window of k drafted tokens x_1..x_k:
    target_logits [k+1, V]: the target's logits at the positions that predict x_1..x_k and the
                            bonus token after x_k (row i predicts x_{i+1});
    q [k, V] or q(x_i) [k]: the draft's sampling distribution (after temperature/top-k/top-p).

Greedy: accept the longest prefix where x_i == argmax p_i; the next token is argmax at the first
mismatch (or the bonus). Output equals target-only greedy decoding exactly.

Sampling (Leviathan et al. / Chen et al.): accept x_i with probability min(1, p(x_i)/q(x_i)); on
the first rejection draw the correction from norm(max(0, p - q)); on full acceptance draw the bonus
from p_{k+1}. The emitted tokens are distributed exactly as the target's own samples.

Decoupled (CoVSpec): the device uploads only q(x_i) per token; the edge runs the same acceptance
test and, on a rejection, returns only the support of p at that position (ids + probs). The device
forms max(0, p - q) with its own full q and samples the correction itself. Because the residual is
zero wherever p is zero, the support of p is all that is needed: exact whenever p is truncated
(top-k/top-p); untruncated p is cut to the smallest set covering 1 - SUPPORT_TAIL of its mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covspec.sampling import SamplingParams
from covspec.sampling_torch import probabilities, sample

SUPPORT_TAIL = 1e-6  # mass of an untruncated p the edge may leave out of a returned support


@dataclass
class Verdict:
    accepted: int  # how many drafted tokens were accepted (0..k)
    next_token: int | None  # the token after the accepted prefix (None: the device must correct)
    support_ids: torch.Tensor | None = None  # [m] support of p at the rejected position (decoupled)
    support_probs: torch.Tensor | None = None  # [m] p on that support


def verify_greedy(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """draft_ids [k], target_logits [k+1, V] -> accepted prefix length and the target's next token."""
    target_ids = target_logits.argmax(-1)  # [k+1]
    k = draft_ids.shape[0]
    mismatch = (draft_ids != target_ids[:k]).nonzero()
    accepted = int(mismatch[0, 0]) if mismatch.numel() else k
    return Verdict(accepted=accepted, next_token=int(target_ids[accepted]))


def _accept_prefix(draft_ids: torch.Tensor, p_draft: torch.Tensor, q_draft: torch.Tensor,
                   generator: torch.Generator | None) -> int:
    """The number of tokens that pass min(1, p/q) in order; p_draft, q_draft [k] are p(x_i), q(x_i)."""
    ratio = (p_draft / q_draft.clamp_min(1e-30)).clamp(max=1.0)  # [k]
    for i in range(draft_ids.shape[0]):
        u = torch.rand((), generator=generator)
        if u >= ratio[i]:
            return i
    return int(draft_ids.shape[0])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over [V]; falls back to p where p <= q everywhere (measure zero)."""
    r = (p - q).clamp_min(0.0)
    total = r.sum()
    return r / total if total > 0 else p


def verify_full(draft_ids: torch.Tensor, q_full: torch.Tensor, target_logits: torch.Tensor,
                params: SamplingParams, generator: torch.Generator | None) -> Verdict:
    """Conventional sampling verification: the device uploaded the full q [k, V] of every token."""
    k = draft_ids.shape[0]
    p = probabilities(target_logits, params)  # [k+1, V]
    rows = torch.arange(k)
    accepted = _accept_prefix(draft_ids, p[rows, draft_ids], q_full[rows, draft_ids], generator)
    if accepted == k:
        return Verdict(accepted=k, next_token=sample(p[k], generator))
    return Verdict(accepted=accepted, next_token=sample(residual(p[accepted], q_full[accepted]), generator))


def support_of(p: torch.Tensor, tail: float = SUPPORT_TAIL) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and probabilities [m] of p [V] with p > 0, cut to the smallest set covering
    1 - tail of the mass when p has more nonzero entries than that needs."""
    probs, ids = torch.sort(p, descending=True)
    nonzero = int((probs > 0).sum())
    mass_before = probs.double().cumsum(0) - probs.double()
    needed = int((mass_before < 1.0 - tail).sum())
    m = max(1, min(nonzero, needed))
    return ids[:m].to(torch.int32), probs[:m].float()


def verify_decoupled(draft_ids: torch.Tensor, q_of_draft: torch.Tensor, target_logits: torch.Tensor,
                     params: SamplingParams, generator: torch.Generator | None) -> Verdict:
    """CoVSpec sampling verification from q(x_i) [k] alone. On a rejection returns p's support
    at that position and no next token: the device draws the correction (`correct_decoupled`)."""
    k = draft_ids.shape[0]
    p = probabilities(target_logits, params)  # [k+1, V]
    accepted = _accept_prefix(draft_ids, p[torch.arange(k), draft_ids], q_of_draft, generator)
    if accepted == k:
        return Verdict(accepted=k, next_token=sample(p[k], generator))
    ids, probs = support_of(p[accepted])
    return Verdict(accepted=accepted, next_token=None, support_ids=ids, support_probs=probs)
