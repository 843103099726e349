"""ExecuTorch's own MultimodalRunner (the executorch wheel's Python bindings of the C++ runner Android
uses) on the Idefics3 (SmolVLM) and Qwen2.5-VL device bundles, against our runtime (`BundleAdapter`,
numpy in/out). tests/export/test_export_multimodal.py does the same for the LLaVA bundles.

Slow (one .pte export per family, ~1-2 min each):
- both families: the runner loads model.pte (metadata methods, token_embedding, text_decoder,
  vision_encoder) and its greedy text on text-only prompts (token_embedding + text_decoder at RoPE
  position = cache slot, which is also Qwen's M-RoPE for text alone: the three rows equal) equals ours;
- idefics3: with an image (our prompt ids split around the image tokens, our preprocessed [3, S, S]
  pixels through make_image_input) the runner's greedy text equals ours;
- qwen2_5_vl: the runner cannot run the image, and the test holds that it cannot (so that it says so
  if a later ExecuTorch can): its image path makes a [3, H, W] (or [1, 3, H, W]) tensor of an RGB
  image, while our vision_encoder takes the patches [P, C*t*p*p]; and its text_decoder calls pass 1-D
  cache positions (slot = position), while image tokens need M-RoPE positions [3, k] (temporal, row,
  column) and the text after them positions shifted by rope_delta. The manifest's limits say so.

The runner samples among the tokenizer's ids only, while the tiny models' logits also cover padded
embedding rows that random weights sometimes rank first: texts are compared up to our first such token
(or EOS), special tokens left out (our decode skips them, the runner prints them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_idefics3, build_qwen2_5_vl

PROMPTS = ["what is the color ?", "how many circle are there ?", "describe the image .", "is there a red square ?",
           "what shape is in the image ?", "where is it ?"]
SIZES = [(40, 36), (112, 112), (200, 90)]  # (width, height): smaller, equal, wider
BUILDERS = {"idefics3": build_idefics3, "qwen2_5_vl": build_qwen2_5_vl}
MAX_NEW = 12


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A noisy image with a coloured square (as tests/export/test_bundle_families.py)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


def images() -> list[Image.Image]:
    return [picture(size, seed) for seed, size in enumerate(SIZES)]


@pytest.fixture(scope="module", params=list(BUILDERS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from conftest import tiny_family_export

    return tiny_family_export(request.param, tmp_path_factory)[1], request.param


def open_both(folder: Path):
    from executorch.extension.llm.runner import MultimodalRunner

    from covspec.bundles.adapter import BundleAdapter

    ours = BundleAdapter(folder, backend="executorch")
    return ours, MultimodalRunner(str(folder / "model.pte"), str(folder / "runner_tokenizer.json"))


def generate_text(runner, inputs: list, max_new_tokens: int) -> str:
    from executorch.extension.llm.runner import GenerationConfig

    runner.reset()  # a new conversation: the runner's position back to 0
    return runner.generate_text(inputs, GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0))


def compared_length(ours, ids: list[int]) -> int:
    """Our tokens up to the first EOS or padded-vocabulary token (which the runner never samples)."""
    return next((i for i, t in enumerate(ids) if t >= len(ours.tokenizer) or t in ours.eos_token_ids), len(ids))


def visible_words(text: str, specials: list[str]) -> list[str]:
    for special in specials:
        text = text.replace(special, " ")
    return text.split()


def text_only_ids(ours, prompt: str) -> list[int]:
    """The family's chat prompt without an image."""
    from covspec.models.common import encode_text

    if ours.family == "qwen2_5_vl":
        from covspec.models.qwen2_5_vl import SYSTEM_PROMPT

        text = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")
    else:
        text = f"<|im_start|>User:{prompt}<end_of_utterance>\nAssistant:"
    return encode_text(ours.tokenizer, text)


