"""What the edge bounds, with safe defaults (`covspec edge serve` flags set them). Light: no torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from covspec.slo import Slo, parse_slo
from covspec.transport import protocol as wire
from covspec.transport.channel import ServerKeys

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # covspec.models.placement.DTYPES, named without torch
DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")
SCHEDULES = ("slo", "fifo")  # how the edge picks a round's requests (edge_runtime.scheduling)


@dataclass
class EdgeSettings:
    """Everything the edge bounds. `limits` holds the wire bounds: message and header bytes
    (max_total_bytes, max_header_bytes), image bytes, drafted tokens per VERIFY (max_window)."""

    bind: str = "tcp://127.0.0.1:5555"
    max_sessions: int = 64
    max_sessions_per_device: int = 4
    idle_timeout_s: float = 120.0
    max_new_tokens: int = 1024
    max_image_pixels: int = 2048 * 2048
    limits: wire.Limits = wire.DEFAULT_LIMITS
    keys: ServerKeys | None = None  # CURVE: the edge's key pair and the allowed device keys (None: no auth)
    # batched verification: a VERIFY waits at most batch_wait_ms for other sessions' VERIFYs to share
    # its target pass (0: off); at most max_batch requests are gathered into one round
    batch_wait_ms: float = 2.0
    max_batch: int = 8
    # which held requests a round takes (edge_runtime.scheduling): "slo", windows first and OPENs held while
    # the SLO allows, by each answer's pace against `slo`; "fifo", arrival order
    schedule: str = "slo"
    slo: Slo = field(default_factory=lambda: parse_slo(""))
    # where the target runs: its weights, caches, masks and batched passes (logits come back to the CPU
    # in float32 for verification); CUDA asked for where none is present is refused when loading
    device: str = "cpu"
    dtype: str = "float32"
    # the static verify path (edge_runtime.static_target): windows padded to buckets, each session's keys
    # and values in a slot of a static cache of static_len positions; cuda_graphs (which implies it)
    # replays each bucket's captured pass on CUDA, and runs the same passes eagerly elsewhere
    static_cache: bool = False
    cuda_graphs: bool = False
    static_len: int = 2048
    # edge-side speculation (edge_runtime.drafting, with a draft given to `covspec edge serve --draft`): the
    # edge offers to draft for devices that could draft themselves while it holds at most this many
    # unfinished sessions (0: never; edge_sd sessions are always served). 1, a lone device: on the demo pair
    # over wifi (results/capacity-draft-streams, offer 4, and results/capacity, offer 1), edge
    # drafting beat the devices' own at 1 device (1.13x) and lost at 2 and 4 (0.93x, 0.75x), where offer 1 is
    # their equal; an earlier tree on a busier machine had it win up to 4 (results/load-edge-sd)
    draft_sessions: int = 1
    # a covspec device's plain STREAM (its draft still prefilling, or drafting not paying on its link) served by
    # drafting on the edge, whatever its load: a window per target pass instead of a token, the same answer
    draft_streams: bool = True
    # SIGTERM drains the edge: open sessions finish, new OPENs get DRAINING; it exits when none is
    # unfinished or after this many seconds (keep it under the orchestrator's grace period)
    drain_timeout_s: float = 60.0

    def check(self) -> None:
        """Raises ValueError naming a setting that makes no sense."""
        positive = {"max_sessions": self.max_sessions, "max_sessions_per_device": self.max_sessions_per_device,
                    "idle_timeout_s": self.idle_timeout_s, "max_new_tokens": self.max_new_tokens,
                    "max_image_pixels": self.max_image_pixels, "max_total_bytes": self.limits.max_total_bytes,
                    "max_image_bytes": self.limits.max_image_bytes, "max_window": self.limits.max_window,
                    "max_batch": self.max_batch, "static_len": self.static_len}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not DEVICE_NAME.fullmatch(self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.draft_sessions < 0:
            raise ValueError(f"draft_sessions must be at least 0, got {self.draft_sessions}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be at least 0, got {self.drain_timeout_s}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be slo or fifo, got {self.schedule!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must lie in [0, 1000], got {self.batch_wait_ms}")
