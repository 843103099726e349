"""The pruner's settings search, on the val split only (the report split is for reported figures):
the draft's task score per (theta, rel_weight) of the CoVSpec score and keep ratio, split by whether
the prompt is grounded (names something in the image: pruning.query_grounding at least a threshold)
and by question type.

    python -m benchmarks.prune_tune --draft DRAFT --limit 1000 --keeps 0.25 --json results/prune-report/val/default.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from covspec.demo.evaluate import MAX_NEW_TOKENS, score_answer
from covspec.demo.task import QUESTION_TYPES, sample_split
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.models.draft import as_draft
from covspec.pruning import GROUNDING_THRESHOLD, query_grounding, score_and_select
from covspec.sampling import SamplingParams

THETAS = (0.0, 0.25, 0.5, 0.75, 0.9)
REL_WEIGHTS = (0.0, 0.5, 1.0)
TUNING_SPLITS = ("val",)


def tune(draft_path: str, split: str = "val", limit: int = 1000, keeps: Sequence[float] = (0.25,),
         thetas: Sequence[float] = THETAS, rel_weights: Sequence[float] = REL_WEIGHTS, merge: bool = False,
         progress: bool = False) -> dict:
    if split not in TUNING_SPLITS:
        raise ValueError(f"settings are searched on {', '.join(TUNING_SPLITS)} only, not {split!r}")
    draft = as_draft(load_adapter(draft_path))  # numpy in and out, as the device runs it
    items = list(sample_split(split, limit, 0))
    settings = list(itertools.product(keeps, thetas, rel_weights))
    scores = {f"{k:g}/{t:g}/{w:g}": [] for k, t, w in settings}
    grounding: list[float] = []
    start = time.perf_counter()
    for i, item in enumerate(items):
        visual = draft.encode_image(draft.preprocess(item.image))
        query = draft.prompt_embeddings(item.question)
        grounding.append(query_grounding(visual, query))
        for k, t, w in settings:
            kept = score_and_select(visual, query, k, "covspec", theta=t, rel_weight=w)
            result = generate(draft, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS,
                              kept=kept, merge=merge)
            scores[f"{k:g}/{t:g}/{w:g}"].append(score_answer(item, result.text))
        if progress and (i + 1) % 100 == 0:
            print(f"[prune_tune] {i + 1}/{len(items)} items, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    return {"draft": draft_path, "split": split, "merge": merge, "qtypes": [i.qtype for i in items],
            "grounding": grounding, "scores": scores}


def format_tune(data: dict, threshold: float = GROUNDING_THRESHOLD) -> str:
    qtypes = np.array(data["qtypes"])
    grounded = np.array(data["grounding"]) >= threshold
    groups = {"all": np.ones(len(qtypes), bool), "grounded": grounded, "ungrounded": ~grounded}
    groups.update({t: qtypes == t for t in QUESTION_TYPES if (qtypes == t).any()})
    lines = [f"Draft {data['draft']}, split {data['split']}, {len(qtypes)} items; grounded: query_grounding >= "
             f"{threshold} (" + ", ".join(f"{t} {int((grounded & (qtypes == t)).sum())}/{int((qtypes == t).sum())}"
                                         for t in QUESTION_TYPES if (qtypes == t).any()) + ")", "",
             "| keep / theta / rel_weight | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for key, values in data["scores"].items():
        v = np.array(values)
        lines.append(f"| {key} | " + " | ".join(f"{v[m].mean():.3f}" for m in groups.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", required=True)
    parser.add_argument("--split", default="val", choices=TUNING_SPLITS)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25])
    parser.add_argument("--thetas", type=float, nargs="+", default=list(THETAS))
    parser.add_argument("--rel-weights", type=float, nargs="+", default=list(REL_WEIGHTS))
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = tune(args.draft, args.split, args.limit, args.keeps, args.thetas, args.rel_weights, args.merge, True)
    text = format_tune(data)
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.prune_tune " + shlex.join(argv if argv is not None else sys.argv[1:])
        path.write_text(json.dumps({"command": command, **data}))
        path.with_suffix(".txt").write_text(f"Command: {command}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
