"""The demo draft's acceptance when it reads a lower-resolution image than the target, greedy, on the
held-out split, against the draft at full resolution on the same items, with 95% intervals.

    python -m benchmarks.lowres_accept --limit 200 --json results/prune-realsize/lowres_accept.json

The demo images are 72x72 px; the target and the draft read them in 12 px patches (36 visual tokens).
The target always reads the full image (the edge has it). The draft reads, per variant:

- "full": the image as it is (36 tokens);
- "half side, upscaled": the image box-downscaled to 36x36 px, then resized back to 72 px by the draft's
  own preprocessing (bicubic): the same 36 tokens and the same vision cost, only the detail lost;
- "quarter side, upscaled": the same from 18x18 px (a shape of 14-18 px becomes 4-5 px);
- "half side, native": the 36x36 image read at its own size (CLIP's position embeddings
  interpolated): 9 visual tokens, the vision tower's cost cut as at real size (the demo draft was
  never trained at this size);
- "keep 0.25": the full image with 9 of its 36 tokens kept by the pruner (covspec's method), the
  same number of tokens as the native half side.

As benchmarks.prune_accept runs it: the target's greedy answer opens with its first token, the draft
drafts fixed windows of `--window` tokens, the target keeps the longest prefix equal to its own greedy
tokens. Reported per variant: accepted / drafted, per-token acceptance (accepted / (accepted +
rejections)), mean accepted tokens per window, each with its 95% bootstrap interval over items, and
the paired difference from "full" on the same items.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.prune_accept import WINDOW, speculate, write_study
from benchmarks.prune_eval import target_answer
from benchmarks.prune_realsize import interpolated_positions
from covspec.demo import WEIGHTS
from covspec.demo.task import sample_split, split_seed
from covspec.models import load_adapter
from covspec.models.common import VisualTokens
from covspec.models.draft import DraftModel, as_draft
from covspec.models.llava_inputs import ClipPreprocessor
from covspec.pruning import score_and_select
from covspec.stats import Estimate, bootstrap_ratio, paired_ratio_difference

FULL, UPSCALED, QUARTER, NATIVE, PRUNED = ("full", "half side, upscaled", "quarter side, upscaled", "half side, native",
                                          "keep 0.25")
VARIANTS = (FULL, UPSCALED, QUARTER, NATIVE, PRUNED)


def downscale(image: Image.Image, factor: int = 2) -> Image.Image:
    """The image at 1/factor of its side (box filter: each pixel the mean of factor x factor)."""
    return image.convert("RGB").resize((image.width // factor, image.height // factor), Image.Resampling.BOX)


class Upscaled:
    """The draft reading a downscaled image through its own preprocessing (resized back to its size)."""

    def __init__(self, draft: DraftModel, factor: int = 2):
        self.draft, self.factor = draft, factor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.draft, name)

    def preprocess(self, image: Image.Image) -> dict[str, Any]:
        return self.draft.preprocess(downscale(image, self.factor))


class Native:
    """The draft reading a downscaled image at its own size: fewer patches, interpolated positions
    (a LLaVA draft with a CLIP tower)."""

    def __init__(self, draft: DraftModel, factor: int = 2):
        self.draft, self.factor = draft, factor
        self.tower = draft.adapter.model.model.vision_tower

    def __getattr__(self, name: str) -> Any:
        return getattr(self.draft, name)

    def preprocess(self, image: Image.Image) -> dict[str, Any]:
        small = downscale(image, self.factor)
        return {"pixel_values": torch.from_numpy(ClipPreprocessor(None, small.width)(small))}

    def encode_image(self, pixels: dict[str, Any]) -> VisualTokens:
        with interpolated_positions(self.tower):
            return self.draft.encode_image(pixels)


@dataclass
class Counts:
    variant: str
    tokens: int = 0  # visual tokens the draft prefills
    drafted: list[int] = field(default_factory=list)  # per item
    accepted: list[int] = field(default_factory=list)
    rejections: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    def closed(self) -> list[int]:
        return [a + r for a, r in zip(self.accepted, self.rejections, strict=True)]


def shown(path: str | Path) -> str:
    """The path relative to the working directory when under it (a checkout's root), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def accept_lowres(draft_path: str | Path, target_path: str | Path, split: str = "heldout", limit: int = 32,
                  seed: int = 0, window: int = WINDOW) -> tuple[list[Counts], dict[str, Any]]:
    draft, target = as_draft(load_adapter(draft_path)), load_adapter(target_path)
    readers: dict[str, DraftModel] = {FULL: draft, UPSCALED: Upscaled(draft), QUARTER: Upscaled(draft, 4),
                                      NATIVE: Native(draft), PRUNED: draft}
    runs = {v: Counts(v) for v in VARIANTS}
    items = list(sample_split(split, limit, seed))
    start = time.perf_counter()
    for item in items:
        answer = target_answer(target, item)
        for variant, reader in readers.items():
            kept = None
            visual = reader.encode_image(reader.preprocess(item.image))
            if variant == PRUNED:
                kept = score_and_select(visual, draft.prompt_embeddings(item.question), 0.25)
            r = speculate(reader, item, answer, kept, False, window)
            run = runs[variant]
            run.tokens = len(visual.activity) if kept is None else len(kept)
            run.drafted.append(r.drafted)
            run.accepted.append(r.accepted)
            run.rejections.append(r.rejections)
            run.rounds.append(r.rounds)
    meta = {"draft": shown(draft_path), "target": shown(target_path), "split": split, "seed": split_seed(split, seed),
            "items": limit, "window": window, "seconds": round(time.perf_counter() - start, 1)}
    return list(runs.values()), meta


def _fmt(e: Estimate, signed: bool = False) -> str:
    spec = "+.3f" if signed else ".3f"
    return f"{e.value:{spec}} [{e.low:{spec}}, {e.high:{spec}}]" + ("*" if signed and e.excludes_zero else "")


def format_runs(runs: list[Counts], meta: dict[str, Any]) -> str:
    base = runs[0]
    lines = [f"Draft {meta['draft']}, target {meta['target']} (reads the full image); {meta['items']} items of "
             f"split {meta['split']} (generator seed {meta['seed']}); fixed windows of {meta['window']}, greedy. "
             "Values [95% bootstrap interval over items]; differences paired with `full` on the same items, "
             "* the interval excludes 0.", "",
             "| draft reads | visual tokens | drafted | accepted / drafted | per-token acceptance | accepted per window "
             "| per-token - full |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        diff = "-" if r is base else _fmt(paired_ratio_difference(r.accepted, r.closed(), base.accepted,
                                                                   base.closed()), True)
        lines.append(f"| {r.variant} | {r.tokens} | {sum(r.drafted)} | {_fmt(bootstrap_ratio(r.accepted, r.drafted))} "
                     f"| {_fmt(bootstrap_ratio(r.accepted, r.closed()))} | {_fmt(bootstrap_ratio(r.accepted, r.rounds))} "
                     f"| {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default=str(WEIGHTS / "draft"))
    parser.add_argument("--target", default=str(WEIGHTS / "target"))
    parser.add_argument("--split", default="heldout", help="held-out layouts (settings are chosen on val)")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the per-item counts here (and the table beside it, .md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, meta = accept_lowres(args.draft, args.target, args.split, args.limit, args.seed, args.window)
    text = format_runs(runs, meta)
    print(text)
    if args.json:
        write_study(Path(args.json), "benchmarks.lowres_accept", argv, meta, [asdict(r) for r in runs], text, ".md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
