"""The `covspec` command: one parser, each subcommand's options next to its handler.

    generate                 covspec/cli/generate.py
    demo build|show, eval    covspec/cli/demo.py
    keys gen                 covspec/cli/keys.py
    edge serve|stats         covspec/cli/edge.py
    device run|flash         covspec/cli/device.py
    calibrate                covspec/cli/calibrate.py
    export                   covspec/cli/export.py
    link                     covspec/transport/link.py (add_arguments, run)
    bench                    covspec/tools/bench.py (add_arguments, run)
    fuzz                     covspec/tools/fuzz.py (add_arguments, run)

Heavy imports (torch, transformers) happen inside the handlers so that `covspec --help` is quick;
logging (covspec/logs.py: --log-level, --verbose) is set up before any handler runs, so the
libraries' import-time noise is silenced unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys

from covspec.cli.options import HelpFormatter, add_command, add_logging_args, every_parser
from covspec.errors import CovspecError

# (name, summary, module): tools with their own add_arguments(parser) and run(args) handler
TOOLS = (
    ("link", "user-space TCP link emulator (RTT, bandwidth) between device and edge", "covspec.transport.link"),
    ("bench", "end-to-end latency, throughput and bytes per token: edge, link, device processes", "covspec.tools.bench"),
    ("fuzz", "property-based fuzz of the protocol decoder and of a running edge (RSS checked)", "covspec.tools.fuzz"),
    ("conformance", "checks of a running edge against transport/PROTOCOL.md (exit 1 on a failure)", "covspec.tools.conformance"),
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from covspec.cli import calibrate, demo, device, edge, export, generate, keys

    parser = argparse.ArgumentParser(prog="covspec", formatter_class=HelpFormatter,
                                     description="CoVSpec: device-edge speculative decoding for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (generate, demo, keys, edge, device, calibrate, export):
        command.register(sub)
    for name, summary, module_name in TOOLS:
        module = importlib.import_module(module_name)
        p = add_command(sub, name, summary)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    for each in every_parser(parser):  # last, so that they close every help page
        add_logging_args(each, top=each is parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["covspec", *argv])  # recorded with the results of bench and fuzz
    with command_logging(args.log_level, args.verbose):
        try:
            return args.handler(args)
        except CovspecError as err:
            print(f"covspec {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130


def device_main(argv: list[str] | None = None) -> int:
    """`covspec-device ...`: the device's commands alone (`covspec-device run ...` is `covspec device
    run ...`), the launcher a flashed device runs; torch-free with a bundle."""
    return main(["device", *(sys.argv[1:] if argv is None else argv)])


@contextlib.contextmanager
def command_logging(level: str, verbose: bool):
    """covspec/logs.py's setup for one command; our loggers as they were afterwards, so that main()
    called in-process (tests, notebooks) leaves the caller's logging alone."""
    from covspec import logs

    loggers = [logging.getLogger(name) for name in ("covspec", "covspec.edge.requests")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    logs.setup(level, verbose)
    try:
        yield
    finally:
        for lg, (handlers, lvl, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(lvl)


if __name__ == "__main__":
    sys.exit(main())
