"""Draft placement (covspec.policy.place_drafting): the rule on constructed estimates, a covspec device
handing drafting to an edge that drafts faster (and not to a loaded one) with the target's greedy
answer, and sampling that stays the target's distribution when drafting moves to the edge mid-answer."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image
from test_edge_sd import DraftingEdge, reference
from test_lossless_sampling import DRAWS, PROMPT, SETTINGS, assert_follows, exact_marginals
from test_runtimes import PROMPTS, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.drafter import Drafter
from covspec.edge_runtime.drafting import EdgeDraft, EdgeDrafting, speculate
from covspec.edge_runtime.session import TargetSession
from covspec.models import load_adapter
from covspec.models.draft import as_draft
from covspec.modes import COVSPEC, MODE_OPTIONS
from covspec.policy import DEVICE, EDGE, EdgeOffer, OnlineStats, place_drafting
from covspec.sampling import SamplingParams, correct_decoupled
from covspec.transport import protocol as wire
from covspec.transport.channel import Client


def estimates(rtt: float, acceptance: float = 0.85, branch_hit: float = 0.7) -> OnlineStats:
    """A device's estimates after many rounds: draft step 2 ms, verify 20 ms + 0.5 ms per token."""
    stats = OnlineStats(t_draft=0.002, rtt=rtt, prior_v0=0.02, prior_v1=0.0005, prior_n=1e6,
                        prior_acceptance=acceptance, branch_hit=branch_hit)
    stats.rounds = 20
    return stats


OFFER = EdgeOffer(offers=True, sessions=1)


def test_placement_follows_the_link():
    assert place_drafting(estimates(rtt=0.001), OFFER, target_step_s=0.025) == DEVICE  # loopback: branches hide the wait
    assert place_drafting(estimates(rtt=0.15), OFFER, target_step_s=0.025) == EDGE  # 4g: a round trip per window
    assert place_drafting(estimates(rtt=0.15), None, target_step_s=0.025) == DEVICE  # no draft on the edge


def test_a_device_that_has_not_drafted_yet_drafts_first_unless_the_link_is_long():
    fresh = estimates(rtt=0.03)  # a round trip of 1.2 target steps: windows in flight may hide it
    fresh.rounds = 2
    assert place_drafting(fresh, OFFER, target_step_s=0.025) == DEVICE  # two rounds say little yet
    fresh.rounds = 3
    assert place_drafting(fresh, OFFER, target_step_s=0.025) == EDGE
    long = estimates(rtt=0.15)  # 6 target steps per round trip: nothing to learn by drafting first
    long.rounds = 0
    assert place_drafting(long, OFFER, target_step_s=0.025) == EDGE
    assert place_drafting(long, OFFER, target_step_s=None) == EDGE  # no target step said: the verify line's pass
    short = estimates(rtt=0.03)  # 1.5 one-token verify passes (20.5 ms)
    short.rounds = 0
    assert place_drafting(short, OFFER, target_step_s=None) == DEVICE


def test_a_loaded_edge_is_not_asked_to_draft():
    assert place_drafting(estimates(rtt=0.15), EdgeOffer(offers=False, sessions=6), 0.025) == DEVICE


def test_an_edge_whose_drafting_loses_to_streaming_is_not_asked():
    poor = EdgeOffer(offers=True, sessions=1, draft_step_s=0.02, acceptance=0.05)  # a slow, poor edge draft
    assert place_drafting(estimates(rtt=0.15), poor, target_step_s=0.025) == DEVICE
    # the edge's own measurements are read: its slow draft makes the device's drafting the better one
    slow = EdgeOffer(offers=True, sessions=1, draft_step_s=0.05)
    assert place_drafting(estimates(rtt=0.03), slow, target_step_s=0.025) == DEVICE
    assert place_drafting(estimates(rtt=0.03), OFFER, target_step_s=0.025) == EDGE


