"""Model adapters on tiny randomly initialised models of each real architecture (fp32, CPU).

For every family: cached incremental decoding equals recomputing from scratch, a k-token window
equals k single steps, rollback then re-decoding equals never having gone forward, pruned prefill
with everything kept equals unpruned prefill, and greedy `covspec.generation.generate` equals the
model's own `generate`. Then the ways loading and input can go wrong.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

from covspec.errors import ImageError, ModelLoadError, PromptError
from covspec.generation import generate
from covspec.images import load_image
from covspec.models import load_adapter
from covspec.models.base import VLMAdapter
from covspec.models.idefics3 import Idefics3Adapter
from covspec.models.llava import PROMPT_TEMPLATE, LlavaAdapter, llava_prompt_ids
from covspec.models.qwen2_5_vl import Qwen25VLAdapter

TOL = 1e-4
PROMPT = "what is the color of the circle ?"
MAX_DIFFS: dict[str, float] = {}  # largest difference seen per family and check, printed at the end


def record(name: str, diff: float) -> float:
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), diff)
    return diff


@pytest.fixture(scope="session", autouse=True)
def _report_diffs():
    yield
    if MAX_DIFFS:
        print("\nmax abs logit differences:")
        for name, diff in sorted(MAX_DIFFS.items()):
            print(f"  {name:45s} {diff:.3e}")


@dataclass
class Family:
    name: str
    adapter: VLMAdapter
    image: Image.Image
    hf_inputs: Callable[[VLMAdapter, Image.Image, str], dict[str, torch.Tensor]]
    path: Path


def llava_hf_inputs(adapter: LlavaAdapter, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    pixel_values = adapter.preprocess(image)["pixel_values"]
    n = adapter.encode_image({"pixel_values": pixel_values}).count
    ids = adapter.prompt_ids(prompt, n)
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixel_values}


def qwen_hf_inputs(adapter: Qwen25VLAdapter, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    pixels = adapter.preprocess(image)
    n = int(pixels["image_grid_thw"].prod()) // adapter.merge ** 2
    ids = torch.tensor([adapter.prompt_ids(prompt, n)[0]])
    return {"input_ids": ids, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": (ids == adapter.image_token_id).int()}


def idefics3_hf_inputs(adapter: Idefics3Adapter, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    pixel_values = adapter.preprocess(image)["pixel_values"]
    n = adapter.encode_image({"pixel_values": pixel_values}).count
    ids = torch.tensor([adapter.prompt_ids(prompt, n)[0]])
    return {"input_ids": ids, "pixel_values": pixel_values[None]}  # [batch, images, 3, S, S]


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llava_family(model_dir) -> Family:
    path = tiny_models.build_llava(model_dir / "llava")
    return Family("llava", load_adapter(path), random_image(40, 52), llava_hf_inputs, path)


@pytest.fixture(scope="session")
def qwen2_5_vl_family(model_dir) -> Family:
    path = tiny_models.build_qwen2_5_vl(model_dir / "qwen2_5_vl")
    # 80 x 115 resizes to 84 x 112: a 6 x 8 patch grid, 3 x 4 visual tokens in 2 x 2 attention windows
    return Family("qwen2_5_vl", load_adapter(path), random_image(80, 115), qwen_hf_inputs, path)


@pytest.fixture(scope="session")
def llava_siglip_family(model_dir) -> Family:
    path = tiny_models.build_llava(model_dir / "llava_siglip", siglip_qwen2=True)
    return Family("llava_siglip_qwen2", load_adapter(path), random_image(40, 52), llava_hf_inputs, path)


@pytest.fixture(scope="session")
def idefics3_family(model_dir) -> Family:
    path = tiny_models.build_idefics3(model_dir / "idefics3")
    return Family("idefics3", load_adapter(path), random_image(50, 77), idefics3_hf_inputs, path)


FAMILIES = ["llava", "llava_siglip", "qwen2_5_vl", "idefics3"]


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> Family:
    return request.getfixturevalue(f"{request.param}_family")


# --- helpers ---------------------------------------------------------------------------------
def full_logits(fam: Family, extra: list[int]) -> torch.Tensor:
    """Logits [T, V] of the model's own forward (no cache) over the prompt followed by `extra`."""
    inputs = dict(fam.hf_inputs(fam.adapter, fam.image, PROMPT))
    ids = inputs["input_ids"]
    inputs["input_ids"] = torch.cat([ids, torch.tensor([extra], dtype=ids.dtype)], dim=1)
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([mm, torch.zeros(1, len(extra), dtype=mm.dtype)], dim=1)
    with torch.inference_mode():
        return fam.adapter.model(**inputs, use_cache=False).logits[0].float()


