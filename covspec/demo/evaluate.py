"""Accuracy of a checkpoint on a split of the demo task, through the adapter and the reference
decode loop (greedy), and the draft's agreement with the target and both models' step times."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from covspec.demo.task import CORE_TYPES, QUESTION_TYPES, Item, normalise, object_f1, sample_split
from covspec.generation import generate
from covspec.models import VLMAdapter, load_adapter
from covspec.sampling import SamplingParams

DEFAULT_LIMIT = 400
MAX_NEW_TOKENS = 48


@dataclass
class Score:
    n: int = 0
    total: float = 0.0  # exact matches, or summed object-F1 for describe

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value


@dataclass
class EvalReport:
    model: str
    split: str
    n_items: int
    by_type: dict[str, Score] = field(default_factory=dict)  # scenes of seen combinations only
    unseen_by_type: dict[str, Score] = field(default_factory=dict)  # scenes holding an unseen combination
    seconds: float = 0.0
    examples: list[tuple[str, str, str, str, float]] = field(default_factory=list)  # file, q, truth, answer, score

    def overall(self, types: tuple[str, ...] = CORE_TYPES, unseen: bool = False) -> Score:
        source = self.unseen_by_type if unseen else self.by_type
        out = Score()
        for t in types:
            s = source.get(t, Score())
            out.n += s.n
            out.total += s.total
        return out

    def as_dict(self) -> dict:
        def row(scores: dict[str, Score]) -> dict:
            return {t: {"n": s.n, "score": s.mean} for t, s in scores.items()}

        return {"model": self.model, "split": self.split, "n_items": self.n_items,
                "short_exact_match": self.overall().mean, "describe_f1": self.by_type.get("describe", Score()).mean,
                "relation": self.by_type.get("relation", Score()).mean,
                "unseen_short_exact_match": self.overall(CORE_TYPES + ("relation",), unseen=True).mean,
                "unseen_describe_f1": self.unseen_by_type.get("describe", Score()).mean,
                "by_type": row(self.by_type), "unseen_by_type": row(self.unseen_by_type), "seconds": self.seconds}


def score_answer(item: Item, answer: str) -> float:
    if item.qtype == "describe":
        return object_f1(answer, item.answer)
    return float(normalise(answer) == normalise(item.answer))


def evaluate(model_path: str | Path, split: str = "heldout", limit: int | None = None, seed: int = 0,
             adapter: VLMAdapter | None = None, progress: bool = True) -> EvalReport:
    """Greedy answers of the checkpoint to the first `limit` items of the split, scored per question
    type; scenes holding a colour-shape combination never seen in training are scored apart."""
    adapter = adapter or load_adapter(model_path)
    n = limit or DEFAULT_LIMIT
    report = EvalReport(model=str(model_path), split=split, n_items=n)
    started = time.perf_counter()
    console = Console(stderr=True)
    items = sample_split(split, n, seed)
    with console.status(f"evaluating {Path(model_path).name} on {n} {split} items", spinner="dots") \
            if progress else _nothing():
        for item in items:
            result = generate(adapter, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS)
            value = score_answer(item, result.text)
            table = report.unseen_by_type if item.slices.get("unseen") else report.by_type
            table.setdefault(item.qtype, Score()).add(value)
            report.examples.append((item.file_name, item.question, item.answer, result.text, value))
    report.seconds = time.perf_counter() - started
    return report


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _cell(score: Score | None, f1: bool = False) -> str:
    if score is None or not score.n:
        return "-"
    return f"{score.mean:.3f}" if f1 else f"{score.mean:.1%}"


def print_report(report: EvalReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{Path(report.model).name} on {report.split} ({report.n_items} items, "
                        f"{report.seconds:.0f} s)")
    table.add_column("question type")
    table.add_column("n", justify="right")
    table.add_column("score", justify="right")
    table.add_column("unseen combos n", justify="right")
    table.add_column("unseen combos score", justify="right")
    for qtype in QUESTION_TYPES:
        seen, unseen = report.by_type.get(qtype), report.unseen_by_type.get(qtype)
        f1 = qtype == "describe"
        name = "describe (object F1)" if f1 else qtype
        table.add_row(name, str(seen.n if seen else 0), _cell(seen, f1),
                      str(unseen.n if unseen else 0), _cell(unseen, f1))
    core = report.overall()
    core_unseen = report.overall(unseen=True)
    table.add_section()
    table.add_row("short questions (core five)", str(core.n), _cell(core), str(core_unseen.n), _cell(core_unseen))
    console.print(table)


# --- draft vs target ---------------------------------------------------------------------------

@dataclass
class AgreementReport:
    agreement: float  # share of the target's answer tokens (and its end token) the draft's argmax matches
    tokens: int
    by_type: dict[str, float]
    target_step_ms: float
    draft_step_ms: float

    @property
    def step_ratio(self) -> float:
        return self.target_step_ms / self.draft_step_ms


@torch.inference_mode()
def teacher_forced_agreement(target: VLMAdapter, draft: VLMAdapter, items: list[Item]) -> tuple[float, int, dict]:
    """The draft, fed the target's own greedy answer, predicts each next token: the share it gets right."""
    hits: dict[str, list[int]] = defaultdict(list)
    for item in items:
        result = generate(target, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS)
        answer = list(result.ids) + ([min(target.eos_token_ids)] if result.stop_reason == "eos" else [])
        visual = draft.encode_image(draft.preprocess(item.image))
        first, state = draft.prefill(visual, item.question)
        rest = draft.forward(state, torch.tensor(answer[:-1])) if len(answer) > 1 else first[None][:0]
        predicted = [int(first.argmax())] + [int(x) for x in rest.argmax(-1)]
        hits[item.qtype].extend(int(p == a) for p, a in zip(predicted, answer, strict=True))
    flat = [h for v in hits.values() for h in v]
    return sum(flat) / max(1, len(flat)), len(flat), {t: sum(v) / len(v) for t, v in hits.items() if v}


