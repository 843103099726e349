"""Lossless sampling: with a fixed context, the tokens speculative decoding emits at the next
positions follow the target's own sampling distribution (chi-square, p > 0.01, 2,000 draws each).

The draft (Drafter) and the edge's verification (TargetSession) run as in the runtimes, in one
process; the wire only carries their numbers and is tested on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image
from scipy.stats import chisquare

from covspec.drafter import Drafter
from covspec.edge_runtime.session import TargetSession
from covspec.models import load_adapter
from covspec.models.draft import as_draft
from covspec.sampling import SamplingParams, correct_decoupled
from covspec.sampling_torch import probabilities

DRAWS = 2000
PROMPT = "what is the color of the circle ?"
SETTINGS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, top_k=12, top_p=0.9)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    target = load_adapter(tiny_models.build_llava(root / "target", seed=0))
    draft = as_draft(load_adapter(tiny_models.build_llava(root / "draft", seed=1)))  # numpy, as on the device
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    target_visual = target.encode_image(target.preprocess(image))
    draft_visual = draft.encode_image(draft.preprocess(image))
    return target, draft, target_visual, draft_visual


def exact_marginals(target, visual, first: int, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own distribution of the tokens at positions 1 and 2 after the first token;
    position 2 has one more category, "none" (index V), for answers that ended at position 1."""
    _, state = target.prefill(visual, PROMPT)
    p1 = probabilities(target.forward(state, torch.tensor([first]))[-1], params)  # [V]
    base = state.length
    p2 = torch.zeros(p1.shape[0] + 1)
    for x1 in p1.nonzero().flatten().tolist():
        if x1 in target.eos_token_ids:
            p2[-1] += p1[x1]
            continue
        p2[:-1] += p1[x1] * probabilities(target.forward(state, torch.tensor([x1]))[-1], params)
        target.truncate(state, base)
    return p1, p2


@torch.inference_mode()
def speculative_draws(pair, params: SamplingParams, scheme: str, first: int, window: int = 3) -> np.ndarray:
    """DRAWS runs of speculative decoding from the same context; returns the tokens at positions 1, 2."""
    target, draft, target_visual, draft_visual = pair
    _, t_state = target.prefill(target_visual, PROMPT)
    _, d_state = draft.prefill(draft_visual, PROMPT)
    t_len, d_len = t_state.length, d_state.length
    generator = torch.Generator().manual_seed(1234)  # the edge's
    rng = np.random.default_rng(1234)  # the device's
    out = np.zeros((DRAWS, 2), dtype=np.int64)
    for n in range(DRAWS):
        target.truncate(t_state, t_len)
        draft.truncate(d_state, d_len)
        session = TargetSession(adapter=target, state=t_state, params=params, max_new_tokens=64,
                                generator=generator, committed=[first], prompt_length=t_len)
        drafter = Drafter(draft, d_state, first, params, rng)
        round_no = 0
        while len(drafter.committed) < 3 and not session.done:
            window_ = drafter.draft(window)
            q = torch.from_numpy(window_.q)
            kwargs = {"q_full": q} if scheme == "full" else {"q_of_draft": torch.from_numpy(window_.q_of_drafted())}
            answer = session.verify(round_no, drafter.committed[-1], torch.from_numpy(window_.ids), scheme, **kwargs)
            token = answer.verdict.next_token
            if token is None and answer.verdict.support_ids is not None:  # decoupled: the device draws the correction from the returned support
                token = correct_decoupled(answer.verdict.support_ids.numpy(), answer.verdict.support_probs.numpy(),
                                          window_.q[answer.verdict.accepted], rng)
                session.committed.append(token)
                session.root_known = True
            drafter.commit(window_, answer.verdict.accepted, token)
            round_no += 1
        ended = drafter.committed[1] in target.eos_token_ids
        out[n] = (drafter.committed[1], target.vocab_size if ended else drafter.committed[2])
    return out


def chi_square_pvalue(samples: np.ndarray, p: np.ndarray) -> float:
    """Chi-square p-value of sample counts against p [V], rare tokens pooled so every bin expects >= 5
    (1.0 when a single bin is left); a sample the target gives probability 0 fails at once."""
    counts = np.bincount(samples, minlength=p.shape[0]).astype(float)
    expected = np.asarray(p, dtype=np.float64) * len(samples)
    assert counts[expected == 0].sum() == 0, "a token the target gives probability 0 was emitted"
    order = np.argsort(-expected)
    keep = [i for i in order if expected[i] >= 5]
    rest = [i for i in order if 0 < expected[i] < 5]
    obs = [counts[i] for i in keep] + ([counts[rest].sum()] if rest else [])
    exp = [expected[i] for i in keep] + ([expected[rest].sum()] if rest else [])
    if len(obs) < 2:
        return 1.0
    return float(chisquare(obs, np.array(exp) * (sum(obs) / sum(exp))).pvalue)


def assert_follows(samples: np.ndarray, p: torch.Tensor) -> float:
    """Chi-square of sample counts against p (chi_square_pvalue) above 0.01."""
    pvalue = chi_square_pvalue(samples, p.double().numpy())
    assert pvalue > 0.01, f"emitted tokens do not follow the target's distribution (p = {pvalue:.2e})"
    return pvalue


@pytest.mark.parametrize("scheme", ["full", "decoupled"])
@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "topk_topp"])
def test_speculative_sampling_follows_target(pair, params, scheme):
    target, _, target_visual, _ = pair
    first = 5
    p1, p2 = exact_marginals(target, target_visual, first, params)
    samples = speculative_draws(pair, params, scheme, first)
    assert_follows(samples[:, 0], p1)
    assert_follows(samples[:, 1], p2)
