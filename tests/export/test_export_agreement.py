"""benchmarks.export_agreement's scoring and aggregation on a tiny fabricated input (no export, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.export_agreement import (
    END,
    Answers,
    checks,
    compare,
    e2e_matches,
    prefix_agreement,
    size_ratios,
)


def test_prefix_agreement_counts_up_to_the_first_divergence_over_the_longer_answer():
    reference = [[1, 2, 3, END], [4, 5, END], [6, END]]
    other = [[1, 2, 3, END], [4, 9, 5, END], [6, 7, 8, END]]  # same; diverges at 1; runs on past the end
    assert prefix_agreement(reference, other) == (4 + 1 + 1, 4 + 4 + 4)
    with pytest.raises(ValueError):
        prefix_agreement(reference, other[:2])


def _answers(label, sequences, scores, logits, quant="none", backend="eager", size=100):
    return Answers(label, sequences, [""] * len(sequences), scores, [np.asarray(x, float) for x in logits],
                   program_bytes=size, quant=quant, backend=backend)


def test_compare_size_ratios_and_checks():
    eager = _answers("eager fp32", [[1, END], [2, END]], [1.0, 0.0], [[0.0, 1.0], [2.0, 0.0]], size=300)
    fp32 = _answers("pte fp32", [[1, END], [2, END]], [1.0, 0.0], [[0.0, 1.0], [2.0, 0.5]], backend="executorch",
                    size=310)
    int8 = _answers("pte int8", [[1, END], [3, END]], [1.0, 1.0], [[0.25, 1.0], [2.0, 0.0]], quant="int8",
                    backend="executorch", size=100)
    rows = [compare(eager, r) for r in (eager, fp32, int8)]
    size_ratios(rows, 300)
    assert rows[0]["answers_identical"] == 2 and rows[0]["first_step_max_abs_logit_diff"] == 0.0
    assert rows[1]["first_step_max_abs_logit_diff"] == 0.5
    assert rows[2]["prefix_tokens_equal"] == 2 and rows[2]["tokens"] == 4 and rows[2]["answers_identical"] == 1
    assert rows[2]["accuracy_minus_eager"]["value"] == pytest.approx(0.5)
    assert rows[2]["smaller_than_fp32"] == pytest.approx(3.1) and rows[1]["smaller_than_fp32"] is None
    assert rows[2]["smaller_than_eager"] == pytest.approx(3.0)
    e2e = e2e_matches([{"link": "loopback", "mode": "target_only", "matches_target": None},
                       {"link": "loopback", "mode": "covspec", "matches_target": True, "rounds": 2},
                       {"link": "loopback", "mode": "covspec", "matches_target": True, "rounds": 0,
                        "edge_drafted": True}])
    assert e2e == {"loopback": {"same": 2, "answers": 2, "device_drafted": 1}}
    verdicts = [ok for _, ok in checks(rows, 2, e2e)]
    assert verdicts == [True, False, True, True, True]  # fp32 equal; int8 agreement 50%; no loss; 3.1x; e2e
