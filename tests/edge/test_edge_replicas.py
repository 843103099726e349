"""Three `covspec edge serve` replicas behind HAProxy (Debian's package, run with deploy/haproxy.cfg and
ports of the test's own), CURVE end to end through it: 6 devices x 5 answers spread over the replicas; one replica is killed
mid-answer (its devices' connections land on another replica, which reopens their sessions with the
tokens they have), another drains on SIGTERM (its open sessions finish, the next OPEN on one of its
connections is refused with DRAINING and the device connects again, to the third). Every answer equals
target-only greedy's. Slow: three edge processes and HAProxy (the fast drain tests: test_edge_drain.py)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tiny_models
from PIL import Image
from test_runtimes import png

from covspec.device_runtime.client import DeviceRuntime
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.tools.balancer import haproxy_config, server_states
from covspec.tools.procs import free_port
from covspec.transport.channel import generate_keys, load_client_keys

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "describe this image ."
N = 24  # tokens per answer
DEVICES, ANSWERS = 6, 5
MODES = ("covspec", "vanilla_sd", "target_only")
COVSPEC = [sys.executable, "-c", "import sys; from covspec.cli import main; sys.exit(main(sys.argv[1:]))"]


def haproxy() -> str:
    """The haproxy binary: installed from Debian's package when missing (as root with apt-get), else skip."""
    found = shutil.which("haproxy")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("HAProxy is not installed and this is not root with apt-get: `apt-get install haproxy` "
                    "(Debian's package) to run this test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "install", "-y", "-q", "haproxy"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "haproxy"]):
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=600)
        if step[1] == "install" and done.returncode == 0:
            break
    found = shutil.which("haproxy")
    if not found:
        pytest.skip(f"apt-get install haproxy failed: {done.stderr.strip()[-300:]}")
    return found


def health(address: str) -> dict:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=2) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())
    except OSError:
        return {"ready": False, "down": True}


class Replica:
    def __init__(self, target: Path, name: str, keys: Path) -> None:
        """A `covspec edge serve` process with CURVE: the edge key pair and the devices' keys in `keys`."""
        self.name, self.port, self.metrics = name, free_port(), f"127.0.0.1:{free_port()}"
        auth = ["--auth", "curve", "--key", str(keys / "edge" / "edge.key_secret"), "--allow", str(keys / "devices")]
        self.proc = subprocess.Popen([*COVSPEC, "edge", "serve", "--model", str(target), *auth,
                                      "--bind", f"tcp://127.0.0.1:{self.port}", "--metrics", self.metrics,
                                      "--threads", "1", "--drain-timeout", "60"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines = [self.proc.stdout.readline(), self.proc.stdout.readline()]
        assert "edge serving" in self.lines[0], self.lines

    def sessions(self) -> int:
        return int(health(self.metrics).get("sessions_open", 0))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    return tiny_models.build_llava(root / "target", seed=0), tiny_models.build_llava(root / "draft", seed=1)


def test_three_replicas_behind_haproxy_survive_a_kill_and_a_drain(models, tmp_path):
    target, draft = models
    binary = haproxy()
    images = [[png(d * ANSWERS + j) for j in range(ANSWERS)] for d in range(DEVICES)]
    adapter = load_adapter(target)
    expected = [[generate(adapter, Image.open(io.BytesIO(im)).convert("RGB"), PROMPT, max_new_tokens=N).ids
                 for im in row] for row in images]
    keys = tmp_path / "keys"  # CURVE end to end, device to replica: HAProxy passes the handshake through
    generate_keys(keys / "edge", "edge")
    for d in range(DEVICES):
        generate_keys(keys / "devices", f"device{d}")
    replicas = [Replica(target, f"edge{i + 1}", keys) for i in range(3)]
    front, stats = free_port(), tmp_path / "haproxy.sock"
    servers = [(r.name, r.port, int(r.metrics.rsplit(":", 1)[1])) for r in replicas]
    (tmp_path / "haproxy.cfg").write_text(haproxy_config((ROOT / "deploy" / "haproxy.cfg").read_text(), front,
                                                         servers, stats))
    assert subprocess.run([binary, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True).returncode == 0
    balancer = subprocess.Popen([binary, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    devices: list[DeviceRuntime] = []
    try:
        wait_for(lambda: stats.exists() and set(server_states(stats).values()) == {"UP"}, 30, "three replicas UP")
        answers: list[list] = [[] for _ in range(DEVICES)]
        failures: list[BaseException] = []
        devices = [DeviceRuntime(load_adapter(draft), f"tcp://127.0.0.1:{front}", timeout_s=2.0, retries=6,
                                 keys=load_client_keys(keys / "devices" / f"device{d}.key_secret",
                                                       keys / "edge" / "edge.key"))
                   for d in range(DEVICES)]

        def run(d: int) -> None:
            try:
                for j in range(ANSWERS):
                    answers[d].append(devices[d].answer(images[d][j], PROMPT, MODES[d % len(MODES)],
                                                        SamplingParams(), max_new_tokens=N, window=3))
            except BaseException as err:  # reported by the main thread
                failures.append(err)

        threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in range(DEVICES)]
        for t in threads:
            t.start()
        done = lambda: sum(len(a) for a in answers)  # noqa: E731
        busiest = lambda live: max(live, key=Replica.sessions)  # noqa: E731
        # 1. a replica killed mid-answer, once a round of answers is in
        wait_for(lambda: done() >= DEVICES or failures, 120, "the first answers")
        wait_for(lambda: any(r.sessions() for r in replicas), 30, "a replica mid-answer")
        killed = busiest(replicas)
        killed.proc.kill()
        killed_at = done()
        # 2. another replica drains on SIGTERM while it serves a session
        live = [r for r in replicas if r is not killed]
        wait_for(lambda: done() >= killed_at + DEVICES or failures, 120, "answers after the kill")
        wait_for(lambda: any(r.sessions() for r in live), 30, "a live replica mid-answer")
        drained = busiest(live)
        drained.proc.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        assert drained.proc.wait(60) == 0
        drain_s = time.monotonic() - sigterm
        tail = drained.proc.stdout.read()
        for t in threads:
            t.join(180)
        assert not failures, failures
        got = [[a.ids for a in row] for row in answers]
        assert got == expected, "an answer differs from target-only greedy's"
        flat = [a for row in answers for a in row]
        reopens, moves = sum(a.reopens for a in flat), sum(a.moves for a in flat)
        assert len(flat) == DEVICES * ANSWERS
        assert reopens >= 1, "no device reopened its session on another replica after the kill"
        assert moves >= 1, "no OPEN was refused with DRAINING (the drain path was not hit)"
        assert re.search(r"drained in [\d.]+ s, 0 unfinished", tail), tail
        survivor = next(r for r in live if r is not drained)
        states = server_states(stats)
        assert states[killed.name] == "DOWN" and states[drained.name] == "DOWN" and states[survivor.name] == "UP"
        print(f"30 answers, all = greedy; killed {killed.name} after {killed_at} answers ({reopens} reopen(s)); "
              f"drained {drained.name} in {drain_s:.2f} s ({moves} OPEN(s) refused, moved)")
    finally:
        for device in devices:
            device.close()
        balancer.kill()
        balancer.wait()
        for r in replicas:
            r.stop()
