"""benchmarks/device_footprint.py: the size of a folder on disk, and the summary and table of
fabricated device results (no processes, no timing)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from benchmarks.device_footprint import site_packages, summarise, table, tree_bytes


def test_tree_bytes_counts_files_once_and_skips_symlinks(tmp_path: Path) -> None:
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "a.py").write_bytes(b"x" * 1000)
    (site / "b.so").write_bytes(b"y" * 2500)
    os.link(site / "b.so", site / "b-hardlink.so")
    (site / "link.so").symlink_to(site / "b.so")
    assert site_packages(tmp_path / "venv") == site
    assert tree_bytes(site) == 3500


def _variant(name: str, answers: list[dict], modules: list[str]) -> dict:
    return {"name": name, "label": name.upper(), "install_mb": 270.0, "draft_mb": 0.5, "maxrss_mb": 67.0,
            "startup_s": [0.9, 1.5, 0.8], "step_s": [0.0001, 0.0003, 0.0002, 0.0004], "answers": answers,
            "threads": 4, "modules": modules}


def test_summary_uses_the_bench_decode_rate_and_compares_answers() -> None:
    ref = _variant("ref", [{"link": "loopback", "index": 0, "decode_tps": 100.0, "latency_s": 0.2, "ids": [1, 2]},
                           {"link": "loopback", "index": 1, "decode_tps": 300.0, "latency_s": 0.4, "ids": [3]},
                           {"link": "wifi", "index": 0, "decode_tps": float("nan"), "latency_s": 0.1, "ids": [4]}],
                   ["torch"])
    other = _variant("other", [{"link": "loopback", "index": 0, "decode_tps": 50.0, "latency_s": 0.3, "ids": [1, 2]},
                               {"link": "loopback", "index": 1, "decode_tps": 70.0, "latency_s": 0.3, "ids": [9]},
                               {"link": "wifi", "index": 0, "decode_tps": 10.0, "latency_s": 0.5, "ids": [4]}], [])
    row = summarise(ref, ["loopback", "wifi"], ref)
    assert row["loopback_tps"] == 200.0 and math.isnan(row["wifi_tps"])  # one-token answers have no rate
    assert math.isclose(row["loopback_latency_ms"], 300.0) and row["startup_s"] == 0.9
    assert math.isclose(row["step_ms"], 0.25) and row["same_answers"] == "3/3"
    assert summarise(other, ["loopback", "wifi"], ref)["same_answers"] == "2/3"

    lines = table([row, summarise(other, ["loopback", "wifi"], ref)], ["loopback", "wifi"])
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "| REF | 270 | 0.50 | 67 | 0.90 | 0.25 | 200 | 300 | nan | 100 | 3/3 | torch | 4 |" == lines[2]
    assert lines[3].endswith("| 2/3 | none | 4 |")
