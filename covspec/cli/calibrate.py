"""`covspec calibrate`: draft steps, edge verify times, the link and acceptance into a profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from covspec.cli.options import add_client_key_args, add_command, add_threads_arg, client_keys
from covspec.errors import CovspecError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "calibrate", "measure draft steps, edge verify times, the link and acceptance into a profile")
    p.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--draft", help="draft checkpoint folder (times the eager backend)")
    p.add_argument("--bundle", help="exported device bundle folder (times --backends)")
    p.add_argument("--backends", default="executorch,onnx", help="bundle backends to time, comma-separated")
    p.add_argument("--split", default="val", choices=["train", "val", "heldout"],
                   help="demo task split for acceptance (default: val, the calibration split)")
    p.add_argument("--image", help="instead of the demo task: one image ...")
    p.add_argument("--prompt", default="describe the image .", help="... and its prompt, asked --items times")
    p.add_argument("--items", type=int, default=24, help="requests for acceptance by margin bin")
    p.add_argument("--out", default="calibration.json", help="profile file to write")
    add_threads_arg(p)
    add_client_key_args(p, "this device's secret key file, for an edge with --auth curve")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from covspec.calibration.measure import calibrate
    from covspec.demo.task import sample_split
    from covspec.images import png_bytes

    torch.set_num_threads(args.threads)
    drafts = {}
    if args.draft:
        from covspec.models import load_adapter

        drafts["eager"] = load_adapter(args.draft)
    if args.bundle:
        from covspec.bundles.adapter import BundleAdapter
        from covspec.bundles.bundle import BundleError

        for backend in args.backends.split(","):
            try:
                drafts[backend] = BundleAdapter(args.bundle, backend=backend, threads=args.threads)
            except BundleError as err:
                raise CovspecError(f"bundle {args.bundle}: {err}") from err
    if not drafts:
        raise CovspecError("give the draft as --draft PATH (a checkpoint), --bundle DIR (an exported device bundle), or both")
    if args.image:
        requests = [(Path(args.image).read_bytes(), args.prompt)] * args.items
        split = "prompt"
    else:
        requests = [(png_bytes(item.image), item.question) for item in sample_split(args.split, args.items, seed=0)]
        split = f"demo {args.split}"
    console = Console()
    with Progress(console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.advance(tasks[name], done)

        profile = calibrate(args.edge, drafts, requests, split, keys=client_keys(args), progress=progress)
    path = profile.save(args.out)
    console.print(f"draft step ms {', '.join(f'{k} {v:.2f}' for k, v in profile.draft_step_ms.items())}; "
                  f"edge verify ms k=1 {profile.verify_ms[1]:.2f}, k=16 {profile.verify_ms[16]:.2f} "
                  f"(line {profile.verify_line_ms[0]:.2f} + {profile.verify_line_ms[1]:.3f} k); target step "
                  f"{profile.target_step_ms or float('nan'):.2f} ms; rtt {profile.rtt_ms:.2f} ms, up "
                  f"{profile.up_mbit:.0f} / down {profile.down_mbit:.0f} Mbit/s; acceptance {profile.acceptance:.3f} "
                  f"over {sum(profile.bin_judged)} drafted tokens")
    console.print(f"calibration profile written to {path}")
    return 0
