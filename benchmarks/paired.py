"""Paired per-prompt comparison of two modes in a `covspec bench` folder: on each link, the ratio of
mean decode tokens/s and of mean request latency of mode A over mode B (and A over target_only),
with 95% bootstrap intervals resampling the same prompts (covspec.stats.bootstrap_ratio); also
without each link's first prompt, where a fresh device still learns its estimates.

    python -m benchmarks.paired results/bench-edge-sd --a covspec --b edge_sd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from covspec.stats import Estimate, bootstrap_ratio


def fmt(e: Estimate) -> str:
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def table(rows: list[dict], a: str, b: str) -> list[str]:
    lines = [f"| link | prompts | {a} / {b} tok/s | {a} / target_only tok/s | {a} / {b} latency |",
             "|---|---|---|---|---|"]
    for link in dict.fromkeys(r["link"] for r in rows):
        by = {m: {r["index"]: r for r in rows if r["link"] == link and r["mode"] == m} for m in (a, b, "target_only")}
        shared = sorted(set(by[a]) & set(by[b]) & set(by["target_only"]))
        for skip, label in ((0, f"all {len(shared)}"), (1, "after the first")):
            keep = shared[skip:]

            def col(mode: str, field: str, keep: list[int] = keep, by: dict = by) -> np.ndarray:
                return np.array([by[mode][i][field] for i in keep], dtype=float)

            lines.append(f"| {link} | {label} | {fmt(bootstrap_ratio(col(a, 'decode_tps'), col(b, 'decode_tps')))} | "
                         f"{fmt(bootstrap_ratio(col(a, 'decode_tps'), col('target_only', 'decode_tps')))} | "
                         f"{fmt(bootstrap_ratio(col(a, 'latency_s'), col(b, 'latency_s')))} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", type=Path, help="a covspec bench output folder (its results.jsonl)")
    p.add_argument("--a", default="covspec", help="the mode compared")
    p.add_argument("--b", default="edge_sd", help="the mode it is compared against")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in (args.folder / "results.jsonl").read_text().splitlines() if line.strip()]
    text = "\n".join(table(rows, args.a, args.b))
    (args.folder / f"paired-{args.a}-{args.b}.md").write_text(
        f"Command: `python -m benchmarks.paired {args.folder} --a {args.a} --b {args.b}`\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
