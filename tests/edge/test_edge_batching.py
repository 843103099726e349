"""Batched verification: the VERIFY windows of several sessions in one target pass.

`forward_batch` on sessions of different past lengths (one pruned) and window sizes gives the logits
of per-session forwards and leaves each cache as a per-session forward would (decoding continues
identically); a batched window commits only the kept positions; an edge that batches gives the same
RESULTs as one that does not, and devices in threads get target-only greedy's answers.
"""

from __future__ import annotations

import copy
import io
import threading
import time

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image
from test_runtimes import PROMPTS, RunningEdge, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.edge_runtime.batching import (
    PACKED_ATTENTION,
    can_batch,
    can_prefill_batch,
    commit,
    forward_batch,
    prefill_batch,
    run_batch,
)
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.modes import SpecOptions
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import Client, RemoteError

TOLERANCE = 1e-4
# every family's text model (Llama, Qwen2, Qwen2.5-VL's with M-RoPE, Idefics3's Llama) runs our packed attention
BUILDERS = {"llava": tiny_models.build_llava,
            "llava_siglip_qwen2": lambda folder, seed=0: tiny_models.build_llava(folder, seed, siglip_qwen2=True),
            "qwen2_5_vl": tiny_models.build_qwen2_5_vl, "idefics3": tiny_models.build_idefics3}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    return tiny_models.build_llava(root / "target", seed=0), tiny_models.build_llava(root / "draft", seed=1)


