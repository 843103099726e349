"""Draft accuracy (and agreement with the target) when the draft prefills only the kept visual tokens:
per pruning method and keep ratio, on a split of the demo task, every figure with its 95% interval.

    python -m benchmarks.prune_eval --draft DRAFT --target TARGET --split report --limit 2000 \\
        --ratios 0.1 0.25 0.5 1.0 --json results/prune-report/default/sweep.json

Accuracy: the draft's greedy answer (covspec.generation.generate with `kept`), scored as
covspec.demo.evaluate scores it (exact match for short answers, object F1 for "describe"). Slices:
"all" every item (the draft's one held-out accuracy), "short" the five core question types, "relation",
"describe" (F1), "unseen" every item whose scene holds a colour-shape combination never trained on;
and each question type on its own. Agreement (with --target): the target's own greedy answer is fed
to the pruned draft, which predicts each next token; hits / tokens is the greedy acceptance a window
would see.

Intervals (covspec.stats): bootstrap percentile intervals over items (2,000 resamples, seed 0) for
every score, and paired bootstrap intervals for differences on the same items: every method against
the unpruned draft, and each `--compare` method (default covspec) against every other at its ratio.
A difference whose interval holds 0 is not distinguishable on these items. The per-item scores go to
the JSON (with the target's answers), so `--reuse` adds methods without re-running the rest and
`--from-json` redraws the tables.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from covspec.demo.data import per_side, tokens_by_cell
from covspec.demo.evaluate import MAX_NEW_TOKENS, score_answer
from covspec.demo.task import CORE_TYPES, N_VISUAL_TOKENS, QUESTION_TYPES, Item, sample_split, split_seed
from covspec.generation import generate
from covspec.models import VLMAdapter, load_adapter
from covspec.models.draft import DraftModel, as_draft
from covspec.pruning import METHODS, keep_count, merged_visual, score_and_select
from covspec.sampling import SamplingParams
from covspec.stats import (
    Estimate,
    bootstrap_mean,
    bootstrap_ratio,
    paired_difference,
    paired_ratio_difference,
)

DEFAULT_RATIOS = (0.1, 0.25, 0.5, 1.0)
SLICES: dict[str, Callable[[str, bool], bool]] = {
    "all": lambda qtype, unseen: True,
    "short": lambda qtype, unseen: qtype in CORE_TYPES,
    "relation": lambda qtype, unseen: qtype == "relation",
    "describe": lambda qtype, unseen: qtype == "describe",
    "unseen": lambda qtype, unseen: unseen,
}
Config = tuple[str, float, bool]  # (method, keep ratio, dropped tokens merged)


def config_key(config: Config) -> str:
    method, ratio, merged = config
    return f"{method}@{ratio:g}" + ("+merge" if merged else "")


@dataclass
class ConfigScores:
    """One (method, ratio, merged) configuration's per-item results."""

    method: str
    ratio: float
    merged: bool
    kept: int = 0  # visual tokens kept (of the image's N)
    scores: list[float] = field(default_factory=list)  # task score per item
    hits: list[int] = field(default_factory=list)  # agreement hits per item (with a target)
    prefill_s: list[float] = field(default_factory=list)  # encoding + prefill + pruning per item


@dataclass
class ItemScores:
    """Every per-item result of one sweep: what all its tables and intervals are computed from."""

    draft: str
    split: str
    seed: int  # the generator seed the items were drawn with (split_seed)
    qtypes: list[str]
    unseen: list[bool]
    answers: list[list[int]]  # the target's greedy answer per item (empty without a target)
    configs: dict[str, ConfigScores] = field(default_factory=dict)

    def mask(self, slice_name: str) -> np.ndarray:
        if slice_name in SLICES:
            test = SLICES[slice_name]
            return np.array([test(q, u) for q, u in zip(self.qtypes, self.unseen, strict=True)], dtype=bool)
        return np.array([q == slice_name for q in self.qtypes], dtype=bool)  # one question type

    def tokens(self) -> np.ndarray:
        return np.array([len(a) for a in self.answers], dtype=np.float64)

    @classmethod
    def from_dict(cls, data: dict) -> ItemScores:
        configs = {k: ConfigScores(**v) for k, v in data.pop("configs").items()}
        return cls(**data, configs=configs)


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
    unseen: float = float("nan")  # every item on a scene with an unseen combination
    agreement: float = float("nan")  # teacher-forced greedy agreement with the target
    prefill_ms: float = float("nan")  # median draft time to first token: encoding + prefill, plus pruning
    intervals: dict[str, list[float]] = field(default_factory=dict)  # slice, type or "agreement" -> [low, high]