def test_measured_paces_decide_once_both_are_known():
    """The cost model does not see round trips hidden by windows in flight: once this device's pace
    (between RESULTs) and the edge's streams' pace were measured, those decide, the edge needing to be
    5% faster; a model that says EDGE is overruled by a device measured faster."""
    stats = estimates(rtt=0.03)
    assert place_drafting(stats, OFFER, target_step_s=0.025) == EDGE  # the model alone
    for _ in range(4):
        stats.observe_pace(8, 8 * 0.001)  # 1 ms per token measured on the device
    edge_slower = EdgeOffer(offers=True, s_per_token=0.0012)
    edge_faster = EdgeOffer(offers=True, s_per_token=0.0008)
    close_call = EdgeOffer(offers=True, s_per_token=0.00097)  # 3% faster: within the margin
    assert place_drafting(stats, edge_slower, target_step_s=0.025) == DEVICE
    assert place_drafting(stats, edge_faster, target_step_s=0.025) == EDGE
    assert place_drafting(stats, close_call, target_step_s=0.025) == DEVICE
    opened = wire.Opened(token=1, offers_draft=True, edge_sessions=1, timings={"edge_sd_s_per_token": 0.002})
    assert EdgeOffer.from_reply(opened).s_per_token == 0.002
    assert OnlineStats().s_per_token() is None  # nothing measured: the model decides


def test_offer_read_from_the_reply():
    assert EdgeOffer.from_reply(wire.Result(round=0, accepted=1, timings={"verify_s": 0.01})) is None  # no draft there
    reply = wire.Result(round=0, accepted=1, offers_draft=True, edge_sessions=2, timings={"edge_acceptance": 0.8})
    assert EdgeOffer.from_reply(wire.decode(wire.encode(reply))) == EdgeOffer(offers=True, sessions=2, acceptance=0.8)
    declines = wire.Opened(token=3, offers_draft=False, edge_sessions=9)
    assert EdgeOffer.from_reply(wire.decode(wire.encode(declines))) == EdgeOffer(offers=False, sessions=9)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    target = tiny_models.build_llava(root / "target", seed=0)
    draft = tiny_models.build_llava(root / "draft", seed=1)
    return target, draft


def slow_link_device(draft, endpoint) -> DeviceRuntime:
    """A device whose estimates say every round trip costs 1 s (a long link), covspec's and the
    no-placement ablation's."""
    device = DeviceRuntime(load_adapter(draft), endpoint, timeout_s=20)
    for mode in ("covspec", "covspec_no_placement"):
        stats = OnlineStats(t_draft=0.001, rtt=1.0, prior_v0=0.005, prior_v1=0.001)
        stats.rounds = 5  # as if it had drafted over this link before
        device.learned[(MODE_OPTIONS[mode], True)] = stats
    return device


@pytest.mark.parametrize("draft_sessions", [1, 0], ids=["offers", "declines"])
def test_covspec_hands_drafting_to_the_edge_on_a_long_link(pair, draft_sessions):
    target, _ = pair
    draft = target  # a draft the target always accepts: drafting on the edge beats its streaming alone
    # declining: nor does it draft the STREAMs the device then asks plain (tests/device/test_joining.py has those)
    edge = DraftingEdge(target, draft, draft_sessions=draft_sessions, draft_streams=bool(draft_sessions))
    device = slow_link_device(draft, edge.endpoint)
    try:
        handed = []
        for i, prompt in enumerate(PROMPTS):
            image = png(i)
            expected = reference(target, image, prompt, 16)
            answer = device.answer(image, prompt, "covspec", SamplingParams(), max_new_tokens=16)
            assert answer.ids == expected, prompt
            handed.append(answer.edge_drafted)
            ablation = device.answer(image, prompt, "covspec_no_placement", SamplingParams(), max_new_tokens=16)
            assert ablation.ids == expected and not ablation.edge_drafted
        sampled = device.answer(png(4), PROMPTS[0], "covspec", SamplingParams(temperature=1.0, top_k=20, seed=5),
                                max_new_tokens=12)
        assert 0 < len(sampled.ids) <= 12  # decoupled sampling, drafting handed over or not
        # the first answer hands over (estimates carried from earlier ones); later ones weigh what the edge measured (its
        # draft is as slow as the target, so streaming may win as well)
        assert handed[0] == bool(draft_sessions) and (any(handed) == bool(draft_sessions))
        drafted = edge.server.stats()["tokens_edge_drafted"]
        assert (drafted > 0) == bool(draft_sessions)
    finally:
        device.close()
        edge.close()


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))


