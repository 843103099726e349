"""Joining (covspec's answer never waits for the device's prefill): a device whose draft prefills slowly (a
speed profile) gets its first token at the edge's pace, the edge streaming (or drafting) the answer's start
while the draft prefills on its thread, and takes drafting over mid-answer; the answer is the target's.
Also the profiles themselves: every one loads, names its source, and `Paced` never shortens a call."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from test_edge_sd import DraftingEdge, reference
from test_runtimes import PROMPTS, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.device_runtime.profiles import DeviceProfile, Paced, load_profile, profile_names
from covspec.errors import CovspecError
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire

PREFILL_MS = 500.0  # the emulated device's vision + prefill: far slower than the tiny edge's OPENED
SLOW = DeviceProfile(name="test-slow-prefill", draft="tiny llava", prefill_ms=PREFILL_MS, prefill_tokens=40,
                     step_ms=2.0, source="a test's")
TOKENS = 64
EDGE_STEP_S = 0.01  # the tiny target's pass paced to 10 ms, so that the answer outlasts the device's prefill


def paced_edge(target, draft, draft_sessions: int, step_s: float = EDGE_STEP_S, draft_streams: bool = True) -> DraftingEdge:
    """An edge with a draft whose target's every pass takes at least EDGE_STEP_S (a real target's pace;
    the tiny one streams 48 tokens faster than the emulated device prefills)."""
    edge = DraftingEdge(target, draft, draft_sessions=draft_sessions, draft_streams=draft_streams)
    adapter = edge.server.adapter
    forward = adapter.forward

    def slowed(state, ids):
        start = time.perf_counter()
        out = forward(state, ids)
        time.sleep(max(0.0, step_s - (time.perf_counter() - start)))
        return out

    adapter.forward = slowed
    return edge


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("joining")
    return tiny_models.build_llava(root / "target", seed=0), tiny_models.build_llava(root / "draft", seed=1)


@pytest.mark.parametrize(("draft_sessions", "draft_streams"), [(4, True), (0, True), (0, False)],
                         ids=["edge-drafts-meanwhile", "loaded-edge-drafts-the-plain-stream", "edge-streams-meanwhile"])
def test_first_token_at_the_edges_pace_and_the_device_joins_mid_answer(pair, draft_sessions, draft_streams):
    target, draft = pair
    edge = paced_edge(target, draft, draft_sessions, draft_streams=draft_streams)
    # the device's draft is the target itself (every window accepted: its drafting is seen to run and to win
    # over the edge's own, poor draft), at the emulated device's pace
    device = DeviceRuntime(Paced(load_adapter(target), SLOW), edge.endpoint, timeout_s=20)
    try:
        image, prompt = png(0), PROMPTS[1]
        expected = reference(target, image, prompt, TOKENS)
        # a first answer: the device joins when OPENED comes before its draft is ready (nothing measured yet)
        first = device.answer(image, prompt, "covspec", SamplingParams(), max_new_tokens=TOKENS)
        assert first.ids == expected and first.joined is not None
        assert first.joined.prefill_s is None or first.ttft_s < first.joined.prefill_s
        # no joining: the first token waits for the draft's prefill (the window before OPENED needs it)
        waits = device.answer(image, prompt, "covspec_no_join", SamplingParams(), max_new_tokens=TOKENS)
        assert waits.ids == expected and waits.joined is None
        assert waits.ttft_s >= PREFILL_MS / 1000
        # then, the edge's OPENED and the draft's prefill measured, its STREAM goes right behind the OPEN
        joins = device.answer(image, prompt, "covspec", SamplingParams(), max_new_tokens=TOKENS)
        assert joins.ids == expected
        joined = joins.joined
        assert joined is not None and joined.prefill_s is not None and joined.prefill_s >= PREFILL_MS / 1000, joined
        # the first token came at the edge's pace, before the device's prefill ended (on a busy machine the edge
        # itself may be slow: the prefill measured, not the profile's figure, is the bar)
        assert joins.ttft_s < joined.prefill_s, "the first token waited for the device's prefill"
        assert joined.segments >= 1, (joined, len(joins.ids), joins.rounds, joins.streamed_rest, joins.ttft_s)
        # the hand-over happened mid-answer: the edge generated the start, the device drafted from there
        assert joined.at_token is not None and 1 < joined.at_token < len(joins.ids), joined
        assert joins.rounds and joins.acceptance_rate > 0.5, joins.rounds  # the device's (pruned) draft drafted
        stats = edge.server.stats()
        assert (stats["tokens_edge_drafted"] > 0) == bool(draft_sessions or draft_streams)
        if not draft_sessions:  # no offer (as loaded): the joining STREAMs were asked plain
            assert (stats["plain_streams_drafted"] > 0) == draft_streams, stats
        sampled = device.answer(image, prompt, "covspec", SamplingParams(temperature=1.0, top_k=20, seed=3),
                                max_new_tokens=TOKENS)
        assert 0 < len(sampled.ids) <= TOKENS and sampled.joined is not None
    finally:
        device.close()
        edge.close()


def test_every_profile_loads_with_its_source():
    names = profile_names()
    assert {"smolvlm-256m", "qwen2.5-vl-3b-width", "jetson-orin-cpu", "jetson-orin-nano-gpu", "phone-xnnpack"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.step_ms > 0 and profile.prefill_ms > 0 and len(profile.source) > 40, name
    assert load_profile("smolvlm-256m").step_ms == 7.4  # results/export-realsize/smolvlm-256m.md, pte int8
    with pytest.raises(CovspecError, match="unknown device profile 'pixel-99'.*smolvlm-256m"):
        load_profile("pixel-99")


class Slowest:
    """A draft whose forward takes 30 ms: slower than any profile's step."""

    numpy_io = True

    def forward(self, state, ids):
        time.sleep(0.03)
        return np.zeros((len(ids), 4), dtype=np.float32)


