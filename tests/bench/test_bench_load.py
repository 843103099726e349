"""`covspec bench --devices`: the load summary, and (slow) a run of 1 and 2 device processes."""

import json
from pathlib import Path

import pytest
import tiny_models

from covspec.tools import bench
from covspec.tools.load import summarise_load


def row(device: int, tokens: int, t_start: float, t_end: float) -> dict:
    return {"device": device, "tokens": tokens, "t_start": t_start, "t_end": t_end, "latency_s": t_end - t_start}


def test_load_summary_figures():
    rows = [row(0, 10, 0.0, 1.0), row(0, 10, 1.0, 2.0), row(1, 30, 0.5, 1.5)]
    s = summarise_load(rows, "vanilla_sd", 2, {"batches": 4, "batched_windows": 10}, 123.0)
    assert s["tokens"] == 50 and s["requests"] == 3
    assert s["aggregate_tps"] == pytest.approx(50 / 2.0)  # all tokens over the span 0..2 s
    assert s["device_tps_mean"] == pytest.approx((20 / 2.0 + 30 / 1.0) / 2)
    assert s["device_tps_min"] == pytest.approx(10.0)
    assert s["latency_p50_ms"] == pytest.approx(1000.0)
    assert s["windows_per_batch"] == pytest.approx(2.5) and s["edge_peak_rss_mb"] == 123.0
    assert s["edge_cpu_ms_per_request"] is None and s["edge_busy"] is None  # not measured
    measured = summarise_load(rows, "vanilla_sd", 2, {}, None, edge_cpu_s=1.5)
    assert measured["edge_cpu_ms_per_request"] == pytest.approx(500.0) and measured["edge_busy"] == pytest.approx(0.75)


def test_process_cpu_time_is_read_from_proc():
    import os
    import time

    from covspec.tools.load import process_cpu_s

    first = process_cpu_s(os.getpid())
    start = time.process_time()
    while time.process_time() - start < 0.05:  # 50 ms of CPU work, five clock ticks
        pass
    assert first is not None and process_cpu_s(os.getpid()) > first
    assert process_cpu_s(2**22 + 12345) is None  # no such process


@pytest.mark.slow
def test_load_run_with_one_and_two_devices(tmp_path: Path):
    target = tiny_models.build_llava(tmp_path / "target", seed=0)
    draft = tiny_models.build_llava(tmp_path / "draft", seed=1)
    out = tmp_path / "load"
    argv = ["--target", str(target), "--draft", str(draft), "--devices", "1,2", "--modes", "vanilla_sd",
            "--prompts", "1", "--max-new-tokens", "8", "--out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads((out / "load.json").read_text())["summary"]
    assert [(s["devices"], s["requests"]) for s in summary] == [(1, 1), (2, 2)]
    assert all(s["aggregate_tps"] > 0 and s["latency_p99_ms"] >= s["latency_p50_ms"] for s in summary)
    assert summary[0]["edge_batches"] == 0  # one device: nothing to batch with
    assert "| vanilla_sd | 2 |  | 2 |" in (out / "load.md").read_text()  # closed loop: no rate


@pytest.mark.slow
def test_replaying_load_generators_get_the_recorded_replies(tmp_path: Path):
    target = tiny_models.build_llava(tmp_path / "target", seed=0)
    draft = tiny_models.build_llava(tmp_path / "draft", seed=1)
    out = tmp_path / "load"
    argv = ["--target", str(target), "--draft", str(draft), "--devices", "1,2", "--replay",
            "--modes", "target_only,vanilla_sd,covspec", "--prompts", "2", "--max-new-tokens", "12", "--out", str(out)]
    assert bench.main(argv) == 0
    summary = json.loads((out / "load.json").read_text())["summary"]
    assert [(s["mode"], s["devices"]) for s in summary] == [(m, n) for m in ("target_only", "vanilla_sd", "covspec")
                                                           for n in (1, 2)]
    for s in summary:
        assert s["requests"] == 2 * s["devices"] and s["replay_matches"] == s["requests"], s
    assert any(s["edge_batches"] > 0 for s in summary if s["devices"] == 2 and s["mode"] != "target_only")
