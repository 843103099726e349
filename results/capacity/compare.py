"""Before and after SLO-aware rounds, side by side: goodput at the SLO and p99 TPOT against devices, per mode,
for the edge scheduling its rounds by the SLO (results/capacity) and in arrival order (results/capacity-fifo),
each point the mean over a count's repeats. `python results/capacity/compare.py` writes
results/capacity/schedule.png and prints the table."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RUNS = {"slo (results/capacity)": Path("results/capacity"), "fifo (results/capacity-fifo)": Path("results/capacity-fifo")}
MODES = ("target_only", "edge_sd", "covspec", "covspec_no_placement")


def means(folder: Path) -> dict[tuple[str, int], dict[str, float]]:
    rows = [json.loads(line) for line in (folder / "load-summary.jsonl").read_text().splitlines()]
    out: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        out.setdefault((r["mode"], r["devices"]), []).append(r)
    return {k: {"goodput": sum(r["goodput"] for r in v) / len(v),
                "tpot99": sum(r["slo_tpot_ms_p99"] for r in v) / len(v),
                "met": sum(r["slo_met"] for r in v), "answers": sum(r["requests"] for r in v)} for k, v in out.items()}


def main() -> None:
    data = {name: means(folder) for name, folder in RUNS.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, values), style in zip(data.items(), ("-", "--"), strict=True):
        for mode, color in zip(MODES, ("tab:gray", "tab:orange", "tab:blue", "tab:green"), strict=True):
            counts = sorted(n for m, n in values if m == mode)
            left.plot(counts, [values[(mode, n)]["goodput"] for n in counts], style, color=color, marker="o",
                      label=f"{mode}, {name.split()[0]}")
            right.plot(counts, [values[(mode, n)]["tpot99"] for n in counts], style, color=color, marker="o")
    right.axhline(25, color="red", linewidth=0.8)
    for ax, label in ((left, "goodput at SLO, answers/s"), (right, "p99 time per output token, ms (SLO 25)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices (replayed, wifi)")
        ax.set_ylabel(label)
    right.set_yscale("log")
    left.legend(fontsize=7)
    fig.suptitle("one CPU edge, demo pair: rounds by the SLO (solid) against arrival order (dashed)")
    fig.tight_layout()
    fig.savefig(RUNS["slo (results/capacity)"] / "schedule.png", dpi=120)
    print("| mode | devices | " + " | ".join(f"{name}: goodput, met, p99 TPOT" for name in data) + " |")
    print("|---|---|" + "---|" * len(data))
    for mode in MODES:
        for n in sorted(n for m, n in data["slo (results/capacity)"] if m == mode):
            cells = [f"{v[(mode, n)]['goodput']:.2f}, {v[(mode, n)]['met']}/{v[(mode, n)]['answers']}, "
                     f"{v[(mode, n)]['tpot99']:.1f}" for v in data.values()]
            print(f"| {mode} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