def prefill(fam: Family, kept: torch.Tensor | None = None):
    visual = fam.adapter.encode_image(fam.adapter.preprocess(fam.image))
    return fam.adapter.prefill(visual, PROMPT, kept=kept)


def some_ids(fam: Family, k: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, len(fam.adapter.tokenizer), (k,), generator=gen).tolist()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --- decoding equivalences -------------------------------------------------------------------
def test_prefill_and_incremental_decoding_match_full_recompute(family: Family):
    extra = some_ids(family, 5)
    reference = full_logits(family, extra)  # [T + 5, V]
    logits, state = prefill(family)
    T = state.length
    assert logits.shape == (family.adapter.vocab_size,)
    assert record(f"{family.name}: prefill vs model forward", maxdiff(logits, reference[T - 1])) < TOL
    for i, token in enumerate(extra):
        step = family.adapter.forward(state, torch.tensor([token]))
        assert step.shape == (1, family.adapter.vocab_size)
        assert record(f"{family.name}: cached step vs full recompute", maxdiff(step[0], reference[T + i])) < TOL
    assert state.length == T + len(extra)


def test_window_of_k_equals_k_single_steps(family: Family):
    window = some_ids(family, 4, seed=2)
    _, one_pass = prefill(family)
    scored = family.adapter.forward(one_pass, torch.tensor(window))
    assert scored.shape == (4, family.adapter.vocab_size)
    _, stepped = prefill(family)
    steps = torch.cat([family.adapter.forward(stepped, torch.tensor([t])) for t in window])
    assert record(f"{family.name}: k-window vs k steps", maxdiff(scored, steps)) < TOL
    assert one_pass.length == stepped.length


def test_rollback_then_redecode_equals_never_going_forward(family: Family):
    accepted, rejected, after = some_ids(family, 3, 3), some_ids(family, 4, 4), some_ids(family, 3, 5)
    _, state = prefill(family)
    family.adapter.forward(state, torch.tensor(accepted))
    kept_length = state.length
    family.adapter.forward(state, torch.tensor(rejected))
    family.adapter.truncate(state, kept_length)
    assert state.length == kept_length
    rolled = family.adapter.forward(state, torch.tensor(after))

    _, clean = prefill(family)
    family.adapter.forward(clean, torch.tensor(accepted))
    straight = family.adapter.forward(clean, torch.tensor(after))
    assert record(f"{family.name}: rollback vs straight", maxdiff(rolled, straight)) < TOL


def test_pruned_prefill(family: Family):
    visual = family.adapter.encode_image(family.adapter.preprocess(family.image))
    n = visual.count
    full, state_full = family.adapter.prefill(visual, PROMPT)
    all_kept, state_all = family.adapter.prefill(visual, PROMPT, kept=torch.arange(n))
    assert record(f"{family.name}: kept=all vs unpruned", maxdiff(full, all_kept)) < TOL
    assert state_full.length == state_all.length

    subset = torch.arange(0, n, 2)
    pruned, state = family.adapter.prefill(visual, PROMPT, kept=subset)
    assert state.length == state_full.length - (n - subset.numel())
    assert maxdiff(full, pruned) > 1e-3
    nxt = family.adapter.forward(state, torch.tensor(some_ids(family, 2)))
    assert torch.isfinite(nxt).all()

    with pytest.raises(ValueError, match="sorted"):
        family.adapter.prefill(visual, PROMPT, kept=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="lie in"):
        family.adapter.prefill(visual, PROMPT, kept=torch.tensor([0, n]))


def test_greedy_generate_matches_model_generate(family: Family):
    adapter = family.adapter
    ours = generate(adapter, family.image, PROMPT, max_new_tokens=8)
    inputs = family.hf_inputs(adapter, family.image, PROMPT)
    with torch.inference_mode():
        out = adapter.model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                     max_new_tokens=8, do_sample=False,
                                     eos_token_id=sorted(adapter.eos_token_ids),
                                     pad_token_id=adapter.tokenizer.pad_token_id or 0)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    if theirs and theirs[-1] in adapter.eos_token_ids:
        theirs = theirs[:-1]
    assert ours.ids == theirs
    assert ours.stop_reason == ("eos" if len(theirs) < 8 else "length")