@torch.inference_mode()
def switching_draws(target, draft, params: SamplingParams, first: int, decoupled: bool) -> np.ndarray:
    """DRAWS answers whose position 1 is drafted on the device (a window of 1, verified decoupled or with
    the full q) and whose position 2 on is drafted by the edge (`speculate`) from there."""
    image = picture()
    t_visual, d_visual = target.encode_image(target.preprocess(image)), draft.encode_image(draft.preprocess(image))
    _, t_state = target.prefill(t_visual, PROMPT)
    _, d_state = draft.prefill(d_visual, PROMPT)
    _, e_state = draft.prefill(d_visual, PROMPT)  # the edge's own copy of the draft
    t_len, d_len = t_state.length, d_state.length
    generator = torch.Generator().manual_seed(99)  # the edge's
    rng = np.random.default_rng(99)  # the device's (and the edge draft's: numpy like the device's)
    drafting = EdgeDrafting(draft)
    out = np.zeros((DRAWS, 2), dtype=np.int64)
    for n in range(DRAWS):
        for adapter, state, length in ((target, t_state, t_len), (draft, d_state, d_len), (draft, e_state, d_len)):
            adapter.truncate(state, length)
        session = TargetSession(adapter=target, state=t_state, params=params, max_new_tokens=64,
                                generator=generator, committed=[first], prompt_length=t_len)
        device = Drafter(as_draft(draft), d_state, first, params, rng)
        window = device.draft(1)
        ids = torch.from_numpy(window.ids)
        if decoupled:
            answer = session.verify(0, first, ids, "decoupled", q_of_draft=torch.from_numpy(window.q_of_drafted()))
        else:
            answer = session.verify(0, first, ids, "full", q_full=torch.from_numpy(window.q))
        token = answer.verdict.next_token
        if token is None and answer.verdict.support_ids is not None:  # the device's correction, sent as root
            token = correct_decoupled(answer.verdict.support_ids.numpy(), answer.verdict.support_probs.numpy(),
                                      window.q[answer.verdict.accepted], rng)
            session.committed.append(token)
            session.root_known = True
        device.commit(window, answer.verdict.accepted, token)
        if not session.done:  # the edge takes over drafting here
            edge = EdgeDraft(msg=None, drafter=Drafter(as_draft(draft), e_state, first, params, rng))
            next(speculate(session, edge, drafting, max_pixels=0), None)
        committed = session.committed
        ended = committed[1] in target.eos_token_ids
        out[n] = (committed[1], target.vocab_size if ended else committed[2])
    return out


@pytest.mark.parametrize("decoupled", [True, False], ids=["decoupled", "full"])
@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "topk_topp"])
def test_sampling_follows_target_when_the_edge_takes_over_mid_answer(pair, params, decoupled):
    target_path, draft_path = pair
    target, draft = load_adapter(target_path), load_adapter(draft_path)
    first = 5
    p1, p2 = exact_marginals(target, target.encode_image(target.preprocess(picture())), first, params)
    samples = switching_draws(target, draft, params, first, decoupled)
    assert_follows(samples[:, 0], p1)
    assert_follows(samples[:, 1], p2)


def test_covspec_options_carry_placement():
    assert COVSPEC.placement and not MODE_OPTIONS["covspec_no_placement"].placement
    assert not MODE_OPTIONS["vanilla_sd"].placement


