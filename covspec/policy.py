"""Adaptive drafting on the device (docs/DESIGN.md, mechanisms 2 and 3): how long each window is, when it
stops early, and which branches to draft while a window is being verified. Plain functions and
dataclasses; the device runtime feeds `OnlineStats` after every round and asks `choose_window`.

Cost model. A window of k drafted tokens with per-token acceptance a (each token accepted with
probability a given the ones before it were) yields accepted + 1 tokens (the edge adds the
correction or bonus token), in expectation

    E[accepted + 1 | k] = sum_{j=0..k} a^j = (1 - a^(k+1)) / (1 - a)          (k + 1 when a = 1)

and costs, stop-and-wait,

    T(k) = k * t_draft + rtt + t_verify(k),     t_verify(k) = v0 + v1 * k     (linear fit, measured)

With parallel branching the next window is drafted while this one is verified; when a branch hits
(rate h) only the drafting time the wait did not hide is paid:

    T(k) = h * max(k * t_draft, rtt + t_verify(k)) + (1 - h) * (k * t_draft + rtt + t_verify(k))

`choose_window` returns the k in [1, k_max] maximising E[accepted + 1 | k] / T(k). A long round trip
makes the fixed cost large, so more tokens per round pay and k grows (slow links send longer,
rarer windows); a low acceptance makes extra tokens worthless and k shrinks. `speculation_pays`
compares the best rate with the target streaming alone (1 / t_target per token), the check that
lets the device fall back to target-only when speculation does not pay on this link.

Acceptance can also be read per margin bin (the draft's top-1 minus top-2 probability): then a
drafted window's expected yield is 1 + sum_j prod_{i<=j} a(m_i), which prices the margin gate and
ranks branch roots.

Margin gate. While drafting, the window stops after the first token whose margin is under the
threshold: that token is likely rejected, and drafting past it is likely wasted. The uncertain
token itself is still sent (its draft step is already paid, and it may be accepted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from covspec.transport import protocol as wire

# --- margin gate ---------------------------------------------------------------------------------

MARGIN_THRESHOLD = 0.3  # default gate: stop after a token whose top-1 minus top-2 probability is below


def top2_margin(probs: np.ndarray) -> float:
    """probs [V] (a distribution) -> top-1 minus top-2 probability, in [0, 1]."""
    flat = np.asarray(probs, dtype=np.float32).ravel()
    if flat.size < 2:
        return 1.0
    top = np.partition(flat, flat.size - 2)[-2:][::-1]  # [2] the two largest, largest first
    return float(top[0] - top[1])


@dataclass
class MarginGate:
    """Stops a window after a token drafted with a margin below `threshold`, once at least
    `min_tokens` are drafted. Call `stop` after drafting each token."""

    threshold: float = MARGIN_THRESHOLD
    min_tokens: int = 1

    def stop(self, margin: float | np.ndarray, drafted: int) -> bool:
        """margin: the just-drafted token's top-1 minus top-2 probability (a float), or the draft's
        distribution at that position [V]; drafted: tokens in the window so far, this one included."""
        values = np.asarray(margin, dtype=np.float32)
        if values.size > 1:
            margin = top2_margin(values)
        return drafted >= self.min_tokens and float(margin) < self.threshold


def gated_length(margins: Sequence[float] | np.ndarray, threshold: float = MARGIN_THRESHOLD,
                 min_tokens: int = 1) -> int:
    """How many tokens of an already-drafted window [k] of margins the gate keeps: up to and
    including the first token (at or past min_tokens) whose margin is under the threshold."""
    gate = MarginGate(threshold, min_tokens)
    values = [float(m) for m in margins]
    for i, m in enumerate(values):
        if gate.stop(m, i + 1):
            return i + 1
    return len(values)


# --- expected yield and cost -------------------------------------------------------------------

def expected_tokens(a: float, k: int) -> float:
    """E[accepted + 1 | k] for per-token acceptance a: (1 - a^(k+1)) / (1 - a)."""
    a = min(max(a, 0.0), 1.0)
    if a >= 1.0 - 1e-12:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def expected_tokens_from(acceptance: Sequence[float]) -> float:
    """E[accepted + 1] of a drafted window whose tokens have acceptance probabilities [k]
    (each given the ones before were accepted): 1 + sum_j prod_{i<=j} a_i."""
    total, reach = 1.0, 1.0
    for a in acceptance:
        reach *= min(max(float(a), 0.0), 1.0)
        total += reach
    return total


@dataclass
class LinkCosts:
    """What one round costs, in seconds."""

    t_draft: float  # one draft decode step
    rtt: float  # network round trip (the wait minus the edge's verify time)
    v0: float  # edge verify time of a window: v0 + v1 * k
    v1: float
    branch_hit: float = 0.0  # share of rounds whose next window was already drafted (parallel branching)

    def verify(self, k: int) -> float:
        return max(0.0, self.v0 + self.v1 * k)

    def round_time(self, k: int) -> float:
        wait = self.rtt + self.verify(k)
        drafting = k * self.t_draft
        h = min(max(self.branch_hit, 0.0), 1.0)
        return h * max(drafting, wait) + (1.0 - h) * (drafting + wait)


def tokens_per_second(a: float, k: int, costs: LinkCosts) -> float:
    return expected_tokens(a, k) / max(costs.round_time(k), 1e-9)


def best_window(a: float, costs: LinkCosts, k_max: int = 16) -> tuple[int, float]:
    """(k, expected tokens/s) maximising E[accepted + 1 | k] / T(k) over k in [1, k_max];
    the smaller k on a tie."""
    if k_max < 1:
        raise ValueError(f"k_max must be at least 1, got {k_max}")
    best_k, best_rate = 1, -1.0
    for k in range(1, k_max + 1):
        rate = tokens_per_second(a, k, costs)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k, best_rate


# --- online statistics ---------------------------------------------------------------------------

MARGIN_BINS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0 + 1e-9)  # edges of the margin bins


def _ewma(old: float, new: float, weight: float) -> float:
    return (1.0 - weight) * old + weight * new


@dataclass
class OnlineStats:
    """Running estimates the cost model reads, updated after every round.

    Acceptance is a decayed count: each round of k drafted tokens with n accepted shows n accepted
    tokens and, when n < k, one rejection (tokens after it were never judged), so
    a = (accepted + prior_a * prior_n) / (judged + prior_n), a geometric-rate estimate that stays
    right for windows cut short by the margin gate. Per margin bin the same, with the global
    estimate as the bin's prior. Times are EWMAs; the verify time is a decayed least-squares line
    in k, anchored by prior points so one window size alone still gives a slope."""

    decay: float = 0.97  # weight kept by old counts at each round (half-life ~23 rounds)
    weight: float = 0.1  # EWMA weight of a new time measurement
    prior_acceptance: float = 0.7
    prior_n: float = 2.0  # pseudo-tokens behind the acceptance prior
    t_draft: float = 0.005  # s per draft step
    rtt: float = 0.02  # s
    prior_v0: float = 0.02  # s, verify time intercept
    prior_v1: float = 0.002  # s per drafted token
    prior_verify_weight: float = 1.0  # pseudo-rounds at each prior anchor (k = 1 and k = 8)
    prior_bins: list[float] | None = None  # acceptance per margin bin (a calibration profile's); None: the global
    branch_hit: float = 0.0
    rounds: int = 0
    _acc: float = 0.0  # decayed accepted tokens
    _judged: float = 0.0  # decayed judged tokens (accepted + rejections)
    _bin_acc: list[float] = field(default_factory=lambda: [0.0] * (len(MARGIN_BINS) - 1))
    _bin_judged: list[float] = field(default_factory=lambda: [0.0] * (len(MARGIN_BINS) - 1))
    _vsums: list[float] = field(default_factory=lambda: [0.0] * 5)  # decayed n, sum k, k^2, t, k t
    _pace: list[float] = field(default_factory=lambda: [0.0, 0.0])  # decayed [tokens, seconds] between RESULTs

    # --- updates -----------------------------------------------------------------------------
    def update(self, drafted: int, accepted: int, draft_step_s: float | Sequence[float] | None = None,
               wait_s: float | None = None, verify_s: float | None = None,
               margins: Sequence[float] | np.ndarray | None = None, branch_hit: bool | None = None) -> None:
        """One round: `drafted` tokens sent, `accepted` of them accepted; the draft's step times (one
        mean or a list), the device's wait from sending VERIFY to its RESULT, the edge's own verify
        time, the drafted tokens' margins [drafted], whether a prepared branch was used."""
        if drafted < 0 or not 0 <= accepted <= drafted:
            raise ValueError(f"accepted must lie in [0, drafted], got {accepted} of {drafted}")
        self.rounds += 1
        rejected = 1 if accepted < drafted else 0
        self._acc = self.decay * self._acc + accepted
        self._judged = self.decay * self._judged + accepted + rejected
        if margins is not None:
            values = [float(m) for m in margins][:drafted]
            self._bin_acc = [self.decay * x for x in self._bin_acc]
            self._bin_judged = [self.decay * x for x in self._bin_judged]
            for i, m in enumerate(values[:accepted + rejected]):
                b = margin_bin(m)
                self._bin_judged[b] += 1.0
                self._bin_acc[b] += 1.0 if i < accepted else 0.0
        if draft_step_s is not None:
            steps = [draft_step_s] if isinstance(draft_step_s, int | float) else list(draft_step_s)
            if steps:
                self.t_draft = _ewma(self.t_draft, sum(steps) / len(steps), self.weight)
        if wait_s is not None:
            rtt = max(0.0, wait_s - (verify_s or 0.0))
            self.rtt = _ewma(self.rtt, rtt, self.weight)
        if verify_s is not None and drafted > 0 and math.isfinite(verify_s):
            self._vsums = add_point(self._vsums, drafted, verify_s, decay=self.decay)
        if branch_hit is not None:
            self.branch_hit = _ewma(self.branch_hit, 1.0 if branch_hit else 0.0, self.weight)

    def observe_rtt(self, rtt_s: float) -> None:
        """A round trip measured outside a round (a streamed answer's first chunk)."""
        self.rtt = _ewma(self.rtt, max(0.0, rtt_s), self.weight)

    # --- estimates ---------------------------------------------------------------------------
    def margins_informed(self, min_tokens: float = 20.0) -> bool:
        """Whether acceptance per margin bin says more than the global rate: a calibration profile's
        bins, or at least `min_tokens` judged tokens (decayed) in the bins."""
        return self.prior_bins is not None or sum(self._bin_judged) >= min_tokens

    @property
    def acceptance(self) -> float:
        return (self._acc + self.prior_acceptance * self.prior_n) / (self._judged + self.prior_n)

    def acceptance_upper(self, z: float = 1.0) -> float:
        """The acceptance estimate plus z standard errors (binomial, over the decayed judged tokens and
        the prior's): the optimistic end of what a few rounds can tell."""
        a, n = self.acceptance, self._judged + self.prior_n
        return min(1.0, a + z * math.sqrt(a * (1.0 - a) / n))

    def acceptance_at(self, margin: float) -> float:
        """Acceptance of a token drafted with this margin: its bin's count, shrunk to the bin's prior
        (calibrated) or to the global rate."""
        b = margin_bin(margin)
        prior = self.prior_bins[b] if self.prior_bins is not None else self.acceptance
        return (self._bin_acc[b] + prior * self.prior_n) / (self._bin_judged[b] + self.prior_n)

    def verify_line(self) -> tuple[float, float]:
        """(v0, v1): least squares of verify time on window size over the decayed rounds plus the
        prior anchors at k = 1 and k = 8."""
        sums = self._vsums
        w = self.prior_verify_weight
        for k in (1.0, 8.0):
            sums = add_point(sums, k, self.prior_v0 + self.prior_v1 * k, weight=w)
        return fit_line(sums) or (self.prior_v0, self.prior_v1)

    def costs(self) -> LinkCosts:
        v0, v1 = self.verify_line()
        return LinkCosts(t_draft=self.t_draft, rtt=self.rtt, v0=v0, v1=v1, branch_hit=self.branch_hit)

    def observe_pace(self, tokens: int, seconds: float) -> None:
        """`tokens` committed by a RESULT `seconds` after the one before (or after OPENED): the pace
        this device's speculation really runs at, round trips hidden by branches and windows in
        flight included, which the cost model does not see."""
        n, t = self._pace
        self._pace = [self.decay * n + tokens, self.decay * t + seconds]

    def s_per_token(self, min_tokens: float = 8.0) -> float | None:
        """Measured seconds per committed token of this device's speculation (None: too few tokens)."""
        n, t = self._pace
        return t / n if n >= min_tokens else None


