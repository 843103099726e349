"""The demo pair's closing figures in one command:

    python -m covspec.demo.report [--limit 400] [--agreement 100] [--json out.json]

target and draft accuracy on the held-out split (per type, relations and the unseen-combination
slice apart), the draft's teacher-forced greedy agreement with the target, and both decode steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console

from covspec.demo import default_draft_path, default_target_path
from covspec.demo.evaluate import draft_report, evaluate, print_draft_report, print_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=default_target_path())
    parser.add_argument("--draft", type=Path, default=default_draft_path())
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--agreement", type=int, default=100, help="items for the draft agreement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    out = {}
    for role, path in (("target", args.target), ("draft", args.draft)):
        report = evaluate(path, args.split, limit=args.limit)
        print_report(report, console)
        out[role] = report.as_dict()
    pair = draft_report(args.target, args.draft, args.split, n=args.agreement)
    print_draft_report(pair, console)
    out["pair"] = {"agreement": pair.agreement, "tokens": pair.tokens, "by_type": pair.by_type,
                   "target_step_ms": pair.target_step_ms, "draft_step_ms": pair.draft_step_ms,
                   "step_ratio": pair.step_ratio}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