def our_text_only_greedy(ours, ids: list[int], max_new_tokens: int) -> list[int]:
    """Our runtime's greedy tokens after a prompt without an image: RoPE position = slot (Qwen: the same
    position on the three M-RoPE rows, get_rope_index's for text alone; rope_delta 0)."""
    t = len(ids)
    state = ours.new_state()
    positions = np.arange(t, dtype=np.int64)
    if ours.family == "qwen2_5_vl":
        state.extra["rope_delta"] = 0
        positions = np.ascontiguousarray(np.broadcast_to(positions, (3, t)))
    logits = ours._run(state, np.asarray(ids, dtype=np.int64), np.zeros((t, ours.hidden), dtype=np.float32),
                       np.zeros(t, dtype=np.bool_), positions)[-1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        out.append(int(logits.argmax()))
        logits = ours.forward(state, np.array(out[-1:]))[-1]
    return out


@pytest.mark.slow
def test_the_runner_loads_each_family_pte(exported: tuple[Path, str]) -> None:
    from executorch.runtime import Runtime

    from covspec.export.cached_decoder import load_custom_ops

    folder, family = exported
    load_custom_ops()
    program = Runtime.get().load_program(folder / "model.pte")
    assert {"vision_encoder", "token_embedding", "text_decoder", "covspec_decoder", "get_max_seq_len",
            "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids", "use_kv_cache"} <= program.method_names
    ours, runner = open_both(folder)
    assert program.load_method("get_eos_ids").execute([]) == ours.bundle.manifest["eos_token_ids"]
    from executorch.extension.llm.runner import make_token_input

    assert generate_text(runner, [make_token_input(text_only_ids(ours, PROMPTS[0]))], 2)  # it runs


@pytest.mark.slow
def test_the_runner_gives_our_greedy_text_on_text_only_prompts(exported: tuple[Path, str]) -> None:
    from executorch.extension.llm.runner import make_token_input

    folder, family = exported
    ours, runner = open_both(folder)
    specials = list(ours.tokenizer.all_special_tokens)
    compared, pairs = 0, 0
    for prompt in PROMPTS:
        ids = text_only_ids(ours, prompt)
        mine = our_text_only_greedy(ours, ids, MAX_NEW)
        n = compared_length(ours, mine)
        if n == 0:
            continue
        theirs = generate_text(runner, [make_token_input(ids)], n)
        assert visible_words(theirs, specials) == ours.decode(mine[:n]).split(), (family, prompt, theirs)
        compared, pairs = compared + n, pairs + 1
    print(f"{family}: text-only, {compared} greedy tokens on {pairs} prompts of the C++ MultimodalRunner equal ours")
    assert compared >= 15


@pytest.mark.slow
def test_the_runner_gives_our_greedy_text_with_an_image(exported: tuple[Path, str]) -> None:
    from executorch.extension.llm.runner import make_image_input, make_token_input

    from covspec.generation import generate

    folder, family = exported
    if family == "qwen2_5_vl":
        pytest.skip("qwen2_5_vl: the runner's image path gives vision_encoder a [3, H, W] image (ours takes "
                    "the patches [P, C*t*p*p]) and text_decoder 1-D cache positions (image tokens need M-RoPE "
                    "[3, k] and the text after them a rope_delta shift): see "
                    "test_the_runner_cannot_run_a_qwen_image")
    ours, runner = open_both(folder)
    specials = list(ours.tokenizer.all_special_tokens)
    n_visual = int(ours.bundle.manifest["vision"]["tokens"])
    compared, pairs = 0, 0
    for image in images():
        pixels = torch.from_numpy(ours.preprocess(image)["pixel_values"][0])  # [3, S, S]
        for prompt in PROMPTS[:4]:
            mine = generate(ours, image, prompt, max_new_tokens=MAX_NEW).ids
            n = compared_length(ours, mine)
            if n == 0:
                continue
            ids = ours.prompt_ids(prompt, n_visual)
            first = ids.index(ours.image_token_id)
            inputs = [make_token_input(ids[:first]), make_image_input(pixels), make_token_input(ids[first + n_visual:])]
            theirs = generate_text(runner, inputs, n)
            assert visible_words(theirs, specials) == ours.decode(mine[:n]).split(), (family, image.size, prompt)
            compared, pairs = compared + n, pairs + 1
    print(f"{family}: with an image, {compared} greedy tokens on {pairs} prompt/image pairs of the C++ "
          "MultimodalRunner equal ours")
    assert compared >= 20


@pytest.mark.slow
def test_the_runner_cannot_run_a_qwen_image(exported: tuple[Path, str]) -> None:
    """What stops it, held so that a later ExecuTorch that can is noticed; the manifest says it."""
    from executorch.extension.llm.runner import make_image_input, make_token_input

    folder, family = exported
    if family != "qwen2_5_vl":
        pytest.skip("only Qwen2.5-VL's vision_encoder takes patches and its decoder M-RoPE positions")
    ours, runner = open_both(folder)
    assert any("MultimodalRunner" in line for line in ours.bundle.manifest["limits"])
    patches = torch.from_numpy(ours.preprocess(images()[0])["pixel_values"])  # [P, C*t*p*p]
    with pytest.raises(RuntimeError, match="must be 3-dimensional"):
        make_image_input(patches)
    with pytest.raises(RuntimeError, match="3 \\(RGB\\) or 4 \\(RGBA\\) channels"):
        make_image_input(patches[None])
    n = int(ours.bundle.manifest["vision"]["tokens"])
    ids = ours.prompt_ids(PROMPTS[0], n)
    first = ids.index(ours.image_token_id)
    as_rgb = make_image_input(patches.reshape(3, patches.shape[0], -1))  # the same floats as a 3-channel image
    with pytest.raises(RuntimeError, match="Generation failed"):  # vision_encoder's input is rank 2, not 3
        generate_text(runner, [make_token_input(ids[:first]), as_rgb, make_token_input(ids[first + n:])], 2)
