"""Export and the exported device runtime, on tiny LLaVA checkpoints.

Fast: the bundle loader's refusals, the edge backend choice, unsupported families.
Slow (export takes ~1 min per bundle on a loaded 2-core machine): .pte / ONNX parity with the eager
adapter through covspec.generation.generate, int8 agreement, the manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_llava, build_qwen2_5_vl

from covspec.bundles.bundle import BundleError, load_bundle
from covspec.bundles.manifest import FORMAT_VERSION, MANIFEST, sha256_file, write_manifest
from covspec.models.draft import as_draft

PROMPTS = ["what is the color ?", "how many circle are there ?", "describe the image .", "is there a red square ?"]
COLORS = [(200, 30, 30), (10, 200, 30), (30, 30, 220)]


def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 36), c) for c in COLORS]


# --- the loader -----------------------------------------------------------------------------------
@pytest.fixture
def fake_bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "decoder.pte").write_bytes(bytes(range(256)) * 8)
    (folder / "vision.pte").write_bytes(b"vision" * 100)
    (folder / "tokenizer.json").write_text("{}")
    write_manifest(folder, {"kind": "device", "family": "llava",
                            "programs": {"pte": {"vision": "vision.pte", "decoder": "decoder.pte"}}})
    return folder


def test_intact_bundle_loads(fake_bundle: Path) -> None:
    bundle = load_bundle(fake_bundle)
    assert bundle.manifest["format_version"] == FORMAT_VERSION
    assert bundle.manifest["files"]["decoder.pte"]["sha256"] == sha256_file(fake_bundle / "decoder.pte")
    assert bundle.program("pte", "decoder") == fake_bundle / "decoder.pte"
    with pytest.raises(BundleError, match="no onnx programs"):
        bundle.program("onnx", "decoder")


def test_truncated_file_is_refused(fake_bundle: Path) -> None:
    data = (fake_bundle / "decoder.pte").read_bytes()
    (fake_bundle / "decoder.pte").write_bytes(data[:-100])
    with pytest.raises(BundleError, match=r"decoder\.pte: size 1948 bytes, the manifest says 2048 \(truncated"):
        load_bundle(fake_bundle)


def test_wrong_checksum_is_refused(fake_bundle: Path) -> None:
    data = bytearray((fake_bundle / "vision.pte").read_bytes())
    data[10] ^= 0xFF
    (fake_bundle / "vision.pte").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vision\.pte: sha256 does not match"):
        load_bundle(fake_bundle)


def test_missing_file_is_refused(fake_bundle: Path) -> None:
    (fake_bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        load_bundle(fake_bundle)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, None, "1"])
def test_bad_format_version_is_refused(fake_bundle: Path, version: object) -> None:
    manifest = json.loads((fake_bundle / MANIFEST).read_text())
    manifest["format_version"] = version
    (fake_bundle / MANIFEST).write_text(json.dumps(manifest))
    expected = r"newer than this device runtime.*update the runtime" if version == FORMAT_VERSION + 1 else (
        r"manifest\.json has format version .* this runtime reads version")
    with pytest.raises(BundleError, match=expected):
        load_bundle(fake_bundle)


def test_broken_or_absent_manifest_is_refused(fake_bundle: Path, tmp_path: Path) -> None:
    (fake_bundle / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(fake_bundle)
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)


def test_program_not_listed_is_refused(fake_bundle: Path) -> None:
    manifest = json.loads((fake_bundle / MANIFEST).read_text())
    del manifest["files"]["decoder.pte"]
    (fake_bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="decoder.pte: the pte decoder program is not among the listed files"):
        load_bundle(fake_bundle)


# --- edge backend choice, unsupported families ---------------------------------------------------
def test_edge_backend_choice_names_the_reason() -> None:
    from covspec.export.edge_bundle import choose_backend
    from covspec.export.tensorrt_engine import tensorrt_unavailable

    missing = tensorrt_unavailable()
    backend, reason = choose_backend("auto")
    if missing is None:
        assert backend == "tensorrt"
    else:
        assert backend == "pytorch" and missing in reason
    assert choose_backend("onnx")[0] == "onnx"
    with pytest.raises(ValueError, match="unknown edge backend"):
        choose_backend("tflite")


def test_tensorrt_engine_gives_onnx_runtimes_logits(tmp_path: Path) -> None:
    """Where TensorRT and a GPU are present: the edge bundle with backend tensorrt (engine built from the
    decoder ONNX, fp16) gives ONNX Runtime's logits on the same windows (a prefill of 6, then 3 more
    tokens on the cache it returned) within fp16's tolerance, and the same greedy tokens."""
    from covspec.export.tensorrt_engine import tensorrt_unavailable

    missing = tensorrt_unavailable()
    if missing is not None:
        pytest.skip(f"TensorRT engine build not run here: {missing}")
    from covspec.bundles.programs import open_programs
    from covspec.export.edge_bundle import build_edge_bundle

    edge = load_bundle(build_edge_bundle(build_llava(tmp_path / "llava"), tmp_path / "edge", backend="tensorrt",
                                         max_len=64, max_chunk=8))
    assert edge.manifest["backend"] == "tensorrt" and (edge.folder / "decoder.engine").is_file()
    onnx, engine = open_programs("onnx", edge), open_programs("tensorrt", edge)
    hidden = int(edge.manifest["decoder"]["hidden"])
    rng = np.random.default_rng(0)
    caches = {"onnx": onnx.new_cache(), "tensorrt": engine.new_cache()}
    for start, k in ((0, 6), (6, 3)):
        inputs = (rng.integers(0, 40, (1, k)).astype(np.int64), np.zeros((1, k, hidden), np.float32),
                  np.zeros((1, k), np.bool_), np.arange(start, start + k, dtype=np.int64),
                  np.arange(start, start + k, dtype=np.int64))
        (want, caches["onnx"]), (got, caches["tensorrt"]) = (
            programs._run(*inputs, caches[name]) for name, programs in (("onnx", onnx), ("tensorrt", engine)))
        np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_unsupported_family_names_the_cause_and_fallback(tmp_path: Path) -> None:
    from covspec.export.write_programs import ExportUnsupported, check_exportable
    from covspec.models import load_adapter

    adapter = load_adapter(build_qwen2_5_vl(tmp_path / "qwen"))
    check_exportable(adapter)  # the device bundle exports it
    with pytest.raises(ExportUnsupported, match=r"qwen2_5_vl: cannot export .*ONNX edge bundle runs LLaVA targets only.*fallback"):
        check_exportable(adapter, ("llava",))  # an ONNX edge bundle (run by BundleAdapter) does not


