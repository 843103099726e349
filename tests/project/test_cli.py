"""The `covspec` parser: modes from the one table, every option documented, the tools as ordinary
subcommands, bench workers configured by one settings file. Parsing only: nothing is served."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from covspec.cli import build_parser, main
from covspec.cli.options import HelpFormatter
from covspec.modes import MODE_OPTIONS, MODES, Mode, SpecOptions, mode_labels, split_label
from covspec.tools import bench, fuzz, load
from covspec.tools.worker import WorkerSettings
from covspec.transport import link

README = Path(__file__).resolve().parents[2] / "README.md"
DEVICE_RUN = ["device", "run", "--model", "m", "--edge", "tcp://127.0.0.1:1", "--image", "i.png", "--prompt", "p"]


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every command and action, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from subparsers(child, (*path, name))


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_device_run_accepts_every_mode_of_the_table():
    parser = build_parser()
    for mode in MODES:
        assert parser.parse_args([*DEVICE_RUN, "--mode", mode]).mode == mode
    assert "covspec_no_ahead" in MODES  # the mode the old hand-typed choices refused


def test_device_run_refuses_an_unknown_mode_naming_the_modes(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*DEVICE_RUN, "--mode", "covspec_turbo"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--mode: invalid choice: 'covspec_turbo'" in err
    assert all(mode in err for mode in MODES)


def test_the_readme_lists_exactly_the_modes_of_the_table():
    text = README.read_text()
    start = text.index("Modes of `device run` and `bench`:")
    paragraph = text[start:text.index("\n\n", start)]
    listed = paragraph.split(":", 1)[1].split("In the bench")[0]  # the list, before MODE@K and --keep
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(MODES)


def test_modes_table_margin_default_is_the_policys():
    from covspec.policy import MARGIN_THRESHOLD

    assert SpecOptions().margin_threshold == MARGIN_THRESHOLD
    assert MODES == ("target_only", "draft_only", "edge_sd", *MODE_OPTIONS)
    assert tuple(Mode) == MODES  # the enum the code compares with names every mode, in the table's order


def test_bench_modes_are_checked_against_the_table(capsys):
    args = build_parser().parse_args(["bench", "--modes", "target_only,vanilla_sd@8,covspec_no_ahead"])
    assert args.modes == ("target_only", "vanilla_sd@8", "covspec_no_ahead")
    assert build_parser().parse_args(["bench"]).modes == ("target_only", "vanilla_sd", "covspec", "draft_only")
    assert split_label("vanilla_sd@8") == ("vanilla_sd", 8) and split_label("covspec") == ("covspec", None)
    for bad, message in (("covspec,nope", "unknown mode 'nope'"), ("vanilla_sd@0", "at least 1"),
                         ("vanilla_sd@x", "whole number"), (",", "no mode given")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            mode_labels(bad)
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "--modes", bad])
        assert message in capsys.readouterr().err


def test_every_option_of_every_command_has_help_and_shows_its_default():
    commands = dict(subparsers(build_parser()))
    assert {("link",), ("bench",), ("fuzz",), ("device", "run"), ("edge", "serve"), ("export",)} <= set(commands)
    checked = 0
    for path, parser in commands.items():
        formatter = HelpFormatter(" ".join(path))
        for action in options(parser):
            name = f"covspec {' '.join(path)} {action.option_strings[0]}"
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{name}: no help"
            shown = formatter._get_help_string(action)
            if action.default not in (None, False) and not action.required:
                assert "default" in shown, f"{name}: its default {action.default!r} is not shown"
            checked += 1
    assert checked > 100


def test_help_texts_show_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["device", "run", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "seconds to wait for each edge reply (default: 30.0)" in text
    assert "(default: covspec)" in text and "covspec_no_ahead" in text


@pytest.mark.parametrize("name, module, flag", [("link", link, "--rtt-ms"), ("bench", bench, "--devices"),
                                                ("fuzz", fuzz, "--decoder")])
def test_the_tools_are_subcommands_of_the_one_parser(name, module, flag, capsys):
    args = build_parser().parse_args([name])
    assert args.handler is module.run
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])  # the module's own entry point is the same parser
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: covspec {name} ") and flag in out


def test_link_flags_reach_its_handler():
    args = build_parser().parse_args(["link", "--upstream", "127.0.0.1:9", "--profile", "custom", "--rtt-ms", "4",
                                      "--stats-interval", "0"])
    assert (args.upstream, args.profile, args.rtt_ms, args.stats_interval) == ("127.0.0.1:9", "custom", 4.0, 0.0)


def test_link_without_upstream_is_refused(capsys):
    assert main(["link", "--profile", "wifi"]) == 2
    assert "--upstream is required" in capsys.readouterr().err


def test_python_m_covspec_cli_runs_the_parser():
    done = subprocess.run([sys.executable, "-m", "covspec.cli", "bench", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "usage: covspec bench" in done.stdout


def test_bench_worker_settings_round_trip_through_one_file(tmp_path):
    args = build_parser().parse_args(["bench", "--draft", "d", "--modes", "target_only,vanilla_sd@8", "--prompts", "3",
                                      "--keep", "0.5", "--merge", "--temperature", "1", "--seed", "7",
                                      "--question-type", "describe"])
    settings = WorkerSettings.from_bench(args, edge="tcp://127.0.0.1:1", link="wifi", rows="rows.jsonl")
    assert settings.modes == ("target_only", "vanilla_sd@8") and settings.keep == 0.5 and settings.merge
    assert (settings.prompts, settings.temperature, settings.seed, settings.question_type) == (3, 1.0, 7, "describe")
    command = settings.save(tmp_path / "worker.json")
    assert command == [sys.executable, "-m", "covspec.tools.worker", str(tmp_path / "worker.json")]
    assert WorkerSettings.load(tmp_path / "worker.json") == settings


def test_load_bench_device_settings(tmp_path):
    from covspec.edge_runtime.settings import EdgeSettings

    args = build_parser().parse_args(["bench", "--draft", "d", "--devices", "1,2", "--replay", "--prompts", "4",
                                      "--start", "10", "--out", str(tmp_path)])
    s = load.worker_settings(args, "tcp://127.0.0.1:1", "covspec", 2, 1, tmp_path / "rows.jsonl", tmp_path / "go")
    assert s.modes == ("covspec",) and s.link == "2dev" and s.device == 1
    assert s.start == 14  # after device 0's four prompts
    offered = EdgeSettings().draft_sessions  # up to that many devices the edge may draft for them
    assert s.go == str(tmp_path / "go")
    assert s.replay_file == str(tmp_path / ("recorded.msgpack" if 2 <= offered else "recorded-loaded.msgpack"))
    alone = load.worker_settings(args, "tcp://127.0.0.1:1", "covspec", offered, 0, tmp_path / "r", tmp_path / "go")
    assert alone.replay_file == str(tmp_path / "recorded.msgpack")  # within it, the hand-over recorded
    loaded = load.worker_settings(args, "tcp://127.0.0.1:1", "covspec", offered + 1, 0, tmp_path / "r", tmp_path / "go")
    assert loaded.replay_file == str(tmp_path / "recorded-loaded.msgpack")  # past that, devices draft themselves


def test_device_and_edge_flags_derive_from_their_configuration():
    """`device run`'s defaults are AnswerConfig's and DeviceConfig's, `edge serve`'s EdgeSettings'."""
    from covspec.cli.options import sampling_params
    from covspec.device_runtime.config import AnswerConfig, DeviceConfig
    from covspec.edge_runtime.settings import EdgeSettings

    args = build_parser().parse_args(["device", "run", "--edge", "tcp://127.0.0.1:1", "--image", "x.png",
                                      "--prompt", "what is it ?"])
    ask, device = AnswerConfig(), DeviceConfig(edge=args.edge)
    assert (args.mode, args.window, args.max_new_tokens) == (ask.mode, ask.window, ask.max_new_tokens)
    assert sampling_params(args) == ask.params and ask.params.greedy
    assert (args.timeout, args.retries, args.backend) == (device.timeout_s, device.retries, device.backend)
    edge, settings = build_parser().parse_args(["edge", "serve", "--model", "m"]), EdgeSettings()
    assert (edge.bind, edge.max_sessions, edge.idle_timeout, edge.max_new_tokens, edge.batch_wait_ms, edge.max_batch,
            edge.draft_sessions, edge.schedule) == (settings.bind, settings.max_sessions, settings.idle_timeout_s,
                                                    settings.max_new_tokens, settings.batch_wait_ms, settings.max_batch,
                                                    settings.draft_sessions, settings.schedule)
    from covspec.cli.edge import edge_slo

    assert edge_slo(edge.slo) == settings.slo


def test_edge_serve_refuses_a_bad_slo_before_loading_anything(capsys):
    """`--slo` is read before the target loads: a bad one is one line naming the fix, exit 2."""
    assert main(["edge", "serve", "--model", "/nonexistent", "--auth", "none", "--slo", "tpot=fast"]) == 2
    err = capsys.readouterr().err
    assert "tpot='fast' is not a number of milliseconds" in err and "Traceback" not in err