def test_paced_pads_calls_to_the_profile_and_never_shortens_them():
    paced = Paced(Slowest(), DeviceProfile(name="t", draft="", prefill_ms=1, prefill_tokens=1, step_ms=60, source=""))
    start = time.perf_counter()
    paced.forward(None, np.array([1]))
    assert time.perf_counter() - start >= 0.06 and paced.padded_s > 0
    fast = Paced(Slowest(), DeviceProfile(name="t", draft="", prefill_ms=1, prefill_tokens=1, step_ms=1, source=""))
    fast.forward(None, np.array([1]))
    assert fast.padded_s == 0.0  # 30 ms measured, 1 ms profiled: left alone


def test_stream_limit_is_on_the_wire():
    msg = wire.Stream(sid=1, seq=2, chunk=1, limit=5)
    assert wire.decode(wire.encode(msg)).limit == 5
    with pytest.raises(wire.ProtocolError):
        wire.decode(wire.encode(wire.Stream(sid=1, seq=2, chunk=1, limit=0)))
    opened = wire.Opened(sid=1, seq=2, token=3, stream_limit=True)
    assert wire.decode(wire.encode(opened)).stream_limit is True  # a typed field, not a timing


JOIN_DRAWS = 400
JOIN_POSITIONS = 8
FAST = DeviceProfile(name="test-quick-prefill", draft="tiny llava", prefill_ms=90.0, prefill_tokens=40,
                     step_ms=1.0, source="a test's")  # ready a few of the edge's 25 ms tokens after OPENED


def noisy_copy(target: Path, out: Path, scale: float) -> Path:
    """The target with noise of `scale` times its spread on the output head: a draft that agrees often
    but not always (windows rejected and corrected after the join)."""
    from transformers import LlavaForConditionalGeneration

    shutil.copytree(target, out)
    model = LlavaForConditionalGeneration.from_pretrained(target)
    torch.manual_seed(7)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.add_(torch.randn_like(head) * scale * head.std())
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_sampled_answers_follow_the_target_per_position_across_the_join(pair, tmp_path):
    """Sampling stays the target's distribution when the device joins mid-answer: the edge streams the
    start (sampled there), the device's draft (the target with a noisy head, so windows are rejected and
    corrected) takes over within the first positions. Each of the first 8 positions of many sampled answers
    follows the target's own marginal there (exact, by enumerating its top-3 tree: chi-square)."""
    from test_wire_sampling import as_positions, assert_positions_follow, exact_marginals

    target = pair[0]
    draft = noisy_copy(target, tmp_path / "noisy-draft", scale=1.0)
    image, prompt = png(0), "what is the color of the circle ?"
    params = SamplingParams(temperature=1.0, top_k=3)
    marginals = exact_marginals(target, image, prompt, params, JOIN_POSITIONS)
    vocab = marginals.shape[1] - 1
    edge = paced_edge(target, draft, draft_sessions=0, step_s=0.025)  # the edge streams while the draft prefills
    device = DeviceRuntime(Paced(load_adapter(draft), FAST), edge.endpoint, timeout_s=20)
    rows, joined_at, drafted, accepted = [], [], 0, 0
    try:
        for n in range(JOIN_DRAWS):
            answer = device.answer(image, prompt, "covspec", SamplingParams(temperature=1.0, top_k=3, seed=n),
                                   max_new_tokens=16)
            rows.append(as_positions(answer.ids, vocab, JOIN_POSITIONS))
            drafted += sum(r.drafted for r in answer.rounds)
            accepted += sum(r.accepted for r in answer.rounds)
            if answer.joined is not None and answer.joined.at_token is not None:
                joined_at.append(answer.joined.at_token)
    finally:
        device.close()
        edge.close()
    within = sum(1 < j < JOIN_POSITIONS for j in joined_at)
    assert within >= JOIN_DRAWS // 4, f"the device joined within the first {JOIN_POSITIONS} positions in {within} answers"
    assert 0 < accepted < drafted, (accepted, drafted)  # the device drafted after joining, and was corrected
    assert_positions_follow(np.asarray(rows), marginals, f"joined mid-answer in {len(joined_at)} of {JOIN_DRAWS} "
                            f"answers ({within} within the first {JOIN_POSITIONS} positions); device rounds: "
                            f"{drafted} tokens drafted, {accepted} accepted")
