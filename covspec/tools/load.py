"""`covspec bench --devices 1,2,4,8`: N device processes against one edge, per mode.

    edge   : `covspec edge serve --threads 1 --batch-wait-ms W` (its own process)
    devices: N x `python -m covspec.tools.worker SETTINGS.json` (1 thread each), straight to the edge, or each
             through the `--load-link` emulator profile

The devices load their draft, then start together (a go file) and each asks `--prompts` held-out
prompts of its own in the mode. Real devices run the draft on the same machine as the edge: on a
small machine they compete with it for the cores. With `--replay` the devices are load generators,
as servers are load-tested: one real device first answers every device's prompts in every mode
(a recording pass, recorded.msgpack: each request's messages and the edge's replies), then each device
replays its requests' messages (OPEN, the drafted VERIFY windows, STREAM, CLOSE) under a fresh
session id, waiting for every reply as the device did and, before each message, for the time the
recording device spent on its own work before sending it (drafting, pruning, prefill), with no draft
running; the edge does all of its real work, and each replayed request checks that the edge's
replies equal the recorded ones (`replay_matches`). Reported per (mode, N): aggregate decode tokens/s (all tokens over the span from
the first request's start to the last one's end), per-device tokens/s (a device's tokens over its
own span; mean and min), request latency p50/p99 (one request = one answer), the edge's batched
passes in that run (STATS) and its peak RSS. Files: load.jsonl (one row per request), load.json
and load.md (the summary and the command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from covspec.tools.procs import process_cpu_s
from covspec.tools.replay import release
from covspec.tools.worker import WorkerSettings


def edge_peak_rss_mb(pid: int) -> float | None:
    """The edge process's peak resident set (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def edge_stats(endpoint: str) -> dict[str, float]:
    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client

    with Client(endpoint, timeout_s=30.0, retries=1) as client:
        return dict(client.request(wire.Stats()).counters)


def worker_settings(args: argparse.Namespace, endpoint: str, mode: str, n: int, device: int,
                    rows: Path, go: Path) -> WorkerSettings:
    """Device `device` of `n` in `mode`: its own --prompts prompts, after those of the devices before it."""
    return WorkerSettings.from_bench(
        args, edge=endpoint, link=f"{n}dev", modes=(mode,), start=args.start + device * args.prompts, rows=str(rows),
        device=device, go=str(go), replay_file=str(recording(Path(args.out), n)) if args.replay else None)


def offered(n: int) -> bool:
    """Whether the edge offers to draft for N devices: at most `EdgeSettings.draft_sessions` unfinished
    sessions (edge_runtime.drafting)."""
    from covspec.edge_runtime.settings import EdgeSettings

    return n <= EdgeSettings().draft_sessions


def recording(out: Path, n: int) -> Path:
    """The recorded run N devices replay: while the edge offers to draft for them (`offered`) covspec may
    hand drafting over; past that the edge declines, so those replay a recording whose device drafted
    every window itself."""
    return out / ("recorded.msgpack" if offered(n) else "recorded-loaded.msgpack")


def run_devices(args: argparse.Namespace, out: Path, endpoint: str, mode: str, n: int) -> list[dict]:
    """N device workers in `mode`, started together; their rows."""
    from covspec.tools.procs import one_thread_env

    tag = f"{mode.replace('@', '-')}-{n}"
    go = out / f"go-{tag}"
    files = [out / f"rows-{tag}-{i}.jsonl" for i in range(n)]
    for path in [go, *files, *(Path(f"{go}.ready.{i}") for i in range(n))]:
        path.unlink(missing_ok=True)
    log = open(out / f"devices-{tag}.log", "w")
    commands = [worker_settings(args, endpoint, mode, n, i, files[i], go).save(out / f"worker-{tag}-{i}.json")
                for i in range(n)]
    procs = [subprocess.Popen(command, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT)
             for command in commands]
    try:
        release(go, n, procs)
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a device worker failed (see {log.name})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        log.close()
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def summarise_load(rows: list[dict], mode: str, n: int, batches: dict[str, float], rss_mb: float | None,
                   edge_cpu_s: float | None = None) -> dict:
    """`edge_cpu_s`: the CPU time the edge process used while these requests ran. Per request, it is
    what one answer costs the edge; over the span, how busy the edge was (1.0: a one-thread edge
    saturated, and the aggregate cannot grow with more devices)."""
    tokens = sum(r["tokens"] for r in rows)
    span = max(r["t_end"] for r in rows) - min(r["t_start"] for r in rows)
    per_device = []
    for device in sorted({r["device"] for r in rows}):
        mine = [r for r in rows if r["device"] == device]
        own = max(r["t_end"] for r in mine) - min(r["t_start"] for r in mine)
        per_device.append(sum(r["tokens"] for r in mine) / max(own, 1e-9))
    latency = np.array([r["latency_s"] for r in rows]) * 1000
    windows = batches.get("batched_windows", 0)
    return {"mode": mode, "devices": n, "requests": len(rows), "tokens": tokens,
            "aggregate_tps": tokens / max(span, 1e-9), "device_tps_mean": float(np.mean(per_device)),
            "device_tps_min": float(np.min(per_device)), "latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p99_ms": float(np.percentile(latency, 99)), "edge_batches": int(batches.get("batches", 0)),
            "windows_per_batch": windows / batches["batches"] if batches.get("batches") else 0.0,
            "edge_peak_rss_mb": rss_mb,
            "edge_cpu_ms_per_request": None if edge_cpu_s is None else 1000 * edge_cpu_s / max(len(rows), 1),
            "edge_busy": None if edge_cpu_s is None else edge_cpu_s / max(span, 1e-9),
            "replay_matches": None if "replay_matches" not in rows[0] else sum(r["replay_matches"] for r in rows)}


