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


def cmd_edge_serve(args: argparse.Namespace) -> int:
    import logging

    import torch

    from covspec.edge_runtime.server import EdgeServer, EdgeSettings
    from covspec.models import load_adapter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    settings = EdgeSettings(bind=args.bind, max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout,
                            max_new_tokens=args.max_new_tokens)
    server = EdgeServer(load_adapter(args.model), settings, name=Path(args.model).name)
    print(f"edge serving {args.model} on {server.endpoint}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.sock.close()
    return 0


def cmd_device_run(args: argparse.Namespace) -> int:
    import torch

    from covspec.device_runtime.client import DeviceRuntime
    from covspec.models import load_adapter

    params = _sampling_params(args)
    torch.set_num_threads(args.threads)
    image = Path(args.image)
    if not image.is_file():
        raise CovspecError(f"image {image}: no such file")
    device = DeviceRuntime(load_adapter(args.model), args.edge, timeout_s=args.timeout, retries=args.retries)
    try:
        answer = device.answer(image.read_bytes(), args.prompt, args.mode, params, args.max_new_tokens,
                               window=args.window)
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

    p = sub.add_parser("edge", help="the edge runtime (target VLM)")
    edge_sub = p.add_subparsers(dest="edge_command", required=True, metavar="ACTION")
    q = edge_sub.add_parser("serve", help="serve a target checkpoint over ZeroMQ (ROUTER)")
    q.add_argument("--model", required=True, help="target checkpoint folder")
    q.add_argument("--bind", default="tcp://127.0.0.1:5555", help="ZeroMQ endpoint to bind")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--max-sessions", type=int, default=64)
    q.add_argument("--idle-timeout", type=float, default=120.0, help="seconds before an idle session is freed")
    q.add_argument("--max-new-tokens", type=int, default=1024, help="the largest answer a session may ask for")
    q.set_defaults(handler=cmd_edge_serve)

    p = sub.add_parser("device", help="the device runtime (draft VLM)")
    device_sub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    q = device_sub.add_parser("run", help="answer an image + question through an edge")
    q.add_argument("--model", required=True, help="draft checkpoint folder")
    q.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    q.add_argument("--image", required=True)
    q.add_argument("--prompt", required=True)
    q.add_argument("--mode", default="vanilla_sd", choices=["target_only", "draft_only", "vanilla_sd"])
    q.add_argument("--window", type=int, default=4, help="drafted tokens per verification")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each edge reply")
    q.add_argument("--retries", type=int, default=2)
    q.add_argument("--threads", type=int, default=2)
    _add_sampling_args(q)
    q.set_defaults(handler=cmd_device_run)

    sub.add_parser("link", help="user-space TCP link emulator (RTT, bandwidth) between device and edge")
    sub.add_parser("bench", help="end-to-end latency, throughput and bytes per token: edge, link, device processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["link"]:  # the link emulator and the bench parse their own arguments
        from covspec.transport import link

        return link.main(argv[1:])
    if argv[:1] == ["bench"]:
        from covspec import bench

        return bench.main(argv[1:])
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
