"""Exports of the other families on their tiny checkpoints (slow: one export each).

Idefics3 (SmolVLM) and Qwen2.5-VL (fixed grid: 112 x 112 images, M-RoPE positions as decoder inputs):
the device bundle's model.pte and ONNX programs, run through the bundle's program runners
(covspec.bundles.programs) on the eager adapter's prompt (the bundle runtime itself runs LLaVA
bundles only), give eager's visual tokens and eager's fp32 greedy tokens on 24 prompt/image pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_idefics3, build_qwen2_5_vl

from covspec.models.base import DecodeState, VisualTokens

PROMPTS = ["what is the color ?", "how many circle are there ?", "describe the image .", "is there a red square ?",
           "what shape is in the image ?", "is there a blue triangle ?", "how many are there ?", "where is it ?"]
COLORS = [(200, 30, 30), (10, 200, 30), (30, 30, 220)]


def greedy_eager(eager, visual: VisualTokens, prompt: str, n: int) -> list[int]:
    logits, state = eager.prefill(visual, prompt)
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = eager.forward(state, torch.tensor(out[-1:]))[-1]
    return out


def greedy_programs(programs, eager, visual: VisualTokens, prompt: str, n: int) -> tuple[list[int], torch.Tensor]:
    """The exported decoder (numpy in and out) on the eager adapter's prefill inputs (embeds, unpruned positions)."""
    inputs = eager.prefill_inputs(visual, prompt)
    t = int(inputs.embeds.shape[0])
    state = DecodeState(cache=programs.new_cache(), length=0)
    logits = programs.decoder(state, np.zeros((1, t), dtype=np.int64), inputs.embeds[None].float().numpy(),
                              np.ones((1, t), dtype=np.bool_), flat_positions(inputs.positions).numpy(), 0)[0]  # [T, V]
    first = torch.from_numpy(logits[-1].copy())
    out, length = [], t
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        pos = eager._positions(DecodeState(cache=None, length=length, extra=dict(inputs.extra)), 1)  # [1|3, (1,) 1]
        logits = programs.decoder(state, np.asarray([out[-1:]], dtype=np.int64),
                                  np.zeros((1, 1, inputs.embeds.shape[1]), dtype=np.float32),
                                  np.zeros((1, 1), dtype=np.bool_), flat_positions(pos).numpy(), length)[0]
        length += 1
    return out, first


def flat_positions(positions: torch.Tensor) -> torch.Tensor:
    """[1, k] -> [k]; M-RoPE [3, 1, k] -> [3, k]."""
    return positions[:, 0] if positions.dim() == 3 else positions[0]


BUILDERS = {"idefics3": (build_idefics3, (40, 36)), "qwen2_5_vl": (build_qwen2_5_vl, (112, 112))}


@pytest.fixture(scope="module", params=list(BUILDERS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    from covspec.export.device_bundle import build_device_bundle

    root = tmp_path_factory.mktemp(request.param)
    tiny = BUILDERS[request.param][0](root / request.param)
    return tiny, build_device_bundle(tiny, root / "device", quant="none", formats=("pte", "onnx"),
                                     max_len=96), request.param


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_exported_programs_equal_eager(exported: tuple[Path, Path, str], backend: str) -> None:
    from covspec.bundles.bundle import load_bundle
    from covspec.bundles.programs import open_programs
    from covspec.models import load_adapter

    tiny, folder, family = exported
    bundle = load_bundle(folder)
    assert bundle.manifest["family"] == family and bundle.manifest["unsupported"] == {}
    programs = open_programs(backend, bundle)
    eager = load_adapter(tiny)
    worst, pairs = 0.0, 0
    for color in COLORS:
        pixels = eager.preprocess(Image.new("RGB", BUILDERS[family][1], color))
        reference = eager.encode_image(pixels)
        embeds, activity, *attention = (torch.from_numpy(np.array(a)) for a in
                                        programs.vision(pixels["pixel_values"].numpy()))  # the programs take numpy
        assert torch.allclose(embeds, reference.embeds, atol=1e-5)
        assert torch.allclose(activity, reference.activity, atol=1e-4)
        if reference.attention is not None:
            assert torch.allclose(attention[0], reference.attention, atol=1e-5)
        visual = VisualTokens(embeds=embeds, activity=activity, attention=attention[0] if attention else None,
                              grid=reference.grid)
        for prompt in PROMPTS:
            ours, first = greedy_programs(programs, eager, visual, prompt, 12)
            assert ours == greedy_eager(eager, reference, prompt, 12), prompt
            worst = max(worst, float((first - eager.prefill(reference, prompt)[0]).abs().max()))
            pairs += 1
    print(f"{family} {backend}: {pairs} prompt/image pairs, max |first-logit diff| {worst:.2e}")
    assert pairs >= 20 and worst < 1e-4
