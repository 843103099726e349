"""Training-free visual-token pruning on the device (docs/DESIGN.md, mechanism 1): keep k of N tokens.
Numpy only (the device runs it without torch); inputs may be numpy arrays or CPU tensors.

`score_and_select(visual, query, keep, method)` returns the sorted indices [k] of the visual tokens
the draft prefills. Every method reads the same inputs:

    E [N, d]  visual tokens after the projector (VisualTokens.embeds)
    a [N]     activity: L2 norm of each token's vision feature (VisualTokens.activity)
    g [N]     attention each token receives in the vision encoder (VisualTokens.attention, or None)
    Q [T, d]  the question's text-token input embeddings (adapter.prompt_embeddings(prompt))

Shared pieces (hats are rows scaled to unit length; `rank01` maps values to their rank in [0, 1],
ties averaged, so that signals on unrelated scales combine evenly and outliers do not dominate):

    C      = Ê Q̂ᵀ                                         [N, T]  token-to-word cosine similarity
    rel_i  = mean_t softmax_i(C[:, t] / tau)_i             [N]     query relevance: how much of each
             (each word spreads one unit of attention over the visual tokens; a token's relevance is
             the share it receives, averaged over words; tau = RELEVANCE_TAU)
    act_i  = rank01(a)_i, or (rank01(a)_i + rank01(g)_i) / 2 when g is given     token activity

CoVSpec ("covspec"): quality times diversity, one conditional-DPP MAP problem.

    s_i = w_rel * rank01(rel)_i + (1 - w_rel) * act_i      [N]  in [0, 1]   (w_rel = REL_WEIGHT)
    q_i = exp(alpha * s_i),   alpha = theta / (2 (1 - theta))                 (theta = THETA)
    S   = Ẽ Ẽᵀ + eps I,  Ẽ = rows of (E - mean_i E) scaled to unit length      [N, N]  PSD
    L   = diag(q) S diag(q)
    Y*  = argmax_{|Y| = k} log det L_Y = sum_{i in Y} 2 alpha s_i + log det S_Y   (greedily)

so theta in [0, 1) balances quality (theta -> 1) against low-rank dependency (theta = 0: pure
volume of the kept directions; a token that is a near-copy of a kept one adds ~log eps and is
skipped). Centering before the cosine removes the direction every token shares (background
dominates these images), so S measures how tokens differ, not how much they all look alike.
The greedy MAP is Chen, Zhang & Zhou 2018 ("Fast greedy MAP inference for DPP"): an incremental
pivoted Cholesky of L that keeps each candidate's conditional gain d_i^2 = L_ii - |c_i|^2 and
adds the argmax, O(N k^2) after the O(N k d) kernel rows it reads (L is never built whole).

CoVSpec grounded ("covspec_grounded"): the same greedy MAP, its (theta, w_rel) chosen per prompt:
(GROUNDED_THETA, GROUNDED_REL_WEIGHT) when query_grounding (the largest token-to-word cosine) is at
least GROUNDING_THRESHOLD, else (COVER_THETA, COVER_REL_WEIGHT), coverage for prompts that name
nothing in the image. Chosen on the val split only (benchmarks.prune_tune).

Baselines for comparison, same signature:
    "random"     k uniformly random tokens (a numpy Generator makes it reproducible)
    "relevance"  top-k by rel (FastV-like: text-to-image attention only)
    "attention"  top-k by g, the vision encoder's received attention (activity when g is None)
    "activity"   top-k by the activity norm a
    "diversity"  DivPrune-like max-min: start from the token farthest from its nearest neighbour,
                 then add the token whose cosine distance 1 - cos to the kept set is largest
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from covspec.models.common import VisualTokens
from covspec.models.draft import to_numpy

METHODS = ("covspec", "random", "relevance", "attention", "activity", "diversity", "covspec_grounded")

# Defaults from a short proxy sweep (100 val scenes, a draft with a trained vision tower and aligned
# projector): share of the question's objects with at least one kept token, at 10% / 25% kept:
#   theta 0 (diversity only) 0.83 / 0.99; theta 0.3-0.5 0.93-0.95 / 1.00; theta 0.9 0.88-0.90 / 0.97;
#   rel_weight 0.5 >= 0 or 1 at theta 0.5; without centring S: 0.87 / 1.00. Baselines at 10%:
#   random 0.44, relevance 0.70, attention 0.72, activity 0.43, diversity (max-min) 0.78.
THETA = 0.5  # quality vs diversity in the DPP kernel: 0 = diversity only, -> 1 = quality only
REL_WEIGHT = 0.5  # share of query relevance in the quality score (the rest is activity)
RELEVANCE_TAU = 0.1  # temperature of each word's softmax over visual tokens
KERNEL_EPS = 1e-3  # jitter on the similarity kernel: keeps it positive definite, so greedy never stalls
# A prompt is "grounded" when one of its words is like one of the image's tokens (query_grounding at
# least this): it names a colour, shape or place there. On 300 val items of the 36-token draft, every
# "describe the image ." read 0.05-0.16 and every other question 0.18-0.77 (count questions lowest).
GROUNDING_THRESHOLD = 0.17
# "covspec_grounded": the CoVSpec score with its settings chosen by the prompt's grounding, on val only
# (benchmarks.prune_tune, 1,000 val items per draft at 25% kept, results/prune-report/val): a grounded
# question keeps the tokens it names (relevance-led quality, a little diversity); a prompt that names
# nothing (describe, count all) keeps the most different tokens (theta 0: the DPP's volume alone,
# coverage of every object), where relevance is noise.
GROUNDED_THETA, GROUNDED_REL_WEIGHT = 0.9, 1.0
COVER_THETA, COVER_REL_WEIGHT = 0.0, 0.0


def keep_count(keep: float | int, n: int) -> int:
    """`keep` as a number of tokens out of n: an int count in [1, n], or a ratio in (0, 1] (rounded,
    at least 1). A bool is refused (it is an int to Python, never what was meant)."""
    if n < 1:
        raise ValueError("there are no visual tokens to keep")
    if isinstance(keep, bool):
        raise TypeError("keep must be a ratio in (0, 1] or a token count, not a bool")
    if isinstance(keep, int):
        if not 1 <= keep <= n:
            raise ValueError(f"keep count must lie in [1, {n}], got {keep}")
        return keep
    keep = float(keep)
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep ratio must lie in (0, 1], got {keep}")
    return max(1, min(n, round(keep * n)))


def query_grounding(visual: VisualTokens, query: np.ndarray) -> float:
    """The largest cosine similarity between a visual token and a word of the prompt: high when the
    prompt names something the image's tokens encode, low for a generic prompt ("describe the image")
    whose relevance scores are noise (0 for an empty prompt)."""
    q = _numpy(query)
    if q.size == 0:
        return 0.0
    return float((unit_rows(_numpy(visual.embeds)) @ unit_rows(q).T).max())


def _activity(visual: VisualTokens) -> np.ndarray:
    act = rank01(_numpy(visual.activity))
    if visual.attention is not None:
        act = (act + rank01(_numpy(visual.attention))) / 2
    return act


def _quality(visual: VisualTokens, embeds: np.ndarray, query: np.ndarray, rel_weight: float,
             tau: float) -> np.ndarray:
    return rel_weight * rank01(relevance(embeds, query, tau)) + (1.0 - rel_weight) * _activity(visual)


def _numpy(x: object) -> np.ndarray:
    return to_numpy(x, np.float32)


def rank01(x: np.ndarray) -> np.ndarray:
    """[N] -> [N] float32: the rank of each value scaled to [0, 1] (ties get their mean rank; all 0.5
    when every value is equal or N == 1)."""
    v = _numpy(x).ravel()
    n = v.size
    if n == 1:
        return np.full(1, 0.5, dtype=np.float32)
    order = np.argsort(v, kind="stable")
    if (np.diff(v[order]) > 0).all():  # no ties (the usual case): each value's rank is its place
        ranks = np.empty(n, dtype=np.float64)
        ranks[order] = np.arange(n)
        return (ranks / (n - 1)).astype(np.float32)
    _, group, equal = np.unique(v, return_inverse=True, return_counts=True)  # tie groups, ascending
    less = np.cumsum(equal) - equal  # [groups] values below each group
    return ((less[group] + (equal[group] - 1) / 2) / (n - 1)).astype(np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """[M, d] rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def relevance(embeds: np.ndarray, query: np.ndarray, tau: float = RELEVANCE_TAU) -> np.ndarray:
    """embeds [N, d], query [T, d] -> [N]: the mean over words of each word's softmax attention
    over the visual tokens, by cosine similarity / tau. Sums to 1 over N."""
    embeds, query = _numpy(embeds), _numpy(query)
    if query.size == 0:
        return np.full(embeds.shape[0], 1.0 / embeds.shape[0], dtype=np.float32)
    z = (unit_rows(embeds) @ unit_rows(query).T) / tau  # [N, T]
    z = np.exp(z - z.max(0, keepdims=True))
    return (z / z.sum(0, keepdims=True)).mean(1)  # [N]


