"""The family report's pure pieces (benchmarks/family_report.py): agreement and logit margins."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.family_report import END, agreement, make_pairs, top_margins


def test_agreement_counts_positions_up_to_the_first_divergence_over_the_longer_answer() -> None:
    eager = [[1, 2, 3, END], [4, 5], [7, 8, 9]]
    other = [[1, 2, 3, END], [4, 6, 5, 5], [7, 8]]
    got = agreement(eager, other)
    assert (got.answers, got.identical, got.tokens_equal, got.tokens) == (3, 1, 4 + 1 + 2, 4 + 4 + 3)
    assert got.token_agreement == pytest.approx(7 / 11)
    assert agreement(eager, eager).token_agreement == 1.0
    assert np.isnan(agreement([[]], [[]]).token_agreement)
    with pytest.raises(ValueError, match="different pairs"):
        agreement(eager, other[:2])


def test_top_margins_are_top1_minus_top2_per_row() -> None:
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 2.0, -1.0]], dtype=np.float32)
    assert np.allclose(top_margins(logits), [2.0, 0.0])
    assert np.allclose(top_margins(logits[0]), [2.0])


def test_24_pairs_cover_every_prompt_at_every_image_size() -> None:
    pairs = make_pairs(24)
    assert len({(image.size, prompt) for image, prompt in pairs}) == 24
