"""What one answer of `covspec device run` reports: its tokens and times (`Answer`) and one record per
speculative round (`RoundRecord`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoundRecord:
    drafted: int
    accepted: int
    draft_s: float
    wait_s: float  # from sending VERIFY to its RESULT (round trip + edge verify)
    verify_s: float  # the edge's own verify time
    branch_hit: bool | None = None  # whether a branch drafted during the wait was used (None: no branches)
    margins: list[float] | None = None  # the drafted tokens' top-1 minus top-2 draft probabilities
    ahead: bool = False  # the window was sent before the previous round's RESULT (windows in flight)


@dataclass
class Joined:
    """How a device whose draft was still prefilling when OPENED came joined its answer (the edge
    generated the start meanwhile)."""

    prefill_s: float | None  # the draft's encode + prefill on its thread (None: still running at the end)
    at_token: int | None  # the answer's length when the device took drafting over (None: it never did)
    at_s: float | None  # when, from the request's start
    segments: int  # STREAMs with a limit the edge answered meanwhile


@dataclass
class Answer:
    mode: str
    ids: list[int]
    text: str
    ttft_s: float  # request start to the first token known on the device
    latency_s: float  # request start to the last token
    rounds: list[RoundRecord] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    kept: int | None = None  # visual tokens the draft prefilled with, when pruned
    decode_bytes_up: int = 0  # bytes sent after OPEN: the drafted windows (what the schemes differ in)
    streamed_rest: bool = False  # the adaptive policy found speculation not paying and switched to STREAM
    edge_drafted: bool = False  # that STREAM asked the edge to draft the rest itself (draft placement)
    reopens: int = 0  # times the session was re-OPENed with the answer so far (the edge had lost it)
    moves: int = 0  # times an edge answered an OPEN with DRAINING and the device connected again (another edge)
    joined: Joined | None = None  # the draft prefilled while the edge started the answer (covspec's joining)

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.latency_s - self.ttft_s
        return (len(self.ids) - 1) / span if len(self.ids) > 1 and span > 0 else float("nan")

    @property
    def mean_accepted(self) -> float:
        return float(np.mean([r.accepted for r in self.rounds])) if self.rounds else float("nan")

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(r.drafted for r in self.rounds)
        return sum(r.accepted for r in self.rounds) / drafted if drafted else float("nan")


def final_answer(tokens: list[int], eos: set[int], max_new_tokens: int) -> list[int]:
    """The answer as target-only generation would give it: cut at the first end token and the limit."""
    out: list[int] = []
    for token in tokens:
        if token in eos or len(out) >= max_new_tokens:
            break
        out.append(token)
    return out
