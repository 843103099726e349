"""The edge's cost model: what it measures of its own work and tells the devices (OPENED and RESULT
timings), owned by one object that the handlers and the stream loop feed.

    observe_stream(elapsed_s, tokens)   the target streamed the rest of an answer: its time per token
                                        (`step_s`, sending included: what a device weighs drafting against)
    observe_verify(k, verify_s)         a verified window of k tokens: the decayed verify-time line over
                                        every session (covspec.policy.add_point / fit_line)
    observe_drafted(elapsed_s, tokens)  a whole edge-drafted stream: its pace (seconds per token, EWMA)
    observe_pass(tokens, pass_s)        a verify pass of this many tokens, one window's or a batch's
    observe_prefill(prompts, pass_s)    a prefill pass of this many prompts, alone or batched
    observe_streams_round(elapsed_s)    a round of the edge-drafted streams (run between request rounds)
    timings()                           step time and verify line, for OPENED (the drafting policies' prior)
    pass_s(tokens), prefill_s(prompts)  the predicted passes, for the edge's scheduler (edge_runtime.scheduling)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from covspec.policy import add_point, fit_line

VERIFY_DECAY = 0.99  # weight kept by older verify passes in the edge's cost line, per pass
RATE_WEIGHT = 0.2  # EWMA weight of an edge-drafted stream's seconds per token


@dataclass
class EdgeCosts:
    step_s: float | None = None  # the target's last measured streaming time per token
    verify_sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # decayed fit of verify time on window size
    drafted_s_per_token: float | None = None  # an edge-drafted stream's seconds per token (EWMA)
    pass_sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # decayed fit of a verify pass on its tokens
    prefill_sums: list[float] = field(default_factory=lambda: [0.0] * 5)  # decayed fit of a prefill pass on its prompts
    streams_round_s: float = 0.0  # a round of the edge-drafted streams (EWMA)

    def observe_stream(self, elapsed_s: float, tokens: int) -> None:
        if tokens > 0:
            self.step_s = elapsed_s / tokens

    def observe_verify(self, k: int, verify_s: float) -> None:
        if k > 0:
            self.verify_sums = add_point(self.verify_sums, k, verify_s, decay=VERIFY_DECAY)

    def observe_drafted(self, elapsed_s: float, tokens: int) -> None:
        if tokens > 0:
            rate = elapsed_s / tokens
            self.drafted_s_per_token = rate if self.drafted_s_per_token is None else (
                (1 - RATE_WEIGHT) * self.drafted_s_per_token + RATE_WEIGHT * rate)

    def observe_pass(self, tokens: int, pass_s: float) -> None:
        if tokens > 0:
            self.pass_sums = add_point(self.pass_sums, tokens, pass_s, decay=VERIFY_DECAY)

    def observe_prefill(self, prompts: int, pass_s: float) -> None:
        if prompts > 0:
            self.prefill_sums = add_point(self.prefill_sums, prompts, pass_s, decay=VERIFY_DECAY)

    def observe_streams_round(self, elapsed_s: float) -> None:
        self.streams_round_s = elapsed_s if not self.streams_round_s else (
            (1 - RATE_WEIGHT) * self.streams_round_s + RATE_WEIGHT * elapsed_s)

    def pass_s(self, tokens: int) -> float | None:
        """The predicted verify pass over this many tokens (None before any was measured)."""
        return predict(self.pass_sums, tokens)

    def prefill_s(self, prompts: int) -> float | None:
        """The predicted prefill pass over this many prompts (None before any was measured)."""
        return predict(self.prefill_sums, prompts)

    def timings(self) -> dict[str, float]:
        """What the devices' drafting policies price windows with (sent in OPENED): the target's streaming
        time per token and, once windows of more than one length were verified, the verify-time line."""
        out = {"step_s": self.step_s} if self.step_s else {}
        line = fit_line(self.verify_sums, min_spread=0.25)
        if line is not None:  # a steep slope can put the intercept below 0: no pass takes negative time
            out["verify_v0_s"], out["verify_v1_s"] = max(line[0], 0.0), line[1]
        return out


def predict(sums: list[float], x: float) -> float | None:
    """t at x on the decayed line of `sums` (add_point); while the points' x do not spread, their mean
    time scaled by x over their mean x; None without points."""
    n, sx, _, st, _ = sums
    if n <= 0:
        return None
    line = fit_line(sums, min_spread=0.25)
    if line is None:
        return st / sx * x if sx > 0 else None
    return max(line[0] + line[1] * x, 0.0)
