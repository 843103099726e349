"""Draft accuracy (and agreement with the target) when the draft prefills only the kept visual tokens:
one row per pruning method and keep ratio, on a split of the demo task.

    python -m covspec.tools.prune_eval --draft DRAFT --target TARGET --limit 60 --ratios 0.1 0.25 0.5 1.0

Accuracy: the draft's greedy answer (covspec.generation.generate with `kept`), scored as
covspec.demo.evaluate scores it (exact match for short answers, object F1 for "describe"); "all
items" is the mean score over every item, the draft's one held-out accuracy.
Agreement (with --target): the target's own greedy answer is fed to the pruned draft, which predicts
each next token; the share it gets right is the greedy acceptance rate a window would see.

Method "oracle" is a ground-truth reference, not a pruner a device could run: it reads the scene's
objects and keeps their tokens first (one per object in turn, then a second each, ..., patches in
index order), then background. It shows what the draft scores when every object is covered; a
pruner could still beat it by picking better patches of each object.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from covspec.demo.data import per_side, tokens_by_cell
from covspec.demo.evaluate import MAX_NEW_TOKENS, Score, score_answer
from covspec.demo.task import CORE_TYPES, N_VISUAL_TOKENS, Item, sample_split
from covspec.generation import generate
from covspec.models import VLMAdapter, load_adapter
from covspec.pruning import METHODS, keep_count, merged_visual, score_and_select
from covspec.sampling import SamplingParams

DEFAULT_RATIOS = (0.1, 0.25, 0.5, 1.0)


@dataclass
class SweepRow:
    method: str
    ratio: float
    kept: int  # visual tokens kept (of the image's N)
    n: int  # items
    merged: bool = False  # the dropped tokens merged into the kept ones (pruning.merge_pruned)
    by_type: dict[str, float] = field(default_factory=dict)  # mean score per question type
    overall: float = float("nan")  # mean task score over every item (each type scored as it is)
    short: float = float("nan")  # exact match over the five core types
    describe_f1: float = float("nan")
    relation: float = float("nan")
    unseen_short: float = float("nan")  # core types + relation, scenes with an unseen combination
    agreement: float = float("nan")  # teacher-forced greedy agreement with the target
    prefill_ms: float = float("nan")  # median draft time to first token: encoding + prefill, plus pruning


@dataclass
class _Tally:
    seen: dict[str, Score] = field(default_factory=lambda: defaultdict(Score))
    unseen: dict[str, Score] = field(default_factory=lambda: defaultdict(Score))
    hits: int = 0
    tokens: int = 0
    prefill_s: list[float] = field(default_factory=list)

    def row(self, method: str, ratio: float, merged: bool, kept: int, n: int) -> SweepRow:
        every: dict[str, Score] = defaultdict(Score)
        for table in (self.seen, self.unseen):
            for qtype, s in table.items():
                every[qtype].n += s.n
                every[qtype].total += s.total
        core = _pool(self.seen, CORE_TYPES)
        unseen = _pool(self.unseen, CORE_TYPES + ("relation",))
        everything = _pool(every, tuple(every))
        return SweepRow(method=method, ratio=ratio, kept=kept, merged=merged, n=n,
                        by_type={t: s.mean for t, s in sorted(every.items())}, overall=everything.mean,
                        short=core.mean,
                        describe_f1=every["describe"].mean if "describe" in every else float("nan"),
                        relation=every["relation"].mean if "relation" in every else float("nan"),
                        unseen_short=unseen.mean,
                        agreement=self.hits / self.tokens if self.tokens else float("nan"),
                        prefill_ms=1000 * statistics.median(self.prefill_s) if self.prefill_s else float("nan"))


def _pool(scores: dict[str, Score], types: tuple[str, ...]) -> Score:
    out = Score()
    for t in types:
        if t in scores:
            out.n += scores[t].n
            out.total += scores[t].total
    return out


@torch.inference_mode()
def target_answer(target: VLMAdapter, item: Item) -> list[int]:
    """The target's greedy answer ids, its end token included when it stopped on one."""
    result = generate(target, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS)
    return list(result.ids) + ([min(target.eos_token_ids)] if result.stop_reason == "eos" else [])


@torch.inference_mode()
def agreement(draft: VLMAdapter, item: Item, kept: torch.Tensor, answer: list[int],
              merge: bool = False) -> tuple[int, int]:
    """(hits, tokens): the pruned draft fed the target's answer, predicting each next token."""
    visual = draft.encode_image(draft.preprocess(item.image))
    if merge:
        visual = merged_visual(visual, kept)
    first, state = draft.prefill(visual, item.question, kept=kept)
    rest = draft.forward(state, torch.tensor(answer[:-1])) if len(answer) > 1 else first[None][:0]
    predicted = [int(first.argmax())] + [int(x) for x in rest.argmax(-1)]
    return sum(int(p == a) for p, a in zip(predicted, answer, strict=True)), len(answer)


def oracle_kept(item: Item, k: int, n_visual: int = N_VISUAL_TOKENS) -> torch.Tensor:
    """Sorted indices [k] of n_visual: the scene's object tokens round-robin over its objects, then
    background."""
    cells = tokens_by_cell(per_side(n_visual))
    queues = [list(cells[obj.cell]) for obj in item.scene.objects]
    chosen: list[int] = []
    while len(chosen) < k and any(queues):
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    objects = {obj.cell for obj in item.scene.objects}
    background = [t for cell, tokens in cells.items() if cell not in objects for t in tokens]
    return torch.tensor(sorted(chosen + background[:k - len(chosen)]), dtype=torch.long)