def greedy_dpp_map(features: np.ndarray, q: np.ndarray, k: int, eps: float = KERNEL_EPS) -> list[int]:
    """Greedy MAP of the DPP with kernel L = diag(q) (F Fᵀ + eps I) diag(q).

    features [N, m] (rows of unit length for a cosine kernel), q [N] > 0 -> k indices in the order
    chosen. The greedy adds, each step, the candidate with the largest conditional gain
    det L_{Y+i} / det L_Y, the largest remaining diagonal of L's Cholesky factor pivoted as it goes
    (Chen et al. 2018): the pivots of LAPACK's pivoted Cholesky (dpstrf), in the same order on 150
    held-out images of the demo draft, without scipy on the device. In float64; N is a few hundred at most."""
    f = np.asarray(features, dtype=np.float64)
    qq = np.asarray(q, dtype=np.float64)
    n = f.shape[0]
    kernel = (f @ f.T + eps * np.eye(n)) * qq[:, None] * qq[None, :]  # [N, N] L
    gain = kernel.diagonal().copy()  # [N] d_i^2, each candidate's conditional gain
    rows = np.zeros((k, n))  # the Cholesky rows of the picks so far
    chosen: list[int] = []
    for j in range(k):
        i = int(np.argmax(gain))
        if gain[i] <= 0:  # the eps jitter keeps L positive definite: this is a bug, not an input
            raise ArithmeticError(f"the pruning kernel lost positive definiteness after {j} of {k} picks")
        chosen.append(i)
        rows[j] = (kernel[i] - rows[:j, i] @ rows[:j]) / np.sqrt(gain[i])  # [N]
        gain = gain - rows[j] ** 2
        gain[chosen] = -np.inf
    return chosen


