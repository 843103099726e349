"""An edge told to stop (SIGTERM) drains: its open sessions finish, a new OPEN is refused with
DRAINING (the device connects again and lands on another edge), /readyz turns 503 while /healthz
stays 200, and the process exits once the sessions are done. The slow test with HAProxy and three
replicas is tests/edge/test_edge_replicas.py."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tiny_models
from PIL import Image
from test_runtimes import RunningEdge, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.edge_runtime.metrics import MetricsServer
from covspec.edge_runtime.server import EdgeServer
from covspec.edge_runtime.settings import EdgeSettings
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import Client, RemoteError

PROMPT = "describe this image ."
N = 12
COVSPEC = [sys.executable, "-c", "import sys; from covspec.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("drain")
    return tiny_models.build_llava(root / "target", seed=0), tiny_models.build_llava(root / "draft", seed=1)


def reference(target, image: bytes, n: int = N) -> list[int]:
    return generate(load_adapter(target), Image.open(io.BytesIO(image)).convert("RGB"), PROMPT, max_new_tokens=n).ids


def probe(address: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def open_session(client: Client, sid: int, image: bytes) -> wire.Opened:
    opened = client.request(wire.Open(sid=sid, image=image, prompt=PROMPT, mode="vanilla_sd", max_new_tokens=N))
    assert isinstance(opened, wire.Opened)
    return opened


def finish(client: Client, sid: int, known: list[int]) -> list[int]:
    """The rest of an open session's answer after the `known` tokens (STREAM), then CLOSE: the whole answer."""
    sent = client.send(wire.Stream(sid=sid, chunk=4))
    tokens = list(known)
    while True:
        chunk = client.recv(sent.seq, timeout_s=20)
        assert isinstance(chunk, wire.Streamed), chunk
        tokens += [int(t) for t in chunk.tokens]
        if chunk.done:
            break
    assert isinstance(client.request(wire.Close(sid=sid)), wire.Closed)
    return tokens


def test_health_probes_and_drain_in_process(models):
    """/healthz and /readyz before and while draining; open sessions served to the end, a new OPEN
    refused with DRAINING (a repeated OPEN of an open session still answered), the loop returns."""
    target, _ = models
    server = EdgeServer(load_adapter(target), EdgeSettings(bind="tcp://127.0.0.1:*", drain_timeout_s=30))
    metrics = MetricsServer("127.0.0.1:0", server.stats, health=server.health)
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    try:
        assert probe(metrics.address, "/healthz")[0] == 200
        status, body = probe(metrics.address, "/readyz")
        assert status == 200 and body["ready"] and body["draining_s"] is None
        images = [png(i) for i in range(2)]
        with Client(server.endpoint, timeout_s=20, retries=0) as client:
            first = open_session(client, 1, images[0])
            retried_open = wire.Open(sid=2, image=images[1], prompt=PROMPT, mode="vanilla_sd", max_new_tokens=N)
            second = client.request(retried_open)
            server.drain()
            status, body = probe(metrics.address, "/readyz")
            assert status == 503 and not body["ready"] and body["draining_s"] >= 0 and body["sessions_open"] == 2
            assert probe(metrics.address, "/healthz")[0] == 200  # alive: not to be restarted, only not sent new work
            with pytest.raises(RemoteError) as refused:
                client.request(wire.Open(sid=3, image=images[0], prompt=PROMPT, mode="vanilla_sd", max_new_tokens=N))
            assert refused.value.code == wire.ErrorCode.DRAINING and "another edge" in refused.value.message
            # the same OPEN again (a retry: same sid and seq) of an open session is answered as before
            sock = client._sock
            sock.send(wire.Open(sid=2, seq=second.seq, image=images[1], prompt=PROMPT, mode="vanilla_sd",
                                max_new_tokens=N))
            again = client.recv(second.seq, timeout_s=20)
            assert again == second
            # the open sessions go on: a VERIFY round, then the rest streamed
            drafted = [first.token, 3]
            result = client.request(wire.Verify(sid=1, round=0, tokens=np.array(drafted, np.int32)))
            assert isinstance(result, wire.Result)
            known = [first.token, *drafted[:result.accepted], result.token]
            answers = [finish(client, 1, known), finish(client, 2, [second.token])]
        loop.join(10)
        assert not loop.is_alive(), "a drained edge's loop must return"
        assert [a[:N] for a in answers] == [reference(target, image) for image in images]
        assert server.stats()["errors.DRAINING"] == 1
    finally:
        server.drain()
        loop.join(10)
        metrics.close()
        server.close()


