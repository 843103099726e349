"""`covspec generate`: one model answers a question about an image (target-only, no edge)."""

from __future__ import annotations

import argparse
import sys

from covspec.cli.options import TokenPrinter, add_command, add_sampling_args, add_threads_arg, sampling_params
from covspec.errors import CovspecError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "generate", "answer a question about an image with one model (target-only)")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question or instruction")
    add_threads_arg(p)
    add_sampling_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from covspec.generation import generate
    from covspec.images import load_image
    from covspec.models import load_adapter

    params = sampling_params(args)
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
