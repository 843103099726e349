"""The device runtime (`BundleAdapter`) on Idefics3 (SmolVLM) and Qwen2.5-VL bundles, against the
eager Hugging Face adapters (covspec/models/idefics3.py, qwen2_5_vl.py) on the tiny checkpoints.

Fast (no export): the bundle's per-family rules (covspec/bundles/families.py, numpy + PIL) give the
eager adapter's pixels (Idefics3 for any image size; Qwen2.5-VL for the image resized to the exported
fixed side, which is what the bundle runs any image at), its prompt ids, and its positions (Qwen: the
model's own get_rope_index M-RoPE positions, selected for the kept tokens) for full and pruned prefills
and the decode steps after them; the manifest records what the family cannot do.

Slow (one export per family, ~1-2 min each): on both backends, greedy generation equals eager's on 24
prompt/image pairs of varied image sizes (max logit difference printed); a pruned prefill at 50% kept
equals eager's, then forked branches, windows and a rollback do too; `covspec device run`'s covspec
mode over the bundle against a real edge gives target_only's answers.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_idefics3, build_qwen2_5_vl

from covspec.errors import PromptError

PROMPTS = ["what is the color ?", "how many circle are there ?", "describe the image .", "is there a red square ?",
           "what shape is in the image ?", "is there a blue triangle ?", "how many are there ?", "where is it ?"]
SIZES = [(40, 36), (112, 112), (200, 90), (64, 150)]  # (width, height): smaller, equal, wider, taller
BUILDERS = {"idefics3": build_idefics3, "qwen2_5_vl": build_qwen2_5_vl}


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A noisy image with a coloured square, so that the resize and the visual tokens matter."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


def numpy(x) -> np.ndarray:
    """The eager adapter's torch tensors and the bundle's numpy arrays, compared as numpy."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def images() -> list[Image.Image]:
    return [picture(size, seed) for seed, size in enumerate(SIZES[:3])]


def eager_image(family: str, image: Image.Image, manifest: dict) -> Image.Image:
    """The image the eager adapter sees for the same answer: Qwen2.5-VL's bundle has one fixed grid,
    so eager is given the image resized to that side (its own resize of it is then the identity)."""
    if family != "qwen2_5_vl":
        return image
    side = int(manifest["vision"]["image_side"])
    return image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


# --- fast: the per-family rules against the eager adapters -------------------------------------------
@pytest.fixture(scope="module", params=list(BUILDERS))
def described(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(family, eager adapter, rules) from a tiny checkpoint's manifest description, no export."""
    from covspec.bundles.families import rules_for
    from covspec.export.write_programs import describe_model
    from covspec.models import load_adapter
    from covspec.models.base import read_json_file

    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "tiny")
    eager = load_adapter(folder)
    info = describe_model(eager, 96, 64)
    return request.param, eager, rules_for(info, read_json_file(folder / "preprocessor_config.json"))


def test_rules_give_the_eager_pixels_for_any_image_size(described) -> None:
    family, eager, rules = described
    for seed, size in enumerate([*SIZES, (1, 1), (300, 7)]):
        image = picture(size, seed)
        ours = rules.pixels(image)
        reference = eager.preprocess(eager_image(family, image, rules.manifest))
        assert ours.dtype == np.float32 and list(ours.shape) == rules.manifest["vision"]["pixels"], size
        assert np.array_equal(ours, reference["pixel_values"].numpy()), size
        if family == "qwen2_5_vl":
            assert reference["image_grid_thw"][0].tolist() == rules.manifest["vision"]["grid_thw"]


