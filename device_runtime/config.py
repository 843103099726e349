"""The device's configuration: how it reaches its edge and runs its draft (`DeviceConfig`), and what one
answer asks for (`AnswerConfig`). `covspec device run`'s flags take their defaults from these, the API
(`covspec.answer`) takes them, and `Speculation` reads an AnswerConfig. Light: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from covspec.modes import MODE_OPTIONS, Mode, SpecOptions
from covspec.sampling import SamplingParams

if TYPE_CHECKING:
    from covspec.calibration.profile import CalibrationProfile
    from covspec.transport.channel import ClientKeys

BACKENDS = ("auto", "executorch", "onnx")  # what runs a device bundle (auto: ExecuTorch when it has its .pte)


@dataclass(frozen=True)
class AnswerConfig:
    """What one answer asks for: its mode (covspec/modes.py), sampling and length, and the window."""

    mode: str = Mode.COVSPEC
    params: SamplingParams = field(default_factory=SamplingParams)  # greedy unless it says otherwise
    max_new_tokens: int = 64
    window: int = 4  # the fixed window of vanilla_sd (and of covspec without the adaptive policy)
    options: SpecOptions | None = None  # the mode's mechanisms overridden (pruning flags, sweeps)

    def spec_options(self) -> SpecOptions:
        """The mechanisms a speculative mode uses: `options`, else the mode's own."""
        return self.options or MODE_OPTIONS[self.mode]


@dataclass(frozen=True)
class DeviceConfig:
    """How a device reaches its edge (`edge`: tcp://HOST:PORT; CURVE `keys`; `timeout_s` per reply,
    `retries` on a fresh socket after a timeout; the calibration `profile` seeding its drafting
    policy) and where its draft comes from: a device bundle (`bundle`, run by `backend` on `threads`)
    or a Hugging Face checkpoint (`model`)."""

    edge: str
    keys: ClientKeys | None = None
    timeout_s: float = 30.0
    retries: int = 2
    profile: CalibrationProfile | None = None
    model: str | Path | None = None
    bundle: str | Path | None = None
    backend: str = "auto"
    threads: int | None = None