def add_point(sums: Sequence[float], k: float, t: float, decay: float = 1.0, weight: float = 1.0) -> list[float]:
    """Decayed least-squares sums [n, sum k, sum k^2, sum t, sum k t] with the point (k, t) added."""
    n, sk, skk, st, skt = (decay * x for x in sums)
    return [n + weight, sk + weight * k, skk + weight * k * k, st + weight * t, skt + weight * k * t]


def fit_line(sums: Sequence[float], min_spread: float = 1e-9) -> tuple[float, float] | None:
    """(v0, v1) of t ~ v0 + v1 * k from `add_point` sums, the slope clipped at 0 (verifying more
    tokens never takes less time); None while the points' window sizes do not spread."""
    n, sk, skk, st, skt = sums
    det = n * skk - sk * sk
    if n <= 0 or det <= min_spread * n * n:
        return None
    v1 = max(0.0, (n * skt - sk * st) / det)
    return (st - v1 * sk) / n, v1


def margin_bin(margin: float) -> int:
    m = min(max(float(margin), 0.0), 1.0)
    for b in range(len(MARGIN_BINS) - 1):
        if m < MARGIN_BINS[b + 1]:
            return b
    return len(MARGIN_BINS) - 2


def choose_window(stats: OnlineStats, k_max: int = 16, remaining: int | None = None) -> int:
    """The draft length in [1, k_max] (and at most `remaining` answer tokens, when given) that
    maximises expected tokens per second under the current estimates."""
    if remaining is not None:
        k_max = max(1, min(k_max, remaining))
    return best_window(stats.acceptance, stats.costs(), k_max)[0]


