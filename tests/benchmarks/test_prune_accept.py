"""End-to-end acceptance with pruning (benchmarks.prune_accept) on tiny models."""

from __future__ import annotations

import json

import tiny_models

from benchmarks.prune_accept import main, speculate
from benchmarks.prune_eval import target_answer
from covspec.demo.task import make_item
from covspec.models import load_adapter


def test_a_draft_that_is_the_target_has_every_drafted_token_accepted(tmp_path):
    path = tiny_models.build_llava(tmp_path / "m", seed=1)
    model = load_adapter(path)
    item = make_item("report", 3, 90_417, qtype="describe")
    answer = target_answer(model, item)
    r = speculate(model, item, answer, None, False, window=3, max_new_tokens=48)
    assert r.drafted == r.accepted > 0 and r.rejections == 0  # (speculate also checks it committed `answer`)
    assert r.rounds == -(-(len(answer) - 1) // 4)  # after the first token: windows of 3 accepted, plus a bonus each


def test_prune_accept_reports_pruned_against_unpruned_on_the_same_items(tmp_path):
    target = str(tiny_models.build_llava(tmp_path / "target", seed=0))
    draft = str(tiny_models.build_llava(tmp_path / "draft", seed=1))
    out = tmp_path / "accept.json"
    assert main(["--draft", draft, "--target", target, "--limit", "4", "--keeps", "0.25", "1.0",
                 "--window", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["keep"] for r in data["runs"]] == [0.25, 1.0] and data["meta"]["split"] == "report"
    for run in data["runs"]:
        assert len(run["drafted"]) == 4
        assert all(0 <= a <= d for a, d in zip(run["accepted"], run["drafted"], strict=True))
        assert all(j <= n for j, n in zip(run["rejections"], run["rounds"], strict=True))
    text = (tmp_path / "accept.txt").read_text()
    assert text.startswith("Command: python -m benchmarks.prune_accept") and "| covspec@0.25 | 0.25 |" in text
