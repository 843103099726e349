"""What several subcommands share: the help format, the sampling options, the device's keys."""

from __future__ import annotations

import argparse
import contextlib
import os
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


def add_logging_args(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--log-level and --verbose, accepted before the subcommand (`top`: with their defaults) and after
    it (no default there, so that one given before is kept)."""
    from covspec.logs import LEVELS

    g = parser.add_argument_group("output")
    g.add_argument("--log-level", choices=LEVELS, default="info" if top else argparse.SUPPRESS,
                   help="covspec's own messages on stderr at this level and above (default: info)")
    g.add_argument("--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="let the libraries (torch, torchao, transformers, ExecuTorch, ONNX) print their warnings "
                        "and progress bars too (default: off, they are silenced)")


def add_command(sub: argparse._SubParsersAction, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser, its summary as both the list entry and the description."""
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kwargs)


def every_parser(parser: argparse.ArgumentParser):
    """`parser` and every subcommand's and action's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from every_parser(child)


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    """The sampling options of every command that answers (generate, device run, bench)."""
    group = parser.add_argument_group("sampling (temperature 0 = greedy)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    group.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: off)")
    group.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, unseeded)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens of the answer at most")


def sampling_params(args: argparse.Namespace):
    from covspec.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        raise CovspecError(f"sampling: {err}") from err


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads() -> int:
    """Half this machine's cores: an edge and a device started side by side on one machine, each with
    its default, then do not fight over the cores (2 threads each on 2 cores ran 15x slower than 1)."""
    return max(1, cores() // 2)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, default=auto_threads(),
                        help=f"torch threads (default: half this machine's {cores()} cores, {auto_threads()}, so "
                             "that an edge and a device on one machine share it; give the whole machine to a "
                             "process that runs alone)")


def warn_threads(threads: int, shared_with: str | None = None) -> None:
    """A warning naming the fix when `threads` oversubscribe this machine's cores, alone or with a
    process it shares the machine with (`shared_with`, e.g. "the edge at tcp://127.0.0.1:5555")."""
    import logging

    log = logging.getLogger("covspec.cli")
    n = cores()
    if threads > n:
        log.warning("--threads %d is more than this machine's %d cores: expect a slowdown (use --threads %d "
                    "or fewer)", threads, n, n)
    elif shared_with and 2 * threads > n:
        log.warning("%s runs on this machine too: --threads %d here and as many there is more than its %d cores, "
                    "which slows both down many times over; give each --threads %d", shared_with, threads, n,
                    max(1, n // 2))


def add_client_key_args(parser: argparse.ArgumentParser, key_help: str) -> None:
    parser.add_argument("--key", help=key_help)
    parser.add_argument("--edge-key", help="the edge's public key file (NAME.key)")


def client_keys(args: argparse.Namespace):
    from covspec.tools.edge_probe import client_keys as keys_of

    return keys_of(args.key, args.edge_key)


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


@contextlib.contextmanager
def native_stderr_quiet(verbose: bool):
    """Unless `verbose`, what C++ runtimes write straight to the stderr file (ExecuTorch's CPU probing
    while a program loads) goes nowhere for the duration; Python's own errors come after, unharmed."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
