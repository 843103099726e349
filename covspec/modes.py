"""The one table of modes: which CoVSpec mechanisms each mode of `covspec device run` and
`covspec bench` uses (the README's list of modes is this table); the device, the CLI and the tools
all read it.

    target_only  the edge generates and streams (the device only tokenizes and shows)
    edge_sd      the edge drafts with its own draft and verifies, and streams (server-side speculative
                 decoding: `covspec edge serve --draft`; the device only tokenizes and shows)
    draft_only   the device alone
    vanilla_sd   fixed window k, stop-and-wait; sampling uploads the draft's full distribution
    covspec      pruning, adaptive windows, branches with windows in flight, decoupled verification
    covspec_no_prune / _no_adaptive / _no_branch / _no_ahead / _no_decoupled / _no_placement: one mechanism
                 off each (placement: the device hands drafting to an edge that drafts faster, policy.place_drafting;
                 without it the device also never lets the edge start the answer while its draft prefills)
    covspec_no_join  the device's draft prefills before its first window, the answer waiting for it (covspec
                 joins: the edge starts the answer, the device takes drafting over once its draft is ready)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from enum import StrEnum

# policy.MARGIN_THRESHOLD, the drafting policy's default gate (a test keeps the two equal): this module
# is read by the CLI to build its parser, so it imports nothing heavy (policy and pruning import torch)
MARGIN_THRESHOLD = 0.3


@dataclass(frozen=True)
class SpecOptions:
    """Which CoVSpec mechanisms a speculative mode uses."""

    keep: float = 1.0  # share of the draft's visual tokens kept (1: no pruning)
    prune_method: str = "covspec"
    merge: bool = False  # the dropped visual tokens merged into the kept ones (pruning.merge_pruned)
    prune_target: bool = False  # send the kept indices to the edge too (changes the target's answers)
    adaptive: bool = False  # margin gate + cost-model window length (else the fixed window)
    margin_threshold: float = MARGIN_THRESHOLD
    k_max: int = 12
    branching: bool = False  # draft the next window on likely outcomes while one is verified
    branches: int = 1  # rejection branches besides the all-accepted one
    ahead: bool = False  # with branching: send the all-accepted branch's window before the RESULT arrives
    decoupled: bool = False  # sampling: upload q(x_i) only, correct on the device
    placement: bool = False  # hand drafting to the edge (STREAM with draft) when its drafting wins (policy.place_drafting)
    join: bool = False  # the answer starts on the edge while the draft prefills (a thread); the device joins when ready


# The demo pair's settings, chosen by side-by-side bench runs (docs/measurements.md): on its flat verify
# cost (results/calibration) long windows with a low gate pay, and long windows multiply every lost
# point of acceptance, so it keeps 90% of the visual tokens (describe, 16 prompts, loopback / wifi
# tok/s: 90% kept 479 / 351, 75% 396 / 309, 50% 399 / 288, unpruned 452 / 343; vanilla_sd@8 342 / 251)
COVSPEC = SpecOptions(keep=0.9, adaptive=True, branching=True, ahead=True, decoupled=True, margin_threshold=0.1,
                      k_max=16, placement=True, join=True)
MODE_OPTIONS: dict[str, SpecOptions] = {
    "vanilla_sd": SpecOptions(),
    "covspec": COVSPEC,
    "covspec_no_prune": replace(COVSPEC, keep=1.0),
    "covspec_no_adaptive": replace(COVSPEC, adaptive=False),
    "covspec_no_branch": replace(COVSPEC, branching=False, ahead=False),
    "covspec_no_ahead": replace(COVSPEC, ahead=False),
    "covspec_no_decoupled": replace(COVSPEC, decoupled=False),
    # no placement: the device drafts every token itself, so no edge-started answer either (joining hands the
    # start of the answer to the edge)
    "covspec_no_placement": replace(COVSPEC, placement=False, join=False),
    "covspec_no_join": replace(COVSPEC, join=False),
}
MODES = ("target_only", "draft_only", "edge_sd", *MODE_OPTIONS)


class Mode(StrEnum):
    """Every mode by name: a str (OPEN.mode carries the value), compared as `mode == Mode.EDGE_SD`."""

    TARGET_ONLY = "target_only"
    DRAFT_ONLY = "draft_only"
    EDGE_SD = "edge_sd"
    VANILLA_SD = "vanilla_sd"
    COVSPEC = "covspec"
    COVSPEC_NO_PRUNE = "covspec_no_prune"
    COVSPEC_NO_ADAPTIVE = "covspec_no_adaptive"
    COVSPEC_NO_BRANCH = "covspec_no_branch"
    COVSPEC_NO_AHEAD = "covspec_no_ahead"
    COVSPEC_NO_DECOUPLED = "covspec_no_decoupled"
    COVSPEC_NO_PLACEMENT = "covspec_no_placement"
    COVSPEC_NO_JOIN = "covspec_no_join"


STREAMING_MODES = (Mode.TARGET_ONLY, Mode.EDGE_SD)  # the device only opens and streams (no draft runs on it)
NO_EDGE_DRAFT = (Mode.TARGET_ONLY, Mode.DRAFT_ONLY)  # modes an edge's draft has no part in


class VerifyScheme(StrEnum):
    """How the edge verifies a window (edge_runtime.session.TargetSession.verify): greedy (argmax
    match), full (the device sent every drafted token's full q, VERIFY.dists) or decoupled (the device
    sent q(x_i) only, VERIFY.q, and draws the correction itself)."""

    GREEDY = "greedy"
    FULL = "full"
    DECOUPLED = "decoupled"


def pruning_options(mode: str, keep: float | None, merge: bool) -> SpecOptions | None:
    """The mode's mechanisms with a keep ratio and merging applied to its pruning (None: the mode as
    it is; modes that do not prune are left alone). Merging suits a draft trained on merged tokens
    (the demo's draft_fine)."""
    options = MODE_OPTIONS.get(mode)
    if options is None or options.keep >= 1.0 or (keep is None and not merge):
        return None
    if keep is not None:
        from covspec.pruning import keep_count

        keep_count(keep, 100)  # a ratio in (0, 1]
    return replace(options, keep=options.keep if keep is None else keep, merge=merge)


def split_label(label: str) -> tuple[str, int | None]:
    """A bench mode label: "vanilla_sd@8" -> ("vanilla_sd", 8), a fixed window of 8; "covspec" -> ("covspec", None)."""
    mode, at, k = label.partition("@")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
    if not at:
        return mode, None
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"{label!r}: the window after @ must be a whole number of at least 1")
    return mode, int(k)


def mode_labels(text: str) -> tuple[str, ...]:
    """argparse type of `bench --modes`: comma-separated modes of the table, each with an optional @K."""
    labels = tuple(label for label in text.split(",") if label)
    if not labels:
        raise argparse.ArgumentTypeError("no mode given")
    for label in labels:
        try:
            split_label(label)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return labels