def write_load(out: Path, summary: list[dict], args: argparse.Namespace) -> None:
    (out / "load.json").write_text(json.dumps({"summary": summary, "command": args.command_line}, indent=1))
    lines = ["# covspec bench --devices", "", f"Command: `{args.command_line}`", "",
             f"Edge: {args.edge_threads} thread{'s' if args.edge_threads > 1 else ''}, batch_wait_ms {args.batch_wait_ms}. Devices: "
             + ("load generators replaying the messages of a recorded real run, each message after the time the "
                "recording device spent on its own work before it (no draft running); `replayed equal` counts "
                "requests whose edge replies equal the recorded ones. "
                if args.replay else "separate processes running the real draft (1 thread each) on the same "
                "machine. ")
             + (f"Link: each device's connection through the `{args.load_link}` emulator (recording included). "
                if args.load_link != "loopback" else "Link: none, straight to the edge. ")
             + "A request is one answer; tokens/s counts every answer token (aggregate: over the span of all "
             "requests; per device: over its own).", "",
             "| mode | devices | requests | aggregate tok/s | per-device tok/s (mean / min) | latency p50 ms | "
             "latency p99 ms | edge batches | windows per batch | edge CPU ms per request | edge busy | "
             "edge peak RSS MiB | replayed equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        rss = "" if s["edge_peak_rss_mb"] is None else f"{s['edge_peak_rss_mb']:.0f}"
        equal = "" if s["replay_matches"] is None else f"{s['replay_matches']}/{s['requests']}"
        cpu = "" if s.get("edge_cpu_ms_per_request") is None else f"{s['edge_cpu_ms_per_request']:.1f}"
        busy = "" if s.get("edge_busy") is None else f"{s['edge_busy']:.2f}"
        lines.append(f"| {s['mode']} | {s['devices']} | {s['requests']} | {s['aggregate_tps']:.1f} | "
                     f"{s['device_tps_mean']:.1f} / {s['device_tps_min']:.1f} | {s['latency_p50_ms']:.0f} | "
                     f"{s['latency_p99_ms']:.0f} | {s['edge_batches']} | {s['windows_per_batch']:.2f} | {cpu} | "
                     f"{busy} | {rss} | {equal} |")
    (out / "load.md").write_text("\n".join(lines) + "\n")
    plot_load(out, summary)


def plot_load(out: Path, summary: list[dict]) -> None:
    """aggregate_tps.png: aggregate tokens/s by number of devices, a line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(s["mode"] for s in summary):
        points = sorted((s["devices"], s["aggregate_tps"]) for s in summary if s["mode"] == mode)
        ax.plot([n for n, _ in points], [t for _, t in points], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Aggregate throughput by number of devices")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "aggregate_tps.png", dpi=120)
    plt.close(fig)


def record(args: argparse.Namespace, out: Path, endpoint: str, devices: int) -> None:
    """The recording pass: one real device answers the prompts of `devices` devices in every mode (past
    what the edge offers to draft for, as on a loaded edge: no hand-over of drafting)."""
    from covspec.tools.procs import one_thread_env

    recorded = recording(out, devices)
    recorded.unlink(missing_ok=True)
    rows = out / f"{recorded.stem}.jsonl"
    rows.unlink(missing_ok=True)
    settings = WorkerSettings.from_bench(args, edge=endpoint, link="recording", prompts=devices * args.prompts,
                                         rows=str(rows), record=str(recorded), hand_over=offered(devices))
    command = settings.save(out / f"worker-{recorded.stem}.json")
    with open(out / f"{recorded.stem}.log", "w") as log:
        subprocess.run(command, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT, check=True)


def run_load(args: argparse.Namespace) -> Path:
    from covspec.tools.procs import (
        edge_draft_options,
        free_port,
        start_edge,
        start_link,
        stop_edge,
        stop_link,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in str(args.devices).split(",")]
    edge_port = free_port()
    endpoint = f"tcp://127.0.0.1:{edge_port}"
    edge = start_edge(args.target, endpoint, out / "edge.log", "--max-sessions-per-device", "64",
                      "--batch-wait-ms", str(args.batch_wait_ms), "--device", getattr(args, "edge_device", "cpu"),
                      "--dtype", getattr(args, "edge_dtype", "float32"), *edge_draft_options(args),
                      threads=args.edge_threads)
    summary, all_rows = [], []
    link = None
    try:
        devices_endpoint = endpoint  # loopback: the devices talk to the edge straight
        if args.load_link != "loopback":  # each device's connection through the emulated link
            link, devices_endpoint = start_link(args.load_link, edge_port)
        if args.replay:  # one recording for devices the edge drafts for, one for devices on a loaded edge
            for group in ([n for n in counts if offered(n)], [n for n in counts if not offered(n)]):
                if group:
                    record(args, out, devices_endpoint, max(group))
        for mode in args.modes:
            for n in counts:
                before, cpu_before = edge_stats(endpoint), process_cpu_s(edge.pid)
                rows = run_devices(args, out, devices_endpoint, mode, n)
                cpu_after, after = process_cpu_s(edge.pid), edge_stats(endpoint)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("batches", "batched_windows")}
                cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
                summary.append(summarise_load(rows, mode, n, delta, edge_peak_rss_mb(edge.pid), cpu))
                all_rows += rows
                s = summary[-1]
                print(f"{mode:14s} {n:3d} devices: {s['aggregate_tps']:7.1f} tok/s in all, p99 "
                      f"{s['latency_p99_ms']:.0f} ms, {s['edge_batches']} batches", flush=True)
    finally:
        if link is not None:
            stop_link(link)
        stop_edge(edge)
    (out / "load.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    write_load(out, summary, args)
    print((out / "load.md").read_text())
    return out
