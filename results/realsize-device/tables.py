"""The tables of results/realsize-device/README.md from a bench's results.jsonl:
python results/realsize-device/tables.py results/realsize-device/bench/results.jsonl"""

import json
import sys
from collections import defaultdict

import numpy as np


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["link"], r["mode"])].append(r)
    print("| link | mode | TTFT p50 ms | TTFT p90 ms | latency mean ms | latency p90 ms | tokens/s end-to-end | "
          "same as target | device joined mid-answer | edge finished before the draft was ready | edge drafted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (link, mode), rs in groups.items():
        ttft = np.array([r["ttft_s"] for r in rs]) * 1000
        lat = np.array([r["latency_s"] for r in rs]) * 1000
        same = [r["matches_target"] for r in rs if r["matches_target"] is not None]
        joined = sum(r.get("joined_at") is not None for r in rs)
        never = sum(r.get("join_segments") is not None and r.get("joined_at") is None for r in rs)
        print(f"| {link} | {mode} | {np.median(ttft):.0f} | {np.percentile(ttft, 90):.0f} | {lat.mean():.0f} | "
              f"{np.percentile(lat, 90):.0f} | {sum(r['tokens'] for r in rs) / (lat.sum() / 1000):.1f} | "
              f"{sum(same)}/{len(same)} | {joined} | {never} | {np.mean([bool(r['edge_drafted']) for r in rs]):.2f} |")
    print()
    # paired per prompt: covspec's latency over each other mode's, mean with a 95% bootstrap interval
    by = {(r["link"], r["mode"], r["index"]): r for r in rows}
    rng = np.random.default_rng(0)
    print("| link | covspec latency / mode's (paired per prompt) | ratio | 95% interval |")
    print("|---|---|---|---|")
    for link in dict.fromkeys(r["link"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            if mode == "covspec":
                continue
            pairs = [(by[(link, "covspec", i)]["latency_s"], by[(link, mode, i)]["latency_s"])
                     for (lk, md, i) in by if lk == link and md == mode and (link, "covspec", i) in by]
            ratios = np.array([a / b for a, b in pairs])
            boot = [rng.choice(ratios, len(ratios)).mean() for _ in range(2000)]
            print(f"| {link} | {mode} | {ratios.mean():.2f} | {np.percentile(boot, 2.5):.2f}-{np.percentile(boot, 97.5):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