@dataclass
class DiffRow:
    """Paired differences a - b on the same items (a and b config keys), per slice and agreement."""

    a: str
    b: str
    ratio: float
    diffs: dict[str, Estimate] = field(default_factory=dict)


def estimates(items: ItemScores, key: str) -> dict[str, Estimate]:
    """Each slice's and question type's mean score with its interval, and the agreement."""
    c = items.configs[key]
    scores = np.asarray(c.scores, dtype=np.float64)
    out = {name: bootstrap_mean(scores[items.mask(name)]) for name in (*SLICES, *QUESTION_TYPES)}
    if items.answers and c.hits:
        out["agreement"] = bootstrap_ratio(c.hits, items.tokens())
    return out


def summarise(items: ItemScores) -> list[SweepRow]:
    rows = []
    for key, c in items.configs.items():
        est = estimates(items, key)
        nan = Estimate(math.nan, math.nan, math.nan, 0)
        rows.append(SweepRow(
            method=c.method, ratio=c.ratio, kept=c.kept, n=len(c.scores), merged=c.merged,
            by_type={t: est[t].value for t in QUESTION_TYPES if est[t].n},
            overall=est["all"].value, short=est["short"].value, describe_f1=est["describe"].value,
            relation=est["relation"].value, unseen=est["unseen"].value,
            agreement=est.get("agreement", nan).value,
            prefill_ms=1000 * statistics.median(c.prefill_s) if c.prefill_s else float("nan"),
            intervals={k: [e.low, e.high] for k, e in est.items() if e.n}))
    return rows


def paired(items: ItemScores, a: str, b: str) -> DiffRow:
    """a - b on the same items, per slice (and agreement), with paired bootstrap intervals."""
    ca, cb = items.configs[a], items.configs[b]
    sa, sb = np.asarray(ca.scores), np.asarray(cb.scores)
    diffs = {name: paired_difference(sa[m], sb[m]) for name in SLICES for m in [items.mask(name)]}
    if items.answers and ca.hits and cb.hits:
        tokens = items.tokens()
        diffs["agreement"] = paired_ratio_difference(ca.hits, tokens, cb.hits, tokens)
    return DiffRow(a, b, ca.ratio, diffs)


def comparisons(items: ItemScores, compare: Sequence[str] = ("covspec",)) -> list[DiffRow]:
    """Every pruned configuration against the unpruned draft; each `compare` method's against every
    other configuration at its ratio."""
    full = [k for k, c in items.configs.items() if c.ratio >= 1.0]
    pruned = [k for k, c in items.configs.items() if c.ratio < 1.0]
    rows = [paired(items, k, full[0]) for k in pruned] if full else []
    for k in pruned:
        c = items.configs[k]
        if c.method in compare:
            rows += [paired(items, k, other) for other in pruned
                     if other != k and items.configs[other].ratio == c.ratio]
    return rows


@torch.inference_mode()
def target_answer(target: VLMAdapter, item: Item) -> list[int]:
    """The target's greedy answer ids, its end token included when it stopped on one."""
    result = generate(target, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS)
    return list(result.ids) + ([min(target.eos_token_ids)] if result.stop_reason == "eos" else [])


