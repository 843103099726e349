"""`covspec device run|flash`: the device runtime (draft VLM) against an edge, and bundle deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from covspec.cli.options import (
    add_client_key_args,
    add_command,
    add_sampling_args,
    add_threads_arg,
    client_keys,
    native_stderr_quiet,
    sampling_params,
    warn_threads,
)
from covspec.device_runtime.config import BACKENDS, AnswerConfig, DeviceConfig
from covspec.errors import CovspecError
from covspec.modes import MODES

ANSWER, DEVICE = AnswerConfig(), DeviceConfig(edge="")  # the flags' defaults


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "device", "the device runtime (draft VLM)")
    device_sub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    q = add_command(device_sub, "run", "answer an image + question through an edge")
    q.add_argument("--model", help="draft checkpoint folder, run on PyTorch (or --bundle)")
    q.add_argument("--bundle", help="exported device bundle folder (covspec export), run without transformers' model")
    q.add_argument("--backend", default=DEVICE.backend, choices=BACKENDS,
                   help="runtime for --bundle (auto: ExecuTorch when the bundle has its .pte, else ONNX Runtime)")
    q.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    q.add_argument("--image", required=True,
                   help="image file (PNG, JPEG, ...; at most 2048x2048 pixels, the edge's limit too)")
    q.add_argument("--prompt", required=True, help="question or instruction")
    q.add_argument("--mode", default=str(ANSWER.mode), choices=MODES, metavar="MODE",
                   help=f"how to answer (covspec/modes.py): {', '.join(MODES)}")
    q.add_argument("--window", type=int, default=ANSWER.window, help="drafted tokens per verification")
    q.add_argument("--keep", type=float, default=None,
                   help="share of the draft's visual tokens a pruning mode keeps (default: the mode's own)")
    q.add_argument("--merge", action="store_true",
                   help="merge the dropped visual tokens into the kept ones (a draft trained so: draft_fine)")
    q.add_argument("--timeout", type=float, default=DEVICE.timeout_s, help="seconds to wait for each edge reply")
    q.add_argument("--retries", type=int, default=DEVICE.retries, help="times a request is sent again, on a fresh socket, after a timeout")
    add_threads_arg(q)
    add_client_key_args(q, "this device's secret key file (NAME.key_secret), for an edge with --auth curve")
    q.add_argument("--profile", help="calibration profile (covspec calibrate): the drafting policy's starting estimates")
    q.add_argument("--device-profile", metavar="NAME",
                   help="run the draft at a named device's pace (device_runtime/profiles.json: smolvlm-256m, "
                        "phone-xnnpack, jetson-orin-cpu...): each call padded to the profile's time, a labelled "
                        "emulation, not a measurement of that device (default: this machine's own pace)")
    add_sampling_args(q, max_new_tokens=ANSWER.max_new_tokens)
    q.add_argument("--json", action="store_true",
                   help="print the answer and its figures as one JSON object on stdout (nothing else there)")
    q.set_defaults(handler=run)

    q = add_command(device_sub, "flash", "install a device bundle, the device runtime and its launcher on a "
                    "folder, ssh:// or adb:// target and verify them")
    q.add_argument("--bundle", required=True, help="device bundle folder (covspec export)")
    q.add_argument("--to", required=True, help="DIR, ssh://user@host[:port]/path or adb://SERIAL/path: receives "
                   "bundle/, runtime/ and the launcher bin/covspec-device")
    q.add_argument("--runtime", default="auto", metavar="auto|none|PATH",
                   help="the device runtime to install: auto (made on this machine for the target's platform, cached in "
                   "~/.cache/covspec/device-runtime), none (the bundle alone) or a runtime folder made for the "
                   "target's platform (python -m covspec.device_runtime.runtime_payload build [--platform "
                   "linux-aarch64 --python 3.11])")
    q.add_argument("--platform", metavar="linux-MACHINE",
                   help="a folder target's platform (an SD card image, a rootfs): linux-aarch64 or linux-x86_64 "
                   "(default: this machine's; ssh and adb targets are asked)")
    q.add_argument("--python", metavar="X.Y", help="the folder target's Python, with --platform (e.g. 3.11)")
    q.add_argument("--glibc", metavar="X.Y", help="the folder target's glibc, with --platform, where known "
                   "(otherwise the launcher checks it at first start)")
    q.set_defaults(handler=run_flash)


def run(args: argparse.Namespace) -> int:
    import json

    from covspec import api
    from covspec.images import load_image
    from covspec.transport.channel import check_endpoint

    check_endpoint(args.edge, "--edge")  # the quick checks first, before torch and the draft load
    keys = client_keys(args)
    image = Path(args.image)
    load_image(image)
    for flag, folder in (("--bundle", args.bundle), ("--model", args.model)):
        if folder and not Path(folder).is_dir():
            raise CovspecError(f"{flag} {folder}: no such folder")
    warn_threads(args.threads, local_edge(args.edge))
    api.check_edge(args.edge, keys)  # unreachable, refused: said in seconds, not after the draft loads

    from covspec.modes import pruning_options

    params = sampling_params(args)
    if args.model:  # a Hugging Face draft runs on torch; a bundle's programs take their threads at load
        import torch

        torch.set_num_threads(args.threads)
    try:
        options = pruning_options(args.mode, args.keep, args.merge)
    except (TypeError, ValueError) as err:
        raise CovspecError(f"--keep: {err}") from err
    profile = None
    if args.profile:
        from covspec.calibration.profile import load_profile

        profile = load_profile(args.profile)
    device = DeviceConfig(args.edge, keys=keys, timeout_s=args.timeout, retries=args.retries, profile=profile,
                          model=args.model, bundle=args.bundle, backend=args.backend, threads=args.threads)
    ask = AnswerConfig(args.mode, params, args.max_new_tokens, args.window, options)
    with native_stderr_quiet(args.verbose):
        draft = api.load_draft(device.model, device.bundle, device.backend, device.threads)
    if args.device_profile:
        from covspec.device_runtime.profiles import Paced
        from covspec.device_runtime.profiles import load_profile as load_device_profile

        draft = Paced(draft, load_device_profile(args.device_profile))
    answer = api.answer(device, image, args.prompt, ask, draft=draft)
    record = api.answer_record(answer, draft=api.draft_name(draft), edge=args.edge)
    record["device_profile"] = args.device_profile  # an emulated device's pace, when named (never a measurement)
    if args.json:
        print(json.dumps(record))
        return 0
    print(answer.text)
    print(api.describe_answer(record), file=sys.stderr)
    return 0


def local_edge(endpoint: str) -> str | None:
    """"the edge at ENDPOINT" when it is on this machine (loopback), else None."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return f"the edge at {endpoint}" if host in ("127.0.0.1", "localhost", "[::1]") else None


def run_flash(args: argparse.Namespace) -> int:
    from covspec.bundles.bundle import BundleError
    from covspec.device_runtime.flash import FlashError, flash

    try:
        platform = None
        if args.platform or args.python or args.glibc:
            from covspec.device_runtime.platforms import from_flags

            if not (args.platform and args.python):
                raise ValueError("--platform and --python go together (e.g. --platform linux-aarch64 --python 3.11)")
            platform = from_flags(args.platform, args.python, args.glibc)
        report = flash(args.bundle, args.to, args.runtime, log=lambda line: print(line, file=sys.stderr),
                       platform=platform)
    except (BundleError, FlashError, ValueError) as err:
        raise CovspecError(f"flash: {err}") from err
    print(f"{report.target}: {len(report.copied)} files copied, {len(report.skipped)} already there, "
          f"{report.verified} checksums verified on the target")
    if report.runtime:
        print(f"runtime for {report.runtime}: {report.install}; on the device:\n  {report.launcher} run "
              "--edge tcp://HOST:PORT --image IMAGE --prompt 'QUESTION'")
    if report.note:
        print(report.note)
    return 0
