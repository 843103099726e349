"""The acceptance and correction rules reproduce the target's distribution (small vocabularies)."""

import torch
from scipy.stats import chisquare

from covspec.sampling import SamplingParams, probabilities
from covspec.speculative import (
    correct_decoupled,
    support_of,
    verify_decoupled,
    verify_full,
    verify_greedy,
)


def test_greedy_accepts_longest_matching_prefix():
    logits = torch.full((4, 6), -5.0)
    for row, best in enumerate([2, 3, 1, 4]):
        logits[row, best] = 5.0
    assert verify_greedy(torch.tensor([2, 3, 1]), logits).accepted == 3
    assert verify_greedy(torch.tensor([2, 3, 1]), logits).next_token == 4
    verdict = verify_greedy(torch.tensor([2, 0, 1]), logits)
    assert (verdict.accepted, verdict.next_token) == (1, 3)
    assert verify_greedy(torch.tensor([5]), logits[:2]).accepted == 0


def _first_token_frequencies(scheme: str, params: SamplingParams, draws: int, seed: int) -> torch.Tensor:
    """Runs one-token windows: the draft samples x ~ q, the edge verifies; counts emitted tokens."""
    gen = torch.Generator().manual_seed(seed)
    draft_logits = torch.tensor([2.0, 1.5, 0.2, -1.0, 0.7, 1.0])
    target_logits = torch.tensor([[0.3, 2.2, 1.0, 0.1, -0.5, 1.1], [0.0] * 6])
    q = probabilities(draft_logits, params)
    counts = torch.zeros(6)
    for _ in range(draws):
        x = torch.multinomial(q, 1, generator=gen)
        if scheme == "full":
            verdict = verify_full(x, q[None], target_logits, params, gen)
            token = int(x) if verdict.accepted == 1 else verdict.next_token
        else:
            verdict = verify_decoupled(x, q[x], target_logits, params, gen)
            if verdict.accepted == 1:
                token = int(x)
            else:
                token = correct_decoupled(verdict.support_ids, verdict.support_probs, q, gen)
        counts[token] += 1
    return counts


def _assert_matches_target(counts: torch.Tensor, params: SamplingParams) -> None:
    p = probabilities(torch.tensor([0.3, 2.2, 1.0, 0.1, -0.5, 1.1]), params)
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    expected = p[support] * counts.sum()
    assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > 0.01


def test_full_and_decoupled_match_target_distribution():
    for params in [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4, top_p=0.9)]:
        for scheme in ["full", "decoupled"]:
            _assert_matches_target(_first_token_frequencies(scheme, params, 4000, seed=1), params)


def test_support_cut_keeps_required_mass():
    p = torch.softmax(torch.linspace(5, -20, 1000), 0)
    ids, probs = support_of(p)
    assert probs.double().sum() >= p.double().sum() - 1.5e-6
    assert len(ids) < 1000
    truncated = probabilities(torch.linspace(5, -20, 1000), SamplingParams(temperature=1.0, top_k=7))
    ids, _ = support_of(truncated)
    assert len(ids) == 7