# --- exported bundles (slow) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llava(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def fp32_bundles(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from covspec.export import build_bundles

    return build_bundles(tiny, tiny, tmp_path_factory.mktemp("fp32"), quant="none", max_len=96, quiet=True)


def agreement(eager, exported, max_new_tokens: int = 24) -> tuple[int, int, float]:
    """(tokens equal at the same position, tokens, max |logit difference| over prefill + a window +
    a rollback and re-forward)."""
    from covspec.generation import generate
    from covspec.models.draft import as_draft

    eager, exported = as_draft(eager), as_draft(exported)  # numpy both
    same = total = 0
    worst = 0.0
    for image in images():
        for prompt in PROMPTS:
            a = generate(eager, image, prompt, max_new_tokens=max_new_tokens)
            b = generate(exported, image, prompt, max_new_tokens=max_new_tokens)
            total += max(len(a.ids), len(b.ids))
            same += sum(x == y for x, y in zip(a.ids, b.ids, strict=False))
            va, vb = eager.encode_image(eager.preprocess(image)), exported.encode_image(exported.preprocess(image))
            la, sa = eager.prefill(va, prompt)
            lb, sb = exported.prefill(vb, prompt)
            worst = max(worst, float(np.abs(la - lb).max()))
            window = np.array([5, 9, 12, 7])
            worst = max(worst, float(np.abs(eager.forward(sa, window) - exported.forward(sb, window)).max()))
            eager.truncate(sa, sa.length - 3)
            exported.truncate(sb, sb.length - 3)
            window = np.array([11, 4])
            worst = max(worst, float(np.abs(eager.forward(sa, window) - exported.forward(sb, window)).max()))
    return same, total, worst


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_fp32_bundle_matches_eager(tiny: Path, fp32_bundles: tuple[Path, Path], backend: str) -> None:
    from covspec.bundles.adapter import BundleAdapter
    from covspec.models import load_adapter

    eager = as_draft(load_adapter(tiny))  # numpy, as the bundle's
    exported = BundleAdapter(fp32_bundles[0], backend=backend)
    assert exported.fingerprint() == eager.fingerprint()
    assert exported.vocab_size == eager.vocab_size and exported.eos_token_ids == eager.eos_token_ids
    visual_a = eager.encode_image(eager.preprocess(images()[0]))
    visual_b = exported.encode_image(exported.preprocess(images()[0]))
    assert np.allclose(visual_a.embeds, visual_b.embeds, atol=1e-5)
    assert np.allclose(visual_a.activity, visual_b.activity, atol=1e-4)
    assert np.allclose(visual_a.attention, visual_b.attention, atol=1e-5)
    assert np.allclose(eager.prompt_embeddings(PROMPTS[0]), exported.prompt_embeddings(PROMPTS[0]), atol=1e-2)
    kept = np.array([0, 3, 5, 6, 10, 15])
    la, _ = eager.prefill(visual_a, PROMPTS[1], kept=kept)
    lb, _ = exported.prefill(visual_b, PROMPTS[1], kept=kept)
    assert np.abs(la - lb).max() < 1e-4
    same, total, worst = agreement(eager, exported)
    assert same == total and worst < 1e-4


