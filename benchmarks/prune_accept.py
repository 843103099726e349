"""End-to-end acceptance with pruning: greedy speculative decoding in one process, the draft prefilled
on the kept visual tokens against the unpruned draft, on the same items, with intervals.

    python -m benchmarks.prune_accept --draft DRAFT --target TARGET --split report --limit 2000 \\
        --keeps 0.9 1.0 --window 8 --json results/prune-report/accept/default.json

Per item, as the device and edge run it (device_runtime/client.py) but without sockets: the target's
first token opens the answer; the draft (covspec.drafter.Drafter, prefilled on the tokens
score_and_select keeps, or all) drafts fixed windows of `--window` tokens (fewer near the token limit,
MAX_NEW_TOKENS); the target verifies each greedily (speculative.verify_greedy's rule: the longest
prefix equal to the target's own greedy tokens, then the target's token). Greedy verification makes the
answer the target's own greedy answer, so the target's tokens are read from that answer (computed once
per item; each run checks that it committed exactly that answer).

Reported per configuration, over items: accepted / drafted (the share of drafted tokens the target
accepts) and per-token acceptance, accepted / (accepted + rejections) (the rate a drafted token is
accepted given those before it were; covspec bench's `per-token acceptance`), each with its 95%
bootstrap interval over items, and the paired difference from the unpruned draft on the same items.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.prune_eval import target_answer
from covspec.demo.evaluate import MAX_NEW_TOKENS
from covspec.demo.task import Item, sample_split, split_seed
from covspec.drafter import Drafter
from covspec.models import load_adapter
from covspec.models.draft import DraftModel, as_draft
from covspec.pruning import keep_count, merged_visual, score_and_select
from covspec.sampling import SamplingParams
from covspec.stats import bootstrap_mean, bootstrap_ratio, paired_ratio_difference

WINDOW = 8


@dataclass
class Rounds:
    """One answer's speculative rounds, summed."""

    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds that ended on a rejected token
    rounds: int = 0


@dataclass
class KeepRun:
    keep: float
    merge: bool
    method: str
    drafted: list[int] = field(default_factory=list)  # per item
    accepted: list[int] = field(default_factory=list)
    rejections: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.method}@{self.keep:g}" + ("+merge" if self.merge and self.keep < 1.0 else "")


def speculate(draft: DraftModel, item: Item, answer: list[int], kept: np.ndarray | None, merge: bool,
              window: int = WINDOW, max_new_tokens: int = MAX_NEW_TOKENS) -> Rounds:
    """Greedy speculative decoding of the target's answer (its greedy ids, the end token included
    when it stopped on one) with the draft prefilled on `kept` (None: every visual token)."""
    out = Rounds()
    eos = set(draft.eos_token_ids)
    if not answer or answer[0] in eos:
        return out
    visual = draft.encode_image(draft.preprocess(item.image))
    if merge and kept is not None:
        visual = merged_visual(visual, kept)
    _, state = draft.prefill(visual, item.question, kept=kept)
    drafter = Drafter(draft, state, answer[0], SamplingParams(), None)  # the target's first token opens it
    while drafter.committed[-1] not in eos and len(drafter.committed) < max_new_tokens:
        k = min(window, max_new_tokens - len(drafter.committed))
        drafted = drafter.draft(k)
        c = len(drafter.committed)
        truth = answer[c:c + len(drafted)]
        accepted = next((i for i, (x, y) in enumerate(zip(drafted.ids.tolist(), truth, strict=False)) if x != y),
                        min(len(drafted), len(truth)))
        next_token = answer[c + accepted] if c + accepted < len(answer) else None
        if accepted == len(drafted) and drafted.ids[-1].item() in eos:
            next_token = None  # the accepted window ended the answer
        drafter.commit(drafted, accepted, next_token)
        out.drafted += len(drafted)
        out.accepted += accepted
        out.rejections += int(accepted < len(drafted))
        out.rounds += 1
        if next_token is None:
            break
    if drafter.committed != answer[:len(drafter.committed)] or len(drafter.committed) != len(answer):
        raise AssertionError(f"item {item.index}: greedy speculation committed {drafter.committed}, "
                             f"not the target's answer {answer}")
    return out