@torch.inference_mode()
def decode_step_ms(adapters: list[VLMAdapter], item: Item, steps: int = 40, rounds: int = 7) -> list[float]:
    """Median time of one one-token forward with a KV cache (the adapter's `forward`), per adapter;
    rounds interleave the adapters so that load on the machine hits them alike; best round kept."""
    best = [float("inf")] * len(adapters)
    token = None
    for _ in range(rounds):
        for k, adapter in enumerate(adapters):
            visual = adapter.encode_image(adapter.preprocess(item.image))
            logits, state = adapter.prefill(visual, item.question)
            token = int(logits.argmax()) if token is None else token
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                adapter.forward(state, torch.tensor([token]))
                times.append(time.perf_counter() - t0)
            best[k] = min(best[k], statistics.median(times[3:]))
    return [1000 * t for t in best]


def draft_report(target_path: str | Path, draft_path: str | Path, split: str = "heldout", n: int = 100,
                 seed: int = 0) -> AgreementReport:
    target, draft = load_adapter(target_path), load_adapter(draft_path)
    items = list(sample_split(split, n, seed))
    agreement, tokens, by_type = teacher_forced_agreement(target, draft, items)
    target_ms, draft_ms = decode_step_ms([target, draft], items[0])
    return AgreementReport(agreement, tokens, by_type, target_ms, draft_ms)


def print_draft_report(report: AgreementReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="draft vs target")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("teacher-forced greedy agreement", f"{report.agreement:.1%} of {report.tokens} tokens")
    for qtype, value in sorted(report.by_type.items()):
        table.add_row(f"  {qtype}", f"{value:.1%}")
    table.add_row("target decode step", f"{report.target_step_ms:.2f} ms")
    table.add_row("draft decode step", f"{report.draft_step_ms:.2f} ms")
    table.add_row("step cost ratio", f"{report.step_ratio:.1f}x")
    console.print(table)
