"""Speculative decoding on the edge (edge_runtime.drafting): mode edge_sd, an edge without a draft
refusing it, and the edge taking over drafting mid-answer; greedy answers equal the target's own."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tiny_models
from PIL import Image
from test_runtimes import PROMPTS, RunningEdge, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.edge_runtime.server import EdgeServer, EdgeSettings
from covspec.errors import CovspecError
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import Client, RemoteError


class DraftingEdge(RunningEdge):
    """A RunningEdge whose server runs `draft` beside the target."""

    def __init__(self, target_path, draft_path, **settings):
        super().__init__(target_path, paused=True, **settings)
        old = self.server
        self.server = EdgeServer(load_adapter(target_path), EdgeSettings(bind="tcp://127.0.0.1:*", **settings),
                                 draft=load_adapter(draft_path))
        old.close()
        self.resume()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge_sd")
    target = tiny_models.build_llava(root / "target", seed=0)
    draft = tiny_models.build_llava(root / "draft", seed=1)
    edge = DraftingEdge(target, draft)
    yield target, draft, edge
    edge.close()


def reference(target, image: bytes, prompt: str, n: int) -> list[int]:
    return generate(load_adapter(target), Image.open(io.BytesIO(image)).convert("RGB"), prompt, max_new_tokens=n).ids


def test_edge_sd_greedy_equals_target_only(pair):
    target, draft, edge = pair
    device = DeviceRuntime(load_adapter(draft), edge.endpoint, timeout_s=20)
    before = edge.server.stats()["tokens_edge_drafted"]
    for i, prompt in enumerate(PROMPTS):
        image = png(i)
        expected = reference(target, image, prompt, 16)
        assert device.answer(image, prompt, "target_only", SamplingParams(), max_new_tokens=16).ids == expected
        answer = device.answer(image, prompt, "edge_sd", SamplingParams(), max_new_tokens=16)
        assert answer.mode == "edge_sd" and answer.ids == expected, prompt
    device.close()
    assert edge.server.stats()["tokens_edge_drafted"] > before, "the edge did not draft"
    assert edge.server.drafting.stats[True].rounds > 0
    assert not edge.server.sessions


def test_edge_sd_sampling_runs_within_the_limit(pair):
    target, draft, edge = pair
    device = DeviceRuntime(load_adapter(draft), edge.endpoint, timeout_s=20)
    answer = device.answer(png(5), PROMPTS[1], "edge_sd", SamplingParams(temperature=1.0, top_k=20, seed=3),
                           max_new_tokens=12)
    assert 0 < len(answer.ids) <= 12
    assert edge.server.drafting.stats[False].rounds > 0
    device.close()


def test_an_edge_without_a_draft_refuses_edge_sd(tmp_path):
    target = tiny_models.build_llava(tmp_path / "target", seed=0)
    edge = RunningEdge(target)
    try:
        with Client(edge.endpoint, timeout_s=10, retries=0) as client:
            with pytest.raises(RemoteError) as err:
                client.request(wire.Open(sid=5, image=png(0), prompt=PROMPTS[0], mode="edge_sd", max_new_tokens=8))
        assert err.value.code == wire.ErrorCode.BAD_STATE
        assert "--draft" in str(err.value)
    finally:
        edge.close()


def test_a_draft_of_another_tokenizer_is_refused(tmp_path):
    target = tiny_models.build_llava(tmp_path / "target", seed=0)
    other = tiny_models.build_qwen2_5_vl(tmp_path / "other", seed=0)
    with pytest.raises(CovspecError, match="tokenizer"):
        EdgeServer(load_adapter(target), EdgeSettings(bind="tcp://127.0.0.1:*"), draft=load_adapter(other))


def test_edge_drafts_from_mid_answer_on_a_stream_that_asks(pair):
    """A covspec device's hand-over: after device rounds, STREAM(draft) makes the edge draft the rest;
    the answer is the target's."""
    target, draft, edge = pair
    image, prompt = png(2), PROMPTS[2]
    expected = reference(target, image, prompt, 20)
    with Client(edge.endpoint, timeout_s=10, retries=0) as client:
        opened = client.request(wire.Open(sid=77, image=image, prompt=prompt, mode="covspec", max_new_tokens=20))
        assert opened.offers_draft is True and opened.edge_sessions == 1  # one session: the edge offers to draft
        committed = [opened.token]
        if len(expected) > 3:  # a device round: two tokens, the target's own (all accepted)
            result = client.request(wire.Verify(sid=77, round=0, tokens=np.asarray(expected[1:3], "int32")))
            assert result.accepted == 2 and result.offers_draft is not None
            committed += expected[1:3] + [result.token]
        sent = client.send(wire.Stream(sid=77, chunk=1, draft=True))
        while True:
            chunk = client.recv(sent.seq)
            committed += [int(t) for t in chunk.tokens]
            if chunk.done:
                break
        client.request(wire.Close(sid=77))
    eos = load_adapter(target).eos_token_ids
    assert [t for t in committed if t not in eos][:20] == expected


def test_edge_sd_streams_interleave_and_share_target_passes(pair):
    """Two edge_sd STREAMs at once: the edge advances both a round at a time, their windows verified in
    one batched pass, and each answer is the target's."""
    target, draft, edge = pair
    jobs = [(31, png(7), PROMPTS[1]), (32, png(8), PROMPTS[2])]
    expected = {sid: reference(target, image, prompt, 24) for sid, image, prompt in jobs}
    before = edge.server.stats()["batched_windows"]
    eos = load_adapter(target).eos_token_ids
    with Client(edge.endpoint, timeout_s=10, retries=0) as client:
        for sid, image, prompt in jobs:  # queued behind the first OPEN while the edge prefills it
            client.send(wire.Open(sid=sid, image=image, prompt=prompt, mode="edge_sd", max_new_tokens=24))
            client.send(wire.Stream(sid=sid, chunk=1))
        tokens: dict[int, list[int]] = {sid: [] for sid, _, _ in jobs}
        order, done = [], set()
        while len(done) < 2:
            got = client._sock.recv_frames(10.0)
            assert got is not None, "the edge stopped replying"
            reply = wire.decode(got[1])
            if isinstance(reply, wire.Opened):
                tokens[reply.sid].insert(0, reply.token)
            elif isinstance(reply, wire.Streamed):
                tokens[reply.sid] += [int(t) for t in reply.tokens]
                order.append(reply.sid)
                if reply.done:
                    done.add(reply.sid)
        for sid, _, _ in jobs:
            client.request(wire.Close(sid=sid))
    for sid, _, _ in jobs:
        assert [t for t in tokens[sid] if t not in eos][:24] == expected[sid], sid
    switches = sum(a != b for a, b in zip(order, order[1:], strict=False))
    assert switches >= 2, "the two streams were not interleaved"
    assert edge.server.stats()["batched_windows"] > before, "no round shared a target pass"


def test_a_second_stream_of_a_session_being_streamed_is_refused(pair):
    target, draft, edge = pair
    with Client(edge.endpoint, timeout_s=10, retries=0) as client:
        client.send(wire.Open(sid=41, image=png(9), prompt=PROMPTS[1], mode="edge_sd", max_new_tokens=40))
        first = client.send(wire.Stream(sid=41, chunk=1))
        second = client.send(wire.Stream(sid=41, chunk=1))
        with pytest.raises(RemoteError) as err:
            while client.recv(second.seq, timeout_s=10) is not None:
                pass
        assert err.value.code == wire.ErrorCode.BAD_STATE
        while not client.recv(first.seq).done:  # the first stream carries on to the end
            pass
        client.request(wire.Close(sid=41))
