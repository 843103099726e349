"""The edge on the static verify path (EdgeSettings.static_cache / cuda_graphs; on the CPU the same
bucketed passes run eagerly): its RESULTs and answers are those of the edge on DynamicCaches, its
batched rounds run as one bucketed pass, greedy covspec stays lossless on the demo pair (fp32 and
bf16), and a freed session's slot goes back to the pool."""

from __future__ import annotations

import functools
import gc

import pytest
import test_edge_batching
from test_edge_batching import answer_in_threads, verify_all
from test_edge_device import answers_by_mode
from test_runtimes import RunningEdge

from covspec.edge_runtime.static_target import StaticTarget
from covspec.models import load_adapter
from covspec.sampling import SamplingParams

HELD_OUT = 4


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    import tiny_models

    root = tmp_path_factory.mktemp("static")
    return tiny_models.build_llava(root / "target", seed=0), tiny_models.build_llava(root / "draft", seed=1)


def test_a_static_edge_replies_as_a_dynamic_one_and_batches_its_rounds(llava):
    target, _ = llava
    results, stats = {}, {}
    for static in (False, True):
        edge = RunningEdge(target, batch_wait_ms=300.0, paused=True, static_cache=static)
        try:
            assert isinstance(edge.server.adapter, StaticTarget) == static
            results[static] = verify_all(edge)
            stats[static] = edge.server.stats()
            pool = edge.server.adapter.verifier.pool if static else None
        finally:
            edge.close()
    assert results[True] == results[False]
    assert stats[True]["batches"] == 1 and stats[True]["batched_windows"] == 3, stats[True]
    assert stats[True]["prefill_batches"] == 1 and stats[True]["batched_prefills"] == 3, stats[True]
    gc.collect()
    assert len(pool.free) == len(pool.keys[0]) - 1, "every closed session's slot is back in the pool"


def test_devices_in_threads_on_a_static_edge_get_target_only_greedy(llava, monkeypatch):
    target, draft = llava
    dynamic, _ = answer_in_threads(target, draft, "vanilla_sd", SamplingParams(), batch_wait_ms=50.0)
    monkeypatch.setattr(test_edge_batching, "RunningEdge", functools.partial(RunningEdge, static_cache=True))
    static, stats = answer_in_threads(target, draft, "vanilla_sd", SamplingParams(), batch_wait_ms=50.0)
    assert static == dynamic
    assert stats["batches"] >= 1 and stats["batch_max"] > 1, stats


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_covspec_on_a_static_edge_equals_its_target_only(dtype):
    answers = answers_by_mode(dtype, ("target_only", "covspec_no_adaptive"), HELD_OUT, static_cache=True)
    reference = [a.ids for a in answers["target_only"]]
    assert all(reference)
    assert [a.ids for a in answers["covspec_no_adaptive"]] == reference, dtype
    if dtype == "float32":  # the static path answers as the DynamicCache path does
        dynamic = answers_by_mode(dtype, ("target_only",), HELD_OUT)
        assert [a.ids for a in dynamic["target_only"]] == reference


def test_the_static_target_is_the_wrapped_adapter_for_images_and_prompts(llava):
    inner = load_adapter(llava[0])
    target = StaticTarget.create(inner, slots=2, max_len=10_000, cuda_graphs=False)
    assert target.verifier.pool.max_len == inner.text_config.max_position_embeddings  # capped at the model's
    assert target.fingerprint() == inner.fingerprint() and target.vocab_size == inner.vocab_size
    assert target.family == inner.family and target.eos_token_ids == inner.eos_token_ids