def speculation_pays(stats: OnlineStats, target_step_s: float, k_max: int = 16,
                     margin: float = 1.0, acceptance: float | None = None) -> bool:
    """Whether the best window beats the target streaming alone at 1 / target_step_s tokens per
    second (by the factor `margin`) at the estimated acceptance (or the one given); when not, the
    device should ask the edge for target-only."""
    a = stats.acceptance if acceptance is None else acceptance
    _, rate = best_window(a, stats.costs(), k_max)
    return rate > margin / max(target_step_s, 1e-9)


def speculation_could_pay(stats: OnlineStats, target_step_s: float, k_max: int = 16) -> bool:
    """Whether a window whose every token is accepted could beat the target streaming alone: the
    test before any acceptance was measured (the costs may still be priors; the round trip and the
    edge's streaming time are measured at connect and in OPENED). False means no draft can win on
    this link, whatever the draft."""
    return speculation_pays(stats, target_step_s, k_max, acceptance=1.0)


# --- parallel branching ------------------------------------------------------------------------

def branch_roots(window_ids: np.ndarray, margins: np.ndarray, runner_up: np.ndarray,
                 max_branches: int, acceptance: Callable[[float], float] | None = None,
                 ) -> list[tuple[int, int]]:
    """Rejection branches to draft while the window is verified: [(position, runner-up token)],
    best first, at most max_branches. A branch at position i assumes tokens 0..i-1 accepted and
    the target's token at i to be the draft's runner-up there.

    window_ids [k], margins [k], runner_up [k] (token ids, see `drafter.runner_up_token`). Without
    `acceptance` the lowest-margin positions win (earlier first on a tie); with it (margin ->
    acceptance probability, e.g. OnlineStats.acceptance_at) positions rank by the probability
    that the first rejection falls there, prod_{j<i} a(m_j) * (1 - a(m_i))."""
    k = len(window_ids)
    if max_branches <= 0 or k == 0:
        return []
    values = [float(m) for m in margins[:k]]
    if acceptance is None:
        order = sorted(range(k), key=lambda i: (values[i], i))
    else:
        reach, score = 1.0, []
        for i in range(k):
            a = acceptance(values[i])
            score.append(reach * (1.0 - a))
            reach *= a
        order = sorted(range(k), key=lambda i: (-score[i], i))
    roots: list[tuple[int, int]] = []
    for i in order:
        token = int(runner_up[i])
        if token == int(window_ids[i]):
            continue  # no distinct runner-up here
        roots.append((i, token))
        if len(roots) == max_branches:
            break
    return roots


