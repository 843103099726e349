"""Figures the bench and the load bench share: percentiles of a column, a mean's 95% interval, table
cells, rows as JSON Lines and CSV, and CDF plots of latency distributions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


def _clean(values: list) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]


def _mean(values: list) -> float:
    clean = _clean(values)
    return float(np.mean(clean)) if clean else float("nan")


def percentiles(values: list, name: str, scale: float = 1000.0) -> dict[str, float]:
    """`name`_p50/_p90/_p99/_mean of `values` (seconds, shown in ms by `scale`); nan when none."""
    clean = np.asarray(_clean(values), dtype=float) * scale
    if not clean.size:
        return {f"{name}_{k}": float("nan") for k in ("p50", "p90", "p99", "mean")}
    p50, p90, p99 = np.percentile(clean, [50, 90, 99])
    return {f"{name}_p50": float(p50), f"{name}_p90": float(p90), f"{name}_p99": float(p99),
            f"{name}_mean": float(clean.mean())}


def mean_ci95(values: list) -> float:
    """Half-width of the mean's 95% interval (normal approximation); nan under two values."""
    clean = _clean(values)
    return 1.96 * float(np.std(clean, ddof=1)) / np.sqrt(len(clean)) if len(clean) > 1 else float("nan")


def _f(value, digits: int = 0) -> str:
    """A figure for a table cell: blank where not measured."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def write_table(out: Path, name: str, rows: list[dict], columns) -> None:
    """`rows` as NAME.csv and NAME.jsonl (the CSV with `columns`)."""
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_cdfs(path: Path, panels: dict[str, dict[str, list[float]]], xlabel: str, title: str) -> None:
    """Empirical CDFs: a panel per key of `panels` (a link, a rate), a line per series (a mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(1 + 4.5 * len(panels), 4), squeeze=False, sharex=True,
                             sharey=True)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        for label, values in series.items():
            values = np.sort(np.asarray(_clean(values), dtype=float))
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of requests")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