def accept_runs(draft_path: str | Path, target_path: str | Path, split: str = "report", limit: int = 200,
                seed: int = 0, keeps: Sequence[float] = (0.9, 1.0), merge: bool = False, method: str = "covspec",
                window: int = WINDOW, progress: bool = False) -> tuple[list[KeepRun], dict]:
    draft, target = as_draft(load_adapter(draft_path)), load_adapter(target_path)  # the draft as the device runs it
    items = list(sample_split(split, limit, seed))
    runs = [KeepRun(k, merge, "none" if k >= 1.0 else method) for k in keeps]
    start = time.perf_counter()
    for i, item in enumerate(items):
        answer = target_answer(target, item)
        visual = draft.encode_image(draft.preprocess(item.image))
        query = draft.prompt_embeddings(item.question)
        for run in runs:
            kept = None if run.keep >= 1.0 else score_and_select(visual, query, run.keep, method)
            r = speculate(draft, item, answer, kept, merge, window)
            run.drafted.append(r.drafted)
            run.accepted.append(r.accepted)
            run.rejections.append(r.rejections)
            run.rounds.append(r.rounds)
        if progress and ((i + 1) % 100 == 0 or i + 1 == len(items)):
            print(f"[prune_accept] {i + 1}/{len(items)} items, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    meta = {"draft": str(draft_path), "target": str(target_path), "split": split, "seed": split_seed(split, seed),
            "items": limit, "window": window, "qtypes": [i.qtype for i in items]}
    return runs, meta


def _fmt(e, signed: bool = False) -> str:
    spec = "+.3f" if signed else ".3f"
    return f"{e.value:{spec}} [{e.low:{spec}}, {e.high:{spec}}]" + ("*" if signed and e.excludes_zero else "")


def format_runs(runs: list[KeepRun], meta: dict) -> str:
    base = next((r for r in runs if r.keep >= 1.0), None)
    lines = [f"Draft {meta['draft']}, target {meta['target']}; {meta['items']} items of split {meta['split']} "
             f"(generator seed {meta['seed']}); fixed windows of {meta['window']}, greedy verification. "
             "Values [95% bootstrap interval over items]; differences are paired (same items), * the interval "
             "excludes 0.", "",
             "| draft prefill | keep | drafted | accepted / drafted | per-token acceptance | mean accepted per round | "
             "accepted / drafted - unpruned | per-token - unpruned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        closed = [a + j for a, j in zip(r.accepted, r.rejections, strict=True)]
        row = (f"| {r.key} | {r.keep:.2f} | {sum(r.drafted)} | {_fmt(bootstrap_ratio(r.accepted, r.drafted))} | "
               f"{_fmt(bootstrap_ratio(r.accepted, closed))} | {_fmt(bootstrap_ratio(r.accepted, r.rounds))} | ")
        if base is None or r is base:
            row += "- | - |"
        else:
            base_closed = [a + j for a, j in zip(base.accepted, base.rejections, strict=True)]
            row += (f"{_fmt(paired_ratio_difference(r.accepted, r.drafted, base.accepted, base.drafted), True)} | "
                    f"{_fmt(paired_ratio_difference(r.accepted, closed, base.accepted, base_closed), True)} |")
        lines.append(row)
    if base is not None:
        for r in runs:
            if r is not base:
                same = [float(a == b) for a, b in zip(r.accepted, base.accepted, strict=True)]
                lines.append(f"\n{r.key}: the same accepted count as unpruned on {_fmt(bootstrap_mean(same))} of items.")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--split", default="report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.9, 1.0], help="keep ratios (1.0: unpruned)")
    parser.add_argument("--method", default="covspec")
    parser.add_argument("--merge", action="store_true", help="merge the dropped tokens into the kept ones")
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the per-item counts here (and the table beside it, .txt)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for k in args.keeps:
        keep_count(k, 100)
    runs, meta = accept_runs(args.draft, args.target, args.split, args.limit, args.seed, args.keeps, args.merge,
                             args.method, args.window, progress=True)
    text = format_runs(runs, meta)
    print(text)
    if args.json:
        write_study(Path(args.json), "benchmarks.prune_accept", argv, meta, [asdict(r) for r in runs], text, ".txt")
    return 0


def write_study(path: Path, module: str, argv: list[str] | None, meta: dict, runs: list[dict], text: str,
                suffix: str) -> None:
    """A study's rows as JSON (with the command that made them) and its table beside them (`suffix`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = f"python -m {module} " + shlex.join(argv if argv is not None else sys.argv[1:])
    path.write_text(json.dumps({"command": command, "meta": meta, "runs": runs}))
    table = f"Command: `{command}`" if suffix == ".md" else f"Command: {command}"
    path.with_suffix(suffix).write_text(f"{table}\n\n{text}\n")


if __name__ == "__main__":
    raise SystemExit(main())
