"""The embedded default: the task generator, the tokenizer, and the shipped draft/target pair."""

from __future__ import annotations

import json

import pytest
import torch

from covspec.demo import WEIGHTS, default_draft_path, default_target_path
from covspec.demo.checksums import check_manifest
from covspec.demo.task import (
    ALL_COMBOS,
    N_VISUAL_TOKENS,
    UNSEEN_COMBOS,
    Scene,
    Shape,
    describe,
    draw_scene,
    make_question,
    normalise,
    object_f1,
    parse_objects,
    sample_split,
    scene_for,
    scene_split,
)
from covspec.demo.word_tokenizer import IMAGE, build_tokenizer

HAND_SCENE = Scene(objects=(Shape("red", "circle", 0), Shape("blue", "square", 1), Shape("green", "triangle", 4),
                            Shape("red", "diamond", 8)),
                   background=(230, 230, 230), texture="plain", texture_seed=1)


def test_generator_is_deterministic():
    a = list(sample_split("train", 12, seed=3))
    b = list(sample_split("train", 12, seed=3))
    assert [(x.question, x.answer, x.file_name) for x in a] == [(x.question, x.answer, x.file_name) for x in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    c = list(sample_split("train", 12, seed=4))
    assert [x.scene for x in a] != [x.scene for x in c]


def test_splits_are_disjoint_and_unseen_combos_stay_out_of_training():
    train = {scene_for("train", i, 0).key() for i in range(1500)}
    val = {scene_for("val", i, 0).key() for i in range(300)}
    heldout_scenes = [scene_for("heldout", i, 0) for i in range(300)]
    heldout = {s.key() for s in heldout_scenes}
    assert not train & heldout and not train & val and not val & heldout
    assert all(scene_split(scene_for("heldout", i, 0)) == "heldout" for i in range(20))
    for i in range(1500):
        scene = scene_for("train", i, 0)
        assert not scene.has_unseen
        assert all((o.colour, o.shape) not in UNSEEN_COMBOS for o in scene.objects)
    assert any(s.has_unseen for s in heldout_scenes)
    assert len(UNSEEN_COMBOS) < len(ALL_COMBOS)


def test_answers_for_a_hand_checked_scene():
    import random

    rng = random.Random(0)
    assert describe(HAND_SCENE) == ("there are four objects : a red circle at the top left , a blue square at the "
                                    "top , a green triangle at the center , a red diamond at the bottom right .")
    seen = {}
    for _ in range(400):
        for qtype in ("color", "shape", "count", "position", "existence", "relation"):
            q, a = make_question(HAND_SCENE, qtype, rng, allow_unseen=False)
            seen[q] = a
    expected = {
        "what color is the object at the top left ?": "red",
        "what color is the square ?": "blue",
        "what shape is the green object ?": "triangle",
        "what shape is at the bottom right ?": "diamond",
        "how many objects are there ?": "four",
        "how many red objects are there ?": "two",
        "how many circles are there ?": "one",
        "where is the green triangle ?": "center",
        "is there a red circle ?": "yes",
        "what is left of the blue square ?": "red circle",
        "what is below the blue square ?": "green triangle",
        "what is right of the blue square ?": "nothing",
        "what is above the green triangle ?": "blue square",
    }
    for question, answer in expected.items():
        assert seen.get(question) == answer, question
    assert all(a == "no" for q, a in seen.items() if q == "is there a blue circle ?")


def test_image_has_dozens_of_mostly_background_tokens():
    image = draw_scene(HAND_SCENE)
    assert image.size == (72, 72) and N_VISUAL_TOKENS == 36
    # 4 of 9 cells hold an object: at least 20 of the 36 patch tokens see only background
    assert 36 - 4 * len(HAND_SCENE.objects) >= 20


def test_scoring():
    truth = describe(HAND_SCENE)
    assert object_f1(truth, truth) == 1.0
    assert len(parse_objects(truth)) == 4
    half = "there are two objects : a red circle at the top left , a blue square at the top ."
    assert object_f1(half, truth) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert normalise(" Top  Left? ") == "top left"


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = describe(HAND_SCENE)
    ids = loaded.encode(text, add_special_tokens=False)
    assert loaded.unk_token_id not in ids
    assert loaded.decode(ids) == text
    prompt = loaded.encode("USER: <image>\nwhat is left of the red circle ? ASSISTANT:")
    assert prompt[0] == loaded.bos_token_id
    assert loaded.convert_tokens_to_ids(IMAGE) in prompt
    for item in sample_split("heldout", 30, seed=0):
        assert loaded.unk_token_id not in loaded.encode(item.question + " " + item.answer, add_special_tokens=False)


def test_shipped_pair_matches_its_manifest_and_loads():
    assert not check_manifest(WEIGHTS), check_manifest(WEIGHTS)
    from covspec.models import load_adapter
    from covspec.models.base import tokenizer_fingerprint

    target, draft = load_adapter(default_target_path()), load_adapter(default_draft_path())
    assert target.family == draft.family == "llava"
    assert tokenizer_fingerprint(target.tokenizer) == tokenizer_fingerprint(draft.tokenizer)
    # the draft is much cheaper (its measured step ratio is a benchmark: covspec.demo.report)
    t_params = sum(p.numel() for p in target.model.model.language_model.layers.parameters())
    d_params = sum(p.numel() for p in draft.model.model.language_model.layers.parameters())
    assert t_params >= 8 * d_params
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*.safetensors"))
    assert size <= 40 * 1024 * 1024
    meta = json.loads((default_target_path() / "covspec_demo.json").read_text())
    assert meta["role"] == "target"
    visual = target.encode_image(target.preprocess(draw_scene(HAND_SCENE)))
    assert visual.count == N_VISUAL_TOKENS
    assert torch.isfinite(visual.embeds).all()


def test_shipped_target_reads_the_image():
    """A regression guard at the shipped pair's measured level: its descriptions are near perfect
    (held-out object-F1 0.98 on 19 items); short questions are at 62% (the issue's 90% bar is not met
    yet), so they are only held above the language prior's low end."""
    from covspec.demo.evaluate import evaluate

    torch.set_num_threads(2)
    report = evaluate(default_target_path(), "heldout", limit=40, progress=False)
    describe_f1 = report.by_type["describe"]
    assert describe_f1.n >= 3 and describe_f1.mean >= 0.85, report.as_dict()
    short = report.overall(("color", "shape", "count", "position", "existence", "relation"))
    assert short.mean >= 0.3, report.as_dict()


def test_pruned_training_rows_are_what_the_pruned_prefill_computes():
    """The draft learns on pruned rows (covspec/demo/data.prune_rows): the training forward on such a
    row gives the logits the adapter's pruned prefill gives for the same kept tokens at inference."""
    import random

    import numpy as np
    from transformers import LlavaForConditionalGeneration

    from covspec.demo.data import collate, kept_tokens, pixel_values, prune_rows, token_cells
    from covspec.demo.task import N_VISUAL_TOKENS, make_item
    from covspec.demo.train import lm_logits, vision_features
    from covspec.models import load_adapter

    tokenizer = build_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    model = LlavaForConditionalGeneration.from_pretrained(default_draft_path()).eval()
    adapter = load_adapter(default_draft_path())
    item = make_item("heldout", 3, 0, qtype="describe")
    pixels = pixel_values(np.asarray(item.image))[None]
    batch = collate(tokenizer, [(0, item.question, item.answer, "describe")], N_VISUAL_TOKENS)
    rng = random.Random(0)
    pruned = prune_rows(batch, [item.scene], image_id, tokenizer.pad_token_id, rng, 1.0, 0.25, N_VISUAL_TOKENS)
    kept = pruned.kept[0]
    assert len(kept) < N_VISUAL_TOKENS and kept.tolist() == sorted(kept.tolist())
    assert {token_cells()[t] for t in kept.tolist()} >= {o.cell for o in item.scene.objects}
    assert int((pruned.batch.ids == image_id).sum()) == len(kept)
    assert len(kept_tokens(item.scene, 3, rng)) >= len(item.scene.objects)  # every object stays visible
    with torch.no_grad():
        logits, _ = lm_logits(model, batch, vision_features(model, pixels), image_id, pruned)
        prompt_end = int((pruned.batch.labels[0] != -100).nonzero()[0])  # the position predicting the answer
        visual = adapter.encode_image(adapter.preprocess(item.image))
        expected, _ = adapter.prefill(visual, item.question, kept=kept)
    assert torch.allclose(logits[0, prompt_end], expected, atol=1e-4)


def test_device_pruned_training_rows_keep_what_the_device_keeps():
    """Rows pruned by the device's pruner (train.device_orders): the first k of a scene's order are
    exactly what the device's score_and_select keeps at k for the describe prompt."""
    import random

    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from covspec.demo.data import build_pool, collate, prune_rows
    from covspec.demo.task import DESCRIBE_PROMPT, N_VISUAL_TOKENS
    from covspec.demo.train import device_orders
    from covspec.models import load_adapter
    from covspec.pruning import score_and_select

    tokenizer = build_tokenizer()
    model = LlavaForConditionalGeneration.from_pretrained(default_draft_path())
    adapter = load_adapter(default_draft_path())
    pool = build_pool("val", 3, 0)
    orders = device_orders(model, tokenizer, pool)
    query = adapter.prompt_embeddings(DESCRIBE_PROMPT)
    for scene_index, order in enumerate(orders):
        visual = adapter.encode_image(adapter.preprocess(Image.fromarray(pool.images[scene_index])))
        for k in (9, 27):
            assert sorted(order[:k]) == score_and_select(visual, query, k).tolist()
    batch = collate(tokenizer, [(0, DESCRIBE_PROMPT, "a", "describe")], N_VISUAL_TOKENS)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    pruned = prune_rows(batch, [pool.scenes[0]], image_id, tokenizer.pad_token_id, random.Random(0), 1.0, 0.25,
                        N_VISUAL_TOKENS, orders=[orders[0]], device_share=1.0)
    n = len(pruned.kept[0])
    assert pruned.kept[0].tolist() == sorted(orders[0][:n])


def test_growing_the_target_keeps_its_function():
    """Depth growth (modeling.grow_text_model): the grown model's logits equal the small one's, and
    the added layers are trainable (their zeroed projections get gradients)."""
    from covspec.demo.modeling import TextSize, grow_text_model, new_model

    tokenizer = build_tokenizer()
    small = new_model(TextSize(layers=2, hidden=32, heads=2, intermediate=64), tokenizer, seed=0).eval()
    big = grow_text_model(small, TextSize(layers=5, hidden=32, heads=2, intermediate=64), tokenizer, seed=1).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        assert torch.allclose(small.model.language_model(ids).last_hidden_state,
                              big.model.language_model(ids).last_hidden_state, atol=1e-6)
    big.train()
    big.lm_head(big.model.language_model(ids).last_hidden_state).sum().backward()
    added = big.model.language_model.layers[4]
    assert added.self_attn.o_proj.weight.grad.abs().sum() > 0 and added.mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot grow"):
        grow_text_model(small, TextSize(layers=5, hidden=64, heads=2, intermediate=64), tokenizer, seed=1)


def test_question_mix_follows_the_stage_type_weights():
    """The polish stage's type_weights steer the short questions drawn (and only those types come)."""
    import random
    from collections import Counter

    from covspec.demo.data import build_pool, sample_questions
    from covspec.demo.train import TrainSettings

    pool = build_pool("train", 40, seed=0)
    weights = {"count": 3.0, "existence": 1.0}
    drawn = Counter(q[3] for step in range(40)
                    for q in sample_questions(pool, random.Random(step), 16, 0.0, weights))
    assert set(drawn) == {"count", "existence"}
    assert 2.0 < drawn["count"] / drawn["existence"] < 4.5
    polish = dict(TrainSettings().target_polish.type_weights)
    assert set(polish) == {"color", "shape", "count", "position", "existence", "relation"}
    assert polish["count"] > polish["color"]


def test_a_checkpoint_from_other_target_stages_is_not_reused(tmp_path):
    """train_pair(target_from=...) refuses a target trained without the current focus or polish stage."""
    from dataclasses import asdict, replace

    from covspec.demo.train import TrainSettings, _as_json, _stored_stage

    s = TrainSettings()
    settings = _as_json(asdict(s))
    assert all(_stored_stage(settings, k) == _as_json(asdict(getattr(s, k)))
               for k in ("target", "target_focus", "target_polish"))
    del settings["target_polish"]  # a checkpoint from before the polish stage
    assert _stored_stage(settings, "target_polish") is None
    assert _stored_stage(_as_json(asdict(replace(s, target_polish=replace(s.target_polish, steps=1)))),
                         "target_polish") != _as_json(asdict(s.target_polish))


def test_a_finer_patch_grid_still_maps_tokens_to_cells():
    import random

    import pytest

    from covspec.demo.data import kept_tokens, per_side, token_cells, tokens_by_cell
    from covspec.demo.task import make_item

    assert per_side(36) == 6 and per_side(144) == 12
    with pytest.raises(ValueError, match="square grid"):
        per_side(40)
    with pytest.raises(ValueError, match="do not tile"):
        token_cells(8)
    fine = tokens_by_cell(12)
    assert all(len(tokens) == 16 for tokens in fine.values()) and len(fine) == 9
    cells = token_cells(12)
    assert cells[0] == 0 and cells[11] == 2 and cells[143] == 8 and cells[4 * 12] == 3
    item = make_item("heldout", 5, 0)
    kept = kept_tokens(item.scene, 9, random.Random(0), 144)
    assert len(kept) == 9 and {cells[t] for t in kept} >= {o.cell for o in item.scene.objects}


def test_merged_training_rows_are_what_the_merged_prefill_computes():
    """The fine-patch draft (144 visual tokens, its own vision tower) learns on pruned rows whose kept
    tokens absorbed the dropped ones: its training forward on such a row gives the logits the device's
    merged, pruned prefill gives."""
    import random

    import numpy as np
    from transformers import LlavaForConditionalGeneration

    from covspec.demo import WEIGHTS
    from covspec.demo.data import collate, pixel_values, prune_rows
    from covspec.demo.task import make_item
    from covspec.demo.train import lm_logits, vision_features
    from covspec.models import load_adapter
    from covspec.models.draft import as_draft
    from covspec.pruning import merged_visual

    path = WEIGHTS / "draft_fine"
    tokenizer = build_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    adapter = as_draft(load_adapter(path))  # numpy in and out, as the device runs it
    item = make_item("heldout", 3, 0, qtype="describe")
    batch = collate(tokenizer, [(0, item.question, item.answer, "describe")], 144)
    pruned = prune_rows(batch, [item.scene], image_id, tokenizer.pad_token_id, random.Random(0), 1.0, 0.25, 144)
    kept = pruned.kept[0]
    with torch.no_grad():
        feats = vision_features(model, pixel_values(np.asarray(item.image))[None])
        logits, _ = lm_logits(model, batch, feats, image_id, pruned, merge=True)
        prompt_end = int((pruned.batch.labels[0] != -100).nonzero()[0])
        visual = adapter.encode_image(adapter.preprocess(item.image))
        assert visual.count == 144
        expected, _ = adapter.prefill(merged_visual(visual, kept), item.question, kept=kept)
        unmerged, _ = adapter.prefill(visual, item.question, kept=kept)
    assert torch.allclose(logits[0, prompt_end], torch.from_numpy(expected), atol=1e-4)
    assert not np.allclose(expected, unmerged, atol=1e-4)  # merging changed what the draft read


def test_report_split_has_its_own_seed_held_out_layouts_and_every_type_in_proportion():
    from collections import Counter

    from covspec.demo.data import build_pool
    from covspec.demo.task import (
        REPORT_BLOCK,
        REPORT_SEED,
        REPORT_SIZE,
        SEED_OFFSETS,
        SPLITS,
        TYPE_WEIGHTS,
        UNSEEN_FRACTION,
        report_plan,
        split_seed,
    )

    others = {split_seed(s, seed) for s in SPLITS if s != "report" for seed in range(10)}
    assert split_seed("report") == REPORT_SEED and REPORT_SEED not in others
    assert all(offset == 0 for split, offset in SEED_OFFSETS.items() if split != "report")
    items = list(sample_split("report", 2 * REPORT_BLOCK))
    assert {i.seed for i in items} == {REPORT_SEED} and {i.split for i in items} == {"report"}
    assert all(scene_split(i.scene) == "report" for i in items)  # a bucket of its own
    for block in (items[:REPORT_BLOCK], items[REPORT_BLOCK:]):  # each block exactly in proportion
        assert Counter(i.qtype for i in block) == Counter(TYPE_WEIGHTS)
        assert sum(i.slices["unseen"] for i in block) == round(UNSEEN_FRACTION * REPORT_BLOCK)
        assert all(i.scene.has_unseen == i.slices["unseen"] for i in block)
    heldout = {(i.scene.key(), i.question) for i in sample_split("heldout", 2 * REPORT_BLOCK, seed=0)}
    assert len(heldout & {(i.scene.key(), i.question) for i in items}) == 0
    again = list(sample_split("report", 5, start=REPORT_BLOCK - 2))  # the same items, drawn on their own
    assert [(i.question, i.scene) for i in again] == [(i.question, i.scene) for i in items[REPORT_BLOCK - 2:][:5]]
    assert REPORT_SIZE >= 2000 and REPORT_SIZE % REPORT_BLOCK == 0
    plan = [report_plan(i) for i in range(REPORT_SIZE)]
    blocks = REPORT_SIZE // REPORT_BLOCK
    assert Counter(t for t, _ in plan) == Counter({t: w * blocks for t, w in TYPE_WEIGHTS.items()})
    assert sum(u for _, u in plan) == round(UNSEEN_FRACTION * REPORT_SIZE)
    with pytest.raises(ValueError, match="report split"):
        build_pool("report", 2, 0)


def _old_scene_for(split: str, index: int, seed: int):
    """scene_for as it was before the report split had a bucket of its own (train: hash bucket < 8, val: 8,
    heldout: 9, on the first hash alone): what the shipped weights were trained on."""
    import hashlib
    import random

    from covspec.demo.task import UNSEEN_FRACTION, random_scene

    rng = random.Random(f"covspec-demo:{seed}:{split}:{index}")
    want_unseen = split == "heldout" and rng.random() < UNSEEN_FRACTION
    buckets = {"train": range(8), "val": (8,), "heldout": (9,)}[split]
    while True:
        scene = random_scene(rng, want_unseen)
        if int.from_bytes(hashlib.sha256(scene.key().encode()).digest()[:4], "big") % 10 in buckets:
            return scene


def test_report_layouts_are_their_own_and_no_other_split_changed():
    """All 2,000 report items: layouts of the report's bucket, none among the 12,000 training and 480
    validation scenes the shipped weights were trained on (settings in covspec_demo.json, drawn here by
    the old rule) nor among the first 2,000 held-out items; held-out and validation items are what they
    were before the report had a bucket, index by index; training items differ only where the old draw
    was a report layout."""
    import json

    from covspec.demo import default_draft_path
    from covspec.demo.task import LEGACY_TRAINING, REPORT_SEED, REPORT_SIZE, scene_for

    settings = json.loads((default_draft_path() / "covspec_demo.json").read_text())["settings"]
    seed, pool, val = settings["seed"], settings["pool_size"], settings["val_size"]
    assert (seed, pool) == LEGACY_TRAINING
    report = [scene_for("report", i, REPORT_SEED) for i in range(REPORT_SIZE)]
    assert all(scene_split(s) == "report" for s in report)
    trained = [_old_scene_for("train", i, seed) for i in range(pool)]
    seen = {s.key() for s in trained} | {_old_scene_for("val", i, seed).key() for i in range(val)}
    heldout = [scene_for("heldout", i, 0) for i in range(REPORT_SIZE)]
    assert not {s.key() for s in report} & (seen | {s.key() for s in heldout})
    assert [s.key() for s in heldout[:500]] == [_old_scene_for("heldout", i, 0).key() for i in range(500)]
    assert all(scene_for("val", i, seed) == _old_scene_for("val", i, seed) for i in range(val))
    moved = [i for i, old in enumerate(trained[:2000]) if scene_split(old) == "report"]
    assert 0 < len(moved) < 100  # about 1 in 64 of the training draws
    assert all(scene_for("train", i, seed) == old for i, old in enumerate(trained[:2000]) if i not in moved)
