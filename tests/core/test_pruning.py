"""Visual-token pruning: selection contract, DPP behaviour, baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covspec.models.base import VisualTokens
from covspec.pruning import (
    METHODS,
    covspec_order,
    greedy_dpp_map,
    keep_count,
    rank01,
    score_and_select,
    unit_rows,
)


def random_visual(n: int = 36, d: int = 32, seed: int = 0, attention: bool = True) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(n, d, generator=g)
    return VisualTokens(embeds=embeds, activity=embeds.norm(dim=-1),
                        attention=torch.rand(n, generator=g) if attention else None, grid=None)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [1, 5, 0.25, 0.5, 35])
def test_kept_indices_sorted_unique_counted(method, keep):
    visual = random_visual(attention=method != "attention")
    query = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    kept = score_and_select(visual, query, keep, method, rng=np.random.default_rng(0))
    assert kept.dtype == np.int64
    assert kept.size == keep_count(keep, 36)
    assert bool((kept[1:] > kept[:-1]).all())
    assert int(kept.min()) >= 0 and int(kept.max()) < 36


def test_covspec_order_prefixes_are_what_it_keeps():
    """The greedy picks in order: its first k are the CoVSpec selection at k, for every k."""
    visual = random_visual(seed=3)
    query = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    order = covspec_order(visual, query, 36)
    assert sorted(order) == list(range(36))
    for k in (1, 4, 9, 18, 27, 35):
        assert sorted(order[:k]) == score_and_select(visual, query, k).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_returns_everything(method):
    visual, query = random_visual(), torch.randn(4, 32)
    assert score_and_select(visual, query, 36, method).tolist() == list(range(36))
    assert score_and_select(visual, query, 1.0, method).tolist() == list(range(36))


def test_keep_count_validation():
    assert keep_count(0.25, 36) == 9
    assert keep_count(0.001, 36) == 1
    assert keep_count(3, 36) == 3
    for bad in (0, 37, 0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError):
            keep_count(bad, 36)
    with pytest.raises(TypeError):
        keep_count(True, 36)
    with pytest.raises(ValueError):
        score_and_select(random_visual(), torch.randn(2, 32), 4, method="nope")


def test_random_is_deterministic_given_a_generator():
    visual, query = random_visual(), torch.randn(3, 32)
    a = score_and_select(visual, query, 9, "random", rng=np.random.default_rng(7))
    b = score_and_select(visual, query, 9, "random", rng=np.random.default_rng(7))
    c = score_and_select(visual, query, 9, "random", rng=np.random.default_rng(8))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def duplicated_visual(distinct: int = 8, copies: int = 4, d: int = 32) -> tuple[VisualTokens, torch.Tensor]:
    """`distinct` orthogonal directions; the first one is repeated `copies` extra times (tiny noise),
    with higher activity, so quality alone would fill the budget with its copies."""
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:distinct]  # [distinct, d] orthonormal
    dupes = basis[:1].repeat(copies, 1) + 1e-3 * torch.randn(copies, d, generator=g)
    embeds = torch.cat([basis, dupes])  # [distinct + copies, d]; the copies of row 0 sit at the end
    activity = torch.ones(embeds.shape[0])
    activity[0] = 2.0
    activity[distinct:] = 2.0
    return VisualTokens(embeds=embeds, activity=activity, attention=None), basis


def test_dpp_skips_near_duplicates():
    visual, basis = duplicated_visual()
    query = basis[:1]  # the question is about the duplicated direction too
    kept = score_and_select(visual, query, 8, "covspec")
    direction = [i if i < 8 else 0 for i in kept.tolist()]  # copies count as direction 0
    assert len(set(direction)) == 8, f"kept near-duplicates: {kept.tolist()}"
    # quality-only ranking would have spent the budget on the copies
    assert set(score_and_select(visual, query, 5, "activity").tolist()) & set(range(8, 12))
    # diversity-only max-min also covers the distinct directions
    kept = score_and_select(visual, query, 8, "diversity")
    assert len({i if i < 8 else 0 for i in kept.tolist()}) == 8


def test_greedy_map_matches_brute_force_small():
    import itertools

    g = torch.Generator().manual_seed(5)
    feats = torch.from_numpy(unit_rows(torch.randn(7, 4, generator=g).numpy()))
    q = torch.rand(7, generator=g) + 0.5
    kernel = q[:, None] * (feats @ feats.T + 1e-3 * torch.eye(7)) * q[None, :]
    chosen = greedy_dpp_map(feats, q, 3)
    # the greedy's first pick is the best singleton, and each step the best conditional gain
    for step in range(1, 4):
        prefix = chosen[:step - 1]
        best = max((j for j in range(7) if j not in prefix),
                   key=lambda j: torch.logdet(kernel[prefix + [j]][:, prefix + [j]].double()))
        assert chosen[step - 1] == best
    assert len(set(chosen)) == 3
    assert list(itertools.islice(chosen, 3)) == chosen


def test_relevance_picks_tokens_aligned_with_the_query():
    visual = random_visual(n=36, d=32, seed=2)
    query = visual.embeds[[4, 17, 30]] + 0.05 * torch.randn(3, 32)
    kept = score_and_select(visual, query, 3, "relevance")
    assert kept.tolist() == [4, 17, 30]
    # covspec with its quality side weighted up keeps them too
    kept = score_and_select(visual, query, 6, "covspec", theta=0.9, rel_weight=1.0)
    assert {4, 17, 30} <= set(kept.tolist())


def test_attention_and_activity_baselines():
    visual = random_visual()
    assert score_and_select(visual, torch.randn(2, 32), 4, "attention").tolist() == \
        sorted(torch.topk(visual.attention, 4).indices.tolist())
    assert score_and_select(visual, torch.randn(2, 32), 4, "activity").tolist() == \
        sorted(torch.topk(visual.activity, 4).indices.tolist())


def test_rank01():
    assert rank01(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert rank01(torch.tensor([1.0, 1.0])).tolist() == [0.5, 0.5]
    assert rank01(torch.tensor([5.0])).tolist() == [0.5]
    # ties get their mean rank: the pairwise definition, on random values with and without ties
    for values in (torch.randn(50), torch.randint(0, 6, (50,)).float()):
        less = (values[None, :] < values[:, None]).sum(1).float()
        equal = (values[None, :] == values[:, None]).sum(1).float()
        assert np.array_equal(rank01(values), ((less + (equal - 1) / 2) / 49).numpy())


def test_degenerate_inputs():
    same = VisualTokens(embeds=torch.ones(10, 8), activity=torch.arange(10.0), attention=None)
    kept = score_and_select(same, torch.ones(2, 8), 4, "covspec")  # all identical: quality decides
    assert kept.size == 4 and len(set(kept.tolist())) == 4
    assert score_and_select(same, torch.ones(2, 8), 4, "diversity").size == 4
    big = random_visual(n=576, d=64)
    assert score_and_select(big, torch.randn(12, 64), 0.1, "covspec").size == 58


def test_prune_sweep_on_tiny_models(tmp_path):
    import tiny_models

    from benchmarks.prune_eval import format_rows, prune_sweep

    draft = tiny_models.build_llava(tmp_path / "draft", seed=1)
    rows = prune_sweep(draft, draft, limit=1, ratios=(0.25, 1.0), methods=("covspec", "random"))
    assert [(r.method, r.ratio) for r in rows] == [("none", 1.0), ("covspec", 0.25), ("random", 0.25)]
    assert [r.kept for r in rows] == [16, 4, 4]
    assert rows[0].agreement == 1.0  # the unpruned draft agrees with itself on every token
    assert all(0.0 <= r.agreement <= 1.0 for r in rows)
    for r in rows:
        assert r.n == 1 and r.prefill_ms > 0 and r.by_type
        assert r.overall == sum(r.by_type.values()) / len(r.by_type)  # one item: its own score
    assert "| covspec | no | 0.25 | 4 |" in format_rows(rows)
    merged = prune_sweep(draft, None, limit=1, ratios=(0.25,), methods=("covspec", "random"), merge=True)
    # every method merged, plus covspec's selection with the dropped tokens left out, side by side
    assert [(r.method, r.merged) for r in merged] == [("covspec", True), ("random", True), ("covspec", False)]
    assert "| covspec | yes | 0.25 | 4 |" in format_rows(merged)


def test_the_oracle_reference_keeps_one_token_of_every_object_first():
    from benchmarks.prune_eval import oracle_kept
    from covspec.demo.data import token_cells
    from covspec.demo.task import make_item

    cells = token_cells()
    for index in range(20):
        item = make_item("heldout", index, 0)
        objects = [o.cell for o in item.scene.objects]
        kept = oracle_kept(item, len(objects))
        assert sorted(cells[t] for t in kept.tolist()) == sorted(objects)  # one token per object
        more = oracle_kept(item, 9).tolist()
        assert more == sorted(set(more)) and len(more) == 9 and {cells[t] for t in more} >= set(objects)


def test_merging_folds_every_dropped_token_into_the_kept_one_most_like_it():
    """The device's merge (numpy) and the training's (torch, with gradient) fold alike."""
    from covspec.demo.train import merge_pruned
    from covspec.pruning import merge_pruned as device_merge
    from covspec.pruning import unit_rows

    torch.manual_seed(0)
    embeds = torch.randn(12, 8, requires_grad=True)
    kept = torch.tensor([1, 4, 9])
    merged = merge_pruned(embeds, kept)
    dropped = [i for i in range(12) if i not in kept.tolist()]
    assert torch.equal(merged[dropped], embeds[dropped])  # only the kept rows change
    feats = unit_rows((embeds.detach() - embeds.detach().mean(0, keepdim=True)).numpy())
    nearest = torch.from_numpy((feats[dropped] @ feats[kept.numpy()].T).argmax(1))  # [dropped] index into kept
    for slot, index in enumerate(kept.tolist()):
        group = [index] + [d for d, n in zip(dropped, nearest.tolist(), strict=True) if n == slot]
        assert torch.allclose(merged[index], embeds[group].mean(0), atol=1e-6)
    np.testing.assert_allclose(device_merge(embeds.detach().numpy(), kept.numpy()), merged.detach().numpy(), atol=1e-6)
    merged[kept].sum().backward()  # the mean carries the gradient to every token it read
    assert bool((embeds.grad.abs().sum(1) > 0).all())
    assert merge_pruned(embeds, torch.arange(12)) is embeds  # nothing dropped: nothing merged


def test_merged_view_leaves_the_scores_and_an_unpruned_image_alone():
    from covspec.models.base import VisualTokens
    from covspec.pruning import merged_visual

    visual = VisualTokens(embeds=torch.randn(6, 4), activity=torch.rand(6), attention=torch.rand(6))
    assert merged_visual(visual, None) is visual and merged_visual(visual, torch.arange(6)) is visual
    view = merged_visual(visual, torch.tensor([0, 3]))
    assert view.activity is visual.activity and view.count == 6
    assert not np.array_equal(view.embeds[[0, 3]], visual.embeds[[0, 3]].numpy())


def test_prune_eval_writes_intervals_paired_differences_and_reuses_its_items(tmp_path, capsys):
    import json

    import tiny_models

    from benchmarks.prune_eval import main

    draft = str(tiny_models.build_llava(tmp_path / "draft", seed=1))
    out = tmp_path / "sweep.json"
    common = ["--draft", draft, "--target", draft, "--split", "report", "--limit", "6", "--no-oracle"]
    assert main([*common, "--ratios", "0.25", "1.0", "--methods", "covspec", "random", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    items = data["items"]
    assert len(items["qtypes"]) == 6 and items["split"] == "report" and len(items["answers"]) == 6
    assert set(items["configs"]) == {"none@1", "covspec@0.25", "random@0.25"}
    none = next(r for r in data["rows"] if r["method"] == "none")
    assert none["agreement"] == 1.0 and none["intervals"]["agreement"] == [1.0, 1.0]  # agrees with itself
    for r in data["rows"]:
        low, high = r["intervals"]["all"]
        assert low <= r["overall"] <= high and r["n"] == 6
        assert r["overall"] == pytest.approx(sum(items["configs"][next(
            k for k in items["configs"] if k.startswith(r["method"]))]["scores"]) / 6)
    text = (tmp_path / "sweep.txt").read_text()
    assert text.startswith("Command: python -m benchmarks.prune_eval") and (tmp_path / "sweep.png").exists()
    assert "| covspec@0.25 - none@1 | 0.25 |" in text and "| covspec@0.25 - random@0.25 | 0.25 |" in text
    # --reuse adds a method without re-running the others (their per-item scores are kept as they were)
    again = tmp_path / "more.json"
    assert main([*common, "--ratios", "0.25", "1.0", "--methods", "covspec", "random", "diversity",
                 "--reuse", str(out), "--json", str(again)]) == 0
    more = json.loads(again.read_text())["items"]["configs"]
    assert set(more) == {"none@1", "covspec@0.25", "random@0.25", "diversity@0.25"}
    assert more["covspec@0.25"] == items["configs"]["covspec@0.25"]
    capsys.readouterr()
    assert main(["--from-json", str(again)]) == 0
    assert "| covspec@0.25 - diversity@0.25 | 0.25 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="reuse"):
        main([*common[:-3], "--limit", "5", "--reuse", str(out)])


def test_query_grounding_reads_whether_the_prompt_names_something_in_the_image():
    from covspec.pruning import query_grounding

    visual = random_visual(n=12, d=16)
    named = torch.cat([torch.randn(3, 16), 2.0 * visual.embeds[5:6]])  # one word is exactly like token 5
    assert query_grounding(visual, named) == pytest.approx(1.0, abs=1e-5)
    basis = torch.linalg.svd(visual.embeds, full_matrices=True).Vh  # rows 12.. are orthogonal to every token
    assert abs(query_grounding(visual, basis[12:])) < 1e-5
    assert query_grounding(visual, torch.zeros(0, 16)) == 0.0


def test_settings_are_searched_on_val_only():
    from benchmarks.prune_tune import tune

    for split in ("report", "heldout", "train"):
        with pytest.raises(ValueError, match="val"):
            tune("unused", split=split)


def test_grounded_covspec_switches_its_settings_on_whether_the_prompt_names_something():
    from covspec import pruning

    visual = random_visual(n=12, d=32, seed=4)
    vague = torch.linalg.svd(visual.embeds, full_matrices=True).Vh[12:15]  # words unlike every token
    named = torch.cat([vague, visual.embeds[7:8]])  # one word is exactly like token 7
    assert pruning.query_grounding(visual, vague) < pruning.GROUNDING_THRESHOLD <= pruning.query_grounding(visual, named)
    kept = score_and_select(visual, named, 4, "covspec_grounded").tolist()
    assert kept == sorted(covspec_order(visual, named, 4, pruning.GROUNDED_THETA, pruning.GROUNDED_REL_WEIGHT))
    assert 7 in kept  # the token the prompt names
    cover = score_and_select(visual, vague, 4, "covspec_grounded").tolist()
    assert cover == sorted(covspec_order(visual, vague, 4, pruning.COVER_THETA, pruning.COVER_REL_WEIGHT))
    assert cover == sorted(covspec_order(visual, named, 4, theta=0.0))  # theta 0: the query plays no part
