"""Device speed profiles: the demo pair's draft run at a named device's pace.

`profiles.json` (beside this module) lists, per device, what the draft's vision tower, prefill and
one decode step take there, each figure with its source (measured on this machine at real size, or
published, or extrapolated, saying how). `Paced` wraps a DraftModel and pads each call (a sleep after
it) to the profile's time, never shortening one, so an answer's tokens and acceptance are the demo
pair's and its timing is the named device's: a labelled emulation, never a measurement of that device.

    profile = load_profile("smolvlm-256m")
    draft = Paced(load_draft(...), profile)     # a DraftModel: encode_image, prefill, forward... paced
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from covspec.errors import CovspecError
from covspec.models.draft import DecodeState, DraftModel, VisualTokens, as_draft

MULTI_TOKEN = 8  # a forward of up to this many tokens costs one decode step (it reads the weights once)


@dataclass(frozen=True)
class DeviceProfile:
    """What one draft call takes on a named device (profiles.json)."""

    name: str
    draft: str  # the draft and runtime the figures are for
    prefill_ms: float  # the draft's prefill of one prompt (the vision tower included when vision_ms is None)
    prefill_tokens: int  # the prompt length the prefill figure is for (visual tokens included)
    step_ms: float  # one decode step
    source: str
    vision_ms: float | None = None  # the vision tower, one image (None: counted in prefill_ms)

    @property
    def answer_start_s(self) -> float:
        """Vision tower + prefill: how long the draft takes before its first token, in seconds."""
        return (self.prefill_ms + (self.vision_ms or 0.0)) / 1000


def profile_names() -> list[str]:
    return [name for name in _table() if not name.startswith("_")]


def load_profile(name: str) -> DeviceProfile:
    """The profile `name` of profiles.json; a CovspecError naming the known ones otherwise."""
    table = _table()
    if name.startswith("_") or name not in table:
        raise CovspecError(f"unknown device profile {name!r} (known: {', '.join(profile_names())})")
    entry = table[name]
    return DeviceProfile(name=name, draft=entry["draft"], prefill_ms=float(entry["prefill_ms"]),
                         prefill_tokens=int(entry["prefill_tokens"]), step_ms=float(entry["step_ms"]),
                         source=entry["source"],
                         vision_ms=None if entry.get("vision_ms") is None else float(entry["vision_ms"]))


def _table() -> dict[str, Any]:
    return json.loads(resources.files("covspec.device_runtime").joinpath("profiles.json").read_text())


class Paced:
    """A DraftModel whose encode_image, prefill and forward take at least the profile's times (each call
    timed, then padded by a sleep; a call already slower is left alone). Everything else is the draft's."""

    numpy_io = True

    def __init__(self, draft: Any, profile: DeviceProfile) -> None:
        self.inner: DraftModel = as_draft(draft)
        self.profile = profile
        self.padded_s = 0.0  # sleep added so far (what the emulation put on top of this machine's time)
        self._vision_s = 0.0  # the last encode_image's time, when the profile's prefill includes vision
        self._took: dict[str, float] = {}  # what the last encode / prefill took here (see _late)

    def __getattr__(self, name: str) -> Any:  # tokenizer, family, path, backend, decode, fingerprint...
        return getattr(self.inner, name)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def eos_token_ids(self) -> set[int]:
        return self.inner.eos_token_ids

    def _pad(self, target_s: float, started: float) -> None:
        left = target_s - (time.perf_counter() - started)
        if left > 0:
            time.sleep(left)
            self.padded_s += left

    def encode_image(self, pixels: dict[str, Any]) -> VisualTokens:
        started = time.perf_counter()
        if self.profile.vision_ms is None:  # counted in the prefill's time
            visual = self.inner.encode_image(pixels)
            self._vision_s = time.perf_counter() - started
            return visual
        return self._late(self.profile.vision_ms / 1000, "encode", lambda: self.inner.encode_image(pixels))

    def prefill(self, visual: VisualTokens, prompt: str,
                kept: np.ndarray | None = None) -> tuple[np.ndarray, DecodeState]:
        target = self.profile.prefill_ms / 1000 - self._vision_s  # the vision tower's time already spent, when included
        self._vision_s = 0.0
        return self._late(target, "prefill", lambda: self.inner.prefill(visual, prompt, kept=kept))

    def _late(self, target_s: float, name: str, call: Any) -> Any:
        """A long call (vision, prefill) padded before it runs rather than after: the sleep stands for the
        device's native work, which leaves this process's GIL free (a demo draft on torch holds it for its
        Python parts, which would slow the socket's thread while the edge starts the answer); the call
        runs at the end, as long as it last took here, and is never shortened."""
        started = time.perf_counter()
        ahead = target_s - self._took.get(name, 0.0)
        if ahead > 0:
            time.sleep(ahead)
            self.padded_s += ahead
        begun = time.perf_counter()
        out = call()
        self._took[name] = time.perf_counter() - begun
        self._pad(target_s, started)
        return out

    def forward(self, state: DecodeState, ids: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        logits = self.inner.forward(state, ids)
        self._pad(self.profile.step_ms / 1000 * math.ceil(max(len(ids), 1) / MULTI_TOKEN), started)
        return logits
