"""`covspec device run|flash`: the device runtime (draft VLM) against an edge, and bundle deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covspec.cli.common import (
    add_client_key_args,
    add_command,
    add_sampling_args,
    add_threads_arg,
    client_keys,
    sampling_params,
)
from covspec.errors import CovspecError
from covspec.modes import MODES


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "device", "the device runtime (draft VLM)")
    device_sub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    q = add_command(device_sub, "run", "answer an image + question through an edge")
    q.add_argument("--model", help="draft checkpoint folder (or --bundle)")
    q.add_argument("--bundle", help="exported device bundle folder (covspec export), run without transformers' model")
    q.add_argument("--backend", default="executorch", choices=["executorch", "onnx"], help="runtime for --bundle")
    q.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    q.add_argument("--image", required=True, help="image file")
    q.add_argument("--prompt", required=True, help="question or instruction")
    q.add_argument("--mode", default="covspec", choices=MODES, metavar="MODE",
                   help=f"how to answer (covspec/modes.py): {', '.join(MODES)}")
    q.add_argument("--window", type=int, default=4, help="drafted tokens per verification")
    q.add_argument("--keep", type=float, default=None,
                   help="share of the draft's visual tokens a pruning mode keeps (default: the mode's own)")
    q.add_argument("--merge", action="store_true",
                   help="merge the dropped visual tokens into the kept ones (a draft trained so: draft_fine)")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each edge reply")
    q.add_argument("--retries", type=int, default=2, help="times a request is sent again, on a fresh socket, after a timeout")
    add_threads_arg(q)
    add_client_key_args(q, "this device's secret key file (NAME.key_secret), for an edge with --auth curve")
    q.add_argument("--profile", help="calibration profile (covspec calibrate): the drafting policy's starting estimates")
    add_sampling_args(q)
    q.set_defaults(handler=run)

    q = add_command(device_sub, "flash", "copy a device bundle to a folder, ssh:// or adb:// target and verify it")
    q.add_argument("--bundle", required=True, help="device bundle folder (covspec export)")
    q.add_argument("--to", required=True, help="DIR, ssh://user@host[:port]/path or adb://SERIAL/path")
    q.set_defaults(handler=run_flash)


def run(args: argparse.Namespace) -> int:
    import torch

    from covspec.device_runtime.client import DeviceRuntime
    from covspec.modes import pruning_options

    params = sampling_params(args)
    torch.set_num_threads(args.threads)
    try:
        options = pruning_options(args.mode, args.keep, args.merge)
    except (TypeError, ValueError) as err:
        raise CovspecError(f"--keep: {err}") from err
    image = Path(args.image)
    if not image.is_file():
        raise CovspecError(f"image {image}: no such file")
    keys = client_keys(args)
    profile = None
    if args.profile:
        from covspec.calibration.profile import load_profile

        profile = load_profile(args.profile)
    device = DeviceRuntime(draft_adapter(args), args.edge, timeout_s=args.timeout, retries=args.retries,
                           keys=keys, profile=profile)
    try:
        answer = device.answer(image.read_bytes(), args.prompt, args.mode, params, args.max_new_tokens,
                               window=args.window, options=options)
    finally:
        device.close()
    print(answer.text)
    n = max(len(answer.ids), 1)
    figures = [f"{len(answer.ids)} tokens", f"first token {answer.ttft_s * 1000:.0f} ms",
               f"latency {answer.latency_s * 1000:.0f} ms", f"decode {answer.decode_tokens_per_s:.1f} tokens/s",
               f"up {answer.bytes_up / n:.0f} B/token", f"down {answer.bytes_down / n:.0f} B/token"]
    if answer.rounds:
        figures.append(f"mean accepted {answer.mean_accepted:.2f} of {args.window}")
    print("[" + ", ".join(figures) + "]", file=sys.stderr)
    return 0


def draft_adapter(args: argparse.Namespace):
    """The device's draft: an exported bundle (ExecuTorch or ONNX Runtime) or a checkpoint folder."""
    if bool(args.model) == bool(args.bundle):
        raise CovspecError("give the draft as --bundle DIR (an exported device bundle) or --model PATH (a checkpoint)")
    if args.bundle:
        from covspec.bundles.adapter import BundleAdapter
        from covspec.bundles.bundle import BundleError

        try:
            return BundleAdapter(args.bundle, backend=args.backend, threads=args.threads)
        except BundleError as err:
            raise CovspecError(f"bundle {args.bundle}: {err}") from err
    from covspec.models import load_adapter

    return load_adapter(args.model)


def run_flash(args: argparse.Namespace) -> int:
    from covspec.bundles.bundle import BundleError
    from covspec.device_runtime.flash import FlashError, flash

    try:
        report = flash(args.bundle, args.to)
    except (BundleError, FlashError, ValueError) as err:
        raise CovspecError(f"flash: {err}") from err
    print(f"{report.target}: {len(report.copied)} files copied, {len(report.skipped)} already there, "
          f"{report.verified} checksums verified on the target")
    return 0