# --- where drafting happens ----------------------------------------------------------------------

DEVICE, EDGE = "device", "edge"


@dataclass(frozen=True)
class EdgeOffer:
    """What the edge says of its own drafting in OPENED and RESULT (edge_runtime.drafting.DraftOffer):
    whether it offers to draft for this device now (it has a draft and is not loaded), how many
    unfinished sessions it holds, and its draft step and per-token acceptance once it measured them."""

    offers: bool
    sessions: int = 0
    draft_step_s: float | None = None
    acceptance: float | None = None
    s_per_token: float | None = None  # measured pace of the edge's own drafted streams

    @classmethod
    def from_reply(cls, reply: wire.Opened | wire.Result) -> EdgeOffer | None:
        """The offer in an OPENED or RESULT (its fields, and what the edge's drafting measured in its
        timings); None from an edge without a draft (it says nothing)."""
        if reply.offers_draft is None:
            return None
        timings = reply.timings
        return cls(offers=reply.offers_draft, sessions=reply.edge_sessions or 0,
                   draft_step_s=timings.get("edge_draft_step_s"), acceptance=timings.get("edge_acceptance"),
                   s_per_token=timings.get("edge_sd_s_per_token"))


def edge_drafting_rate(stats: OnlineStats, offer: EdgeOffer, k_max: int = 16) -> float:
    """Expected tokens/s of the edge drafting and verifying itself: the cost model with no round trip
    and no branches, the edge's draft step and acceptance (this device's own until the edge measured
    them: the same draft, as a rule) and the verify line the device knows."""
    a = stats.acceptance if offer.acceptance is None else offer.acceptance
    t_draft = stats.t_draft if offer.draft_step_s is None else offer.draft_step_s
    v0, v1 = stats.verify_line()
    return best_window(a, LinkCosts(t_draft=t_draft, rtt=0.0, v0=v0, v1=v1), k_max)[1]


