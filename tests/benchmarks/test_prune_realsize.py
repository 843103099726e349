"""benchmarks.prune_realsize and benchmarks.lowres_accept at tiny sizes (their figures are a benchmark,
not asserted here): every draft layout runs end to end and writes a row for every keep share."""

import json

import pytest

from benchmarks.lowres_accept import FULL, NATIVE, PRUNED, QUARTER, UPSCALED, accept_lowres, downscale
from benchmarks.prune_realsize import KEEPS, LOW, SHAPE_NAMES, main
from covspec.demo import WEIGHTS
from covspec.demo.task import make_item


def test_every_layout_writes_a_row_for_every_keep_share_and_the_half_side_image(tmp_path, capsys):
    assert main(["--tiny", "--reps", "1", "--steps", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "prune_realsize.json").read_text())["rows"]
    assert [r["shape"] for r in rows] == [s for s in SHAPE_NAMES for _ in range(len(KEEPS) + 1)]
    for shape in SHAPE_NAMES:
        mine = [r for r in rows if r["shape"] == shape and r["variant"] == "keep"]
        assert [r["keep"] for r in mine] == sorted(KEEPS, reverse=True)
        full = mine[0]
        assert full["kept"] == full["tokens"] and full["saved_ms"] == 0
        # fewer kept tokens, fewer prefill positions (the prompt's text is the same)
        assert [full["positions"] - r["positions"] for r in mine] == [full["tokens"] - r["kept"] for r in mine]
        assert [r["kept"] for r in mine] == sorted({r["kept"] for r in mine}, reverse=True)
        for r in mine:
            assert r["vision_ms"] > 0 and r["prefill_ms"] > 0 and r["step_ms"] > 0
            assert r["total_ms"] == pytest.approx(r["vision_ms"] + r["select_ms"] + r["prefill_ms"])
            assert r["saved_ms"] == pytest.approx(full["total_ms"] - r["total_ms"])
            assert r["vision_share"] == pytest.approx(r["vision_ms"] / r["total_ms"])
        assert all(r["select_ms"] > 0 for r in mine[1:])
        low = next(r for r in rows if r["shape"] == shape and r["variant"] == LOW)
        assert low["side"] * 2 == full["side"] and low["tokens"] * 4 == full["tokens"] == 16
    qwen = [r for r in rows if r["shape"] == "qwen2.5-vl-0.5b"]
    assert all(r["vision_ms"] > r["vision_measured_ms"] for r in qwen)  # its tower built 2 of 4 blocks deep
    assert (tmp_path / "prune_realsize.png").stat().st_size > 0
    assert "Command: `python -m benchmarks.prune_realsize --tiny" in (tmp_path / "table.md").read_text()
    assert "| qwen2.5-vl-0.5b | keep 0.25 | 112 | 4 / 16 |" in capsys.readouterr().out


def test_lower_resolution_draft_is_measured_against_the_full_image_on_the_same_items():
    image = make_item("heldout", 0, 0, "describe").image
    assert downscale(image).size == (36, 36)
    runs, meta = accept_lowres(WEIGHTS / "draft", WEIGHTS / "target", limit=2)
    assert [r.variant for r in runs] == [FULL, UPSCALED, QUARTER, NATIVE, PRUNED]
    assert [r.tokens for r in runs] == [36, 36, 36, 9, 9]
    assert meta["split"] == "heldout" and all(len(r.drafted) == 2 for r in runs)
