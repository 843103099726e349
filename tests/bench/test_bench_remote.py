"""`covspec bench --edge`: the bench against an edge already running as its own process (`covspec edge
serve`), on the user's prompts file, with percentiles; bad input refused in seconds; INFO on the wire."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from PIL import Image, ImageDraw

from covspec.tools import bench
from covspec.tools.procs import free_port, one_thread_env, stop_edge, wait_for_edge
from covspec.tools.prompts import PromptsError, load_prompts, task_score

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("what is the color of the {shape} ?", "describe this image .", "is there a {shape} ?",
             "where is the {shape} ?")


def write_prompts(folder: Path, n: int = 12) -> Path:
    """n images of the test's own (a shape of a colour on a plain ground) and a question each, as JSON Lines."""
    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for i in range(n):
        color, shape = COLORS[i % len(COLORS)], SHAPES[i % len(SHAPES)]
        image = Image.new("RGB", (64 + 8 * i, 48 + 4 * i), (200, 200, 200))
        box = (8 + i, 8, 40 + i, 40)
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
        image.save(images / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
        lines.append({"image": f"images/{i:02d}.{'png' if i % 2 else 'jpg'}",
                      "prompt": QUESTIONS[i % len(QUESTIONS)].format(shape=shape), "reference": color})
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def serve(model: Path, log: Path, *options: str, keys=None) -> tuple[subprocess.Popen, str]:
    """`covspec edge serve` as its own process, as a user starts it; (process, endpoint) once it answers."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    edge = subprocess.Popen([sys.executable, "-m", "covspec.cli", "edge", "serve", "--model", str(model), "--bind",
                             endpoint, "--threads", "1", *options], env=one_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        wait_for_edge(endpoint, keys=keys)
    except BaseException:
        stop_edge(edge)
        raise
    return edge, endpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    return tiny_models.build_llava(folder / "target", seed=0), tiny_models.build_llava(folder / "draft", seed=1)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def check_run(out: Path, modes: tuple[str, ...], prompts: int, link: str) -> list[dict]:
    """Every mode's answers equal target_only's, on the test's own prompts; rows and summary carry the
    percentiles; the bench started no edge of its own."""
    rows = rows_of(out)
    assert len(rows) == prompts * len(modes) and {r["link"] for r in rows} == {link}
    assert {r["qtype"] for r in rows} == {"user"}  # the prompts file's, not the demo's
    for row in rows:
        for field in ("link", "mode", "ttft_s", "latency_s", "matches_target", "per_token_s"):
            assert field in row
        if row["mode"] != "target_only":
            assert row["matches_target"] is True, row
        assert row["score"] is not None and 0.0 <= row["score"] <= 1.0  # the references' token F1
    summary = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["mode"] for s in summary] == list(modes)
    for s in summary:
        assert s["requests"] == prompts and s["identical"] == prompts
        assert s["latency_ms_p50"] <= s["latency_ms_p90"] <= s["latency_ms_p99"]
        assert s["ttft_ms_p50"] <= s["ttft_ms_p99"] and s["per_token_ms_p50"] > 0
        assert s["edge_busy_ms"] > 0 and s["edge_cpu_ms"] > 0  # the edge's own counts per answer
    assert "latency_ms_p99" in (out / "summary.csv").read_text().splitlines()[0]
    assert not (out / "edge.log").exists()  # the bench started no edge
    text = (out / "summary.md").read_text()
    assert "p50 / p90 / p99" in text and "The edge's side" in text
    assert (out / "latency_cdf.png").stat().st_size > 1000
    return rows


def test_bench_against_a_running_edge_on_the_users_prompts(pair, tmp_path: Path):
    target, draft = pair
    prompts = write_prompts(tmp_path / "mine")
    metrics = f"127.0.0.1:{free_port()}"
    edge, endpoint = serve(target, tmp_path / "edge.log", "--auth", "none", "--draft", str(draft),
                           "--metrics", metrics)
    try:
        from covspec.tools.edge_probe import stats_counters

        opened = stats_counters(endpoint)["sessions_opened"]
        out = tmp_path / "bench"
        modes = ("target_only", "vanilla_sd", "covspec", "edge_sd")
        argv = ["--edge", endpoint, "--draft", str(draft), "--prompts-file", str(prompts), "--modes", ",".join(modes),
                "--max-new-tokens", "6", "--edge-metrics", metrics, "--out", str(out)]
        assert bench.main(argv) == 0
        check_run(out, modes, 12, "direct")
        assert stats_counters(endpoint)["sessions_opened"] - opened == 48  # every answer on that edge
        side = json.loads((out / "summary.json").read_text())
        assert side["edge_side"]["direct"]["edge_cpu_ms_per_answer"] > 0  # read off its Prometheus endpoint
        assert "covspec-edge" in side["edge"] and "draft draft" in side["edge"]
    finally:
        stop_edge(edge)


@pytest.mark.slow
def test_bench_through_4g_to_a_curve_edge(pair, tmp_path: Path):
    from covspec.cli import main
    from covspec.transport.channel import load_client_keys

    target, draft = pair
    keys = tmp_path / "keys"
    assert main(["keys", "gen", "--out", str(keys), "--name", "edge"]) == 0
    assert main(["keys", "gen", "--out", str(keys / "devices"), "--name", "phone"]) == 0
    prompts = write_prompts(tmp_path / "mine")
    edge, endpoint = serve(target, tmp_path / "edge.log", "--auth", "curve", "--key", str(keys / "edge.key_secret"),
                           "--allow", str(keys / "devices"),
                           keys=load_client_keys(keys / "devices" / "phone.key_secret", keys / "edge.key"))
    try:
        out = tmp_path / "bench"
        modes = ("target_only", "vanilla_sd", "covspec")
        argv = ["--edge", endpoint, "--key", str(keys / "devices" / "phone.key_secret"), "--edge-key",
                str(keys / "edge.key"), "--links", "4g", "--draft", str(draft), "--prompts-file", str(prompts),
                "--modes", ",".join(modes), "--max-new-tokens", "6", "--out", str(out)]
        assert bench.main(argv) == 0
        rows = check_run(out, modes, 12, "4g")
        assert all(r["ttft_s"] >= 0.040 for r in rows)  # 4g's round trip, at least once per answer
        assert json.loads((out / "link-4g.json").read_text())["bytes_up"] >= sum(r["bytes_up"] for r in rows)
        assert main(["keys", "gen", "--out", str(keys / "strangers"), "--name", "stranger"]) == 0
        start = time.monotonic()
        assert bench.main([*argv[:2], "--key", str(keys / "strangers" / "stranger.key_secret"), *argv[4:]]) == 2
        assert time.monotonic() - start < 30  # a key the edge does not admit: said before any answer
    finally:
        stop_edge(edge)


@pytest.mark.slow
@pytest.mark.parametrize("replay", [True, False], ids=["replaying", "real-drafts"])
def test_open_loop_load_against_a_running_edge(pair, tmp_path: Path, replay: bool):
    target, draft = pair
    prompts = write_prompts(tmp_path / "mine", n=4)
    edge, endpoint = serve(target, tmp_path / "edge.log", "--auth", "none", "--draft", str(draft))
    try:
        out = tmp_path / "load"
        argv = ["--edge", endpoint, "--draft", str(draft), "--prompts-file", str(prompts), "--devices", "2",
                "--rate", "4,8", *(["--replay"] if replay else []), "--modes", "target_only,covspec", "--prompts", "2",
                "--max-new-tokens", "6", "--out", str(out)]
        assert bench.main(argv) == 0
        summary = json.loads((out / "load.json").read_text())["summary"]
        assert [(s["mode"], s["rate"]) for s in summary] == [(m, r) for m in ("target_only", "covspec") for r in (4, 8)]
        for s in summary:
            assert s["requests"] == 4 and s["replay_matches"] == (4 if replay else None)
            assert s["response_ms_p99"] >= s["latency_ms_p50"] and s["edge_cpu_ms_per_request"] > 0
        rows = [json.loads(line) for line in (out / "load.jsonl").read_text().splitlines()]
        assert all(r["queue_s"] >= -0.01 and r["response_s"] >= r["latency_s"] - 0.01 for r in rows)
        assert not (out / "edge.log").exists() and (out / "response_cdf.png").stat().st_size > 1000
        merged = tmp_path / "merged"
        assert bench.main(["merge", str(out), str(out), "--out", str(merged)]) == 0
        again = [json.loads(line) for line in (merged / "load-summary.jsonl").read_text().splitlines()]
        assert [s["requests"] for s in again] == [8] * 4 and [s["devices"] for s in again] == [4] * 4
    finally:
        stop_edge(edge)


# --- bad input: a clear error within seconds -----------------------------------------------------
def error_of(argv: list[str], capsys) -> tuple[str, float]:
    start = time.monotonic()
    assert bench.main(argv) == 2
    return capsys.readouterr().err, time.monotonic() - start


def test_an_unreachable_edge_is_said_in_seconds(pair, tmp_path: Path, capsys):
    _, draft = pair
    err, took = error_of(["--edge", f"tcp://127.0.0.1:{free_port()}", "--draft", str(draft), "--out",
                          str(tmp_path / "b")], capsys)
    assert "is the edge running" in err and took < 20


def test_an_edge_whose_target_does_not_fit_the_draft_is_refused_before_any_answer(pair, tmp_path: Path, capsys):
    target, _ = pair
    other = tiny_models.build_qwen2_5_vl(tmp_path / "other")  # another tokenizer
    edge, endpoint = serve(target, tmp_path / "edge.log", "--auth", "none")
    try:
        out = tmp_path / "b"
        err, took = error_of(["--edge", endpoint, "--draft", str(other), "--out", str(out)], capsys)
        assert "tokenizes differently" in err and "target" in err and took < 30
        assert not (out / "results.jsonl").exists()
        err, _ = error_of(["--edge", endpoint, "--draft", str(pair[1]), "--modes", "target_only,edge_sd", "--out",
                           str(out)], capsys)
        assert "runs no draft" in err and "edge_sd" in err
    finally:
        stop_edge(edge)


def test_broken_prompts_are_refused_naming_the_line(tmp_path: Path, capsys):
    prompts = write_prompts(tmp_path / "mine", n=3)
    lines = prompts.read_text().splitlines()
    broken = tmp_path / "mine" / "broken.jsonl"
    broken.write_text("\n".join([lines[0], lines[1][:-5], lines[2]]) + "\n")
    err, took = error_of(["--prompts-file", str(broken), "--out", str(tmp_path / "b")], capsys)
    assert f"{broken}:2: not a JSON object" in err and took < 10
    (tmp_path / "mine" / "fake.png").write_text("not an image at all")
    fake = tmp_path / "mine" / "fake.jsonl"
    fake.write_text(lines[0] + "\n" + json.dumps({"image": "fake.png", "prompt": "what ?"}) + "\n")
    err, took = error_of(["--prompts-file", str(fake), "--out", str(tmp_path / "b")], capsys)
    assert f"{fake}:2:" in err and "not a readable image" in err and took < 10


@pytest.mark.parametrize("line, says", [
    ({"image": "nowhere.png", "prompt": "what ?"}, "no such file"),
    ({"image": "images/00.jpg"}, "'prompt' missing"),
    ({"image": "images/00.jpg", "prompt": "what ?", "answer": "x"}, "unknown field answer"),
    ({"image": "images/00.jpg", "prompt": "what ?", "reference": 3}, "'reference' must be a string"),
    (["images/00.jpg"], "expected an object"),
])
def test_each_kind_of_bad_line_is_named(tmp_path: Path, line, says):
    write_prompts(tmp_path, n=1)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n" + json.dumps(line) + "\n")
    with pytest.raises(PromptsError, match=f"bad.jsonl:2: .*{says}"):
        load_prompts(path)


def test_an_oversized_image_and_a_folder_of_images(tmp_path: Path):
    from covspec.images import MAX_IMAGE_PIXELS

    write_prompts(tmp_path, n=3)
    big = tmp_path / "big"
    big.mkdir()
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 64
    Image.new("RGB", (side, side)).save(big / "big.png")
    with pytest.raises(PromptsError, match="big.png.*over the limit"):
        load_prompts(big, "what is it ?")
    with pytest.raises(PromptsError, match="--question"):
        load_prompts(tmp_path / "images")
    prompts = load_prompts(tmp_path / "images", "describe this image .")
    assert [Path(p.image).name for p in prompts] == ["00.jpg", "01.png", "02.jpg"]
    assert {p.prompt for p in prompts} == {"describe this image ."} and prompts[0].reference is None


def test_task_score_is_token_f1_against_the_reference():
    assert task_score("The red circle.", "red circle") == 1.0
    assert task_score("a blue square", "red square") == pytest.approx(0.5)
    assert task_score("", "red") == 0.0


def test_percentiles_and_arrivals():
    from covspec.tools.figures import percentiles
    from covspec.tools.replay import Arrivals

    p = percentiles([i / 1000 for i in range(1, 101)], "latency_ms")
    assert p["latency_ms_p50"] == pytest.approx(50.5) and p["latency_ms_p99"] == pytest.approx(99.01)
    assert p["latency_ms_mean"] == pytest.approx(50.5)
    arrivals = Arrivals(1000.0, seed=0)
    times = [arrivals.wait() for _ in range(400)]
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 1000, rel=0.2)  # Poisson at 1000/s: exponential gaps of 1 ms
    assert Arrivals(None).wait() == pytest.approx(time.time(), abs=0.5)  # closed loop: now
    with pytest.raises(ValueError):
        Arrivals(0.0)


def test_info_on_the_wire_and_prometheus_counters():
    from covspec.edge_runtime.metrics import render
    from covspec.tools.edge_probe import METRIC_LINE, edge_side
    from covspec.transport import protocol as wire

    reply = wire.InfoReply(seq=3, version="covspec-edge 0.1.0", protocol=1, fingerprint="ab" * 32, family="llava",
                           model="target", vocab_size=40)
    assert wire.decode(wire.encode(reply)) == reply and wire.decode(wire.encode(wire.Info(seq=2))) == wire.Info(seq=2)
    assert wire.decode(wire.encode(reply)).draft is None
    text = render({"batches": 3, "cpu_s": 1.5, "busy_s": 0.25, "requests.OPEN": 4})
    parsed = {m.group(1): float(m.group(2)) for m in map(METRIC_LINE.match, text.splitlines()) if m}
    assert parsed == {"batches": 3.0, "cpu_s": 1.5, "busy_s": 0.25}
    side = edge_side({"batches": 1, "batched_windows": 2, "busy_s": 0.0, "cpu_s": 1.0},
                     {"batches": 3, "batched_windows": 8, "busy_s": 1.0, "cpu_s": 3.0}, answers=4, span_s=2.0)
    assert side == {"edge_batches": 2, "windows_per_batch": 3.0, "edge_busy": 0.5, "edge_busy_ms_per_answer": 250.0,
                    "edge_cpu_ms_per_answer": 500.0}


def test_bench_config_is_where_the_flags_and_defaults_come_from():
    from dataclasses import fields

    from covspec.cli import build_parser
    from covspec.tools.bench_config import BenchConfig

    parsed = vars(build_parser().parse_args(["bench"]))
    for f in fields(BenchConfig):
        assert parsed[f.name] == getattr(BenchConfig(), f.name), f.name
    assert BenchConfig(modes="target_only,covspec").modes == ("target_only", "covspec")
    with pytest.raises(TypeError, match="unknown_flag"):
        import covspec

        covspec.bench(unknown_flag=1)
    source = Path(covspec.api.__file__).read_text() + Path(bench.__file__).read_text()
    assert "covspec.cli" not in source  # the library asks no parser for its defaults


def test_the_device_side_of_the_bench_imports_no_torch():
    """A torch-free device (a flashed Jetson with covspec[device,bench]) runs the bench against its edge."""
    code = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
            "import covspec.tools.bench, covspec.tools.load, covspec.tools.worker, covspec.tools.replay\n"
            "import covspec.tools.edge_probe, covspec.tools.prompts, covspec.device_runtime.client")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
