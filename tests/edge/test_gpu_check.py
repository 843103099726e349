"""scripts/gpu_check.sh's Python side (covspec/tools/gpu_check.py) end to end on the CPU, shrunk
(--cpu-smoke, without the demo pair): every path's logits against the eager pass, verify time per
window and decode rate measured, the report and its tables written; a path whose logits are wrong
makes the run exit 1. torch.compile runs for real here (the aot_eager backend: dynamo's tracing and
guards without inductor's code generation, which takes minutes on a CPU); CUDA graphs need CUDA and
are skipped here, saying so."""

from __future__ import annotations

import json

import pytest

from covspec.tools.gpu_check import BATCH, build_target, main, prefilled


def test_the_smoke_run_measures_every_cpu_path(tmp_path) -> None:
    assert main(["--cpu-smoke", "--no-demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["failures"] == []
    parity = [r for r in report["parity"] if r["path"] == "static_eager"]
    assert {(r["sessions"], r["window"]) for r in parity} == {(s, n) for s in (1, BATCH) for n in (1, 5, 16)}
    assert report["parity_atol"] == 0.25  # bfloat16 (the smoke run's dtype)
    assert all(r["ok"] and r["max_abs_diff"] <= 0.25 and r["greedy_agreement"] >= 0.95 for r in parity), parity
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


def test_the_compiled_path_gives_the_eager_logits_and_is_timed() -> None:
    """The static pass under torch.compile for real (backend aot_eager on the CPU): its logits equal the
    eager DynamicCache pass's, and it is timed."""
    import torch

    from covspec.tools import gpu_check

    args = gpu_check.parse(["--cpu-smoke", "--compile-backend", "aot_eager"])
    adapter = build_target("smoke", torch.device("cpu"), torch.float32)
    torch._dynamo.reset()
    rows = gpu_check.parity(adapter, 1, args, compiled=True, windows=(1, 8))
    assert [(r["path"], r["window"]) for r in rows] == [("static_compile", 1), ("static_compile", 8)]
    assert all(r["ok"] and r["max_abs_diff"] <= 1e-3 and r["greedy_agreement"] == 1.0 for r in rows), rows
    timed = gpu_check.measure_verify(adapter, 1, gpu_check.Clock(600), args, lambda: None, compiled=True,
                                     windows=(8,), margin_s=0)
    assert [r["path"] for r in timed] == ["static_compile"] and timed[0]["ms"] > 0, timed


def test_a_path_with_wrong_logits_fails_the_run(tmp_path, monkeypatch) -> None:
    """The static pass off by a little (every logit + 0.01, float32): the parity rows say so, exit 1."""
    from covspec.edge_runtime import static_verify

    right = static_verify.eager_pass
    monkeypatch.setattr(static_verify, "eager_pass", lambda *a: right(*a) + 0.01)
    assert main(["--cpu-smoke", "--no-demo", "--dtype", "float32", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["failures"] and all("parity static_eager" in f for f in report["failures"]), report["failures"]
    assert "## FAILED" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="no CUDA here: CUDA graphs and inductor's reduce-overhead are checked by gpu_check on a GPU")
def test_cuda_graph_and_compiled_logits_equal_eager_on_cuda() -> None:
    import torch

    from covspec.tools import gpu_check

    args = gpu_check.parse(["--shape", "smoke", "--dtype", "float32", "--context", "32"])
    adapter = build_target("smoke", torch.device("cuda"), torch.float32)
    rows = gpu_check.parity(adapter, 1, args) + gpu_check.parity(adapter, 1, args, compiled=True)
    assert {r["path"] for r in rows} == {"static_eager", "static_graphs", "static_compile"}
    assert all(r["ok"] for r in rows), rows


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
    """The demo pair end to end with the edge in process, default and static (eager passes: CUDA graphs
    off CUDA are refused): covspec's answers are target_only's."""
    from covspec.tools import gpu_check

    args = gpu_check.parse(["--cpu-smoke", "--dtype", "float32"])
    for settings in ({}, {"static_cache": True}):
        row = gpu_check.edge_in_process(args, 2, **settings)
        assert row["covspec_equals_target_only"] == 2, row
        assert row["target_only_tokens_per_s"] > 0 and row["covspec_tokens_per_s"] > 0, row
