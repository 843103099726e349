"""Does the exported device bundle answer like the eager draft? Greedy tokens, accuracy and size.

    python -m benchmarks.export_agreement --out results/export-agreement [--prompts 50]

Exports the draft (default: the demo draft) to device bundles fp32 and int8 as `covspec export`
does (covspec.export.device_bundle, ExecuTorch `.pte` + ONNX; cached in --work and reused while
newer than the checkpoint), then answers the first --prompts held-out demo items (the bench's
`--question-type mixed` items: sample_split("heldout", n, seed=0)) greedily with covspec.generation
on the eager draft (Hugging Face checkpoint) and on BundleAdapter for each bundle and backend
(executorch, onnx), one thread each. Per variant:

- token agreement with eager: per answer the leading positions equal to eager's (the end token
  counted as a position) over the longer of the two, summed over answers; and answers identical;
- held-out accuracy (covspec.demo.evaluate.score_answer: exact match, object F1 for describe) with
  its 95% bootstrap interval, and the difference to eager with a paired 95% bootstrap interval;
- max |logit difference| to eager on the first step (the prefill's last position), over the items;
- the program files' bytes (the format's vision + decoder files), int8 over fp32 and eager
  model.safetensors over them.

`--e2e DIR` (repeatable): also reads a `covspec bench` run's results.jsonl (e.g. `covspec bench --bundle
WORK/device-int8 --edge-draft none --modes target_only,covspec ...`) and counts covspec answers equal to
target_only's, and those the device drafted (with the edge holding a draft, covspec may hand drafting
of a short answer to it, and then the bundle drafts nothing).
Writes OUT/agreement.json and OUT/agreement.md (with this command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMES = {"fp32": "none", "int8": "int8"}  # label -> covspec export --quant
BACKENDS = {"executorch": "pte", "onnx": "onnx"}  # BundleAdapter backend -> manifest program format
END = -1  # stands for the end token in an answer's sequence (generate drops the stop token)


@dataclass
class Answers:
    """One variant's greedy answers to the items (sequences end with END when the answer stopped)."""

    label: str
    sequences: list[list[int]]
    texts: list[str]
    scores: list[float]
    first_logits: list[np.ndarray] = field(default_factory=list)  # [V] per item
    program_bytes: int | None = None
    quant: str = "none"
    backend: str = "eager"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[int, int]:
    """(positions equal before the first divergence, positions): per answer the common prefix over the
    longer of the two sequences, summed over answers."""
    if len(reference) != len(other):
        raise ValueError(f"answers to different items: {len(reference)} vs {len(other)}")
    same = sum(common_prefix(a, b) for a, b in zip(reference, other, strict=True))
    total = sum(max(len(a), len(b)) for a, b in zip(reference, other, strict=True))
    return same, total


