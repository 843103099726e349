"""What several subcommands share: the help format, the sampling options, the device's keys."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from covspec.errors import CovspecError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, "(default: X)", unless the help says it in words or the
    default is nothing to show (None, or an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.required:
            return text
        return super()._get_help_string(action)


def add_command(sub: argparse._SubParsersAction, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser, its summary as both the list entry and the description."""
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kwargs)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (temperature 0 = greedy)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: off)")
    group.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, unseeded)")
    group.add_argument("--max-new-tokens", type=int, default=64, help="tokens of the answer at most")


def sampling_params(args: argparse.Namespace):
    from covspec.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        raise CovspecError(f"sampling: {err}") from err


def add_threads_arg(parser: argparse.ArgumentParser, default: int = 2) -> None:
    parser.add_argument("--threads", type=int, default=default, help="torch threads")


def add_client_key_args(parser: argparse.ArgumentParser, key_help: str) -> None:
    parser.add_argument("--key", help=key_help)
    parser.add_argument("--edge-key", help="the edge's public key file (NAME.key)")


def client_keys(args: argparse.Namespace):
    from covspec.transport.channel import load_client_keys

    if bool(args.key) != bool(args.edge_key):
        raise CovspecError("--key DEVICE_SECRET_FILE and --edge-key EDGE_PUBLIC_FILE go together")
    return load_client_keys(args.key, args.edge_key) if args.key else None


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
