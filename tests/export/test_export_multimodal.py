"""The device .pte in ExecuTorch's multimodal layout, on the tiny LLaVA checkpoints.

Fast: the runner tokenizer (same ids as the checkpoint's), refusals of corrupt program files.
Slow (one export per tiny model, ~1-2 min each on a loaded 2-core machine): ExecuTorch's own
MultimodalRunner (the wheel's C++ runner) loads our model.pte and gives our runtime's greedy text;
fp32 greedy tokens equal eager on 24 prompt/image pairs per model (max logit difference printed);
a pruned prefill at 50% kept equals eager's; a corrupt model.pte / decoder.onnx consistent with its
manifest is refused with an error naming the file, never an abort.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_llava

from covspec.bundles.bundle import BundleError
from covspec.bundles.manifest import MANIFEST, write_manifest
from covspec.models.draft import as_draft

DEMO_DRAFT = Path(__file__).resolve().parents[2] / "covspec" / "demo" / "weights" / "draft"
PROMPTS = ["what is the color ?", "how many circle are there ?", "describe the image .", "is there a red square ?",
           "where is the circle ?", "what shape is in the image ?", "is there a blue triangle ?", "how many are there ?"]
COLORS = [(200, 30, 30), (10, 200, 30), (30, 30, 220)]
TEXTS = [*PROMPTS, "USER: <image> what is the color ? ASSISTANT:", "yes , two", "a red circle . top left",
         "green blue square triangle", "</s> <s> what"]


def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 36), c) for c in COLORS]


# --- the runner tokenizer -------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["tiny", "demo"])
def test_runner_tokenizer_keeps_the_ids_and_the_text(source: str, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from covspec.export.runner_tokenizer import RUNNER_TOKENIZER, write_runner_tokenizer

    folder = build_llava(tmp_path / "llava") if source == "tiny" else DEMO_DRAFT
    entry = write_runner_tokenizer(folder, tmp_path)
    assert entry == {"file": RUNNER_TOKENIZER, "from": "WordLevel",
                     "how": "WordLevel vocabulary as BPE without merges (same ids)"}
    spec = json.loads((tmp_path / RUNNER_TOKENIZER).read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["merges"] == []
    assert {p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]} == {"Split", "ByteLevel"}
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    runner = Tokenizer.from_file(str(tmp_path / RUNNER_TOKENIZER))
    words = [t for t in original.get_vocab() if t.isalpha()]
    for text in [*TEXTS, " ".join(words)]:
        ids = original.encode(text).ids
        assert runner.encode(text).ids == ids, text
        assert runner.decode(ids).strip() == original.decode(ids), text


# --- corrupt program files ----------------------------------------------------------------------------
def test_a_pte_without_the_header_is_refused_naming_the_file(tmp_path: Path) -> None:
    from covspec.bundles.checks import check_pte_file

    bad = tmp_path / "model.pte"
    bad.write_bytes(b"\x00" * 300)
    with pytest.raises(BundleError, match=r"model\.pte: no ExecuTorch program header.*re-export the bundle"):
        check_pte_file(bad)
    bad.write_bytes(b"\x10\x00\x00\x00ET12eh00 \x00\x00\x00" + (10**6).to_bytes(8, "little") + b"\x00" * 100)
    with pytest.raises(BundleError, match=r"model\.pte: its header says 1000000 program bytes"):
        check_pte_file(bad)


def test_a_corrupt_onnx_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    from covspec.bundles.programs import ort_session

    bad = tmp_path / "decoder.onnx"
    bad.write_bytes(b"\x08\x07\x12\xff\xff garbage" * 50)
    with pytest.raises(BundleError, match=r"decoder\.onnx: ONNX Runtime cannot load it \(.*re-export the bundle"):
        ort_session(bad)


# --- exported bundles (slow) -----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["clip_llama", "siglip_qwen2"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from covspec.export.device_bundle import build_device_bundle

    root = tmp_path_factory.mktemp(request.param)
    tiny = build_llava(root / "llava", siglip_qwen2=request.param == "siglip_qwen2")
    return tiny, build_device_bundle(tiny, root / "device", quant="none", formats=("pte", "onnx"), max_len=96)


@pytest.mark.slow
def test_the_pte_has_the_multimodal_layout(exported: tuple[Path, Path]) -> None:
    from executorch.runtime import Runtime

    from covspec.bundles.bundle import load_bundle
    from covspec.export.cached_decoder import load_custom_ops

    manifest = load_bundle(exported[1]).manifest
    entry = manifest["programs"]["pte"]
    assert entry["model"] == "model.pte" and entry["layout"] == "executorch-multimodal"
    assert manifest["runner_tokenizer"]["file"] == "runner_tokenizer.json"
    load_custom_ops()
    program = Runtime.get().load_program(exported[1] / "model.pte")
    assert {"vision_encoder", "token_embedding", "text_decoder", "covspec_decoder", "get_max_seq_len",
            "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids", "use_kv_cache"} <= program.method_names
    assert program.load_method("get_max_seq_len").execute([]) == [96]
    assert program.load_method("get_eos_ids").execute([]) == manifest["eos_token_ids"]


def runner_text(runner, adapter, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
    """ExecuTorch's MultimodalRunner, greedy, on our prompt's token ids and our preprocessed pixels."""
    from executorch.extension.llm.runner import GenerationConfig, make_image_input, make_token_input

    pixels = torch.from_numpy(adapter.preprocess(image)["pixel_values"][0])  # [3, H, W]
    n = int(adapter.bundle.manifest["vision"]["tokens"])
    ids = adapter.prompt_ids(prompt, n)
    first = ids.index(adapter.image_token_id)
    inputs = [make_token_input(ids[:first]), make_image_input(pixels), make_token_input(ids[first + n:])]
    runner.reset()  # a new conversation: the runner's position back to 0
    return runner.generate_text(inputs, GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0))


def tolerance(exported: tuple[Path, Path], backend: str) -> float:
    """Max |logit difference| to eager: 1e-4, but 5e-3 for the SigLIP tower through XNNPACK, whose fp32
    kernels (likely its tanh-approximated GELU) move the visual tokens by ~2e-4 (ONNX Runtime: 4e-6)."""
    return 5e-3 if backend == "executorch" and "siglip" in exported[0].parent.name else 1e-4


def visible_words(text: str, specials: list[str]) -> list[str]:
    """The words of a decoded text without special tokens (our decode skips them, the runner prints them)."""
    for special in specials:
        text = text.replace(special, " ")
    return text.split()


@pytest.mark.slow
def test_executorch_multimodal_runner_gives_our_greedy_text(exported: tuple[Path, Path]) -> None:
    """The runner decodes through token_embedding + text_decoder, we through covspec_decoder. The runner
    samples among the tokenizer's ids only, while the tiny models' logits also cover padded embedding
    rows (vocab_size = tokenizer + 8) that random weights sometimes rank first: texts are compared up to
    our first such token (or EOS)."""
    from executorch.extension.llm.runner import MultimodalRunner

    from covspec.bundles.adapter import BundleAdapter
    from covspec.generation import generate

    ours = BundleAdapter(exported[1], backend="executorch")
    runner = MultimodalRunner(str(exported[1] / "model.pte"), str(exported[1] / "runner_tokenizer.json"))
    specials = list(ours.tokenizer.all_special_tokens)
    compared = 0
    for image in images():
        for prompt in PROMPTS[:3]:
            ids = generate(ours, image, prompt, max_new_tokens=12).ids
            n = next((i for i, t in enumerate(ids) if t >= len(ours.tokenizer) or t in ours.eos_token_ids), len(ids))
            if n == 0:
                continue
            theirs = runner_text(runner, ours, image, prompt, max_new_tokens=n)
            assert visible_words(theirs, specials) == ours.decode(ids[:n]).split(), (prompt, theirs)
            compared += n
    print(f"{exported[0].parent.name}: {compared} greedy tokens of the C++ MultimodalRunner equal ours")
    assert compared >= 20


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_fp32_greedy_equals_eager_on_24_prompts(exported: tuple[Path, Path], backend: str) -> None:
    from covspec.bundles.adapter import BundleAdapter
    from covspec.generation import generate
    from covspec.models import load_adapter

    eager, ours = as_draft(load_adapter(exported[0])), BundleAdapter(exported[1], backend=backend)  # numpy both
    worst, pairs = 0.0, 0
    for image in images():
        for prompt in PROMPTS:
            assert generate(ours, image, prompt, max_new_tokens=16).ids == generate(eager, image, prompt,
                                                                                   max_new_tokens=16).ids
            la, _ = eager.prefill(eager.encode_image(eager.preprocess(image)), prompt)
            lb, _ = ours.prefill(ours.encode_image(ours.preprocess(image)), prompt)
            worst, pairs = max(worst, float(np.abs(la - lb).max())), pairs + 1
    print(f"{exported[0].parent.name} {backend}: {pairs} prompt/image pairs, max |logit diff| {worst:.2e}")
    assert pairs >= 20 and worst < tolerance(exported, backend)


@pytest.mark.slow
def test_pruned_prefill_at_half_kept_equals_eager_then_forks_and_rolls_back(exported: tuple[Path, Path]) -> None:
    from covspec.bundles.adapter import BundleAdapter
    from covspec.models import load_adapter

    eager, ours = as_draft(load_adapter(exported[0])), BundleAdapter(exported[1], backend="executorch")  # numpy both
    for image in images():
        va, vb = eager.encode_image(eager.preprocess(image)), ours.encode_image(ours.preprocess(image))
        atol = tolerance(exported, "executorch")
        assert np.allclose(va.embeds, vb.embeds, atol=atol) and np.allclose(va.activity, vb.activity, atol=atol)
        kept = np.sort(np.random.default_rng(0).permutation(va.count)[: va.count // 2])
        la, sa = eager.prefill(va, PROMPTS[1], kept=kept)
        lb, sb = ours.prefill(vb, PROMPTS[1], kept=kept)
        assert np.abs(la - lb).max() < atol
        fa, fb = eager.fork_state(sa), ours.fork_state(sb)  # a branch, then both run interleaved
        window, other = np.array([5, 9, 12, 7]), np.array([11, 4])
        assert np.abs(eager.forward(sa, window) - ours.forward(sb, window)).max() < atol
        assert np.abs(eager.forward(fa, other) - ours.forward(fb, other)).max() < atol
        eager.truncate(sa, sa.length - 3)
        ours.truncate(sb, sb.length - 3)
        assert np.abs(eager.forward(sa, other) - ours.forward(sb, other)).max() < atol
        assert np.abs(eager.forward(fa, window) - ours.forward(fb, window)).max() < atol


def corrupt_consistently(folder: Path, name: str) -> None:
    """Flips bytes of folder/name's structure (from byte 1000: the flatbuffer tables of a .pte, the
    protobuf fields of an .onnx; flipped weights would load and only compute garbage) and rewrites
    the manifest so that it matches."""
    data = bytearray((folder / name).read_bytes())
    for i in range(1000, 3000, 7):
        data[i] ^= 0xA5
    (folder / name).write_bytes(bytes(data))
    manifest = json.loads((folder / MANIFEST).read_text())
    body = {k: v for k, v in manifest.items() if k not in ("format_version", "tools", "files")}
    write_manifest(folder, body)


@pytest.mark.slow
@pytest.mark.parametrize("backend,name", [("executorch", "model.pte"), ("onnx", "decoder.onnx")])
def test_corrupt_program_consistent_with_its_manifest_is_refused(exported: tuple[Path, Path], tmp_path: Path,
                                                                 backend: str, name: str) -> None:
    """In a child process, so that an abort would show as its exit status rather than end the tests."""
    import shutil

    folder = tmp_path / "device"
    shutil.copytree(exported[1], folder)
    corrupt_consistently(folder, name)
    code = ("import sys\nfrom covspec.bundles.adapter import BundleAdapter\nfrom covspec.bundles.bundle import BundleError\n"
            f"try:\n    BundleAdapter({str(folder)!r}, backend={backend!r})\nexcept BundleError as err:\n"
            "    print('REFUSED', err)\n    sys.exit(3)\nprint('LOADED')\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert child.returncode == 3, (child.returncode, child.stdout[-2000:], child.stderr[-2000:])
    assert f"{name}:" in child.stdout and "re-export the bundle" in child.stdout


def test_an_old_format_bundle_is_refused_with_the_fix(tmp_path: Path) -> None:
    from covspec.bundles.bundle import load_bundle

    (tmp_path / "vision.pte").write_bytes(b"old")
    write_manifest(tmp_path, {"kind": "device", "programs": {"pte": {"vision": "vision.pte"}}})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(BundleError, match=r"format version 1 \(version 1: vision\.pte \+ decoder\.pte.*"
                                          r"covspec export --draft DRAFT --target TARGET --out OUT"):
        load_bundle(tmp_path)


@pytest.mark.slow
def test_onnxruntime_genai_loads_the_text_decoder(exported: tuple[Path, Path]) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (optional)")
    from covspec.models import load_adapter

    eager = load_adapter(exported[0])
    model = og.Model(str(exported[1]))
    for prompt in PROMPTS[:4]:
        ids = eager.tokenizer(prompt)["input_ids"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 10, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        got = []
        while not generator.is_done():
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        with torch.no_grad():
            reference = eager.model.generate(input_ids=torch.tensor([ids]), max_length=len(ids) + 10, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert got == reference[: len(got)] and got, prompt
