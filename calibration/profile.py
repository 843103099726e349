"""The calibration profile: what `covspec calibrate` measured, as JSON, and how its readers use it.

Readers: the device runtime seeds its drafting policy's estimates with it (`policy_priors`) instead
of generic guesses, so the first windows are already sized for this link and these models; export
records it in the bundle manifest (our int8 scheme is dynamic, so no activation ranges come from it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from covspec.errors import CovspecError

PROFILE_VERSION = 1


class ProfileError(CovspecError):
    """A calibration profile that cannot be used: unreadable, wrong version, or a bad field."""


@dataclass
class CalibrationProfile:
    created: str  # ISO time
    host: str
    edge: str  # endpoint measured
    draft_step_ms: dict[str, float]  # backend label ("eager", "executorch", "onnx") -> one decode step
    verify_ms: dict[int, float]  # window size k -> the edge's own verify time (median)
    verify_line_ms: tuple[float, float]  # (v0, v1): verify_ms ~ v0 + v1 * k, least squares
    target_step_ms: float | None  # the edge streaming alone, per token (target-only)
    rtt_ms: float  # median PING round trip
    up_mbit: float | None  # PING filler upload
    down_mbit: float | None  # PONG filler download
    margin_bins: list[float]  # bin edges of the draft's top-1 minus top-2 probability
    bin_acceptance: list[float | None]  # per bin: accepted / judged drafted tokens (None: none judged)
    bin_judged: list[int]
    acceptance: float  # over all judged drafted tokens
    split: str  # where acceptance was measured (the demo task's calibration split, or "prompts")
    items: int
    version: int = PROFILE_VERSION
    notes: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["verify_ms"] = {str(k): v for k, v in self.verify_ms.items()}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    def policy_priors(self, backend: str) -> dict[str, Any]:
        """Keyword arguments for `OnlineStats` on a device running the draft with `backend`."""
        step = self.draft_step_ms.get(backend)
        if step is None:
            step = min(self.draft_step_ms.values())
        v0, v1 = self.verify_line_ms
        return {"t_draft": step / 1000, "rtt": self.rtt_ms / 1000, "prior_v0": max(v0, 0.0) / 1000,
                "prior_v1": max(v1, 0.0) / 1000, "prior_acceptance": self.acceptance,
                "prior_bins": [a if a is not None else self.acceptance for a in self.bin_acceptance]}


def load_profile(path: str | Path) -> CalibrationProfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ProfileError(f"calibration profile {path}: no such file") from err
    except (OSError, ValueError) as err:
        raise ProfileError(f"calibration profile {path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ProfileError(f"calibration profile {path}: expected a JSON object")
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(f"calibration profile {path}: version {data.get('version')!r}, "
                           f"this covspec reads version {PROFILE_VERSION}")
    known = set(CalibrationProfile.__dataclass_fields__)
    missing = sorted(known - set(data) - {"notes", "version"})
    if missing:
        raise ProfileError(f"calibration profile {path}: missing {', '.join(missing)}")
    try:
        data["verify_ms"] = {int(k): float(v) for k, v in data["verify_ms"].items()}
        data["verify_line_ms"] = tuple(float(x) for x in data["verify_line_ms"])
        profile = CalibrationProfile(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError, AttributeError) as err:
        raise ProfileError(f"calibration profile {path}: a field has the wrong type ({err})") from err
    _check(profile, path)
    return profile


def _check(p: CalibrationProfile, path: Path) -> None:
    def bad(name: str, value: Any) -> ProfileError:
        return ProfileError(f"calibration profile {path}: {name} = {value!r} is not a valid measurement")

    if not p.draft_step_ms or not all(_positive(v) for v in p.draft_step_ms.values()):
        raise bad("draft_step_ms", p.draft_step_ms)
    if not all(k >= 1 and _positive(v) for k, v in p.verify_ms.items()):
        raise bad("verify_ms", p.verify_ms)
    if not (_finite(p.rtt_ms) and p.rtt_ms >= 0):
        raise bad("rtt_ms", p.rtt_ms)
    if not 0.0 <= p.acceptance <= 1.0:
        raise bad("acceptance", p.acceptance)
    if len(p.bin_acceptance) != len(p.margin_bins) - 1 or len(p.bin_judged) != len(p.bin_acceptance):
        raise bad("bin_acceptance", p.bin_acceptance)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _positive(x: Any) -> bool:
    return _finite(x) and x > 0