def test_rules_give_the_eager_prompt_and_positions_pruned_or_not(described) -> None:
    from covspec.models.base import DecodeState, VisualTokens

    family, eager, rules = described
    n = int(rules.manifest["vision"]["tokens"])
    grid = rules.grid(n)
    visual = VisualTokens(embeds=torch.randn(n, rules.manifest["vision"]["hidden"]), activity=torch.rand(n),
                          grid=grid)
    rng = np.random.default_rng(0)
    for prompt in PROMPTS[:4]:
        for kept in (np.arange(n), np.sort(rng.choice(n, n // 2, replace=False)), np.array([n - 1]),
                     np.array([], dtype=np.int64)):
            ids, start = rules.prompt(eager.tokenizer, prompt, len(kept))
            assert (ids, start) == eager.prompt_ids(prompt, len(kept))
            inputs = eager.prefill_inputs(visual, prompt, torch.from_numpy(kept))
            positions, extra = rules.prefill_positions(len(ids), start, kept, n, grid)
            reference = inputs.positions[:, 0] if family == "qwen2_5_vl" else inputs.positions[0]  # [3|1, T]
            assert np.array_equal(positions, reference.numpy()) and extra == inputs.extra, (prompt, kept)
            for length in (len(ids), len(ids) + 5):
                step = eager._positions(DecodeState(cache=None, length=length, extra=extra), 3)
                step = step[:, 0] if family == "qwen2_5_vl" else step[0]
                assert np.array_equal(rules.step_positions(length, extra, 3), step.numpy())
    placeholder = "<image>" if family == "idefics3" else "<|vision_start|>"
    with pytest.raises(PromptError, match="placeholder"):
        rules.prompt(eager.tokenizer, f"what is {placeholder} here ?", n)


def test_the_manifest_records_what_the_family_cannot_do(described) -> None:
    family, _, rules = described
    limits = " ".join(rules.manifest["limits"])
    expected = "no native resolution" if family == "qwen2_5_vl" else "no image splitting"
    assert expected in limits and rules.limits == rules.manifest["limits"]
    assert rules.image_token_id in rules.placeholder_ids and len(rules.placeholder_ids) >= 3


# --- slow: exported bundles ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(BUILDERS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    from conftest import tiny_family_export

    return (*tiny_family_export(request.param, tmp_path_factory), request.param)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_bundle_greedy_equals_eager_on_24_pairs(exported: tuple[Path, Path, str], backend: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from covspec.bundles.adapter import BundleAdapter, _announced
    from covspec.generation import generate
    from covspec.models import load_adapter

    tiny, folder, family = exported
    _announced.clear()
    with caplog.at_level("INFO", logger="covspec.bundles"):
        ours = BundleAdapter(folder, backend=backend)
        for adapter in (ours, BundleAdapter(folder, backend=backend)):  # a second load says nothing more
            adapter.preprocess(images()[0])
            adapter.preprocess(images()[1])
    notices = [r.getMessage() for r in caplog.records if r.name == "covspec.bundles"]
    assert len(notices) == 1 and family in notices[0] and "no " in notices[0], notices
    eager = load_adapter(tiny)
    worst, pairs, answers = 0.0, 0, set()
    for image in images():
        reference_image = eager_image(family, image, ours.bundle.manifest)
        va, vb = eager.encode_image(eager.preprocess(reference_image)), ours.encode_image(ours.preprocess(image))
        assert np.allclose(numpy(va.embeds), numpy(vb.embeds), atol=1e-5) and va.grid == vb.grid
        for prompt in PROMPTS:
            ids = generate(ours, image, prompt, max_new_tokens=16).ids
            assert ids == generate(eager, reference_image, prompt, max_new_tokens=16).ids, (image.size, prompt)
            answers.add(tuple(ids))
            la, sa = eager.prefill(va, prompt)
            lb, sb = ours.prefill(vb, prompt)
            window = ids[:4] or [5]
            step = numpy(eager.forward(sa, torch.tensor(window))) - ours.forward(sb, np.array(window))
            worst = max(worst, float(np.abs(numpy(la) - lb).max()), float(np.abs(step).max()))
            pairs += 1
    print(f"{family} {backend}: {pairs} prompt/image pairs (sizes {[i.size for i in images()]}), "
          f"{len(answers)} distinct answers, max |logit diff| {worst:.2e}")
    assert pairs >= 20 and worst < 1e-4 and len(answers) > 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_pruned_prefill_at_half_kept_equals_eager_then_forks_and_rolls_back(exported: tuple[Path, Path, str],
                                                                           backend: str) -> None:
    from covspec.bundles.adapter import BundleAdapter
    from covspec.models import load_adapter

    tiny, folder, family = exported
    eager, ours = load_adapter(tiny), BundleAdapter(folder, backend=backend)
    worst = 0.0
    for seed, image in enumerate(images()):
        va = eager.encode_image(eager.preprocess(eager_image(family, image, ours.bundle.manifest)))
        vb = ours.encode_image(ours.preprocess(image))
        kept = torch.randperm(va.count, generator=torch.Generator().manual_seed(seed))[: va.count // 2].sort().values
        la, sa = eager.prefill(va, PROMPTS[1], kept=kept)
        lb, sb = ours.prefill(vb, PROMPTS[1], kept=kept.numpy())
        la = numpy(la)
        assert int(la.argmax()) == int(lb.argmax()) and sa.extra == sb.extra and sa.length == sb.length
        diffs = [np.abs(la - lb).max()]
        fa, fb = eager.fork_state(sa), ours.fork_state(sb)  # a branch, then both run interleaved
        window, other = [int(la.argmax()), 9, 12, 7], [11, 4]

        def step(eager_state, our_state, ids: list[int]) -> float:
            return float(np.abs(numpy(eager.forward(eager_state, torch.tensor(ids)))
                                - ours.forward(our_state, np.array(ids))).max())

        diffs += [step(sa, sb, window), step(fa, fb, other)]
        eager.truncate(sa, sa.length - 3)
        ours.truncate(sb, sb.length - 3)
        diffs += [step(sa, sb, other), step(fa, fb, window)]
        worst = max(worst, *(float(d) for d in diffs))
    print(f"{family} {backend}: pruned prefill (50% kept), fork, rollback: max |logit diff| {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.slow
def test_device_run_over_the_bundle_equals_target_only(exported: tuple[Path, Path, str]) -> None:
    """`covspec device run --bundle DIR` (ExecuTorch) against an edge serving the checkpoint: greedy
    covspec (adaptive, and fixed windows) gives target_only's answers."""
    from covspec.bundles.adapter import BundleAdapter
    from covspec.device_runtime.client import DeviceRuntime
    from covspec.edge_runtime.server import EdgeServer, EdgeSettings
    from covspec.edge_runtime.target import load_target
    from covspec.images import png_bytes
    from covspec.sampling import SamplingParams

    tiny, folder, family = exported
    target, _ = load_target(tiny)
    server = EdgeServer(target, EdgeSettings(bind="tcp://127.0.0.1:*"))
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [server.serve_once(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    device = DeviceRuntime(BundleAdapter(folder, backend="executorch"), server.endpoint, timeout_s=60)
    rounds = 0
    try:
        for image in images()[1:]:
            for prompt in PROMPTS[:2]:
                answers = {mode: device.answer(png_bytes(image), prompt, mode, SamplingParams(), max_new_tokens=12)
                           for mode in ("target_only", "covspec", "covspec_no_adaptive")}
                reference = answers["target_only"].ids
                assert reference and answers["covspec"].ids == reference, (family, image.size, prompt)
                assert answers["covspec_no_adaptive"].ids == reference, (family, image.size, prompt)
                rounds += len(answers["covspec_no_adaptive"].rounds)
    finally:
        device.close()
        stop.set()
        thread.join()
        server.close()
    print(f"{family}: covspec over the bundle equals target_only on 4 answers ({rounds} verified windows)")
    assert rounds >= 4
