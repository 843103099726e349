"""`covspec bench --devices 1,2,4,8`: N device processes against one edge, per mode.

    edge   : `covspec edge serve --threads 1 --batch-wait-ms W` (its own process)
    devices: N x `python -m covspec.bench --worker` (1 thread each), straight to the edge (no link)

The devices load their draft, then start together (a go file) and each asks `--prompts` held-out
prompts of its own in the mode. The devices run the real draft on the same machine as the edge: on
a small machine they compete with it for the cores (load generators replaying recorded windows are
not implemented). Reported per (mode, N): aggregate decode tokens/s (all tokens over the span from
the first request's start to the last one's end), per-device tokens/s (a device's tokens over its
own span; mean and min), request latency p50/p99 (one request = one answer), the edge's batched
passes in that run (STATS) and its peak RSS. Files: load.jsonl (one row per request), load.json
and load.md (the summary and the command).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def wait_for_go(go: Path, device: int, timeout_s: float = 600.0) -> None:
    """Worker side: says it is ready (go.ready.<device>), then waits for the go file."""
    Path(f"{go}.ready.{device}").touch()
    deadline = time.monotonic() + timeout_s
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no go signal ({go}) within {timeout_s:.0f} s")
        time.sleep(0.01)


def release(go: Path, n: int, procs: list[subprocess.Popen], timeout_s: float = 600.0) -> None:
    """Orchestrator side: once all n workers are ready, writes the go file."""
    deadline = time.monotonic() + timeout_s
    while sum(Path(f"{go}.ready.{i}").exists() for i in range(n)) < n:
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            raise RuntimeError("a device worker failed before starting (see its log)")
        time.sleep(0.05)
    go.touch()


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


def worker_command(args: argparse.Namespace, endpoint: str, mode: str, n: int, device: int,
                   rows: Path, go: Path) -> list[str]:
    command = [sys.executable, "-m", "covspec.bench", "--worker", "--draft", str(args.draft), "--edge", endpoint,
               "--link", f"{n}dev", "--modes", mode, "--prompts", str(args.prompts),
               "--start", str(args.start + device * args.prompts), "--max-new-tokens", str(args.max_new_tokens),
               "--window", str(args.window), "--temperature", str(args.temperature), "--top-k", str(args.top_k),
               "--top-p", str(args.top_p), "--rows", str(rows), "--device", str(device), "--go", str(go)]
    return command + (["--seed", str(args.seed)] if args.seed is not None else [])


def run_devices(args: argparse.Namespace, out: Path, endpoint: str, mode: str, n: int) -> list[dict]:
    """N device workers in `mode`, started together; their rows."""
    from covspec.bench import one_thread_env

    tag = f"{mode.replace('@', '-')}-{n}"
    go = out / f"go-{tag}"
    files = [out / f"rows-{tag}-{i}.jsonl" for i in range(n)]
    for path in [go, *files, *(Path(f"{go}.ready.{i}") for i in range(n))]:
        path.unlink(missing_ok=True)
    log = open(out / f"devices-{tag}.log", "w")
    procs = [subprocess.Popen(worker_command(args, endpoint, mode, n, i, files[i], go), env=one_thread_env(),
                              stdout=log, stderr=subprocess.STDOUT) for i in range(n)]
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


def summarise_load(rows: list[dict], mode: str, n: int, batches: dict[str, float], rss_mb: float | None) -> dict:
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
            "edge_peak_rss_mb": rss_mb}


def write_load(out: Path, summary: list[dict], args: argparse.Namespace) -> None:
    (out / "load.json").write_text(json.dumps({"summary": summary, "command": args.command_line}, indent=1))
    lines = ["# covspec bench --devices", "", f"Command: `{args.command_line}`", "",
             f"Edge: 1 thread, batch_wait_ms {args.batch_wait_ms}. Devices: separate processes running the real "
             "draft (1 thread each) on the same machine, straight to the edge. A request is one answer; tokens/s "
             "counts every answer token (aggregate: over the span of all requests; per device: over its own).", "",
             "| mode | devices | requests | aggregate tok/s | per-device tok/s (mean / min) | latency p50 ms | "
             "latency p99 ms | edge batches | windows per batch | edge peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        rss = "" if s["edge_peak_rss_mb"] is None else f"{s['edge_peak_rss_mb']:.0f}"
        lines.append(f"| {s['mode']} | {s['devices']} | {s['requests']} | {s['aggregate_tps']:.1f} | "
                     f"{s['device_tps_mean']:.1f} / {s['device_tps_min']:.1f} | {s['latency_p50_ms']:.0f} | "
                     f"{s['latency_p99_ms']:.0f} | {s['edge_batches']} | {s['windows_per_batch']:.2f} | {rss} |")
    (out / "load.md").write_text("\n".join(lines) + "\n")


def run_load(args: argparse.Namespace) -> Path:
    from covspec.bench import free_port, one_thread_env, wait_for_edge

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in str(args.devices).split(",")]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    edge = subprocess.Popen([sys.executable, "-m", "covspec.cli", "edge", "serve", "--model", str(args.target),
                             "--bind", endpoint, "--threads", "1", "--auth", "none", "--max-sessions-per-device", "64",
                             "--batch-wait-ms", str(args.batch_wait_ms)], env=one_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=open(out / "edge.log", "w"))
    summary, all_rows = [], []
    try:
        wait_for_edge(endpoint)
        for mode in args.modes.split(","):
            for n in counts:
                before = edge_stats(endpoint)
                rows = run_devices(args, out, endpoint, mode, n)
                after = edge_stats(endpoint)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("batches", "batched_windows")}
                summary.append(summarise_load(rows, mode, n, delta, edge_peak_rss_mb(edge.pid)))
                all_rows += rows
                s = summary[-1]
                print(f"{mode:14s} {n:3d} devices: {s['aggregate_tps']:7.1f} tok/s in all, p99 "
                      f"{s['latency_p99_ms']:.0f} ms, {s['edge_batches']} batches", flush=True)
    finally:
        edge.send_signal(signal.SIGINT)
        try:
            edge.wait(timeout=30)
        except subprocess.TimeoutExpired:
            edge.kill()
    (out / "load.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    write_load(out, summary, args)
    print((out / "load.md").read_text())
    return out
