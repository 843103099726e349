"""Bucketed static-shape verification (edge_runtime.buckets, static_cache, static_verify) on the CPU,
eagerly: the same bucketing, padding and static-cache logic the CUDA graphs replay. Over several
rounds of windows of random lengths, accepted in part, the logits of the real positions equal the
unbucketed pass on the session's own DynamicCache (adapter.forward + truncate), for every tiny
family and the demo target; padding, batch rows on the scratch slot and the cache's bounds."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch

from covspec.demo import default_target_path
from covspec.demo.task import sample_split
from covspec.edge_runtime.buckets import BATCH_BUCKETS, BUCKETS, bucket_for, check_buckets, pad_ids
from covspec.edge_runtime.static_verify import CudaGraphsUnavailable, StaticVerifier
from covspec.edge_runtime.target import place_target
from covspec.models import load_adapter


def tiny_models_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))


BUILDERS = {"llava": tiny_models.build_llava, "qwen2_5_vl": tiny_models.build_qwen2_5_vl,
            "idefics3": tiny_models.build_idefics3}


def test_bucket_choice() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    assert bucket_for(33) is None and bucket_for(9, BATCH_BUCKETS) is None and bucket_for(3, BATCH_BUCKETS) == 4
    assert bucket_for(5, (8, 4)) == 8
    assert check_buckets((8, 1, 8, 4)) == (1, 4, 8)
    with pytest.raises(ValueError):
        bucket_for(0)
    with pytest.raises(ValueError):
        check_buckets((0, 4))


def test_padding_repeats_the_last_id() -> None:
    assert pad_ids(torch.tensor([7, 3, 5]), 4).tolist() == [7, 3, 5, 5]
    assert pad_ids(torch.tensor([9]), 1).tolist() == [9]
    with pytest.raises(ValueError):
        pad_ids(torch.tensor([1, 2, 3]), 2)


def prefilled(adapter, prompts: list[str], images: list) -> list:
    return [adapter.prefill(adapter.encode_image(adapter.preprocess(image)), prompt)[1]
            for prompt, image in zip(prompts, images, strict=True)]


def rounds_match(adapter, states, rounds: int = 4, atol: float = 1e-4, seed: int = 0) -> int:
    """Runs `rounds` rounds of random windows on the states, statically (all sessions in one bucketed
    pass) and on their DynamicCaches one by one, each round keeping a random prefix of each window;
    asserts equal logits; returns the number of windows compared."""
    rng = torch.Generator().manual_seed(seed)
    verifier = StaticVerifier.create(adapter, slots=len(states) + 1, max_len=160)
    static = [verifier.open(copy.deepcopy(s)) for s in states]
    compared = 0
    for _ in range(rounds):
        sizes = torch.randint(1, 10, (len(states),), generator=rng).tolist()
        windows = [torch.randint(3, adapter.vocab_size, (n,), generator=rng) for n in sizes]
        got = verifier.verify(static, windows)
        for state, st, window, logits in zip(states, static, windows, got, strict=True):
            expected = adapter.forward(state, window)
            torch.testing.assert_close(logits, expected, atol=atol, rtol=1e-4)
            keep = int(torch.randint(0, window.numel() + 1, (1,), generator=rng))
            adapter.truncate(state, state.length - window.numel() + keep)
            verifier.commit(st, keep)
            assert st.length == state.length
            compared += 1
    return compared


@pytest.mark.parametrize("family", list(BUILDERS))
def test_static_bucketed_rounds_equal_the_unbucketed_pass(family, tmp_path) -> None:
    adapter = load_adapter(BUILDERS[family](tmp_path / "m"))
    image = tiny_models_image()
    prompts = ["what is the color of the circle ?", "describe this image .", "how many shape are there ?"]
    states = prefilled(adapter, prompts, [image] * 3)  # 3 sessions: the pass runs 4 rows, one on the scratch slot
    assert rounds_match(adapter, states) == 12


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_static_bucketed_rounds_equal_the_unbucketed_pass_on_the_demo_target(dtype, atol) -> None:
    """bf16: the static pass reads the same bf16 keys and values but multiplies in other shapes, so the
    logits (of magnitude ~15) agree to bf16 rounding, not exactly."""
    adapter = place_target(load_adapter(default_target_path()), dtype=dtype)
    items = list(sample_split("heldout", 5, seed=0))
    states = prefilled(adapter, [i.question for i in items], [i.image for i in items])  # 5 sessions: 8 rows
    assert rounds_match(adapter, states, atol=atol) == 20


def test_single_session_forward_and_bounds() -> None:
    adapter = load_adapter(default_target_path())
    item = next(sample_split("heldout", 1, seed=0))
    (state,) = prefilled(adapter, [item.question], [item.image])
    if adapter.device.type != "cuda":  # asked for off CUDA: a clear error, not eager passes in their place
        with pytest.raises(CudaGraphsUnavailable, match="CUDA graphs need the target on a CUDA device; it is on cpu"):
            StaticVerifier.create(adapter, slots=1, max_len=state.length + 8, cuda_graphs=True)
    verifier = StaticVerifier.create(adapter, slots=1, max_len=state.length + 8)
    static = verifier.open(copy.deepcopy(state))
    window = torch.tensor([5, 6, 7])
    torch.testing.assert_close(verifier.forward(static, window), adapter.forward(state, window), atol=1e-4, rtol=1e-4)
    assert static.length == state.length and not verifier.graphs
    verifier.truncate(static, static.length - 2)
    with pytest.raises(ValueError, match="passes the static cache"):  # 6 + bucket 8 > max_len
        verifier.verify([static], [torch.arange(5, 10)])
    with pytest.raises(ValueError, match="exceed the buckets"):
        verifier.verify([static], [torch.arange(3, 3 + BUCKETS[-1] + 1)])
    with pytest.raises(RuntimeError, match="slots are all taken"):
        verifier.open(copy.deepcopy(state))
    verifier.close(static)
    verifier.open(copy.deepcopy(state))  # its slot was given back


def test_the_warm_up_shapes_run_on_the_scratch_slot_only() -> None:
    """What `warm` captures on CUDA, run eagerly here: every (rows, bucket) shape, no session touched."""
    from covspec.edge_runtime.static_verify import eager_pass

    adapter = load_adapter(default_target_path())
    item = next(sample_split("heldout", 1, seed=0))
    (state,) = prefilled(adapter, [item.question], [item.image])
    verifier = StaticVerifier.create(adapter, slots=2, max_len=64)
    static = verifier.open(state)
    before = [k[1:].clone() for k in verifier.pool.keys]
    shapes = [tuple(inputs.embeds.shape[:2]) for inputs in verifier.shapes()]
    assert shapes == [(r, b) for r in BATCH_BUCKETS for b in BUCKETS]
    with torch.inference_mode():
        for inputs in verifier.shapes():
            assert eager_pass(adapter, verifier.pool, inputs).shape[:2] == inputs.embeds.shape[:2]
        eager_pass(adapter, verifier.pool, next(verifier.shapes()))  # one row: its write is not undone by padded rows
    assert all(torch.equal(k[1:], b) for k, b in zip(verifier.pool.keys, before, strict=True))
    assert verifier.pool.keys[0][0, :, 0].abs().sum() > 0, "the scratch slot took the writes"
    assert verifier.warm() == 0 and static.length == state.length  # no graphs off CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here: the captured graphs cannot run "
                    "(their bucketing, padding and cache logic is tested eagerly above)")
def test_cuda_graphs_replay_what_the_eager_pass_computes() -> None:
    adapter = place_target(load_adapter(default_target_path()), device="cuda", dtype="float32")
    items = list(sample_split("heldout", 3, seed=0))
    states = prefilled(adapter, [i.question for i in items], [i.image for i in items])
    eager = StaticVerifier.create(adapter, slots=3, max_len=160)
    graphs = StaticVerifier.create(adapter, slots=3, max_len=160, cuda_graphs=True)
    a = [eager.open(copy.deepcopy(s)) for s in states]
    b = [graphs.open(copy.deepcopy(s)) for s in states]
    for sizes in ([3, 5, 1], [9, 2, 4], [1, 1, 1]):
        windows = [torch.arange(3, 3 + n) for n in sizes]
        for x, y in zip(eager.verify(a, windows), graphs.verify(b, windows), strict=True):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
        for s, t in zip(a + b, sizes + sizes, strict=True):
            eager.commit(s, t)
    assert sorted(graphs.graphs) == [(4, 1), (4, 8), (4, 16)]  # each shape captured once
    assert graphs.warm() == len(BATCH_BUCKETS) * len(BUCKETS)


def test_cuda_graphs_off_cuda_is_a_clear_cli_error(capsys) -> None:
    """`covspec edge serve --cuda-graphs` with the target on the CPU: one line naming the cause and the
    fix, exit status 2, no server started (never eager passes quietly in place of the graphs)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: --cuda-graphs on a CPU target is refused only where --device is cpu")
    from covspec.cli import main

    code = main(["edge", "serve", "--model", str(default_target_path()), "--bind", "tcp://127.0.0.1:*",
                 "--auth", "none", "--cuda-graphs", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "CUDA graphs need the target on a CUDA device; it is on cpu" in err and "--static-cache" in err, err
    assert "Traceback" not in err
