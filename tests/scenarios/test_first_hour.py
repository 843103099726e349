"""A new user's first hour: every failure is one line that names the thing and the fix, and comes
fast (a refused CURVE key at once and counted on the edge, an unreachable edge within ~10 s, bad
endpoints, ports in use, unknown modes refused by the edge); `device run` says what ran and has
--json; the edge's counters in the Prometheus format; thread defaults that fit one machine."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tiny_models
from test_runtimes import RunningEdge, png

import covspec
from covspec import api
from covspec.cli import main, options
from covspec.edge_runtime.metrics import MetricsServer, parse_address, render
from covspec.edge_runtime.server import EdgeServer, EdgeSettings
from covspec.errors import CovspecError
from covspec.models import load_adapter
from covspec.tools.procs import free_port
from covspec.transport import protocol as wire
from covspec.transport.channel import (
    Client,
    EndpointError,
    HandshakeRefused,
    RemoteError,
    generate_keys,
    load_client_keys,
    load_server_keys,
)

PROMPT = "describe this image ."


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_models.build_llava(tmp_path_factory.mktemp("first-hour") / "target", seed=0)


@pytest.fixture(scope="module")
def edge(target):
    running = RunningEdge(target, max_new_tokens=32)
    yield running
    running.close()


def test_global_options_are_accepted_before_and_after_the_command():
    from covspec.cli import build_parser

    parser = build_parser()
    before = parser.parse_args(["--log-level", "debug", "--verbose", "edge", "stats", "--edge", "tcp://h:1"])
    after = parser.parse_args(["edge", "stats", "--edge", "tcp://h:1", "--log-level", "warning"])
    neither = parser.parse_args(["edge", "stats", "--edge", "tcp://h:1"])
    assert (before.log_level, before.verbose) == ("debug", True)
    assert (after.log_level, after.verbose) == ("warning", False)
    assert (neither.log_level, neither.verbose) == ("info", False)


def test_main_leaves_the_callers_logging_as_it_was(capsys):
    ours = logging.getLogger("covspec")
    before = (ours.handlers[:], ours.propagate, ours.level)
    assert main(["edge", "stats", "--edge", "nowhere:1"]) == 2
    assert (ours.handlers, ours.propagate, ours.level) == before
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["edge", "stats", "--edge", "127.0.0.1:5555"], "did you mean tcp://127.0.0.1:5555?"),
    (["device", "run", "--model", "m", "--edge", "localhost:5555", "--image", "x.png", "--prompt", "p"],
     "did you mean tcp://localhost:5555?"),
    (["edge", "serve", "--model", "m", "--auth", "none", "--bind", "tcp://127.0.0.1:99999"], "outside 1..65535"),
    (["device", "run", "--model", "m", "--edge", "tcp://127.0.0.1:5555", "--image", "nowhere.png", "--prompt", "p"],
     "image nowhere.png: no such file"),
])
def test_bad_input_is_one_line_naming_it_without_a_traceback(argv, message, capsys):
    start = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - start < 2.0


def test_a_port_in_use_is_named(edge, target):
    with pytest.raises(EndpointError, match="already in use .*another port"):
        EdgeServer(load_adapter(target), EdgeSettings(bind=edge.endpoint))


def test_the_edge_refuses_an_unknown_mode_with_an_error(edge):
    hello_ok = Client(edge.endpoint, timeout_s=10, retries=0)
    with hello_ok as client:
        with pytest.raises(RemoteError, match="unknown mode 'zzz'") as refused:
            client.request(wire.Open(sid=7, image=png(0), prompt=PROMPT, mode="zzz", max_new_tokens=4))
    assert refused.value.code == wire.ErrorCode.BAD_MESSAGE
    assert 7 not in edge.server.sessions


def test_a_refused_curve_key_is_reported_at_once_and_counted_on_the_edge(target, tmp_path, caplog):
    generate_keys(tmp_path / "edge", "edge")
    generate_keys(tmp_path / "allowed", "phone")
    _, intruder_secret = generate_keys(tmp_path / "intruder", "intruder")
    edge = RunningEdge(target, keys=load_server_keys(tmp_path / "edge" / "edge.key_secret", tmp_path / "allowed"))
    logging.getLogger("covspec.edge").addHandler(caplog.handler)
    try:
        keys = load_client_keys(intruder_secret, tmp_path / "edge" / "edge.key")
        start = time.monotonic()
        with pytest.raises(HandshakeRefused, match="does not admit this device's CURVE key"):
            api.open_device(edge.endpoint, load_adapter(target), keys=keys, timeout_s=20)
        assert time.monotonic() - start < 5.0
        deadline = time.monotonic() + 5
        while edge.server.counters.refused_handshakes == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert edge.server.stats()["refused_handshakes"] >= 1
        key = keys.public.decode()
        assert any(key in r.getMessage() and "allowed" in r.getMessage() for r in caplog.records)
    finally:
        logging.getLogger("covspec.edge").removeHandler(caplog.handler)
        edge.close()


def test_an_edge_that_is_not_there_is_reported_within_about_ten_seconds(target, capsys):
    image = Path(target) / "image.png"
    image.write_bytes(png(1))
    start = time.monotonic()
    rc = main(["device", "run", "--model", str(target), "--edge", f"tcp://127.0.0.1:{free_port()}",
               "--image", str(image), "--prompt", PROMPT, "--threads", "1"])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2 and "could not reach the edge within 10 s" in err and "Traceback" not in err, err
    assert took < 15


def test_device_run_json_is_one_object_with_the_answer_and_its_figures(edge, target, capsys):
    image = Path(target) / "image.png"
    image.write_bytes(png(2))
    common_args = ["device", "run", "--model", str(target), "--edge", edge.endpoint, "--image", str(image),
                   "--prompt", PROMPT, "--max-new-tokens", "12", "--threads", "1"]
    assert main([*common_args, "--mode", "target_only", "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)
    assert main([*common_args, "--mode", "vanilla_sd", "--window", "3", "--json"]) == 0
    out = capsys.readouterr().out
    record = json.loads(out)  # one object, nothing else on stdout
    assert record["ids"] == reference["ids"] and record["text"] == reference["text"]
    assert record["mode"] == "vanilla_sd" and record["draft"] == f"{target} on PyTorch"
    assert record["tokens"] == len(record["ids"]) and record["rounds"] >= 1
    assert record["mean_drafted"] <= 3 and record["mean_accepted"] <= record["mean_drafted"]
    assert record["accepted"] == round(record["mean_accepted"] * record["rounds"])
    assert reference["rounds"] == 0 and reference["mean_accepted"] is None


def test_device_run_says_what_ran(edge, target, capsys):
    image = Path(target) / "image.png"
    image.write_bytes(png(3))
    assert main(["device", "run", "--model", str(target), "--edge", edge.endpoint, "--image", str(image),
                 "--prompt", PROMPT, "--max-new-tokens", "12", "--mode", "vanilla_sd", "--window", "2",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert f"draft {target} on PyTorch" in err and "drafted per round" in err and " of 4" not in err


def test_describe_answer_names_the_edge_streaming_the_rest():
    record = {"tokens": 40, "ttft_ms": 90.0, "latency_ms": 500.0, "decode_tokens_per_s": 80.0, "up_per_token": 30.0,
              "down_per_token": 50.0, "mode": "covspec", "draft": "b on ONNX Runtime", "rounds": 4,
              "mean_accepted": 4.75, "mean_drafted": 4.75, "edge_streamed_rest": True}
    line = api.describe_answer(record)
    assert "mean accepted 4.75 of 4.75 drafted per round" in line and "the edge streamed the rest" in line
    assert "b on ONNX Runtime" in line
    assert "edge generated every token" in api.describe_answer({**record, "mode": "target_only"})


def test_metrics_text_exposition():
    text = render({"requests": 3, "requests.OPEN": 1, "requests.HELLO": 2, "errors.LIMIT": 1, "uptime_s": 1.5,
                   "refused_handshakes": 2})
    lines = text.splitlines()
    assert "covspec_edge_requests_total 3" in lines
    assert 'covspec_edge_requests_by_type_total{type="OPEN"} 1' in lines
    assert 'covspec_edge_errors_by_code_total{code="LIMIT"} 1' in lines
    assert "covspec_edge_uptime_s 1.5" in lines and "# TYPE covspec_edge_uptime_s gauge" in lines
    assert "covspec_edge_refused_handshakes_total 2" in lines
    assert parse_address(":9100") == ("127.0.0.1", 9100) and parse_address("http://0.0.0.0:80/") == ("0.0.0.0", 80)
    with pytest.raises(CovspecError, match="HOST:PORT"):
        parse_address("9100")


def test_the_edge_metrics_endpoint_is_scraped(edge):
    metrics = MetricsServer("127.0.0.1:0", edge.server.stats)
    try:
        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(f"http://{metrics.address}/metrics", timeout=5) as reply:
                assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                body = reply.read().decode()
            return {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
                    if line and not line.startswith("#")}

        before = scrape()
        with Client(edge.endpoint, timeout_s=10, retries=0) as client:
            client.request(wire.Ping(t=0.0))
        after = scrape()
        key = 'covspec_edge_requests_by_type_total{type="PING"}'
        assert after[key] == before.get(key, 0) + 1
        assert after["covspec_edge_requests_total"] > before["covspec_edge_requests_total"]
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://{metrics.address}/other", timeout=5)
    finally:
        metrics.close()


def test_thread_defaults_fit_an_edge_and_a_device_on_one_machine(monkeypatch, caplog):
    monkeypatch.setattr(options, "cores", lambda: 2)
    assert options.auto_threads() == 1
    log = logging.getLogger("covspec.cli")
    log.addHandler(caplog.handler)
    try:
        options.warn_threads(1, "the edge at tcp://127.0.0.1:5555")
        assert not caplog.records
        options.warn_threads(2, "the edge at tcp://127.0.0.1:5555")
        assert "give each --threads 1" in caplog.records[-1].getMessage()
        options.warn_threads(4)
        assert "more than this machine's 2 cores" in caplog.records[-1].getMessage()
    finally:
        log.removeHandler(caplog.handler)
    from covspec.cli import build_parser

    monkeypatch.setattr(options, "cores", lambda: 16)
    assert build_parser().parse_args(["edge", "serve", "--model", "m"]).threads == 8


def test_import_covspec_is_cheap_and_exposes_the_api():
    import subprocess
    import sys

    code = "import sys, covspec; assert 'torch' not in sys.modules; print(covspec.export.__module__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "covspec.api"
    assert covspec.answer is api.answer and callable(covspec.bench) and callable(covspec.serve_edge)
    with pytest.raises(AttributeError):
        covspec.no_such_thing  # noqa: B018


def test_a_bad_bundle_is_named_once(tmp_path):
    with pytest.raises(CovspecError) as err:
        api.load_draft(bundle=tmp_path / "nowhere")
    assert str(err.value).count(f"bundle {tmp_path / 'nowhere'}") == 1, str(err.value)
    with pytest.raises(CovspecError, match="--bundle DIR .* or --model PATH"):
        api.load_draft()


def test_export_reuse_needs_both_manifests_newer_than_the_checkpoints(tmp_path, monkeypatch):
    import os

    from covspec.bundles import bundle

    monkeypatch.setattr(bundle, "load_bundle", lambda folder: None)  # the files' checksums: bundle's own tests
    draft, target, out = tmp_path / "draft", tmp_path / "target", tmp_path / "out"
    for folder in (draft, target, out / "device", out / "edge"):
        folder.mkdir(parents=True)
    (draft / "model.safetensors").write_bytes(b"d")
    (target / "model.safetensors").write_bytes(b"t")
    assert not api.exported(draft, target, out)  # no manifests
    for kind in ("device", "edge"):
        (out / kind / "manifest.json").write_text("{}")
    assert api.exported(draft, target, out)
    later = (out / "edge" / "manifest.json").stat().st_mtime + 10
    os.utime(draft / "model.safetensors", (later, later))  # the draft changed after the export
    assert not api.exported(draft, target, out)


def test_bench_defaults_ask_for_long_answers_and_report_speed_up():
    from covspec.cli import build_parser
    from covspec.tools import bench

    args = build_parser().parse_args(["bench"])
    assert args.question_type == "describe" and args.backend == "auto" and args.bundle is None
    row = {"tokens": 10, "ttft_s": 0.1, "decode_tps": 50.0, "bytes_up": 100, "bytes_down": 100, "score": 1.0,
           "mean_accepted": float("nan"), "acceptance": float("nan"), "matches_target": None, "rounds": 0}
    rows = [{**row, "link": "4g", "mode": "target_only", "latency_s": 0.6},
            {**row, "link": "4g", "mode": "covspec", "latency_s": 0.2, "matches_target": True},
            {**row, "link": "wifi", "mode": "covspec", "latency_s": 0.3, "matches_target": True}]
    by = {(s["link"], s["mode"]): s for s in bench.summarise(rows)}
    assert by[("4g", "target_only")]["speedup"] == pytest.approx(1.0)
    assert by[("4g", "covspec")]["speedup"] == pytest.approx(3.0)
    assert by[("wifi", "covspec")]["speedup"] != by[("wifi", "covspec")]["speedup"]  # nan: no target_only there
    with pytest.raises(TypeError, match="no_such_option"):
        api.bench(no_such_option=1)


def test_bench_workers_native_log_lines_go_to_their_log_only(tmp_path, capsys):
    import sys

    from covspec.tools.bench import run_worker

    code = "print('[cpuinfo_utils.cpp:71] Reading file x'); print('[loopback] #0 covspec 42 tokens')"
    run_worker([sys.executable, "-c", code], dict(os.environ), tmp_path / "w.log")
    shown = capsys.readouterr().out
    assert "[loopback] #0 covspec" in shown and "cpuinfo" not in shown
    assert "cpuinfo" in (tmp_path / "w.log").read_text()
    with pytest.raises(CovspecError, match="a device worker failed .*w.log"):
        run_worker([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path / "w.log")


def test_native_stderr_is_quiet_while_a_program_loads_unless_verbose(capfd):
    for verbose in (False, True):
        with options.native_stderr_quiet(verbose):
            os.write(2, b"[cpuinfo_utils.cpp:71] Reading file\n")
        os.write(2, b"after\n")
        err = capfd.readouterr().err
        assert "after" in err and ("cpuinfo" in err) == verbose


def test_flash_without_adb_names_the_tool_and_the_fix(tmp_path, capsys):
    from covspec.bundles.manifest import write_manifest

    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.pte").write_bytes(b"pte" * 100)
    write_manifest(folder, {"kind": "device"})
    env_path = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)  # no adb anywhere on it
    try:
        start = time.monotonic()
        assert main(["device", "flash", "--bundle", str(folder), "--to", "adb://emulator-5554/data/local/tmp/b"]) == 2
    finally:
        os.environ["PATH"] = env_path
    err = capsys.readouterr().err
    assert "adb is not installed here: install Android's platform-tools" in err and "Traceback" not in err, err
    assert time.monotonic() - start < 2
