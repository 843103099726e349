"""Link emulator: RTT and throughput within 15% of the profile, byte counts exact, CLI writes its stats."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from covspec.transport.link import PROFILES, Link, get_profile, measure_link


@pytest.mark.parametrize("prof", [PROFILES["wifi"], PROFILES["4g"], get_profile("custom", rtt_ms=40, up_mbit=3, down_mbit=30)],
                         ids=lambda p: p.name)
def test_rtt_and_throughput_within_15_percent(prof) -> None:
    m = measure_link(prof, pings=8, transfer_s=0.3)
    assert abs(m["rtt_ms"] / prof.rtt_ms - 1) < 0.15, m
    assert abs(m["up_mbit"] / prof.up_mbit - 1) < 0.15, m
    assert abs(m["down_mbit"] / prof.down_mbit - 1) < 0.15, m


def test_profiles() -> None:
    assert get_profile("5g") == PROFILES["5g"] and PROFILES["5g"].down_mbit == 50 and PROFILES["5g"].up_mbit == 20
    assert get_profile("4g", rtt_ms=100).rtt_ms == 100 and get_profile("4g", rtt_ms=100).up_mbit == 5
    with pytest.raises(ValueError, match="unknown link profile"):
        get_profile("dialup")
    with pytest.raises(ValueError, match="up_mbit"):
        get_profile("custom", up_mbit=0)


def _echo(s: socket.socket) -> None:
    with s:
        while data := s.recv(65536):
            s.sendall(data)


def _echo_server() -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                s, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(s,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.parametrize("profile", ["loopback", "wifi"])
def test_byte_counts_exact(profile: str) -> None:
    srv = _echo_server()
    sizes = [1, 100, 70000, 3, 250000]
    with Link(srv.getsockname()[:2], profile) as link:
        for _ in range(2):  # two connections share the counters
            with socket.create_connection(link.address) as c:
                for n in sizes:
                    c.sendall(b"z" * n)
                    got = 0
                    while got < n:
                        got += len(c.recv(1 << 20))
        total = 2 * sum(sizes)
        deadline = time.monotonic() + 2
        while link.stats()["bytes_down"] < total and time.monotonic() < deadline:
            time.sleep(0.01)
        s = link.stats()
    srv.close()
    assert (s["bytes_up"], s["bytes_down"], s["connections"]) == (total, total, 2)


def test_upstream_down_closes_client() -> None:
    free = socket.create_server(("127.0.0.1", 0))
    addr = free.getsockname()[:2]
    free.close()
    with Link(addr, "wifi") as link, socket.create_connection(link.address) as c:
        c.settimeout(2)
        assert c.recv(10) == b""  # closed, not hung


def test_cli_writes_stats(tmp_path) -> None:
    srv = _echo_server()
    out = tmp_path / "stats.json"
    host, port = srv.getsockname()[:2]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys; from covspec.transport.link import main; sys.exit(main(sys.argv[1:]))",
         "--upstream", f"{host}:{port}", "--profile", "custom", "--rtt-ms", "4", "--stats-json", str(out)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("link 127.0.0.1:"), line
        lport = int(line.split()[1].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", lport)) as c:
            c.sendall(b"hello")
            assert c.recv(5) == b"hello"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(5)
    srv.close()
    stats = json.loads(out.read_text())
    assert p.returncode == 0 and stats["bytes_up"] == 5 and stats["bytes_down"] == 5 and stats["rtt_ms"] == 4


def test_cli_stops_on_a_burst_of_signals() -> None:
    """SIGTERMs arriving back to back (a shell's `kill %2` and its exit trap) stop the link: a
    handler that set a threading.Event could deadlock inside the main thread's wait on it."""
    srv = _echo_server()
    host, port = srv.getsockname()[:2]
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys; from covspec.transport.link import main; sys.exit(main(sys.argv[1:]))",
         "--upstream", f"{host}:{port}", "--profile", "4g", "--stats-interval", "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert p.stdout.readline().startswith("link 127.0.0.1:")
        for _ in range(50):
            p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        srv.close()