def test_visual_tokens_carry_pruner_scores(family: Family):
    visual = family.adapter.encode_image(family.adapter.preprocess(family.image))
    assert visual.embeds.shape[1] == family.adapter.model.get_input_embeddings().weight.shape[1]
    assert visual.activity.shape == (visual.count,)
    assert (visual.activity > 0).all()
    if visual.attention is not None:
        assert visual.attention.shape == (visual.count,)
    if visual.grid is not None:
        assert visual.grid[0] * visual.grid[1] == visual.count
    emb = family.adapter.prompt_embeddings(PROMPT)
    assert emb.ndim == 2 and emb.shape[0] == len(PROMPT.split())


def test_fingerprint_and_eos(family: Family):
    again = load_adapter(family.path)
    assert again.fingerprint() == family.adapter.fingerprint()
    assert len(family.adapter.fingerprint()) == 64
    assert family.adapter.eos_token_ids
    assert family.adapter.vocab_size >= len(family.adapter.tokenizer)


# --- LLaVA specifics -------------------------------------------------------------------------
def test_llava_prompt_ids_contract(llava_family: Family):
    tok = llava_family.adapter.tokenizer
    image_id = llava_family.adapter.image_token_id
    ids = llava_prompt_ids(tok, "what is the color ?", 3, image_id)
    assert PROMPT_TEMPLATE == "USER: <image>\n{prompt} ASSISTANT:"
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "USER", ":", "<image>", "<image>", "<image>",
                                              "what", "is", "the", "color", "?", "ASSISTANT", ":"]
    with pytest.raises(PromptError, match="placeholder"):
        llava_prompt_ids(tok, "what is <image> ?", 3, image_id)


def test_llava_prompt_ids_without_bos(tmp_path: Path):
    tok = tiny_models.make_tokenizer(tmp_path, ["<s>", "</s>", "<image>"], bos="<s>", eos="</s>",
                                     extra_words=("USER", "ASSISTANT", ":"))
    ids = llava_prompt_ids(tok, "yes", 1, tok.convert_tokens_to_ids("<image>"))
    assert tok.convert_ids_to_tokens(ids) == ["USER", ":", "<image>", "yes", "ASSISTANT", ":"]