def max_logit_diff(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    return max((float(np.max(np.abs(a - b))) for a, b in zip(reference, other, strict=True)), default=float("nan"))


def compare(eager: Answers, variant: Answers) -> dict[str, Any]:
    """The variant's figures against eager on the same items."""
    from covspec.stats import bootstrap_mean, paired_difference

    same, total = prefix_agreement(eager.sequences, variant.sequences)
    identical = sum(a == b for a, b in zip(eager.sequences, variant.sequences, strict=True))
    accuracy = bootstrap_mean(variant.scores)
    delta = paired_difference(variant.scores, eager.scores)
    row: dict[str, Any] = {
        "label": variant.label, "backend": variant.backend, "quant": variant.quant, "items": len(variant.scores),
        "prefix_tokens_equal": same, "tokens": total, "token_agreement": same / total if total else float("nan"),
        "answers_identical": identical,
        "accuracy": asdict(accuracy), "accuracy_minus_eager": asdict(delta),
        "first_step_max_abs_logit_diff": (max_logit_diff(eager.first_logits, variant.first_logits)
                                          if variant.first_logits and variant is not eager else 0.0),
        "program_bytes": variant.program_bytes,
    }
    return row


def size_ratios(rows: list[dict[str, Any]], eager_bytes: int) -> None:
    """Adds, per row, eager bytes over its bytes and (int8 rows) the same format's fp32 bytes over its bytes."""
    fp32 = {r["backend"]: r["program_bytes"] for r in rows if r["quant"] == "none" and r["backend"] != "eager"}
    for r in rows:
        r["smaller_than_eager"] = eager_bytes / r["program_bytes"] if r["program_bytes"] else float("nan")
        base = fp32.get(r["backend"])
        r["smaller_than_fp32"] = base / r["program_bytes"] if base and r["quant"] != "none" else None


def e2e_matches(rows: list[dict[str, Any]], mode: str = "covspec") -> dict[str, Any]:
    """A bench run's rows: per link, how many of `mode`'s answers equal target_only's, and how many of
    them the device drafted itself (at least one verification round, no drafting handed to the edge)."""
    out: dict[str, Any] = {}
    for row in rows:
        if row["mode"] != mode or row.get("matches_target") is None:
            continue
        entry = out.setdefault(row["link"], {"same": 0, "answers": 0, "device_drafted": 0})
        entry["answers"] += 1
        entry["same"] += bool(row["matches_target"])
        entry["device_drafted"] += bool(row.get("rounds")) and not row.get("edge_drafted")
    return out


def checks(rows: list[dict[str, Any]], n_items: int, e2e: dict[str, Any] | None) -> list[tuple[str, bool]]:
    """Issue 19's must-show, each read off the figures."""
    out = []
    for r in rows:
        if r["backend"] == "eager":
            continue
        if r["quant"] == "none":
            out.append((f"{r['label']}: greedy tokens equal eager's on {r['answers_identical']}/{n_items}",
                        r["answers_identical"] == n_items))
        else:
            out.append((f"{r['label']}: token agreement {r['token_agreement']:.1%} >= 98%", r["token_agreement"] >= 0.98))
            delta = r["accuracy_minus_eager"]["value"]
            out.append((f"{r['label']}: accuracy minus eager's {100 * delta:+.1f} points >= -1", delta >= -0.01 - 1e-12))
            ratio = r["smaller_than_fp32"]
            out.append((f"{r['label']}: {ratio:.2f}x smaller than fp32 >= 3x", ratio is not None and ratio >= 3))
    for run, m in (e2e or {}).items():
        out.append((f"e2e {run}: covspec equals target_only on {m['same']}/{m['answers']} "
                    f"({m['device_drafted']} drafted on the device)", m["same"] == m["answers"] == n_items))
    return out


# --- running -------------------------------------------------------------------------------------
def export_bundles(draft: Path, work: Path) -> dict[str, Path]:
    """WORK/device-fp32 and WORK/device-int8, exported as `covspec export` does; an intact bundle newer
    than every file of the draft is kept."""
    from covspec.bundles.bundle import BundleError, load_bundle
    from covspec.export.device_bundle import build_device_bundle

    newest = max(f.stat().st_mtime for f in draft.rglob("*") if f.is_file())
    made = {}
    for label, quant in SCHEMES.items():
        folder = work / f"device-{label}"
        manifest = folder / "manifest.json"
        try:
            fresh = manifest.is_file() and manifest.stat().st_mtime > newest and bool(load_bundle(folder))
        except BundleError:
            fresh = False
        if not fresh:
            build_device_bundle(draft, folder, quant=quant, formats=("pte", "onnx"), step=print)
        made[label] = folder
    return made


def program_bytes(bundle: Path, fmt: str) -> int:
    """Bytes of the format's program files (each file once: the .pte holds vision and decoder together)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {name for name in manifest["programs"][fmt].values() if isinstance(name, str)
             and name in manifest["files"]}
    return sum((bundle / name).stat().st_size for name in files)


def answer_all(adapter: Any, items: list[Any], label: str, max_new_tokens: int) -> Answers:
    import torch

    from covspec.demo.evaluate import score_answer
    from covspec.generation import generate

    answers = Answers(label, [], [], [])
    with torch.inference_mode():
        for item in items:
            result = generate(adapter, item.image, item.question, max_new_tokens=max_new_tokens)
            answers.sequences.append(list(map(int, result.ids)) + ([END] if result.stop_reason == "eos" else []))
            answers.texts.append(result.text)
            answers.scores.append(score_answer(item, result.text))
            logits, _ = adapter.prefill(adapter.encode_image(adapter.preprocess(item.image)), item.question)
            answers.first_logits.append(np.asarray(logits, dtype=np.float64).reshape(-1))
    return answers


def run(draft: Path, work: Path, n: int, max_new_tokens: int) -> tuple[list[dict[str, Any]], list[Answers], list]:
    import torch

    from covspec.bundles.adapter import BundleAdapter
    from covspec.demo.task import sample_split
    from covspec.models import load_adapter

    torch.set_num_threads(1)
    bundles = export_bundles(draft, work)
    items = list(sample_split("heldout", n, seed=0))
    eager = answer_all(load_adapter(draft), items, "eager fp32", max_new_tokens)
    eager.program_bytes = sum(p.stat().st_size for p in draft.glob("*.safetensors"))
    runs = [eager]
    for label, folder in bundles.items():
        for backend, fmt in BACKENDS.items():
            adapter = BundleAdapter(folder, backend=backend, threads=1)
            answers = answer_all(adapter, items, f"{fmt} {label}", max_new_tokens)
            answers.program_bytes, answers.quant, answers.backend = program_bytes(folder, fmt), SCHEMES[label], backend
            runs.append(answers)
            print(f"{answers.label}: {sum(a == b for a, b in zip(eager.sequences, answers.sequences, strict=True))}"
                  f"/{n} answers identical to eager", flush=True)
    rows = [compare(eager, r) for r in runs]
    size_ratios(rows, eager.program_bytes)
    return rows, runs, items


# --- report --------------------------------------------------------------------------------------
def _est(d: dict[str, Any], scale: float = 1.0, spec: str = ".3f") -> str:
    return f"{scale * d['value']:{spec}} [{scale * d['low']:{spec}}, {scale * d['high']:{spec}}]"


def render(rows: list[dict[str, Any]], n: int, command: str, draft: str, e2e: dict[str, Any] | None) -> str:
    lines = [f"# Exported draft vs eager: {draft}, {n} held-out demo prompts (mixed question types)", "", f"Command: `{command}`", "",
             "Greedy, one thread. Token agreement: per answer the leading tokens equal to eager's (end token "
             "included) over the longer answer, summed. Accuracy: exact match (object F1 for describe), "
             "95% bootstrap interval; Δ: minus eager's on the same items, paired 95% bootstrap interval. "
             "Logit diff: max |eager - variant| over the first step's logits, over items.", "",
             "| variant | answers = eager | token agreement | accuracy [95%] | Δ accuracy vs eager [95%] "
             "| first-step max abs logit diff | program bytes | x smaller than fp32 | x smaller than eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp32 = "" if r["smaller_than_fp32"] is None else f"{r['smaller_than_fp32']:.2f}"
        lines.append(f"| {r['label']} | {r['answers_identical']}/{r['items']} | {r['prefix_tokens_equal']}/"
                     f"{r['tokens']} ({r['token_agreement']:.1%}) | {_est(r['accuracy'])} | "
                     f"{_est(r['accuracy_minus_eager'], 100, '+.1f')} pts | {r['first_step_max_abs_logit_diff']:.2e} | "
                     f"{r['program_bytes']:,} | {fp32} | {r['smaller_than_eager']:.2f} |")
    if e2e:
        lines += ["", "End to end (`covspec bench` rows, its command in each folder's summary.md):", "",
                  "| bench run | covspec answers = target_only's | drafted on the device |", "|---|---|---|",
                  *(f"| {run} | {m['same']}/{m['answers']} | {m['device_drafted']}/{m['answers']} |"
                    for run, m in e2e.items())]
    lines += ["", "Checks (issue 19):", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks(rows, n, e2e)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_agreement",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--draft", type=Path, default=None, help="draft checkpoint (default: the demo draft)")
    parser.add_argument("--out", type=Path, default=Path("results/export-agreement"))
    parser.add_argument("--work", type=Path, default=Path("runs/export-agreement"), help="where the bundles go")
    parser.add_argument("--prompts", type=int, default=50, help="held-out demo items")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--e2e", type=Path, action="append", default=[],
                        help="a covspec bench output folder (modes target_only,covspec on the bundle) whose covspec "
                             "answers are counted against target_only's (repeatable)")
    args = parser.parse_args(argv)
    from covspec import demo

    draft = args.draft or demo.default_draft_path()
    shown = str(args.draft) if args.draft else "the demo draft (covspec/demo/weights/draft)"
    command = "python -m benchmarks.export_agreement " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows, runs, items = run(draft, args.work, args.prompts, args.max_new_tokens)
    e2e: dict[str, Any] = {}
    for folder in args.e2e:
        bench_rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line]
        e2e.update({f"{folder} ({link})": m for link, m in e2e_matches(bench_rows).items()})
    args.out.mkdir(parents=True, exist_ok=True)
    per_item = [{"index": item.index, "qtype": item.qtype, "question": item.question, "answer": item.answer,
                 **{r.label: {"text": r.texts[i], "score": r.scores[i]} for r in runs}} for i, item in enumerate(items)]
    report = {"command": command, "draft": shown, "split": "heldout", "seed": 0, "items": args.prompts,
              "variants": rows, "e2e": e2e,
              "checks": [{"check": t, "ok": ok} for t, ok in checks(rows, args.prompts, e2e)], "per_item": per_item}
    (args.out / "agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    text = render(rows, args.prompts, command, shown, e2e)
    (args.out / "agreement.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
