"""The edge's cost model: what it measures of its own work and tells the devices (OPENED and RESULT
timings), owned by one object that the handlers and the stream loop feed.

    observe_stream(elapsed_s, tokens)   the target streamed the rest of an answer: its time per token
                                        (`step_s`, sending included: what a device weighs drafting against)
    observe_verify(k, verify_s)         a verified window of k tokens: the decayed verify-time line over
                                        every session (covspec.policy.add_point / fit_line)
    observe_drafted(elapsed_s, tokens)  a whole edge-drafted stream: its pace (seconds per token, EWMA)
    timings()                           step time and verify line, for OPENED (the drafting policies' prior)
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

    def timings(self) -> dict[str, float]:
        """What the devices' drafting policies price windows with (sent in OPENED): the target's streaming
        time per token and, once windows of more than one length were verified, the verify-time line."""
        out = {"step_s": self.step_s} if self.step_s else {}
        line = fit_line(self.verify_sums, min_spread=0.25)
        if line is not None:  # a steep slope can put the intercept below 0: no pass takes negative time
            out["verify_v0_s"], out["verify_v1_s"] = max(line[0], 0.0), line[1]
        return out