def test_a_loaded_edge_gives_drafting_back_mid_answer(pair):
    """A device hands drafting over on what the edge said when alone; another session opens, so the edge
    gives drafting back after a round; the device drafts the rest and the answer is the target's."""
    target, _ = pair
    edge = DraftingEdge(target, target, draft_sessions=1)
    device = slow_link_device(target, edge.endpoint)
    try:
        image, prompt = next((png(i), p) for i in range(6) for p in PROMPTS
                             if len(reference(target, png(i), p, 40)) >= 30)
        expected = reference(target, image, prompt, 40)
        alone = device.answer(image, prompt, "covspec", SamplingParams(), max_new_tokens=40)
        assert alone.ids == expected and alone.edge_drafted and device.edge_offer.offers
        with Client(edge.endpoint, timeout_s=10, retries=0) as other:
            other.request(wire.Open(sid=99, image=png(1), prompt=PROMPTS[0], mode="covspec", max_new_tokens=40))
            given_back = edge.server.stats()["drafting_given_back"]
            loaded = device.answer(image, prompt, "covspec", SamplingParams(), max_new_tokens=40)
            other.request(wire.Close(sid=99))
        assert loaded.ids == expected
        assert loaded.edge_drafted and loaded.rounds, "the device did not draft again"
        assert edge.server.stats()["drafting_given_back"] == given_back + 1
        assert not device.edge_offer.offers  # not asked again until a RESULT says it offers
    finally:
        device.close()
        edge.close()


def test_a_device_that_would_stream_asks_the_edge_to_draft_when_that_is_faster():
    """Where speculation over the link loses to the target's streaming (weak links), the rest is
    handed to the edge's own drafting when the edge offers and drafts faster than the target streams."""
    from types import SimpleNamespace

    from covspec.device_runtime.speculation import Speculation
    from covspec.modes import MODE_OPTIONS

    def beats(offer: EdgeOffer | None, options=MODE_OPTIONS["covspec"]) -> bool:
        spec = SimpleNamespace(options=options, edge_offer=offer, stats=estimates(rtt=0.4))
        return Speculation._edge_beats_streaming(spec, edge_step_s=0.005)  # target streams 200 tokens/s

    assert beats(EdgeOffer(offers=True, s_per_token=0.002))  # the edge drafts at 500 tokens/s
    assert not beats(EdgeOffer(offers=True, s_per_token=0.008))  # slower than the target alone
    assert not beats(EdgeOffer(offers=False, s_per_token=0.002))  # a loaded edge declines
    assert not beats(None)  # no draft on the edge
    assert not beats(EdgeOffer(offers=True, s_per_token=0.002), MODE_OPTIONS["covspec_no_placement"])


def test_probes_back_off_while_the_edge_keeps_winning_and_reset_when_the_device_wins():
    """The device drafts an answer itself after PROBE_EVERY answers on the edge; each probe after which the edge
    still drafts doubles that wait (up to PROBE_MAX); a probe the device wins starts the schedule over."""
    from covspec.device_runtime.client import PROBE_EVERY, PROBE_MAX, DeviceRuntime

    device = object.__new__(DeviceRuntime)  # the schedule alone: no edge
    device.edge_streak, device.probe_after, device.probed = 0, PROBE_EVERY, False
    probes = []
    for n in range(200):
        probe = device.edge_streak >= device.probe_after
        if probe:
            probes.append(n)
        device._after_answer(edge_drafted=not probe, probe=probe)  # the edge drafts every answer but the probes
    gaps = np.diff(probes).tolist()
    assert probes[0] == PROBE_EVERY and gaps[:3] == [2 * PROBE_EVERY + 1, 4 * PROBE_EVERY + 1, 8 * PROBE_EVERY + 1]
    assert max(gaps) == PROBE_MAX + 1
    device._after_answer(edge_drafted=False, probe=True)  # a probe ...
    device._after_answer(edge_drafted=False, probe=False)  # ... and the device drafts on: it won
    assert device.probe_after == PROBE_EVERY