LONG_LINK_STEPS = 2.0  # a round trip of at least this many target steps is a long link (see place_drafting)


def long_link(stats: OnlineStats, target_step_s: float | None) -> bool:
    """Whether the link's round trip costs at least LONG_LINK_STEPS target steps: the target's streaming
    time per token when the edge said it, else the verify line's one-token pass."""
    step = target_step_s or stats.costs().verify(1)
    return step > 0 and stats.rtt >= LONG_LINK_STEPS * step


def place_drafting(stats: OnlineStats, offer: EdgeOffer | None, target_step_s: float | None,
                   k_max: int = 16, min_rounds: int = 3, margin: float = 0.05) -> str:
    """Where the rest of the answer is drafted: EDGE when the edge offers (it has a draft and is not
    loaded: a loaded edge declines, and every device that can draft does so) and its drafting beats
    both this device's speculation over the link (windows, round trips, branches: `best_window` on
    the device's estimates) and the target streaming alone; else DEVICE (whose own rule then decides
    between speculating and the target's streaming, `speculation_pays`). Only once the device has
    measured `min_rounds` rounds of its own (this answer's or earlier ones'): on priors alone the edge,
    with no round trip, would always look faster, and a device that never drafted would never learn
    that its branches and windows in flight hide a short link's round trips. On a long link (a measured
    round trip of at least LONG_LINK_STEPS target steps) there is nothing to learn first: no window
    in flight hides a round trip that costs several target steps, so the rule applies from the first
    answer (the drafting rounds a device spent there cost its first answer ~10% against edge_sd on
    4g and weak links, results/bench-edge-sd). Once both paces were
    measured (the device's between RESULTs, `observe_pace`; the edge's streams, `offer.s_per_token`)
    the measured rates decide, the edge needing to be `margin` faster; the cost model decides before."""
    if offer is None or not offer.offers:
        return DEVICE
    if stats.rounds < min_rounds and not long_link(stats, target_step_s):
        return DEVICE
    measured = stats.s_per_token()
    if offer.s_per_token and measured:
        edge, device = 1.0 / offer.s_per_token, (1.0 + margin) / measured
    else:
        edge = edge_drafting_rate(stats, offer, k_max)
        device = best_window(stats.acceptance, stats.costs(), k_max)[1]
    target = 1.0 / target_step_s if target_step_s else 0.0
    return EDGE if edge > max(device, target) else DEVICE