def prune_sweep(draft_path: str | Path, target_path: str | Path | None = None, split: str = "heldout",
                ratios: Sequence[float] = DEFAULT_RATIOS, methods: Sequence[str] = METHODS,
                limit: int = 60, seed: int = 0, draft: VLMAdapter | None = None,
                target: VLMAdapter | None = None, oracle: bool = False, merge: bool = False,
                **prune_args: float) -> list[SweepRow]:
    """One row per (method, ratio): the draft's held-out accuracy when it prefills only the kept
    tokens (and, with a target, its teacher-forced agreement with the target's greedy answer).
    Ratio 1.0 is the unpruned draft: computed once, reported as method "none"; `oracle` adds the
    ground-truth reference row per ratio. `merge` (for a draft trained on merged tokens): every
    method's dropped tokens are merged into its kept ones, plus a row of covspec's selection without
    merging per ratio.
    `prune_args` go to score_and_select (theta, rel_weight, tau, eps)."""
    draft = draft or load_adapter(draft_path)
    if target is None and target_path is not None:
        target = load_adapter(target_path)
    items = list(sample_split(split, limit, seed))
    answers = [target_answer(target, item) for item in items] if target is not None else []
    configs = [("none", 1.0, False)] if any(r >= 1.0 for r in ratios) else []
    for r in (r for r in ratios if r < 1.0):
        configs += [(m, r, merge) for m in (*methods, *(["oracle"] if oracle else []))]
        configs += [("covspec", r, False)] if merge and "covspec" in methods else []
    tallies = {c: _Tally() for c in configs}
    counts: dict[tuple[str, float, bool], int] = {}
    for i, item in enumerate(items):
        visual = draft.encode_image(draft.preprocess(item.image))
        query = draft.prompt_embeddings(item.question)
        for method, ratio, merged in configs:
            t0 = time.perf_counter()
            if ratio >= 1.0:
                kept = torch.arange(visual.count)
            elif method == "oracle":
                try:
                    kept = oracle_kept(item, keep_count(ratio, visual.count), visual.count)
                except ValueError as err:
                    raise ValueError(f"the oracle rows need a square token grid over the demo's 3x3 cells; this "
                                     f"draft gives {visual.count} visual tokens (leave them out: --no-oracle)") from err
            else:
                kept = score_and_select(visual, query, ratio, method, generator=torch.Generator().manual_seed(item.index),
                                        **prune_args)
            select_s = time.perf_counter() - t0
            counts[(method, ratio, merged)] = int(kept.numel())
            tally = tallies[(method, ratio, merged)]
            result = generate(draft, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS,
                              kept=None if ratio >= 1.0 else kept, merge=merged)
            table = tally.unseen if item.slices.get("unseen") else tally.seen
            table[item.qtype].add(score_answer(item, result.text))
            tally.prefill_s.append(result.prefill_s + select_s)
            if answers:
                hits, tokens = agreement(draft, item, kept, answers[i], merged)
                tally.hits += hits
                tally.tokens += tokens
    return [tallies[c].row(*c, counts.get(c, 0), len(items)) for c in configs]


def _num(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def _pct(x: float) -> str:
    return _num(x, ".1%")


def format_rows(rows: list[SweepRow]) -> str:
    """A markdown table of the sweep."""
    lines = ["| method | merged | keep | kept | all items | short EM | relation | describe F1 | unseen EM | agreement | "
             "prefill ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {'yes' if r.merged else 'no'} | {r.ratio:.2f} | {r.kept} | {_num(r.overall, '.3f')} | {_pct(r.short)} | "
                     f"{_pct(r.relation)} | "
                     f"{_num(r.describe_f1, '.3f')} | {_pct(r.unseen_short)} | {_pct(r.agreement)} | "
                     f"{_num(r.prefill_ms, '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", required=True)
    parser.add_argument("--target")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-oracle", action="store_true", help="leave out the ground-truth reference rows")
    parser.add_argument("--merge", action="store_true",
                        help="merge the pruned tokens into the kept ones (a draft trained so; default: dropped)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for r in args.ratios:
        keep_count(r, 100)  # validates the ratio
    rows = prune_sweep(args.draft, args.target, args.split, args.ratios, args.methods, args.limit,
                       oracle=not args.no_oracle, merge=args.merge)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        plot_sweep([asdict(r) for r in rows], Path(args.json).with_suffix(".png"))
        command = "python -m covspec.tools.prune_eval " + shlex.join(argv if argv is not None else sys.argv[1:])
        Path(args.json).with_suffix(".txt").write_text(f"Command: {command}\n\n{format_rows(rows)}\n")
    return 0


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Draft accuracy (short-question exact match, describe F1) and agreement with the target
    (the acceptance proxy) against the share of visual tokens kept, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["method"] == "none"]
    any_merged = any(r.get("merged") for r in rows)

    def label(r: dict) -> str:
        return r["method"] + (" (dropped, no merge)" if any_merged and not r.get("merged") else "")

    metrics = [("overall", "held-out task score, every item"), ("short", "short-question exact match"),
               ("describe_f1", "describe object-F1"),
               ("agreement", "token agreement with the target")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(17, 3.8))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for name in dict.fromkeys(label(r) for r in rows if r["method"] != "none"):
            points = sorted([(r["ratio"], r[key]) for r in rows if r["method"] != "none" and label(r) == name] +
                            [(r["ratio"], r[key]) for r in full])
            style = ({"linestyle": "--", "color": "black"} if name.startswith("oracle")
                     else {"linestyle": ":"} if "no merge" in name else {})
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name, **style)
        ax.set_xlabel("share of visual tokens kept")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