@pytest.mark.slow
def test_fp32_manifests(fp32_bundles: tuple[Path, Path], tiny: Path) -> None:
    from covspec.models import load_adapter

    device = load_bundle(fp32_bundles[0]).manifest
    assert device["family"] == "llava" and device["quant"]["scheme"] == "none"
    assert device["tokenizer_fingerprint"] == load_adapter(tiny).fingerprint()
    assert set(device["programs"]) == {"pte", "onnx"} and device["unsupported"] == {}
    assert device["decoder"]["cache"] == [2, 2, 2, 96, 8] and device["vision"]["tokens"] == 16
    assert device["calibration"] is None and device["tools"]["executorch"]
    assert {"tokenizer.json", "runner_tokenizer.json", "model.pte", "decoder.onnx",
            "embeddings.f16.npy"} <= set(device["files"])
    assert device["programs"]["pte"]["layout"] == "executorch-multimodal"
    edge = load_bundle(fp32_bundles[1]).manifest
    assert edge["kind"] == "edge" and edge["backend"] in ("pytorch", "tensorrt") and edge["reason"]
    assert "checkpoint/model.safetensors" in edge["files"]


@pytest.mark.slow
def test_prompt_over_the_static_cache_is_refused(fp32_bundles: tuple[Path, Path]) -> None:
    from covspec.bundles.adapter import BundleAdapter
    from covspec.errors import PromptError

    exported = BundleAdapter(fp32_bundles[0], backend="onnx")
    visual = exported.encode_image(exported.preprocess(images()[0]))
    _, state = exported.prefill(visual, PROMPTS[0])
    with pytest.raises(PromptError, match="over the bundle's 96 cache positions"):
        exported.forward(state, np.ones(96 - state.length + 1, dtype=np.int64))


