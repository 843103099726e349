"""Windows in flight: a device sends the next window before the RESULT of the one before it, rooted at
its guess of the edge's bonus token and naming where it starts (`Verify.pos`). The edge verifies it
only when the window before was accepted whole and the guess was right; otherwise it drops it with a
BAD_ROUND error and the session stays as it was. Over real ZeroMQ sockets, on a tiny random LLaVA.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import tiny_models
from PIL import Image
from test_runtimes import PROMPTS, RunningEdge, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.modes import MODE_OPTIONS
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import Client, RemoteError
from covspec.transport.link import Link, get_profile

MAX_NEW = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ahead")
    return tiny_models.build_llava(root / "target", seed=0), tiny_models.build_llava(root / "draft", seed=1)


@pytest.fixture(scope="module")
def long_answer(models):
    """(image, prompt, the target's greedy answer) with at least 10 tokens before any end token."""
    target = load_adapter(models[0])
    for i in range(20):
        image = png(i)
        ids = generate(target, Image.open(io.BytesIO(image)).convert("RGB"), PROMPTS[1], max_new_tokens=MAX_NEW).ids
        if len(ids) >= 10:
            return image, PROMPTS[1], ids
    pytest.fail("no image among 20 gives the tiny target an answer of 10 tokens")


@contextmanager
def edge_behind_link(target, rtt_ms: float) -> Iterator[tuple[RunningEdge, str]]:
    """A running edge on `target` and the endpoint of an emulated link of `rtt_ms` in front of it."""
    edge = RunningEdge(target)
    try:
        with Link(edge.endpoint.removeprefix("tcp://"), get_profile("custom", rtt_ms=rtt_ms), "127.0.0.1:0") as link:
            yield edge, link.endpoint
    finally:
        edge.close()


def tokens(ids: list[int]) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


def test_the_edge_verifies_a_window_sent_ahead_only_when_its_assumption_holds(models, long_answer):
    image, prompt, ref = long_answer  # ref[0] comes in OPENED; a window after it starts at answer index 1
    edge = RunningEdge(models[0])
    try:
        with Client(edge.endpoint, timeout_s=20, retries=0) as client:
            def open_session(sid: int) -> None:
                opened = client.request(wire.Open(sid=sid, image=image, prompt=prompt, mode="covspec",
                                                  max_new_tokens=MAX_NEW))
                assert opened.token == ref[0]

            # 1. round 0 accepted whole (ref[1:4]), bonus ref[4]; round 1 sent before reading round 0's
            # RESULT, rooted at the right guess ref[4] and starting at answer index 5: verified
            open_session(1)
            r0 = client.send(wire.Verify(sid=1, round=0, tokens=tokens(ref[1:4])))
            r1 = client.send(wire.Verify(sid=1, round=1, tokens=tokens(ref[5:7]), root=ref[4], pos=5))
            res0, res1 = client.recv(r0.seq), client.recv(r1.seq)
            assert (res0.accepted, res0.token) == (3, ref[4])
            assert isinstance(res1, wire.Result) and (res1.accepted, res1.token) == (2, ref[7])

            # 2. the same with a wrong guess of the bonus: dropped, and the session goes on as before
            open_session(2)
            wrong = next(t for t in range(5, 50) if t != ref[4])
            r0 = client.send(wire.Verify(sid=2, round=0, tokens=tokens(ref[1:4])))
            r1 = client.send(wire.Verify(sid=2, round=1, tokens=tokens(ref[5:7]), root=wrong, pos=5))
            assert client.recv(r0.seq).accepted == 3
            with pytest.raises(RemoteError, match="dropped") as err:
                client.recv(r1.seq)
            assert err.value.code == wire.ErrorCode.BAD_ROUND
            again = client.request(wire.Verify(sid=2, round=1, tokens=tokens(ref[5:7])))  # root: the bonus ref[4]
            assert (again.accepted, again.token) == (2, ref[7])

            # 3. round 0 rejected at its second token: the window sent ahead (for index 5) is dropped
            open_session(3)
            bad = next(t for t in range(5, 50) if t != ref[2])
            r0 = client.send(wire.Verify(sid=3, round=0, tokens=tokens([ref[1], bad, ref[3]])))
            r1 = client.send(wire.Verify(sid=3, round=1, tokens=tokens(ref[5:7]), root=ref[4], pos=5))
            res0 = client.recv(r0.seq)
            assert (res0.accepted, res0.token) == (1, ref[2])
            with pytest.raises(RemoteError, match="answer goes on at 3"):
                client.recv(r1.seq)
            again = client.request(wire.Verify(sid=3, round=1, tokens=tokens(ref[3:6])))
            assert (again.accepted, again.token) == (3, ref[6])
        counters = edge.server.stats()
        assert counters["windows_ahead"] == 1 and counters["windows_dropped"] == 2
        assert counters["errors"] == 0  # a dropped window is not an error of the device's
    finally:
        edge.close()


def test_covspec_sends_windows_ahead_and_still_answers_as_the_target(models, long_answer):
    """Over a 30 ms link the device finishes drafting the all-accepted branch before the RESULT comes,
    and its first window before OPENED: with the target as its own draft every guess is right, so
    windows go out ahead and are verified; with a different draft some are dropped (its guess of the
    first token among them, most likely). Greedy answers equal target_only's either way."""
    image, prompt, ref = long_answer
    target, other = models
    with edge_behind_link(target, rtt_ms=30.0) as (edge, endpoint):
        for draft, always_right in ((target, True), (other, False)):
            device = DeviceRuntime(load_adapter(draft), endpoint, timeout_s=20)
            # fixed windows of 3, nothing pruned: the rounds do not depend on timings
            options = replace(MODE_OPTIONS["covspec_no_adaptive"], keep=1.0)
            before = edge.server.stats()["windows_ahead"]
            answer = device.answer(image, prompt, "covspec", SamplingParams(), MAX_NEW, window=3, options=options)
            off = device.answer(image, prompt, "covspec", SamplingParams(), MAX_NEW, window=3,
                                options=replace(options, ahead=False))
            device.close()
            assert answer.ids == off.ids == ref[:len(answer.ids)] and len(answer.ids) == len(ref)
            ahead = sum(r.ahead for r in answer.rounds)
            assert edge.server.stats()["windows_ahead"] - before == ahead
            assert not any(r.ahead for r in off.rounds)
            if always_right:  # the first window went out before OPENED, on the right guess of the
                # first token; then every round after one that went stop-and-wait was sent ahead (a
                # window sent ahead is answered soon after the one before it, often before the next
                # all-accepted branch is drafted, so that one goes stop-and-wait: at least every other)
                assert answer.rounds[0].ahead
                assert len(answer.rounds) >= 3 and ahead >= max(1, len(answer.rounds) // 2)


def test_a_load_replay_sends_windows_ahead_as_recorded_and_leaves_dropped_ones_unread(models, long_answer, tmp_path):
    """The load bench's replaying devices keep the recorded order: a window the recording sent ahead
    goes out before the RESULT it assumes, and the reply to one that was dropped is not waited for."""
    from covspec.tools.replay import Recorder, load_records, replay

    image, prompt, ref = long_answer
    edge = RunningEdge(models[0])
    try:
        with Client(edge.endpoint, timeout_s=20, retries=0) as client:
            recorder = Recorder(client)
            recorder.start()
            client.request(wire.Open(sid=7, image=image, prompt=prompt, mode="covspec", max_new_tokens=MAX_NEW))
            r0 = client.send(wire.Verify(sid=7, round=0, tokens=tokens(ref[1:4])))
            wrong = next(t for t in range(5, 50) if t != ref[4])
            client.send(wire.Verify(sid=7, round=1, tokens=tokens(ref[5:7]), root=wrong, pos=5))  # will be dropped
            assert client.recv(r0.seq).accepted == 3
            assert client.request(wire.Verify(sid=7, round=1, tokens=tokens(ref[5:7]))).accepted == 2
            client.request(wire.Close(sid=7))
            recorder.save(tmp_path / "recorded.msgpack", 0, "covspec", len(ref))
        (record,) = load_records(tmp_path / "recorded.msgpack")
        assert record["awaited"] == [True, True, False, True, True]
        assert record["replies_before"] == [0, 1, 1, 2, 3]  # the window ahead went out before RESULT 0
        with Client(edge.endpoint, timeout_s=20, retries=0) as client:
            replayed = replay(client, record)
        assert replayed["replay_matches"]
        assert edge.server.stats()["windows_dropped"] == 2  # the recording's and the replay's
    finally:
        edge.close()


def test_where_the_edge_streams_the_first_window_is_verified_before_the_streaming(models, long_answer):
    """Over a 150 ms link streaming beats speculating; once the device knows it (from its first
    answer), it sends OPEN, its first window and STREAM together: the edge verifies the window right
    after its prefill and streams the rest from there. Same answer as target_only's."""
    image, prompt, ref = long_answer
    target = models[0]
    with edge_behind_link(target, rtt_ms=150.0) as (edge, endpoint):
        device = DeviceRuntime(load_adapter(target), endpoint, timeout_s=20)
        options = replace(MODE_OPTIONS["covspec"], keep=1.0)
        reference = device.answer(image, prompt, "target_only", SamplingParams(), MAX_NEW)
        first = device.answer(image, prompt, "covspec", SamplingParams(), MAX_NEW, options=options)
        second = device.answer(image, prompt, "covspec", SamplingParams(), MAX_NEW, options=options)
        device.close()
        assert edge.server.stats()["windows_ahead"] >= 1
    assert reference.ids == first.ids == second.ids == ref
    assert first.streamed_rest and second.streamed_rest
    assert len(second.rounds) == 1 and second.rounds[0].ahead  # the window sent with OPEN was verified


def test_no_window_sent_ahead_runs_past_the_token_limit(models, long_answer):
    """An answer cut by max_new_tokens: windows drafted on the all-accepted branch stop where the limit
    does (the edge would cut them, and the cut tokens would count as rejected: the target drafting for
    itself accepted 7 of 9 in one such run)."""
    image, prompt, ref = long_answer
    target = models[0]
    with edge_behind_link(target, rtt_ms=30.0) as (_, endpoint):
        device = DeviceRuntime(load_adapter(target), endpoint, timeout_s=20)
        options = replace(MODE_OPTIONS["covspec_no_adaptive"], keep=1.0)
        limits = range(5, len(ref))  # below the answer's length: the limit binds, mid-window for some
        answers = {limit: device.answer(image, prompt, "covspec", SamplingParams(), limit, window=3,
                                        options=options) for limit in limits}
        device.close()
    for limit, answer in answers.items():
        assert answer.ids == ref[:limit]
        assert answer.acceptance_rate == 1.0, (limit, [(r.drafted, r.accepted, r.ahead) for r in answer.rounds])
    assert any(r.ahead for answer in answers.values() for r in answer.rounds)