def test_llava_preprocessing_matches_transformers(llava_family: Family, tmp_path: Path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = random_image(37, 61, seed=3)
    ours = llava_family.adapter.preprocess(image)["pixel_values"]
    theirs = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})(
        image, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 28, 28)
    assert maxdiff(ours, theirs) < 1e-5

    # with a preprocessor_config.json of other settings
    folder = tmp_path / "llava_pp"
    shutil.copytree(llava_family.path, folder)
    settings = {"size": {"height": 28, "width": 28}, "do_center_crop": False, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3, "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    ours = load_adapter(folder).preprocess(image)["pixel_values"]
    theirs = CLIPImageProcessorPil(**settings)(image, return_tensors="pt")["pixel_values"]
    assert maxdiff(ours, theirs) < 1e-5


def test_llava_attention_matches_eager_attentions(llava_family: Family):
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(str(llava_family.path), attn_implementation="eager")
    pixels = llava_family.adapter.preprocess(llava_family.image)
    visual = llava_family.adapter.encode_image(pixels)
    with torch.inference_mode():
        out = eager.model.vision_tower(pixels["pixel_values"], output_attentions=True)
    layer = eager.config.vision_feature_layer % (len(out.attentions) + 1) - 1
    expected = out.attentions[layer][0].mean(dim=(0, 1))[1:]
    assert visual.attention is not None
    assert maxdiff(visual.attention, expected) < 1e-5


# --- Qwen2.5-VL specifics -------------------------------------------------------------------
@pytest.mark.parametrize("size", [(80, 115), (30, 500), (700, 640)])
def test_qwen_preprocessing_matches_transformers(qwen2_5_vl_family: Family, size: tuple[int, int]):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = random_image(*size, seed=4)
    ours = qwen2_5_vl_family.adapter.preprocess(image)
    theirs = Qwen2VLImageProcessorPil()(image, return_tensors="pt")
    assert ours["image_grid_thw"].tolist() == theirs["image_grid_thw"].tolist()
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert maxdiff(ours["pixel_values"], theirs["pixel_values"]) < 1e-5


def test_qwen_activity_follows_token_order(qwen2_5_vl_family: Family):
    """Activity i belongs to visual token i: the merger applied to the patch features whose norm is
    activity i gives embeds[i] (the tower reorders tokens into attention windows and back)."""
    adapter = qwen2_5_vl_family.adapter
    merger = adapter.model.model.visual.merger
    captured: list[torch.Tensor] = []
    hook = merger.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        visual = adapter.encode_image(adapter.preprocess(qwen2_5_vl_family.image))
    finally:
        hook.remove()
    units = captured[0].reshape(visual.count, -1)  # window order
    with torch.inference_mode():
        merged = merger(captured[0])  # [N, d], window order
    for row in range(visual.count):
        match = int((merged - visual.embeds[row]).abs().amax(dim=-1).argmin())
        assert float(units[match].norm()) == pytest.approx(float(visual.activity[row]), rel=1e-5)
    assert visual.grid == (3, 4)


def test_qwen_pruned_prefill_keeps_original_positions(qwen2_5_vl_family: Family):
    adapter = qwen2_5_vl_family.adapter
    visual = adapter.encode_image(adapter.preprocess(qwen2_5_vl_family.image))
    ids, start = adapter.prompt_ids(PROMPT, visual.count)
    full_positions, full_delta = adapter.rope_positions(torch.tensor(ids), visual.grid)
    _, state_all = adapter.prefill(visual, PROMPT)
    assert state_all.extra["rope_delta"] == full_delta
    kept = torch.tensor([0, 5, 11])
    _, state = adapter.prefill(visual, PROMPT, kept=kept)
    # the next token continues where the unpruned sequence would
    assert state.length + state.extra["rope_delta"] == state_all.length + full_delta
    assert int(full_positions.max()) + 1 == state_all.length + full_delta


# --- Idefics3 specifics ----------------------------------------------------------------------
@pytest.mark.parametrize("size", [(50, 77), (120, 33), (48, 48)])
def test_idefics3_preprocessing_matches_transformers(idefics3_family: Family, size: tuple[int, int]):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image = random_image(*size, seed=5)
    ours = idefics3_family.adapter.preprocess(image)["pixel_values"]
    settings = json.loads((idefics3_family.path / "preprocessor_config.json").read_text())
    theirs = Idefics3ImageProcessorPil(**settings)(image, return_tensors="pt")["pixel_values"]
    assert theirs.shape == (1, 1, 3, 48, 48)
    assert maxdiff(ours, theirs[0]) < 1e-5


def test_idefics3_attention_matches_eager_attentions(idefics3_family: Family):
    from transformers import Idefics3ForConditionalGeneration

    eager = Idefics3ForConditionalGeneration.from_pretrained(str(idefics3_family.path), attn_implementation="eager")
    pixels = idefics3_family.adapter.preprocess(idefics3_family.image)
    visual = idefics3_family.adapter.encode_image(pixels)
    with torch.inference_mode():
        out = eager.model.vision_model(pixel_values=pixels["pixel_values"], output_attentions=True)
    per_patch = out.attentions[-1][0].mean(dim=(0, 1))  # [36] on a 6 x 6 patch grid
    expected = per_patch.view(3, 2, 3, 2).mean(dim=(1, 3)).flatten()  # 2 x 2 patches per token
    assert visual.attention is not None
    assert maxdiff(visual.attention, expected) < 1e-5


# --- bad input -------------------------------------------------------------------------------
def test_missing_folder(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_adapter(tmp_path / "nope")


def test_not_a_folder(tmp_path: Path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_adapter(file)


def test_folder_without_config(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_adapter(tmp_path)


def test_other_family_is_refused(model_dir: Path):
    path = tiny_models.build_llama(model_dir / "plain_llama")
    with pytest.raises(ModelLoadError, match="model_type 'llama'") as err:
        load_adapter(path)
    for family in ("llava", "qwen2_5_vl", "idefics3"):
        assert family in str(err.value)


def test_expected_family_mismatch(llava_family: Family):
    with pytest.raises(ModelLoadError, match="expected a qwen2_5_vl checkpoint"):
        load_adapter(llava_family.path, expect_family="qwen2_5_vl")
    with pytest.raises(ModelLoadError, match="unknown family 'gpt'"):
        load_adapter(llava_family.path, expect_family="gpt")
    assert load_adapter(llava_family.path, expect_family="llava").family == "llava"


def _broken_copy(src: Path, dst: Path, edit: Callable[[dict[str, Any]], Any] | None = None,
                 text: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if text is not None:
        (dst / "config.json").write_text(text)
    elif edit is not None:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_invalid_json_config(llava_family: Family, tmp_path: Path):
    path = _broken_copy(llava_family.path, tmp_path / "m", text='{"model_type": "llava",')
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_adapter(path)


def test_config_without_model_type(llava_family: Family, tmp_path: Path):
    path = _broken_copy(llava_family.path, tmp_path / "m", edit=lambda c: c.pop("model_type"))
    with pytest.raises(ModelLoadError, match="no model_type"):
        load_adapter(path)


def test_config_that_from_pretrained_rejects(llava_family: Family, tmp_path: Path):
    def shrink(config: dict[str, Any]) -> None:
        config["text_config"]["hidden_size"] = 48  # the weights no longer fit

    path = _broken_copy(llava_family.path, tmp_path / "m", edit=shrink)
    with pytest.raises(ModelLoadError, match=r"cannot load LlavaForConditionalGeneration.*shapes do not match") as err:
        load_adapter(path)
    assert str(path) in str(err.value)


def test_config_with_wrong_key_types(llava_family: Family, tmp_path: Path):
    def garble(config: dict[str, Any]) -> None:
        config["vision_config"] = "clip"

    path = _broken_copy(llava_family.path, tmp_path / "m", edit=garble)
    with pytest.raises(ModelLoadError, match="cannot load") as err:
        load_adapter(path)
    assert str(path) in str(err.value)


def test_missing_weights(llava_family: Family, tmp_path: Path):
    path = _broken_copy(llava_family.path, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load") as err:
        load_adapter(path)
    assert str(path) in str(err.value)


def test_weights_lacking_tensors(llava_family: Family, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    path = _broken_copy(llava_family.path, tmp_path / "m")
    weights = load_file(str(path / "model.safetensors"))
    weights.pop(next(k for k in weights if "multi_modal_projector" in k))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="the weights lack 1 tensors .*multi_modal_projector"):
        load_adapter(path)


def test_prompt_too_long(family: Family):
    visual = family.adapter.encode_image(family.adapter.preprocess(family.image))
    with pytest.raises(PromptError, match="over the model's"):
        family.adapter.prefill(visual, " ".join(["red"] * 600))


PLACEHOLDERS = {"llava": "<image>", "llava_siglip_qwen2": "<image>", "qwen2_5_vl": "<|image_pad|>",
                "idefics3": "<image>"}


def test_prompt_with_image_placeholder(family: Family):
    visual = family.adapter.encode_image(family.adapter.preprocess(family.image))
    with pytest.raises(PromptError, match="placeholder"):
        family.adapter.prefill(visual, f"what is {PLACEHOLDERS[family.name]} ?")


def test_missing_tokenizer(llava_family: Family, tmp_path: Path):
    path = _broken_copy(llava_family.path, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_adapter(path)


def test_unreadable_image(tmp_path: Path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(bad)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.png")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(family: Family, prompt: str):
    visual = family.adapter.encode_image(family.adapter.preprocess(family.image))
    with pytest.raises(PromptError, match="empty"):
        family.adapter.prefill(visual, prompt)
    with pytest.raises(PromptError, match="empty"):
        generate(family.adapter, family.image, prompt)


def test_pruned_prefill_keeps_unpruned_positions(llava_family: Family):
    """Dropping visual tokens leaves every other token at its unpruned position, and decoding
    continues where the unpruned sequence would."""
    adapter = llava_family.adapter
    visual = adapter.encode_image(adapter.preprocess(llava_family.image))
    kept = torch.tensor([0, 5, 9])
    _, full = adapter.prefill(visual, PROMPT)
    _, pruned = adapter.prefill(visual, PROMPT, kept=kept)
    assert pruned.length == full.length - (visual.count - 3)
    assert pruned.extra["position_offset"] == visual.count - 3
    assert torch.equal(adapter._positions(pruned, 2), adapter._positions(full, 2))
