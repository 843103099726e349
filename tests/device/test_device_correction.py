"""The device's side of decoupled verification, on its own: on a RESULT that rejects drafted token a
(the edge's support of p there, no token), the device (`Speculation._next_token`) draws the correction
from norm(max(0, p - q_a)), q_a being its own distribution at the rejected position. Chi-square of
4,000 draws against that residual, for a rejection after 0 and after 2 accepted tokens, with q rows that
differ per position, so that a residual of p alone or of another position's q fails. The whole
loop (wire, edge, placement) is tests/scenarios/test_wire_sampling.py; this isolates the piece whose faults
change the distribution only where windows are accepted in part.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import chisquare

from covspec.device_runtime.speculation import Speculation
from covspec.drafter import Window
from covspec.transport import protocol as wire

V, K, DRAWS = 12, 4, 4000


def window(rng: np.random.Generator) -> Window:
    q = rng.dirichlet(np.full(V, 0.6), size=K).astype(np.float32)  # [K, V], a different q per position
    ids = np.array([int(np.argmax(row)) for row in q])
    return Window(ids, q, np.zeros(K, np.float32), np.zeros(K, np.int64), [0.0] * K)


@pytest.mark.parametrize("accepted", [0, 2])
def test_the_device_draws_its_correction_from_the_residual_at_the_rejected_position(accepted: int) -> None:
    rng = np.random.default_rng(accepted)
    drafted = window(rng)
    p = rng.dirichlet(np.full(V, 0.6)).astype(np.float32)  # the target's p at the rejected position
    support = np.flatnonzero(p > 0).astype(np.int32)
    result = wire.Result(sid=1, round=0, accepted=accepted, token=None, cand_ids=support, cand_probs=p[support])
    device = SimpleNamespace(vocab=V, rng=np.random.default_rng(7))
    draws = np.array([Speculation._next_token(device, result, drafted) for _ in range(DRAWS)])
    residual = np.maximum(p - drafted.q[accepted], 0.0)
    residual /= residual.sum()
    counts = np.bincount(draws, minlength=V)
    assert counts[residual == 0].sum() == 0, "a correction the residual gives probability 0 was drawn"
    keep = residual * DRAWS >= 5
    expected = residual[keep] * DRAWS
    pvalue = chisquare(counts[keep], expected * counts[keep].sum() / expected.sum()).pvalue
    assert pvalue > 1e-3, f"corrections do not follow norm(max(0, p - q_a)) (p = {pvalue:.2e})"