def agreement(draft: DraftModel, item: Item, kept: np.ndarray, answer: list[int],
              merge: bool = False) -> tuple[int, int]:
    """(hits, tokens): the pruned draft fed the target's answer, predicting each next token."""
    visual = draft.encode_image(draft.preprocess(item.image))
    if merge:
        visual = merged_visual(visual, kept)
    first, state = draft.prefill(visual, item.question, kept=kept)
    rest = draft.forward(state, np.asarray(answer[:-1], dtype=np.int64)) if len(answer) > 1 else first[None][:0]
    predicted = [int(first.argmax())] + [int(x) for x in rest.argmax(-1)]
    return sum(int(p == a) for p, a in zip(predicted, answer, strict=True)), len(answer)


def oracle_kept(item: Item, k: int, n_visual: int = N_VISUAL_TOKENS) -> np.ndarray:
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
    return np.asarray(sorted(chosen + background[:k - len(chosen)]), dtype=np.int64)


def sweep_configs(ratios: Sequence[float], methods: Sequence[str], oracle: bool, merge: bool) -> list[Config]:
    configs: list[Config] = [("none", 1.0, False)] if any(r >= 1.0 for r in ratios) else []
    for r in (r for r in ratios if r < 1.0):
        configs += [(m, r, merge) for m in (*methods, *(["oracle"] if oracle else []))]
        configs += [("covspec", r, False)] if merge and "covspec" in methods else []
    return configs