@pytest.mark.slow
def test_int8_bundle_runs_and_mostly_agrees(tiny: Path, tmp_path: Path) -> None:
    from covspec.bundles.adapter import BundleAdapter
    from covspec.export.device_bundle import build_device_bundle
    from covspec.models import load_adapter

    folder = build_device_bundle(tiny, tmp_path / "int8", quant="int8", max_len=96)
    eager = load_adapter(tiny)
    for backend in ("executorch", "onnx"):
        same, total, _ = agreement(eager, BundleAdapter(folder, backend=backend), max_new_tokens=16)
        assert same / total >= 0.7, f"{backend}: {same}/{total}"


@pytest.mark.slow
def test_edge_onnx_bundle_runs_the_target_and_feeds_tensorrt(tiny: Path, tmp_path: Path) -> None:
    """The edge's ONNX option: ONNX Runtime runs the target with the eager target's greedy tokens, and
    the decoder ONNX has the inputs (dynamic k) the TensorRT optimization profile names."""
    import onnx

    from covspec.bundles.adapter import BundleAdapter
    from covspec.export.edge_bundle import build_edge_bundle
    from covspec.generation import generate
    from covspec.models import load_adapter

    folder = build_edge_bundle(tiny, tmp_path / "edge", backend="onnx", max_len=96)
    manifest = load_bundle(folder).manifest
    assert manifest["backend"] == "onnx" and manifest["programs"]["onnx"]["decoder"] == "decoder.onnx"
    target = BundleAdapter(folder, backend="onnx")
    eager = load_adapter(tiny)
    for image in images()[:2]:
        assert generate(target, image, PROMPTS[2]).ids == generate(eager, image, PROMPTS[2]).ids
    graph = onnx.load(str(folder / "decoder.onnx")).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert list(inputs) == ["ids", "image_embeds", "is_image", "input_pos", "slots", "cache"]
    assert isinstance(inputs["ids"][1], str) and inputs["input_pos"][0] == inputs["ids"][1]  # k is symbolic
    assert inputs["cache"] == manifest["decoder"]["cache"]


def test_patch_linear_equals_the_patch_convolution() -> None:
    from covspec.export.quant import PatchLinear

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=7, stride=7, bias=True)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(PatchLinear(conv)(pixels), conv(pixels), atol=1e-5)


def test_int8_embedding_rows_are_within_half_a_step() -> None:
    from covspec.export.quant import Int8Embedding

    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 32)
    quantized = Int8Embedding(table)
    ids = torch.arange(50)[None]
    error = (quantized(ids) - table(ids)).abs()[0]  # [50, 32]
    assert quantized.qweight.dtype == torch.int8
    assert bool((error <= quantized.scale[:, None] / 2 + 1e-7).all())


# --- the edge serves an edge bundle -----------------------------------------------------------------
def test_edge_refuses_a_device_bundle_or_a_broken_one(fake_bundle: Path) -> None:
    from covspec.edge_runtime.target import load_target
    from covspec.errors import CovspecError

    with pytest.raises(CovspecError, match="a 'device' bundle, the edge serves an edge bundle"):
        load_target(fake_bundle)
    with open(fake_bundle / "decoder.pte", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CovspecError, match="decoder.pte"):
        load_target(fake_bundle)


