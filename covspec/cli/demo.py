"""`covspec demo build|show` and `covspec eval`: the embedded demo pair and its task."""

from __future__ import annotations

import argparse
from pathlib import Path

from covspec.cli.options import add_command, add_threads_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", "the embedded default: build the demo draft/target pair, show answers")
    demo_sub = p.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    q = add_command(demo_sub, "build", "use the shipped demo weights if intact, else train them")
    q.add_argument("--force", action="store_true", help="retrain from the seed even if weights exist")
    q.add_argument("--fine-draft", action="store_true",
                   help="(re)train the pruning study's fine-patch draft into weights/draft_fine (~7 min)")
    q.set_defaults(handler=run_build)
    q = add_command(demo_sub, "show", "answer a few held-out questions with the target")
    q.add_argument("--n", type=int, default=6, help="questions to answer")
    q.add_argument("--out", default="runs/demo", help="folder for the images shown")
    q.set_defaults(handler=run_show)

    p = add_command(sub, "eval", "accuracy per question type on a split of the demo task")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo target)")
    p.add_argument("--split", default="heldout", choices=["train", "val", "heldout"], help="demo task split")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions (default: all)")
    add_threads_arg(p)
    p.set_defaults(handler=run_eval)


def run_build(args: argparse.Namespace) -> int:
    from covspec import demo

    if args.fine_draft:
        print(f"fine-patch draft ready in {demo.build_fine_draft()}")
        return 0
    path = demo.build(force=args.force)
    print(f"demo pair ready in {path}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from covspec.demo.show import show

    show(n=args.n, out_dir=Path(args.out))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from covspec import demo
    from covspec.demo.evaluate import evaluate, print_report

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else demo.default_target_path()
    report = evaluate(model, args.split, limit=args.limit)
    print_report(report)
    return 0
