"""The `covspec` command. Each subcommand parses its arguments here and calls into its stage.

Heavy imports (torch, transformers) happen inside the handlers so that `covspec --help` is quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from covspec.errors import CovspecError


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (temperature 0 = greedy)")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: off)")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--max-new-tokens", type=int, default=64)


def _sampling_params(args: argparse.Namespace):
    from covspec.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        raise CovspecError(f"sampling: {err}") from err


class TokenPrinter:
    """Streams decoded text to the terminal as token ids come, printing only what is new."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
        else:  # a tokenizer that re-segments earlier text: reprint the line
            sys.stdout.write("\r" + text)
        sys.stdout.flush()
        self.shown = text


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from covspec.generation import generate
    from covspec.images import load_image
    from covspec.models import load_adapter

    params = _sampling_params(args)
    if args.max_new_tokens < 1:
        raise CovspecError("--max-new-tokens must be at least 1")
    torch.set_num_threads(args.threads)
    image = load_image(args.image)
    adapter = load_adapter(args.model)
    printer = TokenPrinter(adapter.decode)
    result = generate(adapter, image, args.prompt, params, args.max_new_tokens, on_token=printer)
    sys.stdout.write("\n")
    n = len(result.ids)
    rate = (n - 1) / result.decode_s if n > 1 and result.decode_s > 0 else float("nan")
    print(f"[{n} tokens, stop: {result.stop_reason}, first token {result.prefill_s * 1000:.0f} ms, "
          f"decode {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_demo_build(args: argparse.Namespace) -> int:
    from covspec import demo

    if args.fine_draft:
        print(f"fine-patch draft ready in {demo.build_fine_draft()}")
        return 0
    path = demo.build(force=args.force)
    print(f"demo pair ready in {path}")
    return 0


def cmd_demo_show(args: argparse.Namespace) -> int:
    from covspec.demo.show import show

    show(n=args.n, out_dir=Path(args.out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from covspec import demo
    from covspec.demo.evaluate import evaluate, print_report

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else demo.default_target_path()
    report = evaluate(model, args.split, limit=args.limit)
    print_report(report)
    return 0


def cmd_keys_gen(args: argparse.Namespace) -> int:
    from covspec.transport.channel import generate_keys

    public, secret = generate_keys(args.out, args.name, overwrite=args.force)
    print(f"public key {public} (give it to the other side; an edge admits the devices whose public keys "
          f"are in its --allow folder)\nsecret key {secret} (keep it here: --key)")
    return 0


def _server_keys(args: argparse.Namespace):
    from covspec.transport.channel import load_server_keys

    if args.auth == "none":
        if args.key or args.allow:
            raise CovspecError("--key/--allow are for --auth curve; with --auth none every device is served")
        return None
    if not args.key or not args.allow:
        raise CovspecError("--auth curve (the default) needs --key EDGE_SECRET_FILE and --allow DEVICE_KEYS_DIR "
                           "(make key pairs with `covspec keys gen`); to serve every device without "
                           "authentication, say --auth none")
    return load_server_keys(args.key, args.allow)


def _client_keys(args: argparse.Namespace):
    from covspec.transport.channel import load_client_keys

    if bool(args.key) != bool(args.edge_key):
        raise CovspecError("--key DEVICE_SECRET_FILE and --edge-key EDGE_PUBLIC_FILE go together")
    return load_client_keys(args.key, args.edge_key) if args.key else None


def cmd_edge_serve(args: argparse.Namespace) -> int:
    import logging
    from dataclasses import replace

    import torch

    from covspec.edge_runtime.server import EdgeServer, EdgeSettings
    from covspec.edge_runtime.target import load_target
    from covspec.transport.protocol import DEFAULT_LIMITS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    requests = logging.getLogger("covspec.edge.requests")  # one JSON object per line, nothing else
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    requests.addHandler(handler)
    requests.propagate = False
    keys = _server_keys(args)
    torch.set_num_threads(args.threads)
    limits = replace(DEFAULT_LIMITS, max_total_bytes=args.max_message_bytes, max_image_bytes=args.max_image_bytes,
                     max_window=args.max_window)
    settings = EdgeSettings(bind=args.bind, max_sessions=args.max_sessions,
                            max_sessions_per_device=args.max_sessions_per_device, idle_timeout_s=args.idle_timeout,
                            max_new_tokens=args.max_new_tokens, max_image_pixels=args.max_image_pixels,
                            limits=limits, keys=keys, batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch)
    try:
        settings.check()
    except ValueError as err:
        raise CovspecError(f"edge settings: {err}") from err
    target, loaded = load_target(args.model, threads=args.threads)
    print(f"edge target: {loaded}", flush=True)
    server = EdgeServer(target, settings, name=Path(args.model).name)
    auth = "no authentication (--auth none)" if keys is None else f"CURVE, devices allowed from {keys.allow_dir}"
    print(f"edge serving {args.model} on {server.endpoint}, {auth}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def cmd_edge_stats(args: argparse.Namespace) -> int:
    import json

    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client

    with Client(args.edge, timeout_s=args.timeout, retries=0, keys=_client_keys(args)) as client:
        reply = client.request(wire.Stats())
    if not isinstance(reply, wire.StatsReply):
        raise CovspecError(f"the edge answered STATS with {reply.TYPE}")
    print(json.dumps(reply.counters, indent=1, sort_keys=True))
    return 0


def cmd_device_run(args: argparse.Namespace) -> int:
    import torch

    from covspec.device_runtime.client import DeviceRuntime
    from covspec.modes import pruning_options

    params = _sampling_params(args)
    torch.set_num_threads(args.threads)
    try:
        options = pruning_options(args.mode, args.keep, args.merge)
    except (TypeError, ValueError) as err:
        raise CovspecError(f"--keep: {err}") from err
    image = Path(args.image)
    if not image.is_file():
        raise CovspecError(f"image {image}: no such file")
    keys = _client_keys(args)
    profile = None
    if args.profile:
        from covspec.calibration.profile import load_profile

        profile = load_profile(args.profile)
    device = DeviceRuntime(_draft_adapter(args), args.edge, timeout_s=args.timeout, retries=args.retries,
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


def _draft_adapter(args: argparse.Namespace):
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


def cmd_calibrate(args: argparse.Namespace) -> int:
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

        profile = calibrate(args.edge, drafts, requests, split, keys=_client_keys(args), progress=progress)
    path = profile.save(args.out)
    console.print(f"draft step ms {', '.join(f'{k} {v:.2f}' for k, v in profile.draft_step_ms.items())}; "
                  f"edge verify ms k=1 {profile.verify_ms[1]:.2f}, k=16 {profile.verify_ms[16]:.2f} "
                  f"(line {profile.verify_line_ms[0]:.2f} + {profile.verify_line_ms[1]:.3f} k); target step "
                  f"{profile.target_step_ms or float('nan'):.2f} ms; rtt {profile.rtt_ms:.2f} ms, up "
                  f"{profile.up_mbit:.0f} / down {profile.down_mbit:.0f} Mbit/s; acceptance {profile.acceptance:.3f} "
                  f"over {sum(profile.bin_judged)} drafted tokens")
    console.print(f"calibration profile written to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from covspec.export import build_bundles
    from covspec.export.programs import ExportUnsupported

    try:
        device_dir, edge_dir = build_bundles(args.draft, args.target, args.out, quant=args.quant,
                                             formats=tuple(f for f in args.formats.split(",") if f),
                                             edge_backend=args.edge_backend, max_len=args.max_len,
                                             calibration=args.calibration)
    except ExportUnsupported as err:
        raise CovspecError(f"export: {err}") from err
    print(f"device bundle: {device_dir}\nedge bundle:   {edge_dir}")
    return 0


def cmd_device_flash(args: argparse.Namespace) -> int:
    from covspec.bundles.bundle import BundleError
    from covspec.device_runtime.flash import FlashError, flash

    try:
        report = flash(args.bundle, args.to)
    except (BundleError, FlashError, ValueError) as err:
        raise CovspecError(f"flash: {err}") from err
    print(f"{report.target}: {len(report.copied)} files copied, {len(report.skipped)} already there, "
          f"{report.verified} checksums verified on the target")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covspec", description="CoVSpec: device-edge speculative decoding for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="answer a question about an image with one model (target-only)")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question or instruction")
    p.add_argument("--threads", type=int, default=2)
    _add_sampling_args(p)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("demo", help="the embedded default: build the demo draft/target pair, show answers")
    demo_sub = p.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    q = demo_sub.add_parser("build", help="use the shipped demo weights if intact, else train them")
    q.add_argument("--force", action="store_true", help="retrain from the seed even if weights exist")
    q.add_argument("--fine-draft", action="store_true",
                   help="(re)train the pruning study's fine-patch draft into weights/draft_fine (~7 min)")
    q.set_defaults(handler=cmd_demo_build)
    q = demo_sub.add_parser("show", help="answer a few held-out questions with the target")
    q.add_argument("--n", type=int, default=6)
    q.add_argument("--out", default="runs/demo", help="folder for the images shown")
    q.set_defaults(handler=cmd_demo_show)

    p = sub.add_parser("eval", help="accuracy per question type on a split of the demo task")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo target)")
    p.add_argument("--split", default="heldout", choices=["train", "val", "heldout"])
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("keys", help="CURVE key pairs for edges and devices")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    q = keys_sub.add_parser("gen", help="write NAME.key (public) and NAME.key_secret (secret) into a folder")
    q.add_argument("--out", required=True, help="folder to write the key pair into")
    q.add_argument("--name", default="device", help="file name stem (default: device)")
    q.add_argument("--force", action="store_true", help="overwrite an existing pair of that name")
    q.set_defaults(handler=cmd_keys_gen)

    from covspec.edge_runtime.settings import EdgeSettings
    from covspec.transport.protocol import DEFAULT_LIMITS

    defaults = EdgeSettings()
    p = sub.add_parser("edge", help="the edge runtime (target VLM)")
    edge_sub = p.add_subparsers(dest="edge_command", required=True, metavar="ACTION")
    q = edge_sub.add_parser("serve", help="serve a target checkpoint over ZeroMQ (ROUTER)")
    q.add_argument("--model", required=True, help="target checkpoint folder, or an edge bundle (covspec export's OUT/edge)")
    q.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint to bind")
    q.add_argument("--threads", type=int, default=2)
    g = q.add_argument_group("authentication (ZeroMQ CURVE)")
    g.add_argument("--auth", choices=["curve", "none"], default="curve",
                   help="curve (the default) admits only devices whose public keys are in --allow, and refuses "
                        "to start without --key and --allow; serving every device unauthenticated must be asked "
                        "for by name: --auth none")
    g.add_argument("--key", help="the edge's secret key file (NAME.key_secret from `covspec keys gen`)")
    g.add_argument("--allow", help="folder of allowed device public keys (*.key)")
    g = q.add_argument_group("limits")
    g.add_argument("--max-sessions", type=int, default=defaults.max_sessions, help="open sessions in all (default: %(default)s)")
    g.add_argument("--max-sessions-per-device", type=int, default=defaults.max_sessions_per_device,
                   help="open sessions per device: per public key with CURVE, per connection without (default: %(default)s)")
    g.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s,
                   help="seconds before an idle session is freed (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="the largest answer a session may ask for (default: %(default)s)")
    g.add_argument("--max-message-bytes", type=int, default=DEFAULT_LIMITS.max_total_bytes,
                   help="bytes of one message, all frames (default: %(default)s)")
    g.add_argument("--max-image-bytes", type=int, default=DEFAULT_LIMITS.max_image_bytes,
                   help="bytes of an encoded image (default: %(default)s)")
    g.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                   help="pixels of a decoded image (default: %(default)s)")
    g.add_argument("--max-window", type=int, default=DEFAULT_LIMITS.max_window,
                   help="drafted tokens in one VERIFY (default: %(default)s)")
    g = q.add_argument_group("batched verification")
    g.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help="how long a VERIFY may wait for other sessions' VERIFYs to share its target pass; "
                        "0: no batching (default: %(default)s)")
    g.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="requests gathered into one batched round at most (default: %(default)s)")
    q.set_defaults(handler=cmd_edge_serve)
    q = edge_sub.add_parser("stats", help="print a running edge's counters (a STATS request) as JSON")
    q.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    q.add_argument("--key", help="this device's secret key file, for an edge with --auth curve")
    q.add_argument("--edge-key", help="the edge's public key file (NAME.key)")
    q.add_argument("--timeout", type=float, default=5.0)
    q.set_defaults(handler=cmd_edge_stats)

    p = sub.add_parser("device", help="the device runtime (draft VLM)")
    device_sub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    q = device_sub.add_parser("run", help="answer an image + question through an edge")
    q.add_argument("--model", help="draft checkpoint folder (or --bundle)")
    q.add_argument("--bundle", help="exported device bundle folder (covspec export), run without transformers' model")
    q.add_argument("--backend", default="executorch", choices=["executorch", "onnx"], help="runtime for --bundle")
    q.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    q.add_argument("--image", required=True)
    q.add_argument("--prompt", required=True)
    q.add_argument("--mode", default="covspec", choices=["target_only", "draft_only", "vanilla_sd", "covspec",
                                                         "covspec_no_prune", "covspec_no_adaptive",
                                                         "covspec_no_branch", "covspec_no_decoupled"])
    q.add_argument("--window", type=int, default=4, help="drafted tokens per verification")
    q.add_argument("--keep", type=float, default=None,
                   help="share of the draft's visual tokens a pruning mode keeps (default: the mode's own)")
    q.add_argument("--merge", action="store_true",
                   help="merge the dropped visual tokens into the kept ones (a draft trained so: draft_fine)")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each edge reply")
    q.add_argument("--retries", type=int, default=2)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--key", help="this device's secret key file (NAME.key_secret), for an edge with --auth curve")
    q.add_argument("--edge-key", help="the edge's public key file (NAME.key)")
    q.add_argument("--profile", help="calibration profile (covspec calibrate): the drafting policy's starting estimates")
    _add_sampling_args(q)
    q.set_defaults(handler=cmd_device_run)

    q = device_sub.add_parser("flash", help="copy a device bundle to a folder, ssh:// or adb:// target and verify it")
    q.add_argument("--bundle", required=True, help="device bundle folder (covspec export)")
    q.add_argument("--to", required=True, help="DIR, ssh://user@host[:port]/path or adb://SERIAL/path")
    q.set_defaults(handler=cmd_device_flash)

    p = sub.add_parser("calibrate", help="measure draft steps, edge verify times, the link and acceptance into a profile")
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--key", help="this device's secret key file, for an edge with --auth curve")
    p.add_argument("--edge-key", help="the edge's public key file (NAME.key)")
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser("export", help="device bundle (ExecuTorch .pte + ONNX, quantized) and edge bundle")
    p.add_argument("--draft", required=True, help="draft checkpoint folder")
    p.add_argument("--target", required=True, help="target checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (device/ and edge/ are written in it)")
    p.add_argument("--quant", default="int8", choices=["none", "int8", "int4"])
    p.add_argument("--formats", default="pte,onnx", help="device formats, comma-separated: pte, onnx")
    p.add_argument("--edge-backend", default="auto", choices=["auto", "tensorrt", "onnx", "pytorch"])
    p.add_argument("--max-len", type=int, default=None, help="static KV-cache length (default: from the config)")
    p.add_argument("--calibration", default=None, help="calibration profile JSON to record in the manifest")
    p.set_defaults(handler=cmd_export)

    sub.add_parser("link", help="user-space TCP link emulator (RTT, bandwidth) between device and edge")
    sub.add_parser("bench", help="end-to-end latency, throughput and bytes per token: edge, link, device processes")
    sub.add_parser("fuzz", help="property-based fuzz of the protocol decoder and of a running edge (RSS checked)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["link"]:  # the link emulator and the bench parse their own arguments
        from covspec.transport import link

        return link.main(argv[1:])
    if argv[:1] == ["bench"]:
        from covspec.tools import bench

        return bench.main(argv[1:])
    if argv[:1] == ["fuzz"]:
        from covspec.tools import fuzz

        return fuzz.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CovspecError as err:
        print(f"covspec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
