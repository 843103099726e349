"""scripts/gpu_check.sh's Python side (covspec/tools/gpu_check.py) end to end on the CPU, shrunk
(--cpu-smoke, without the demo pair): every path's verify time per window and decode rate measured,
the report and its tables written. The GPU paths (CUDA graphs, torch.compile) are not run here."""

from __future__ import annotations

import json

import pytest

from covspec.tools.gpu_check import BATCH, build_target, main, prefilled


def test_the_smoke_run_measures_every_cpu_path(tmp_path) -> None:
    assert main(["--cpu-smoke", "--no-demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "verify.json").read_text())
    windows = report["windows"]
    for sessions in (1, BATCH):
        for path in ("dynamic", "static_eager"):
            rows = [r for r in report["verify"] if r["sessions"] == sessions and r["path"] == path]
            assert [r["window"] for r in rows] == windows, rows
            assert all(0 < r["min_ms"] <= r["ms"] for r in rows), rows
    assert {(r["sessions"], r["path"]) for r in report["decode"]} == {
        (s, p) for s in (1, BATCH) for p in ("dynamic", "static_eager")}
    assert all(0 < r["tokens_per_s"] <= r["best_tokens_per_s"] for r in report["decode"]), report["decode"]
    text = (tmp_path / "summary.md").read_text()
    assert "verify ms per window, 8 session(s)" in text and "| static_eager |" in text
    assert (tmp_path / "command.txt").read_text().startswith("python -m covspec.tools.gpu_check --cpu-smoke")


def test_the_random_target_has_the_shape_asked_for() -> None:
    import torch

    adapter = build_target("smoke", torch.device("cpu"), torch.bfloat16)
    config = adapter.text_config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 2)
    state = prefilled(adapter, 16)
    assert state.length == 16 and state.cache.layers[0].keys.dtype == torch.bfloat16
    with pytest.raises(KeyError):
        build_target("qwen72b", torch.device("cpu"), torch.float32)


def test_the_compiled_path_runs_the_static_pass_through_its_runner(monkeypatch) -> None:
    """torch.compile itself is left out (minutes on a CPU); what the script hands it must run."""
    import torch

    from covspec.tools import gpu_check

    compiled = []
    monkeypatch.setattr(gpu_check.torch, "compile", lambda fn, **options: compiled.append(options) or fn)
    args = gpu_check.parse(["--cpu-smoke"])
    adapter = build_target("smoke", torch.device("cpu"), torch.float32)
    rows = gpu_check.measure_verify(adapter, 1, gpu_check.Clock(600), args, lambda: None, compiled=True,
                                    windows=(1, 8), margin_s=0)
    assert compiled == [{"mode": "reduce-overhead", "dynamic": False}]
    assert [(r["path"], r["window"]) for r in rows] == [("static_compile", 1), ("static_compile", 8)]
    assert all(r["ms"] > 0 for r in rows), rows


def test_a_failing_path_is_reported_and_the_others_still_timed() -> None:
    from covspec.tools.gpu_check import interleaved_ms

    calls = []

    def broken():
        raise RuntimeError("capture failed")

    failed: dict[str, str] = {}
    times = interleaved_ms({"ok": lambda: calls.append(1), "broken": broken}, reps=3, sync=lambda: None, failed=failed)
    assert list(times) == ["ok"] and len(times["ok"]) == 3 and len(calls) == 5  # 2 warm-up calls untimed
    assert failed == {"broken": "RuntimeError: capture failed"}


def test_the_in_process_edges_answer_as_the_target(tmp_path) -> None:
    """The demo pair end to end with the edge in process, default and static (eager here): covspec's
    answers are target_only's."""
    from covspec.tools import gpu_check

    args = gpu_check.parse(["--cpu-smoke", "--dtype", "float32"])
    for settings in ({}, {"cuda_graphs": True}):
        row = gpu_check.edge_in_process(args, 2, **settings)
        assert row["covspec_equals_target_only"] == 2, row
        assert row["target_only_tokens_per_s"] > 0 and row["covspec_tokens_per_s"] > 0, row