def test_drain_timeout_ends_the_loop_with_a_session_left(models):
    target, _ = models
    server = EdgeServer(load_adapter(target), EdgeSettings(bind="tcp://127.0.0.1:*", drain_timeout_s=0.3))
    try:
        with Client(server.endpoint, timeout_s=20, retries=0) as client:
            loop = threading.Thread(target=server.serve_forever, daemon=True)
            loop.start()
            open_session(client, 5, png(3))  # a device that never finishes
            server.drain()
            loop.join(10)
        assert not loop.is_alive() and len(server.sessions) == 1
    finally:
        server.close()


class RoundRobin:
    """Each new TCP connection to `address` piped to the next backend in turn: a stand-in for a balancer
    in the default run (tests/edge/test_edge_replicas.py runs HAProxy)."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = [tuple(b.removeprefix("tcp://").rsplit(":", 1)) for b in backends]
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.turn = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                front, _ = self.server.accept()
            except OSError:
                return
            host, port = self.backends[self.turn % len(self.backends)]
            self.turn += 1
            back = socket.create_connection((host, int(port)))
            for a, b in ((front, back), (back, front)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_device_moves_to_another_edge_on_draining(models):
    """A device's connection lands on edge A; A drains; the device's next OPEN gets DRAINING, it
    connects again at once (the balancer sends the new connection to B) and its answer is unchanged."""
    target, draft = models
    a, b = RunningEdge(target), RunningEdge(target)
    balancer = RoundRobin([a.endpoint, b.endpoint])
    device = DeviceRuntime(load_adapter(draft), balancer.endpoint, timeout_s=20, retries=0)
    try:
        greedy = SamplingParams()
        before = device.answer(png(1), PROMPT, "covspec", greedy, max_new_tokens=N)
        assert before.moves == 0 and a.server.stats()["sessions_opened"] == 1  # the first connection went to A
        a.server.drain()
        answers = [device.answer(png(i), PROMPT, mode, greedy, max_new_tokens=N)
                   for i, mode in ((2, "covspec"), (3, "target_only"))]
        assert [x.moves for x in answers] == [1, 0]
        assert [x.ids for x in answers] == [reference(target, png(2)), reference(target, png(3))]
        assert a.server.stats()["errors.DRAINING"] == 1 and b.server.stats()["sessions_opened"] == 2
    finally:
        device.close()
        balancer.close()
        a.close()
        b.close()


def test_sigterm_drains_the_cli_edge(models):
    """`covspec edge serve` gets SIGTERM with 4 sessions open: /readyz 503, a new OPEN refused with
    DRAINING, the 4 finish with target-only greedy's answers, and the process exits 0 by itself."""
    target, _ = models
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*COVSPEC, "edge", "serve", "--model", str(target), "--auth", "none",
                             "--bind", "tcp://127.0.0.1:*", "--metrics", "127.0.0.1:0", "--threads", "1",
                             "--drain-timeout", "60"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        endpoint = re.search(r" on (tcp://\S+)", lines[0]).group(1)
        metrics = re.search(r"http://(\S+)/metrics", lines[1]).group(1)
        assert probe(metrics, "/readyz")[0] == 200
        images = [png(10 + i) for i in range(4)]
        with Client(endpoint, timeout_s=20, retries=0) as client:
            opened = [open_session(client, 100 + i, image) for i, image in enumerate(images)]
            proc.send_signal(signal.SIGTERM)
            assert "draining" in proc.stdout.readline()
            assert probe(metrics, "/readyz")[0] == 503
            with pytest.raises(RemoteError) as refused:
                open_session(client, 200, images[0])
            assert refused.value.code == wire.ErrorCode.DRAINING
            answers = [finish(client, 100 + i, [o.token]) for i, o in enumerate(opened)]
            closed = time.monotonic()
        assert proc.wait(20) == 0
        exited_s = time.monotonic() - closed
        assert "edge drained in" in proc.stdout.read()
        assert [x[:N] for x in answers] == [reference(target, image) for image in images]
        assert exited_s < 10, f"exited {exited_s:.1f} s after the last CLOSE"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
