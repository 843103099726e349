"""Measures what a replica going away costs devices behind HAProxy, with the demo pair: two `covspec
edge serve` replicas behind deploy/haproxy.cfg (ports of its own), 4 devices connected to replica 1
(replica 2 held in maintenance until then), each answering describe questions back to back. Once
replica 1 holds 4 open sessions it is stopped, either drained (SIGTERM) or killed (SIGKILL), and
replica 2 is let in. Written: how long the drained edge took to exit, whether every answer that was
open at the signal finished (and where), how many OPENs were refused DRAINING and moved, the
latency of the answers open at the signal against the others, and whether every answer equals
target-only greedy's.

    python scripts/measure_drain.py --out results/drain/drain.json
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from covspec.demo import default_draft_path, default_target_path
from covspec.demo.task import make_item
from covspec.device_runtime.client import DeviceRuntime
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.tools.balancer import haproxy_admin, haproxy_config
from covspec.tools.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
COVSPEC = [sys.executable, "-c", "import sys; from covspec.cli import main; sys.exit(main(sys.argv[1:]))"]
PROMPT = "describe the image ."
DEVICES = 4


def sessions(metrics: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{metrics}/readyz", timeout=2) as reply:
            return int(json.loads(reply.read()).get("sessions_open", 0))
    except urllib.error.HTTPError as err:
        return int(json.loads(err.read()).get("sessions_open", 0))
    except OSError:
        return 0


def start_replica(name: str) -> dict:
    port, metrics = free_port(), f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([*COVSPEC, "edge", "serve", "--model", str(default_target_path()), "--auth", "none",
                             "--bind", f"tcp://127.0.0.1:{port}", "--metrics", metrics, "--threads", "1",
                             "--drain-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    assert "edge serving" in lines[0], lines
    return {"name": name, "port": port, "metrics": metrics, "proc": proc}


def scenario(how: str, items: list, expected: dict, timeout_s: float, tmp: Path) -> dict:
    """Replica 1 stopped by `how` ("drain": SIGTERM, "kill": SIGKILL) with 4 sessions open on it."""
    replicas = [start_replica("edge1"), start_replica("edge2")]
    front, admin = free_port(), tmp / f"haproxy-{how}.sock"
    servers = [(r["name"], r["port"], int(r["metrics"].rsplit(":", 1)[1])) for r in replicas]
    (tmp / f"haproxy-{how}.cfg").write_text(haproxy_config((ROOT / "deploy" / "haproxy.cfg").read_text(), front,
                                                           servers, admin))
    balancer = subprocess.Popen(["haproxy", "-db", "-f", str(tmp / f"haproxy-{how}.cfg")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    draft = load_adapter(default_draft_path())
    devices: list[DeviceRuntime] = []
    try:
        while not admin.exists():
            time.sleep(0.05)
        time.sleep(1.5)  # both checked UP
        haproxy_admin(admin, "disable server covspec_replicas/edge2")  # the 4 connections go to edge1
        devices = [DeviceRuntime(draft, f"tcp://127.0.0.1:{front}", timeout_s=timeout_s, retries=4)
                   for _ in range(DEVICES)]
        stopped = threading.Event()
        t0: list[float] = []
        records: list[dict] = []

        def run(d: int) -> None:
            k = d
            while True:
                item = items[k % len(items)]
                start = time.monotonic()
                answer = devices[d].answer(item[0], PROMPT, "covspec", SamplingParams(), max_new_tokens=64)
                end = time.monotonic()
                records.append({"device": d, "item": k % len(items), "start": start, "end": end,
                                "latency_s": answer.latency_s, "reopens": answer.reopens, "moves": answer.moves,
                                "equal": answer.ids == expected[k % len(items)]})
                k += DEVICES
                if stopped.is_set() and start > t0[0]:
                    return  # one answer begun after the signal: done

        threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in range(DEVICES)]
        for t in threads:
            t.start()
        while sessions(replicas[0]["metrics"]) < DEVICES:
            time.sleep(0.002)
        haproxy_admin(admin, "enable server covspec_replicas/edge2")
        t0.append(time.monotonic())
        victim = replicas[0]["proc"]
        victim.send_signal(signal.SIGTERM if how == "drain" else signal.SIGKILL)
        stopped.set()
        rc = victim.wait(120)
        exit_s = time.monotonic() - t0[0]
        tail = victim.stdout.read() if how == "drain" else ""
        for t in threads:
            t.join(300)
        open_at_signal = [r for r in records if r["start"] < t0[0] < r["end"]]
        before = [r["latency_s"] for r in records if r["end"] < t0[0]]
        after = [r for r in records if r["start"] > t0[0]]
        return {
            "stop": "SIGTERM (drain)" if how == "drain" else "SIGKILL",
            "sessions_open_at_signal": len(open_at_signal),
            "exit_s": round(exit_s, 3), "exit_code": rc, "edge_said": tail.strip().splitlines()[-1:] if tail else [],
            "last_open_answer_done_s": round(max(r["end"] for r in open_at_signal) - t0[0], 3),
            "open_answers_reopened": sum(r["reopens"] for r in open_at_signal),
            "open_answers_latency_s": [round(r["latency_s"], 3) for r in open_at_signal],
            "latency_before_signal_median_s": round(statistics.median(before), 3) if before else None,
            "answers_after_signal": len(after), "opens_moved_after_draining": sum(r["moves"] for r in records),
            "answers_after_signal_latency_s": [round(r["latency_s"], 3) for r in after],
            "answers": len(records), "all_equal_greedy": all(r["equal"] for r in records),
            "lost": DEVICES - len(open_at_signal) if len(open_at_signal) < DEVICES else 0,
        }
    finally:
        for device in devices:
            device.close()
        balancer.kill()
        balancer.wait()
        for r in replicas:
            if r["proc"].poll() is None:
                r["proc"].kill()
            r["proc"].wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/drain/drain.json"))
    parser.add_argument("--timeout", type=float, default=30.0, help="the devices' reply timeout (covspec device run's default)")
    args = parser.parse_args()
    if shutil.which("haproxy") is None:
        print("needs haproxy: apt-get install haproxy", file=sys.stderr)
        return 2
    items = []
    for i in range(16):
        item = make_item("heldout", i, 0, qtype="describe")
        buf = io.BytesIO()
        item.image.save(buf, format="PNG")
        items.append((buf.getvalue(),))
    target = load_adapter(default_target_path())
    from PIL import Image

    expected = {i: generate(target, Image.open(io.BytesIO(png)).convert("RGB"), PROMPT, max_new_tokens=64).ids
                for i, (png,) in enumerate(items)}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {how: scenario(how, items, expected, args.timeout, Path(tmp)) for how in ("drain", "kill")}
    out = {"command": "python scripts/measure_drain.py --out " + str(args.out) +
           ("" if args.timeout == 30.0 else f" --timeout {args.timeout:g}"),
           "setup": "demo pair, 2 replicas (--threads 1) behind HAProxy (deploy/haproxy.cfg), 4 devices (covspec mode, "
                    "describe, 64 tokens max) on replica 1, all on this 2-core machine shared with other work",
           "device_timeout_s": args.timeout, **runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