def open_states(adapter, extra_tokens: list[int], seed: int = 0):
    """One prefilled state per entry (the second one pruned to every other visual token), each then
    fed `extra_tokens[i]` random tokens: past lengths differ."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for i, extra in enumerate(extra_tokens):
        image = Image.open(io.BytesIO(png(i))).convert("RGB")
        visual = adapter.encode_image(adapter.preprocess(image))
        kept = torch.arange(0, visual.count, 2) if i == 1 else None
        _, state = adapter.prefill(visual, PROMPTS[i % len(PROMPTS)], kept=kept)
        adapter.forward(state, torch.randint(5, 30, (extra,), generator=g))
        states.append(state)
    return states, g


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("extra,sizes", [([0, 5], [1, 4]), ([2, 0, 7, 3], [3, 1, 5, 2])])
def test_forward_batch_equals_per_session_forwards(tmp_path, family, extra, sizes):
    adapter = load_adapter(BUILDERS[family](tmp_path / family, seed=0))
    states, g = open_states(adapter, extra)
    assert len({s.length for s in states}) > 1 and can_batch(adapter, states)
    alone = [copy.deepcopy(s) for s in states]
    windows = [torch.randint(5, 30, (n,), generator=g) for n in sizes]
    expected = [adapter.forward(s, ids) for s, ids in zip(alone, windows, strict=True)]
    got = forward_batch(adapter, states, windows)
    assert adapter.language_model.config._attn_implementation != PACKED_ATTENTION  # switched back after the pass
    assert [tuple(x.shape) for x in got] == [tuple(x.shape) for x in expected]
    diff = max_diff(got, expected)
    assert diff < TOLERANCE, diff
    assert [s.length for s in states] == [s.length for s in alone]
    for state, single in zip(states, alone, strict=True):  # the caches themselves
        for a, b in zip(state.cache.layers, single.cache.layers, strict=True):
            assert a.keys.shape == b.keys.shape and float((a.keys - b.keys).abs().max()) < TOLERANCE
    following = [torch.randint(5, 30, (2,), generator=g) for _ in states]  # decoding continues alike
    after = max_diff([adapter.forward(s, ids) for s, ids in zip(states, following, strict=True)],
                     [adapter.forward(s, ids) for s, ids in zip(alone, following, strict=True)])
    assert after < TOLERANCE, after
    print(f"{family} B={len(states)}: max |batched - alone| logits {diff:.2e}, after {after:.2e}")


@pytest.mark.parametrize("family", list(BUILDERS))
def test_prefill_batch_equals_per_session_prefills(tmp_path, family):
    """Three prompts of different lengths (one image pruned to every third token) in one pass: the
    same first logits and caches as one prefill each, and decoding continues alike."""
    adapter = load_adapter(BUILDERS[family](tmp_path / family, seed=0))
    assert can_prefill_batch(adapter)
    inputs = []
    for i in range(3):
        visual = adapter.encode_image(adapter.preprocess(Image.open(io.BytesIO(png(i))).convert("RGB")))
        kept = torch.arange(0, visual.count, 3) if i == 1 else None
        inputs.append(adapter.prefill_inputs(visual, PROMPTS[i], kept))
    assert len({int(x.embeds.shape[0]) for x in inputs}) > 1
    alone = [adapter.start(x) for x in inputs]
    together = prefill_batch(adapter, inputs)
    diff = max_diff([logits for logits, _ in together], [logits for logits, _ in alone])
    assert diff < TOLERANCE, diff
    for (_, state), (_, single) in zip(together, alone, strict=True):
        assert state.length == single.length and state.extra == single.extra
        for a, b in zip(state.cache.layers, single.cache.layers, strict=True):
            assert a.keys.shape == b.keys.shape and float((a.values - b.values).abs().max()) < TOLERANCE
    probe = torch.tensor([7, 8, 9])
    after = max_diff([adapter.forward(s, probe) for _, s in together], [adapter.forward(s, probe) for _, s in alone])
    assert after < TOLERANCE, after
    print(f"{family} prefill B=3: max |batched - alone| logits {diff:.2e}, after {after:.2e}")


def test_commit_keeps_only_the_accepted_positions(llava):
    adapter = load_adapter(llava[0])
    states, g = open_states(adapter, [1, 4, 0])
    windows = [torch.randint(5, 30, (n,), generator=g) for n in (4, 2, 3)]
    lengths = [s.length for s in states]
    batched = run_batch(adapter, states, windows)
    assert [s.length for s in states] == lengths, "run_batch must leave the states alone"
    kept = [2, 1, 3]
    alone = [copy.deepcopy(s) for s in states]
    for state, single, window, ids, n in zip(states, alone, batched, windows, kept, strict=True):
        commit(state, window, n)
        adapter.forward(single, ids)
        adapter.truncate(single, single.length - ids.numel() + n)
        assert state.length == single.length
    probe = [torch.tensor([7, 8]) for _ in states]
    assert max_diff([adapter.forward(s, p) for s, p in zip(states, probe, strict=True)],
                    [adapter.forward(s, p) for s, p in zip(alone, probe, strict=True)]) < TOLERANCE
    with pytest.raises(ValueError, match="computed after"):
        commit(states[0], batched[0], 1)  # stale: the state moved on


def verify_all(edge: RunningEdge) -> tuple[dict, list]:
    """Opens three sessions (OPENs sent back to back), then sends their first VERIFYs (and one for a session that does not
    exist) back to back, without waiting: the edge finds them queued together."""
    with Client(edge.endpoint, timeout_s=20, retries=0) as client:
        opening = {sid: client.send(wire.Open(sid=sid, image=png(sid), prompt=PROMPTS[sid % 3], mode="vanilla_sd",
                                              max_new_tokens=16)) for sid in (1, 2, 3)}
        time.sleep(0.3)  # all three queued at the paused edge
        edge.resume()
        opened = {sid: client.recv(msg.seq).token for sid, msg in opening.items()}
        sent = [client.send(wire.Verify(sid=sid, round=0, tokens=np.array([opened[sid], 5 + sid, 9][:sid], np.int32)))
                for sid in (1, 2, 3)]
        sent.append(client.send(wire.Verify(sid=77, round=0, tokens=np.array([1], np.int32))))
        replies = []
        for msg in sent:
            try:
                reply = client.recv(msg.seq)
                replies.append((reply.accepted, reply.token, reply.done))
            except RemoteError as err:
                replies.append(err.code)
        for sid in (1, 2, 3):
            client.request(wire.Close(sid=sid))
    return opened, replies


def test_batched_edge_answers_as_an_unbatched_one(llava):
    target, _ = llava
    results = {}
    for wait_ms in (0.0, 300.0):
        edge = RunningEdge(target, batch_wait_ms=wait_ms, paused=True)
        try:
            results[wait_ms] = verify_all(edge)
            stats = edge.server.stats()
        finally:
            edge.close()
        if wait_ms:
            assert stats["batches"] == 1 and stats["batched_windows"] == 3 and stats["batch_max"] == 3, stats
            assert stats["prefill_batches"] == 1 and stats["batched_prefills"] == 3, stats
        else:
            assert stats["batches"] == 0 and stats["prefill_batches"] == 0
    assert results[0.0] == results[300.0]
    assert results[300.0][1][-1] == wire.ErrorCode.UNKNOWN_SESSION


def answer_in_threads(target, draft, mode: str, params: SamplingParams, batch_wait_ms: float,
                      devices: int = 4, n: int = 12, options: SpecOptions | None = None) -> tuple[dict[int, list[int]], dict]:
    """`devices` devices in threads, started together, each answering its own prompt: (device ->
    answer ids, the edge's STATS)."""
    edge = RunningEdge(target, batch_wait_ms=batch_wait_ms)
    answers: dict[int, list[int]] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(devices)
    drafts = [load_adapter(draft) for _ in range(devices)]  # loaded here: model loading is not thread-safe

    def device(i: int) -> None:
        try:
            runtime = DeviceRuntime(drafts[i], edge.endpoint, timeout_s=30)
            start.wait(30)
            answers[i] = runtime.answer(png(i), PROMPTS[i % 3], mode, params, max_new_tokens=n, window=3,
                                        options=options).ids
            runtime.close()
        except BaseException as err:  # reported by the main thread
            failures.append(err)

    try:
        threads = [threading.Thread(target=device, args=(i,)) for i in range(devices)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = edge.server.stats()
    finally:
        edge.close()
    assert not failures, failures
    return answers, stats


def test_devices_in_threads_get_target_only_greedy(llava):
    target, draft = llava
    target_adapter = load_adapter(target)
    expected = {i: generate(target_adapter, Image.open(io.BytesIO(png(i))).convert("RGB"), PROMPTS[i % 3],
                            max_new_tokens=12).ids for i in range(4)}
    answers, stats = answer_in_threads(target, draft, "vanilla_sd", SamplingParams(), batch_wait_ms=50.0)
    assert answers == expected
    print(f"batches {stats['batches']}, windows in them {stats['batched_windows']}, largest {stats['batch_max']}")
    assert stats["batches"] >= 1 and stats["batch_max"] > 1, stats


@pytest.mark.parametrize("decoupled", [False, True], ids=["full", "decoupled"])
def test_seeded_sampling_answers_do_not_depend_on_batching(llava, decoupled):
    """Fixed windows (no adaptive policy: its windows follow the timings), no branching."""
    target, draft = llava
    params = SamplingParams(temperature=1.0, top_k=20, seed=7)
    options = SpecOptions(decoupled=decoupled)
    alone, _ = answer_in_threads(target, draft, "vanilla_sd", params, batch_wait_ms=0.0, options=options)
    batched, stats = answer_in_threads(target, draft, "vanilla_sd", params, batch_wait_ms=50.0, options=options)
    assert batched == alone
    assert stats["batches"] >= 1, stats