def max_min_diversity(features: np.ndarray, k: int) -> list[int]:
    """DivPrune-like greedy max-min selection on cosine distance. features [N, m] unit rows -> k
    indices: first the token farthest from its nearest neighbour, then repeatedly the token whose
    distance to its nearest kept token is largest."""
    n = features.shape[0]
    if n == 1:
        return [0]
    dist = 1.0 - features @ features.T  # [N, N]
    nearest = np.where(np.eye(n, dtype=bool), np.inf, dist).min(1)  # [N]
    chosen = [int(nearest.argmax())]
    to_kept = dist[chosen[0]].copy()  # [N] distance to the nearest kept token
    to_kept[chosen[0]] = -np.inf
    for _ in range(k - 1):
        j = int(to_kept.argmax())
        chosen.append(j)
        to_kept = np.minimum(to_kept, dist[j])
        to_kept[chosen] = -np.inf
    return chosen


def top_k(score: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest scores (ties to the lower index, so results are reproducible)."""
    return np.argsort(-_numpy(score).ravel(), kind="stable")[:k].tolist()


def score_and_select(visual: VisualTokens, query: np.ndarray, keep: float | int, method: str = "covspec",
                     rng: np.random.Generator | None = None, theta: float = THETA,
                     rel_weight: float = REL_WEIGHT, tau: float = RELEVANCE_TAU,
                     eps: float = KERNEL_EPS) -> np.ndarray:
    """Sorted indices (int64 [k]) of the visual tokens to keep. query [T, d] is the question's
    text embeddings; keep a ratio in (0, 1] or a count in [1, N]. See the module docstring."""
    n = visual.count
    k = keep_count(keep, n)
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0.0 <= theta < 1.0:
        raise ValueError(f"theta must lie in [0, 1), got {theta}")
    if k == n:
        return np.arange(n)
    embeds, query = _numpy(visual.embeds), _numpy(query)  # [N, d], [T, d]
    if method == "random":
        chosen = (rng or np.random.default_rng()).permutation(n)[:k].tolist()
    elif method == "relevance":
        chosen = top_k(relevance(embeds, query, tau), k)
    elif method == "attention":
        chosen = top_k(visual.attention if visual.attention is not None else visual.activity, k)
    elif method == "activity":
        chosen = top_k(visual.activity, k)
    elif method == "diversity":
        chosen = max_min_diversity(unit_rows(embeds), k)
    elif method == "covspec_grounded":
        grounded = query_grounding(visual, query) >= GROUNDING_THRESHOLD
        t, w = (GROUNDED_THETA, GROUNDED_REL_WEIGHT) if grounded else (COVER_THETA, COVER_REL_WEIGHT)
        chosen = covspec_order(visual, query, k, t, w, tau, eps)
    else:
        chosen = covspec_order(visual, query, k, theta, rel_weight, tau, eps)
    return np.asarray(sorted(chosen), dtype=np.int64)


def covspec_order(visual: VisualTokens, query: np.ndarray, k: int, theta: float = THETA,
                  rel_weight: float = REL_WEIGHT, tau: float = RELEVANCE_TAU, eps: float = KERNEL_EPS) -> list[int]:
    """The CoVSpec score's first k picks, in the order the greedy MAP makes them: its first j picks
    are what it keeps at j (the demo draft trains on such prefixes)."""
    embeds = _numpy(visual.embeds)  # [N, d]
    s = _quality(visual, embeds, _numpy(query), rel_weight, tau)  # [N]
    alpha = theta / (2.0 * (1.0 - theta))
    return greedy_dpp_map(centred_unit(embeds), np.exp(alpha * s), k, eps)


def centred_unit(embeds: np.ndarray) -> np.ndarray:
    """[N, d] -> [N, d] float32: the tokens less their mean, rows scaled to unit length. In float32 as the
    demo draft's training computed them (in torch): on 150 held-out images the greedy's full order was
    the training's in 146 (in float64, 141): near-ties between tokens of equal quality flip on the
    summation order of the mean."""
    e = np.asarray(embeds, dtype=np.float32)
    return unit_rows(e - e.mean(0, keepdims=True))


def merged_visual(visual: VisualTokens, kept: np.ndarray | None) -> VisualTokens:
    """The image's tokens with the dropped ones merged into the kept (`merge_pruned`); unchanged
    when nothing is dropped."""
    if kept is None:
        return visual
    kept = np.asarray(kept, dtype=np.int64)
    if kept.size == visual.count:
        return visual
    return replace(visual, embeds=merge_pruned(_numpy(visual.embeds), kept))


def merge_groups(embeds: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """embeds [N, d], kept [k] sorted indices -> [N] int64: the kept token (an index into kept) each
    token joins, by cosine similarity of the centred tokens; a kept token joins itself."""
    feats = centred_unit(_numpy(embeds))  # [N, d]
    nearest = (feats @ feats[kept].T).argmax(1)  # [N] index into kept
    nearest[kept] = np.arange(len(kept))
    return nearest


def merge_pruned(embeds: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """embeds [N, d], kept [k] sorted indices -> [N, d] where each kept row is the mean of itself and
    the pruned tokens nearest to it (`merge_groups`); the other rows are unchanged, so `merged[kept]`
    is what the draft prefills. A dropped patch's content thus reaches the draft through the kept token
    most like it (PruMerge / VisionZip-style merging; the demo's training does the same on tensors,
    covspec.demo.train.merge_pruned, with the groups read from here)."""
    n = embeds.shape[0]
    if len(kept) in (0, n):
        return embeds
    nearest = merge_groups(embeds, kept)
    sums = np.zeros((len(kept), embeds.shape[1]), dtype=np.float64)
    np.add.at(sums, nearest, embeds)  # [k, d] each kept token's group, summed
    merged = embeds.copy()
    merged[kept] = (sums / np.bincount(nearest, minlength=len(kept))[:, None]).astype(embeds.dtype)
    return merged
