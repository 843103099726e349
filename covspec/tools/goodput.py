"""Goodput: answers per second that meet a latency SLO, the load bench's headline (as DistServe, WISP).

An answer meets the SLO when its time to first token and its time per output token are both within it:

    ttft  = queue_s + ttft_s                       (from the request's arrival: open loop counts the wait)
    tpot  = (latency_s - ttft_s) / (tokens - 1)    (decode time per token after the first; 0 for one token)
    goodput = answers meeting the SLO / span       (span: first request's start to the last one's end)

A run meets the SLO when its p99 TTFT and p99 TPOT are within it; `devices_served` is the largest device
count whose run does, per mode (one edge). `paired_ratio` compares two modes on the same prompts: the
measured ratio of goodputs, with a bootstrap interval over the prompts (each resample draws prompts,
both modes' answers to them together); `pooled_ratio` does so over every repeat of a device count at once.
"""

from __future__ import annotations

import numpy as np

from covspec.slo import SLO_DEFAULT, Slo, parse_slo

__all__ = ["SLO_DEFAULT", "Slo", "parse_slo", "goodput", "paired_ratio", "pooled_ratio", "devices_served", "ttft_s",
           "tpot_s"]


def ttft_s(row: dict) -> float:
    """The answer's time to first token, from its arrival (open loop: the wait for a busy device included)."""
    return (row.get("queue_s") or 0.0) + row["ttft_s"]


def tpot_s(row: dict) -> float:
    """The answer's time per output token after the first (0 for an answer of one token)."""
    return max(row["latency_s"] - row["ttft_s"], 0.0) / (row["tokens"] - 1) if row["tokens"] > 1 else 0.0


def meets(row: dict, slo: Slo) -> bool:
    return ttft_s(row) * 1000 <= slo.ttft_ms and tpot_s(row) * 1000 <= slo.tpot_ms


def span_s(rows: list[dict]) -> float:
    return max(max(r["t_end"] for r in rows) - min(r["t_start"] for r in rows), 1e-9)


def goodput(rows: list[dict], slo: Slo) -> dict:
    """One run's goodput figures: answers/s meeting the SLO, the share that does, p99 TTFT and TPOT (ms)
    and whether the run meets the SLO (both p99s within it)."""
    if any(r.get("ttft_s") is None for r in rows):  # rows that did not time their first token: not judged
        nan = float("nan")
        return {"goodput": nan, "slo_met": 0, "slo_share": nan, "slo_ttft_ms_p99": nan, "slo_tpot_ms_p99": nan,
                "at_slo": False}
    ttft = np.array([ttft_s(r) for r in rows]) * 1000
    tpot = np.array([tpot_s(r) for r in rows]) * 1000
    met = sum(meets(r, slo) for r in rows)
    p99_ttft, p99_tpot = float(np.percentile(ttft, 99)), float(np.percentile(tpot, 99))
    return {"goodput": met / span_s(rows), "slo_met": met, "slo_share": met / len(rows),
            "slo_ttft_ms_p99": p99_ttft, "slo_tpot_ms_p99": p99_tpot,
            "at_slo": bool(p99_ttft <= slo.ttft_ms and p99_tpot <= slo.tpot_ms)}


def devices_served(summary: list[dict]) -> dict[str, int]:
    """Per mode: the largest device count whose run meets the SLO (every run of that count, where
    repeated), 0 when none does. Closed-loop runs only (no rate)."""
    served: dict[str, int] = {}
    for mode in dict.fromkeys(s["mode"] for s in summary):
        runs: dict[int, list[bool]] = {}
        for s in summary:
            if s["mode"] == mode and s.get("rate") is None:
                runs.setdefault(s["devices"], []).append(bool(s["at_slo"]))
        served[mode] = max((n for n, ok in runs.items() if all(ok)), default=0)
    return served


def _pairs(rows_a: list[dict], rows_b: list[dict], slo: Slo) -> np.ndarray:
    """[prompts, 4]: (a met, a's answer time, b met, b's answer time) of the prompts both runs answered,
    paired on (repeat, device, index)."""
    key = lambda r: (r.get("repeat", 0), str(r["device"]), r["index"])  # noqa: E731
    b_by = {key(r): r for r in rows_b}
    return np.array([(meets(r, slo), r["latency_s"], meets(b_by[key(r)], slo), b_by[key(r)]["latency_s"])
                     for r in rows_a if key(r) in b_by], dtype=float).reshape(-1, 4)


def _per_time(m: np.ndarray) -> np.ndarray:
    """m [..., prompts, 4] -> (met / answer time of a) over (the same, b): the closed loop's goodput per device."""
    a = m[..., 0].sum(-1) / m[..., 1].sum(-1)
    b = m[..., 2].sum(-1) / m[..., 3].sum(-1)
    return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _bootstrap(pairs: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    picks = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))
    boot = _per_time(pairs[picks])
    return boot[~np.isnan(boot)]


def paired_ratio(rows_a: list[dict], rows_b: list[dict], slo: Slo, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Goodput of run a over run b with its 95% paired interval: (ratio, low, high); nan where no prompt
    pairs (on (device, index)) or b has no goodput. The ratio is the measured one; its interval comes from
    a bootstrap over the paired prompts of (answers met / answer time summed, a) over (the same, b), the
    closed loop's goodput per device, each resample scaled by the measured ratio over its full-sample value:
    both the share meeting the SLO and each answer's time vary with the prompts drawn."""
    pairs = _pairs(rows_a, rows_b, slo)
    good_a, good_b = goodput(rows_a, slo)["goodput"], goodput(rows_b, slo)["goodput"] if rows_b else 0.0
    if not len(pairs) or not good_b:
        return float("nan"), float("nan"), float("nan")
    measured = good_a / good_b
    full = float(_per_time(pairs))
    boot = _bootstrap(pairs, resamples, seed)
    if not full > 0 or not boot.size:
        return measured, float("nan"), float("nan")
    low, high = np.percentile(boot / full * measured, [2.5, 97.5])
    return measured, float(low), float(high)


def pooled_ratio(rows_a: list[dict], rows_b: list[dict], slo: Slo, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mode a over mode b over several repeats together, each prompt paired within its repeat: (met /
    answer time of a) over (the same, b), with its 95% bootstrap interval over the pairs. Repeats run in
    alternating order (the load bench's a-b, b-a) so that a drift of the machine's speed cancels out."""
    pairs = _pairs(rows_a, rows_b, slo)
    if not len(pairs):
        return float("nan"), float("nan"), float("nan")
    full, boot = float(_per_time(pairs)), _bootstrap(pairs, resamples, seed)
    if full != full or not boot.size:
        return full, float("nan"), float("nan")
    low, high = np.percentile(boot, [2.5, 97.5])
    return full, float(low), float(high)