@pytest.mark.slow
@pytest.mark.parametrize("edge_backend", ["pytorch", "onnx"])
def test_device_bundle_against_edge_bundle_matches_target_only(tiny: Path, fp32_bundles: tuple[Path, Path],
                                                               tmp_path: Path, edge_backend: str) -> None:
    """`covspec device run --bundle` (ExecuTorch draft) against `covspec edge serve` on the edge
    bundle (checkpoint or ONNX Runtime target): covspec mode gives target-only's greedy answers."""
    import threading

    from covspec.bundles.adapter import BundleAdapter
    from covspec.device_runtime.client import DeviceRuntime
    from covspec.edge_runtime.server import EdgeServer, EdgeSettings
    from covspec.edge_runtime.target import load_target
    from covspec.export.edge_bundle import build_edge_bundle
    from covspec.generation import generate
    from covspec.images import png_bytes
    from covspec.models import load_adapter
    from covspec.sampling import SamplingParams

    edge_bundle = fp32_bundles[1] if edge_backend == "pytorch" else build_edge_bundle(
        tiny, tmp_path / "edge", backend="onnx", max_len=96)
    target, loaded = load_target(edge_bundle)
    assert ("ONNX Runtime" in loaded) == (edge_backend == "onnx")
    server = EdgeServer(target, EdgeSettings(bind="tcp://127.0.0.1:*"))
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [server.serve_once(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    device = DeviceRuntime(BundleAdapter(fp32_bundles[0], backend="executorch"), server.endpoint)
    try:
        reference = load_adapter(tiny)
        for image in images()[:2]:
            for prompt in PROMPTS[:2]:
                answer = device.answer(png_bytes(image), prompt, "covspec", SamplingParams(), max_new_tokens=12)
                assert answer.ids == generate(reference, image, prompt, max_new_tokens=12).ids
    finally:
        device.close()
        stop.set()
        thread.join()
        server.close()


def test_the_edge_bundle_carries_the_draft_and_the_edge_serves_it(tmp_path: Path) -> None:
    """covspec export puts the draft beside the target in the edge bundle (edge_sd, covspec's placement),
    `edge serve --model OUT/edge` picks it up by itself; a draft of another tokenizer is left out, saying why."""
    from covspec.api import bundle_draft
    from covspec.export.edge_bundle import build_edge_bundle

    target, draft = build_llava(tmp_path / "target", seed=0), build_llava(tmp_path / "draft", seed=1)
    folder = build_edge_bundle(target, tmp_path / "edge", backend="pytorch", draft=draft)
    manifest = load_bundle(folder).manifest  # the copied draft is hashed like every other file
    assert manifest["draft"] == "draft" and (folder / "draft" / "config.json").is_file()
    assert bundle_draft(folder) == folder / "draft"
    assert bundle_draft(target) is None  # a checkpoint folder carries no draft
    other = build_qwen2_5_vl(tmp_path / "qwen")
    skipped = load_bundle(build_edge_bundle(target, tmp_path / "edge2", backend="pytorch", draft=other)).manifest
    assert "draft" not in skipped and "tokenizer" in skipped["draft_skipped"]
    assert bundle_draft(tmp_path / "edge2") is None


def test_a_large_tied_head_gets_an_int8_table_of_its_own() -> None:
    """A tied output head reads the input embedding's int8 rows while the table is small; past
    `untie_above` it becomes a Linear of its own (quantized with the other Linears), since the weight-only
    tied head dequantizes the whole table on every step."""
    from covspec.export.quant import Int8Embedding, Int8TiedHead, prepare_for_quantization

    def tied() -> torch.nn.Module:
        decoder = torch.nn.Module()
        decoder.embed_tokens = torch.nn.Embedding(50, 8)
        decoder.lm_head = torch.nn.Linear(8, 50, bias=False)
        decoder.lm_head.weight = decoder.embed_tokens.weight  # tied
        return decoder

    small = tied()
    prepare_for_quantization(torch.nn.Module(), small, untie_above=50 * 8)
    assert isinstance(small.embed_tokens, Int8Embedding) and isinstance(small.lm_head, Int8TiedHead)
    large = tied()
    reference = large.embed_tokens.weight.detach().clone()
    prepare_for_quantization(torch.nn.Module(), large, untie_above=50 * 8 - 1)
    assert isinstance(large.embed_tokens, Int8Embedding) and type(large.lm_head) is torch.nn.Linear
    assert torch.equal(large.lm_head.weight, reference)  # the same projection, a weight of its own
    x = torch.randn(3, 8)
    assert torch.allclose(large.lm_head(x), x @ reference.T)
