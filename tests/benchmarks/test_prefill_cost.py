"""benchmarks.prefill_cost: the selection + prefill table (its figures are a benchmark, not asserted here)."""

import json

import pytest

from benchmarks.prefill_cost import main, random_llava
from covspec.demo import WEIGHTS


def test_prefill_cost_measures_every_ratio_against_the_unpruned_prefill(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["--draft", str(WEIGHTS / "draft"), "--reps", "1", "--ratios", "0.25", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["ratio"], r["kept"]) for r in rows] == [(0.25, 9), (1.0, 36)]
    full = rows[1]["prefill_ms"]
    for r in rows:
        assert r["prefill_ms"] > 0 and r["encode_ms"] > 0
        assert r["total_ms"] == pytest.approx(r["select_ms"] + r["prefill_ms"])
        assert r["saved_ms"] == pytest.approx(full - r["total_ms"])
    assert rows[0]["select_ms"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "Command: python -m benchmarks.prefill_cost --draft" in out.with_suffix(".txt").read_text()
    assert "| 0.25 | 9 |" in capsys.readouterr().out


def test_a_random_shape_needs_a_square_token_grid():
    with pytest.raises(ValueError, match="square number"):
        random_llava("smollm2-135m", 100 + 1)
