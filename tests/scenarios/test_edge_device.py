"""The edge's placement (--device/--dtype): the target, its caches and its batched passes in the
dtype asked for, logits back in float32 on the CPU, clear errors for CUDA where none is present
and for dtypes not served; and greedy covspec lossless within each dtype on the demo pair (its
answers equal the same edge's own target_only answers, bf16 with bf16, fp32 with fp32)."""

from __future__ import annotations

import threading

import pytest
import tiny_models
import torch

from covspec.demo import default_draft_path, default_target_path
from covspec.demo.task import sample_split
from covspec.device_runtime.client import DeviceRuntime
from covspec.edge_runtime.batching import forward_batch, prefill_batch
from covspec.edge_runtime.server import EdgeServer, EdgeSettings
from covspec.edge_runtime.settings import DTYPE_NAMES
from covspec.edge_runtime.target import load_target, place_target
from covspec.errors import CovspecError
from covspec.images import png_bytes
from covspec.models import load_adapter
from covspec.models.placement import DTYPES, resolve_device, resolve_dtype
from covspec.sampling import SamplingParams

HELD_OUT = 6  # held-out demo prompts per dtype
NO_CUDA = "CUDA is available here: the refusal of a missing CUDA cannot be seen"


def test_the_settings_name_the_dtypes_placement_serves() -> None:
    assert DTYPE_NAMES == tuple(DTYPES)
    for dtype in DTYPE_NAMES:
        EdgeSettings(dtype=dtype, device="cuda:1").check()
    with pytest.raises(ValueError, match="dtype must be one of"):
        EdgeSettings(dtype="float64").check()
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        EdgeSettings(device="gpu").check()


def test_unknown_dtypes_and_devices_are_refused_by_name() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(CovspecError, match="'half' is not served"):
        resolve_dtype("half")
    with pytest.raises(CovspecError, match="'tpu' is not one of"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_without_cuda_is_a_clear_error(capsys) -> None:
    with pytest.raises(CovspecError, match="CUDA is not available here"):
        load_target(default_target_path(), device="cuda")
    with pytest.raises(CovspecError, match="CUDA is not available here"):
        EdgeServer(load_adapter(default_target_path()), EdgeSettings(bind="tcp://127.0.0.1:*", device="cuda:0"))
    from covspec.cli import main

    assert main(["edge", "serve", "--model", str(default_target_path()), "--auth", "none", "--device", "cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_a_bf16_target_keeps_weights_and_caches_in_bf16_and_gives_float32_logits() -> None:
    adapter, loaded = load_target(default_target_path(), dtype="bfloat16")
    assert "bfloat16" in loaded
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16}
    item = next(sample_split("heldout", 1, seed=0))
    logits, state = adapter.prefill(adapter.encode_image(adapter.preprocess(item.image)), item.question)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert {layer.keys.dtype for layer in state.cache.layers} == {torch.bfloat16}
    window = adapter.forward(state, torch.tensor([int(logits.argmax()), 3, 5]))
    assert window.shape == (3, adapter.vocab_size) and window.dtype == torch.float32


@pytest.mark.parametrize("build", [tiny_models.build_llava, tiny_models.build_qwen2_5_vl, tiny_models.build_idefics3],
                         ids=["llava", "qwen2_5_vl", "idefics3"])
def test_every_family_batches_in_bf16_as_it_decodes_alone(build, tmp_path) -> None:
    """The batched passes (our attention function, its masks) of a bf16 target: the prefills' and each
    window's logits match that session's own bf16 passes to bf16 rounding, and the caches stay bf16."""
    adapter = place_target(load_adapter(build(tmp_path / "m")), dtype="bfloat16")
    image = tiny_models_image()
    visual = adapter.encode_image(adapter.preprocess(image))
    prompts = ["what is the color of the circle ?", "describe this image ."]
    prefills = [adapter.prefill(visual, p) for p in prompts]
    alone = [state for _, state in prefills]
    batched = [state for _, state in prefill_batch(adapter, [adapter.prefill_inputs(visual, p) for p in prompts])]
    for (logits, _), (batched_logits, _) in zip(prefills, prefill_batch(adapter, [adapter.prefill_inputs(visual, p)
                                                                                for p in prompts]), strict=True):
        assert batched_logits.dtype == torch.float32 and batched_logits.device.type == "cpu"
        torch.testing.assert_close(batched_logits, logits, atol=0.05 * float(logits.abs().max()) + 1e-3, rtol=0.05)
    windows = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    expected = [adapter.forward(state, ids) for state, ids in zip(alone, windows, strict=True)]
    got = forward_batch(adapter, batched, windows)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=0.05 * float(e.abs().max()) + 1e-3, rtol=0.05)
    assert {layer.keys.dtype for s in batched for layer in s.cache.layers} == {torch.bfloat16}


def tiny_models_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))


class RunningEdge:
    """An EdgeServer serving from a thread (tests/scenarios/test_runtimes.py's, with placement settings)."""

    def __init__(self, **settings):
        target, _ = load_target(default_target_path(), dtype=settings.get("dtype", "float32"))
        self.server = EdgeServer(target, EdgeSettings(bind="tcp://127.0.0.1:*", **settings))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.server.serve_once(timeout_s=0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()


def answers_by_mode(dtype: str, modes: tuple[str, ...], n: int, max_new_tokens: int = 24,
                    **settings) -> dict[str, list]:
    """mode -> the demo pair's answers (device.answer) to n held-out prompts, the edge in `dtype` (and
    other EdgeSettings)."""
    edge = RunningEdge(dtype=dtype, **settings)
    device = DeviceRuntime(load_adapter(default_draft_path()), edge.server.endpoint, timeout_s=60)
    try:
        out: dict[str, list] = {mode: [] for mode in modes}
        for item in sample_split("heldout", n, seed=0):
            for mode in modes:
                out[mode].append(device.answer(png_bytes(item.image), item.question, mode, SamplingParams(),
                                               max_new_tokens=max_new_tokens, window=4))
        return out
    finally:
        device.close()
        edge.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_covspec_equals_the_same_edges_target_only_answers(dtype) -> None:
    answers = answers_by_mode(dtype, ("target_only", "covspec", "covspec_no_adaptive"), HELD_OUT)
    reference = [a.ids for a in answers["target_only"]]
    assert all(reference), "every target_only answer has tokens"
    for mode in ("covspec", "covspec_no_adaptive"):
        assert [a.ids for a in answers[mode]] == reference, f"{dtype}: {mode} differs from target_only"
    assert sum(len(a.rounds) for a in answers["covspec_no_adaptive"]) >= HELD_OUT, "windows were verified"
