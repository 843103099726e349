"""Goodput at an SLO (covspec/tools/goodput.py): rows built by hand on each side of the SLO's edges."""

import math

import pytest

from covspec.tools.bench_config import BenchConfig
from covspec.tools.goodput import (
    SLO_DEFAULT,
    Slo,
    devices_served,
    goodput,
    meets,
    paired_ratio,
    parse_slo,
    pooled_ratio,
    tpot_s,
)

SLO = Slo(ttft_ms=500, tpot_ms=25)


def row(ttft: float, tpot: float, tokens: int = 11, queue: float = 0.0, t_start: float = 0.0, device=0, index=0) -> dict:
    """An answer with this TTFT and TPOT (seconds): latency = ttft + tpot * (tokens - 1)."""
    latency = ttft + tpot * (tokens - 1)
    return {"ttft_s": ttft, "latency_s": latency, "tokens": tokens, "queue_s": queue, "t_start": t_start,
            "t_end": t_start + queue + latency, "device": device, "index": index}


def test_parse_slo_defaults_and_errors():
    assert parse_slo("") == parse_slo(SLO_DEFAULT) == Slo(500, 25)
    assert BenchConfig().slo == SLO_DEFAULT  # the flag's default is the one the module states
    assert parse_slo("tpot=40") == Slo(500, 40)
    assert parse_slo("ttft=200,tpot=10") == Slo(200, 10)
    for bad in ("ttft", "latency=3", "ttft=fast", "tpot=0", "ttft=-1"):
        with pytest.raises(ValueError, match="--slo"):
            parse_slo(bad)


def test_tpot_excludes_the_first_token():
    assert tpot_s(row(0.2, 0.010)) == pytest.approx(0.010)
    assert tpot_s(row(0.2, 0.0, tokens=1)) == 0.0


def test_meets_at_the_edges():
    assert meets(row(0.500, 0.025), SLO)  # exactly at both limits: met
    assert not meets(row(0.501, 0.010), SLO)  # TTFT just over
    assert not meets(row(0.100, 0.0251), SLO)  # TPOT just over
    assert not meets(row(0.300, 0.010, queue=0.201), SLO)  # open loop: the wait counts in TTFT
    assert meets(row(0.300, 0.010, queue=0.199), SLO)


def test_goodput_counts_only_answers_within_the_slo():
    rows = [row(0.1, 0.01, t_start=0.0), row(0.6, 0.01, t_start=0.0), row(0.1, 0.03, t_start=0.0),
            row(0.1, 0.02, t_start=0.7)]  # the last ends at 0.7 + 0.1 + 0.2 = 1.0: span 1 s
    g = goodput(rows, SLO)
    assert g["slo_met"] == 2 and g["goodput"] == pytest.approx(2.0) and g["slo_share"] == 0.5
    assert not g["at_slo"]  # p99 TTFT 0.6 s is over
    assert goodput([row(0.1, 0.01), row(0.5, 0.025)], SLO)["at_slo"]
    untimed = goodput([{**row(0.1, 0.01), "ttft_s": None}], SLO)  # no first-token time: not judged
    assert math.isnan(untimed["goodput"]) and not untimed["at_slo"]


def test_devices_served_needs_every_repeat_at_slo():
    summary = [{"mode": "covspec", "devices": n, "rate": None, "at_slo": ok} for n, ok in
               ((1, True), (2, True), (4, True), (4, False), (8, True), (16, False))]
    summary += [{"mode": "edge_sd", "devices": 1, "rate": None, "at_slo": False}]
    assert devices_served(summary) == {"covspec": 8, "edge_sd": 0}  # 4 failed one repeat; 8 passed


def test_paired_ratio_interval_covers_the_truth_and_fails_when_unpaired():
    # a: every answer met; b: half did, same span and answer count: ratio 2
    a = [row(0.1, 0.01, t_start=i, index=i) for i in range(40)]  # both spans 39.2 s (the last answers alike)
    b = [row(0.1 if i % 2 else 0.9, 0.01, t_start=i, index=i) for i in range(40)]
    ratio, low, high = paired_ratio(a, b, SLO)
    assert ratio == pytest.approx(2.0) and low < 2.0 < high and low > 1.0  # a met every answer: above 1 in any resample
    assert paired_ratio(a, a, SLO) == (1.0, 1.0, 1.0)
    assert all(math.isnan(v) for v in paired_ratio(a, [row(0.1, 0.01, device=1)], SLO))


def test_pooled_ratio_pairs_prompts_within_their_repeat_and_cancels_a_drift():
    """Two repeats of the same prompts: in the first the machine is fast for mode b (b ran first), in the
    second for mode a (order reversed). Each repeat alone says a or b wins by 25%; pooled, neither does."""
    def run(tpot: float, repeat: int) -> list[dict]:
        return [dict(row(0.02, tpot, index=i), repeat=repeat) for i in range(20)]

    a = run(0.010, 0) + run(0.008, 1)
    b = run(0.008, 0) + run(0.010, 1)
    ratio, low, high = pooled_ratio(a, b, SLO)
    assert ratio == pytest.approx(1.0) and low < 1.0 < high
    assert pooled_ratio(run(0.010, 0), run(0.008, 0), SLO)[0] < 0.85  # one repeat alone: the drift reads as a loss
    fast = run(0.005, 0) + run(0.005, 1)
    assert pooled_ratio(fast, b, SLO)[1] > 1.5  # a real gain stays one
    assert math.isnan(pooled_ratio(a, run(0.01, 7), SLO)[0])  # no prompt pairs within a repeat: no ratio
