"""`covspec bench` end to end on tiny models: separate edge, link emulator and device processes."""

import json
from pathlib import Path

import tiny_models

from covspec.tools import bench


def test_bench_runs_every_mode_through_the_link(tmp_path: Path):
    target = tiny_models.build_llava(tmp_path / "target", seed=0)
    draft = tiny_models.build_llava(tmp_path / "draft", seed=1)
    out = tmp_path / "bench"
    argv = ["--target", str(target), "--draft", str(draft), "--prompts", "2", "--links", "wifi",
            "--max-new-tokens", "8", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"target_only", "vanilla_sd", "covspec", "draft_only"}
    assert len(rows) == 8
    for row in rows:
        assert row["tokens"] > 0 and row["latency_s"] > 0
        if row["mode"] in ("vanilla_sd", "covspec"):
            assert row["matches_target"] is True
            assert row["bytes_up"] > 0 and (row["rounds"] >= 1 or row["streamed_rest"])
            # every round trip through the 10 ms link: latency is at least rounds x RTT
            assert row["latency_s"] >= row["rounds"] * 0.010 * 0.85
    stats = json.loads((out / "link-wifi.json").read_text())
    sent_up = sum(r["bytes_up"] for r in rows)
    assert stats["bytes_up"] >= sent_up, "the link carried fewer bytes than the socket sent"
    assert (out / "summary.md").read_text().count("| wifi |") == 4 + 1  # a row per mode, and the edge's side
    summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert all(s["latency_ms_p50"] <= s["latency_ms_p99"] and s["requests"] == 2 for s in summary)
    for plot in ("tokens_per_s.png", "bytes_per_token.png", "accepted_length.png"):
        assert (out / plot).stat().st_size > 1000


def test_per_token_acceptance_counts_one_rejection_per_round_not_accepted_whole():
    rows = [{"rounds": 3, "mean_accepted": 4.0, "rejected_rounds": 1},  # 12 accepted, 1 rejection
            {"rounds": 2, "mean_accepted": 0.5, "rejected_rounds": 2},  # 1 accepted, 2 rejections
            {"rounds": 0, "mean_accepted": float("nan"), "rejected_rounds": 0}]  # streamed: no rounds
    assert bench.token_acceptance(rows) == 13 / 16
    assert bench.token_acceptance(rows[2:]) != bench.token_acceptance(rows[2:])  # nan: nothing judged
