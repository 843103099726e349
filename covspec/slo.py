"""The latency SLO an answer is held to: time to first token and time per output token after it.
The load bench counts goodput against it (covspec.tools.goodput); the edge schedules its rounds by it
(covspec.edge_runtime.scheduling). Light: no torch, no numpy."""

from __future__ import annotations

from dataclasses import dataclass

SLO_DEFAULT = "ttft=500,tpot=25"  # ms: an answer starts within half a second and streams at 40 tokens/s or faster


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1000

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1000

    def __str__(self) -> str:
        return f"ttft={self.ttft_ms:g},tpot={self.tpot_ms:g}"


def parse_slo(text: str) -> Slo:
    """`ttft=MS,tpot=MS` (either may be left out: its default). ValueError naming what was wrong."""
    values = {"ttft": None, "tpot": None}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, value = part.partition("=")
        if name not in values or not value:
            raise ValueError(f"--slo: {part!r} is not ttft=MS or tpot=MS (e.g. --slo {SLO_DEFAULT})")
        try:
            values[name] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {name}={value!r} is not a number of milliseconds") from None
        if not values[name] > 0:
            raise ValueError(f"--slo: {name} must be positive, got {value}")
    default = dict(p.split("=") for p in SLO_DEFAULT.split(","))
    return Slo(values["ttft"] or float(default["ttft"]), values["tpot"] or float(default["tpot"]))
