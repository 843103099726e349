"""The acceptance and correction rules reproduce the target's distribution (small vocabularies)."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from covspec import sampling
from covspec.sampling import SamplingParams, correct_decoupled
from covspec.sampling_torch import probabilities
from covspec.speculative import (
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
    rng = np.random.default_rng(seed)  # the device's, for its correction
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
                token = correct_decoupled(verdict.support_ids.numpy(), verdict.support_probs.numpy(), q.numpy(), rng)
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


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7),
                                    SamplingParams(temperature=1.3, top_k=5),
                                    SamplingParams(temperature=0.9, top_p=0.8),
                                    SamplingParams(temperature=1.0, top_k=40, top_p=0.95)])
def test_device_and_edge_samplers_define_one_distribution(params):
    """The device draws q with numpy (covspec.sampling), the edge p with torch (covspec.sampling_torch):
    the ratio test is exact only if both truncate and renormalise alike."""
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(5)) * 3  # [k, V]
    device = sampling.probabilities(logits.numpy(), params)
    edge = probabilities(logits, params).numpy()
    assert device.dtype == np.float32 and device.shape == edge.shape
    assert ((device > 0) == (edge > 0)).all(), "the two samplers keep different supports"
    np.testing.assert_allclose(device, edge, atol=2e-6)


def test_numpy_sample_follows_probs_and_never_a_zero():
    probs = np.array([0.0, 0.5, 0.0, 0.3, 0.2], dtype=np.float32)
    rng = np.random.default_rng(0)
    counts = np.bincount([sampling.sample(probs, rng) for _ in range(6000)], minlength=5)
    assert counts[0] == counts[2] == 0
    expected = np.array([0.5, 0.3, 0.2]) * counts.sum()
    assert chisquare(counts[[1, 3, 4]], expected).pvalue > 0.01