def sweep_items(draft_path: str | Path, target_path: str | Path | None = None, split: str = "heldout",
                ratios: Sequence[float] = DEFAULT_RATIOS, methods: Sequence[str] = METHODS,
                limit: int = 60, seed: int = 0, draft: VLMAdapter | None = None,
                target: VLMAdapter | None = None, oracle: bool = False, merge: bool = False,
                reuse: ItemScores | None = None, progress: bool = False, **prune_args: float) -> ItemScores:
    """Per-item results per (method, ratio): the draft's score when it prefills only the kept
    tokens (and, with a target, its teacher-forced agreement with the target's greedy answer).
    Ratio 1.0 is the unpruned draft: computed once, method "none"; `oracle` adds the ground-truth
    reference per ratio. `merge` (for a draft trained on merged tokens): every method's dropped tokens
    are merged into its kept ones, plus covspec's selection without merging per ratio. `reuse`: a
    previous sweep of the same items, whose configurations (and target answers) are kept, not re-run.
    `prune_args` go to score_and_select (theta, rel_weight, tau, eps)."""
    draft = as_draft(draft or load_adapter(draft_path))  # numpy in and out, as the device runs it
    items = list(sample_split(split, limit, seed))
    generator_seed = split_seed(split, seed)
    if reuse is not None and (reuse.split, reuse.seed, len(reuse.qtypes)) != (split, generator_seed, limit):
        raise ValueError(f"--reuse holds {len(reuse.qtypes)} items of {reuse.split} (seed {reuse.seed}), "
                         f"not {limit} of {split} (seed {generator_seed})")
    answers = reuse.answers if reuse is not None else []
    if not answers and (target is not None or target_path is not None):
        target = target or load_adapter(target_path)
        answers = [target_answer(target, item) for item in items]
    out = ItemScores(draft=str(draft_path), split=split, seed=generator_seed, qtypes=[i.qtype for i in items],
                     unseen=[bool(i.slices.get("unseen")) for i in items], answers=answers,
                     configs=dict(reuse.configs) if reuse is not None else {})
    todo = [c for c in sweep_configs(ratios, methods, oracle, merge) if config_key(c) not in out.configs]
    for c in todo:
        out.configs[config_key(c)] = ConfigScores(*c)
    start = time.perf_counter()
    for i, item in enumerate(items):
        visual = draft.encode_image(draft.preprocess(item.image))
        query = draft.prompt_embeddings(item.question)
        for method, ratio, merged in todo:
            t0 = time.perf_counter()
            if ratio >= 1.0:
                kept = np.arange(visual.count)
            elif method == "oracle":
                try:
                    kept = oracle_kept(item, keep_count(ratio, visual.count), visual.count)
                except ValueError as err:
                    raise ValueError(f"the oracle rows need a square token grid over the demo's 3x3 cells; this "
                                     f"draft gives {visual.count} visual tokens (leave them out: --no-oracle)") from err
            else:
                kept = score_and_select(visual, query, ratio, method, rng=np.random.default_rng(item.index),
                                        **prune_args)
            select_s = time.perf_counter() - t0
            c = out.configs[config_key((method, ratio, merged))]
            c.kept = len(kept)
            result = generate(draft, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS,
                              kept=None if ratio >= 1.0 else kept, merge=merged)
            c.scores.append(score_answer(item, result.text))
            c.prefill_s.append(result.prefill_s + select_s)
            if answers:
                c.hits.append(agreement(draft, item, kept, answers[i], merged)[0])
        if progress and ((i + 1) % 100 == 0 or i + 1 == len(items)):
            print(f"[prune_eval] {i + 1}/{len(items)} items, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    return out


def prune_sweep(draft_path: str | Path, target_path: str | Path | None = None, split: str = "heldout",
                ratios: Sequence[float] = DEFAULT_RATIOS, methods: Sequence[str] = METHODS,
                limit: int = 60, seed: int = 0, draft: VLMAdapter | None = None,
                target: VLMAdapter | None = None, oracle: bool = False, merge: bool = False,
                **prune_args: float) -> list[SweepRow]:
    """One row per (method, ratio), every score with its interval (see sweep_items)."""
    return summarise(sweep_items(draft_path, target_path, split, ratios, methods, limit, seed, draft, target,
                                 oracle, merge, **prune_args))


def _num(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else format(x, spec)


def _ci(row: SweepRow, name: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    low, high = row.intervals.get(name, [math.nan, math.nan])
    return f"{value:.3f} [{_num(low, '.3f')}, {_num(high, '.3f')}]"


def format_rows(rows: list[SweepRow]) -> str:
    """A markdown table of the sweep: each score with its 95% bootstrap interval over items."""
    lines = ["| method | merged | keep | kept | n | all items | short EM | relation EM | describe F1 | unseen | "
             "agreement | prefill ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {'yes' if r.merged else 'no'} | {r.ratio:.2f} | {r.kept} | {r.n} | "
                     f"{_ci(r, 'all', r.overall)} | {_ci(r, 'short', r.short)} | {_ci(r, 'relation', r.relation)} | "
                     f"{_ci(r, 'describe', r.describe_f1)} | {_ci(r, 'unseen', r.unseen)} | "
                     f"{_ci(r, 'agreement', r.agreement)} | {_num(r.prefill_ms, '.1f')} |")
    return "\n".join(lines)


def format_types(rows: list[SweepRow]) -> str:
    """Each question type's score (F1 for describe) with its interval, one row per configuration."""
    types = [t for t in QUESTION_TYPES if any(t in r.by_type for r in rows)]
    lines = ["| method | merged | keep | " + " | ".join(types) + " |", "|---|---|---|" + "---|" * len(types)]
    for r in rows:
        cells = [_ci(r, t, r.by_type.get(t, math.nan)) for t in types]
        lines.append(f"| {r.method} | {'yes' if r.merged else 'no'} | {r.ratio:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_diffs(diffs: list[DiffRow]) -> str:
    """Paired differences with their intervals; * marks an interval that excludes 0."""
    names = [n for n in (*SLICES, "agreement") if any(n in d.diffs for d in diffs)]
    lines = ["| a - b | keep | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for d in diffs:
        cells = []
        for n in names:
            e = d.diffs.get(n)
            cells.append("-" if e is None or e.n == 0 else
                         f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]" + ("*" if e.excludes_zero else ""))
        lines.append(f"| {d.a} - {d.b} | {d.ratio:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(items: ItemScores, compare: Sequence[str] = ("covspec",)) -> str:
    rows = summarise(items)
    n = len(items.qtypes)
    counts = {name: int(items.mask(name).sum()) for name in (*SLICES, *QUESTION_TYPES)}
    return "\n".join([
        f"Draft {items.draft}; {n} items of split {items.split} (generator seed {items.seed}); items per slice: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
        "Each score: value [95% bootstrap interval over items, 2,000 resamples]. Agreement: hits / tokens of the "
        "target's greedy answer.", "", format_rows(rows), "", "Per question type (exact match; describe: object F1):",
        "", format_types(rows), "",
        "Paired differences a - b on the same items [95% paired bootstrap interval]; * the interval excludes 0 "
        "(otherwise the two are not distinguishable on these items):", "", format_diffs(comparisons(items, compare))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for r in args.ratios:
        keep_count(r, 100)  # validates the ratio
    if args.from_json:
        items = ItemScores.from_dict(json.loads(Path(args.from_json).read_text())["items"])
    else:
        if args.draft is None:
            parser.error("--draft is required (or --from-json)")
        reuse = ItemScores.from_dict(json.loads(Path(args.reuse).read_text())["items"]) if args.reuse else None
        items = sweep_items(args.draft, args.target, args.split, args.ratios, args.methods, args.limit, args.seed,
                            oracle=not args.no_oracle, merge=args.merge, reuse=reuse, progress=True)
    text = report(items, args.compare)
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.prune_eval " + shlex.join(argv if argv is not None else sys.argv[1:])
        rows = summarise(items)
        path.write_text(json.dumps({"command": command, "rows": [asdict(r) for r in rows],
                                    "items": asdict(items)}))
        plot_sweep([asdict(r) for r in rows], path.with_suffix(".png"))
        path.with_suffix(".txt").write_text(f"Command: {command}\n\n{text}\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft")
    parser.add_argument("--target")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (report split: offset from REPORT_SEED)")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--compare", nargs="+", default=["covspec"], choices=METHODS,
                        help="methods whose paired differences against every other method are reported")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-oracle", action="store_true", help="leave out the ground-truth reference rows")
    parser.add_argument("--merge", action="store_true",
                        help="merge the pruned tokens into the kept ones (a draft trained so; default: dropped)")
    parser.add_argument("--json", help="also write the rows and per-item scores here (and .txt, .png beside it)")
    parser.add_argument("--reuse", help="a previous --json of the same items: its configurations are not re-run")
    parser.add_argument("--from-json", help="only redraw the tables and plot of a previous --json")


SLICE_TITLES = [("all", "overall", "task score, every item"), ("short", "short", "short-question exact match"),
                ("relation", "relation", "relation exact match"), ("describe", "describe_f1", "describe object-F1"),
                ("unseen", "unseen", "unseen-combination scenes"),
                ("agreement", "agreement", "token agreement with the target")]


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Each slice's score against the share of visual tokens kept, one line per method, with 95%
    bootstrap intervals as error bars (methods nudged sideways so the bars do not overlap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["method"] == "none"]
    any_merged = any(r.get("merged") for r in rows)

    def label(r: dict) -> str:
        return r["method"] + (" (dropped, no merge)" if any_merged and not r.get("merged") else "")

    names = list(dict.fromkeys(label(r) for r in rows if r["method"] != "none"))
    metrics = [m for m in SLICE_TITLES if any(not math.isnan(r[m[1]]) for r in rows)]
    fig, axes = plt.subplots(2, math.ceil(len(metrics) / 2), figsize=(15, 8))
    for ax, (name_ci, key, title) in zip(axes.flat, metrics, strict=False):
        for j, name in enumerate(names):
            points = sorted([r for r in rows if r["method"] != "none" and label(r) == name] + full,
                            key=lambda r: r["ratio"])
            x = [r["ratio"] + 0.006 * (j - len(names) / 2) for r in points]
            y = [r[key] for r in points]
            err = [[r[key] - r["intervals"].get(name_ci, [r[key]] * 2)[0] for r in points],
                   [r["intervals"].get(name_ci, [r[key]] * 2)[1] - r[key] for r in points]]
            style = ({"linestyle": "--", "color": "black"} if name.startswith("oracle")
                     else {"linestyle": ":"} if "no merge" in name else {})
            ax.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=2, label=name, **style)
        ax.set_xlabel("share of visual tokens kept")
        ax.set_title(title)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("95% bootstrap intervals over items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
