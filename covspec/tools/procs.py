"""Process helpers the tools share: free ports, one-thread environments, starting and stopping an
edge (`covspec edge serve`) and a link emulator (`covspec link`) as separate processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds a process has used so far (user + system, all its threads); None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def stop_edge(edge: subprocess.Popen) -> None:
    """Stops an edge process as Ctrl-C would, killing it if it does not exit within 30 s."""
    edge.send_signal(signal.SIGINT)
    try:
        edge.wait(timeout=30)
    except subprocess.TimeoutExpired:
        edge.kill()


def wait_for_edge(endpoint: str, timeout_s: float = 120.0, keys=None) -> None:
    """Returns once the edge at `endpoint` answers a PING (`keys`: the device's CURVE keys, ClientKeys)."""
    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client, HandshakeRefused, PeerUnavailable

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with Client(endpoint, timeout_s=1.0, retries=0, keys=keys) as client:
                if isinstance(client.request(wire.Ping(t=0.0)), wire.Pong):
                    return
        except HandshakeRefused:
            raise
        except PeerUnavailable:
            continue
    raise RuntimeError(f"the edge at {endpoint} did not answer within {timeout_s:.0f} s")


def edge_draft_options(args) -> list[str]:
    """`covspec edge serve --draft` for a bench whose modes draft on the edge (edge_sd, and the covspec
    modes that may hand drafting over): `--edge-draft PATH`, else the devices' draft; none for
    `--edge-draft none` or modes that never draft there."""
    from covspec.modes import MODE_OPTIONS, split_label

    path = getattr(args, "edge_draft", None) or args.draft
    modes = [split_label(label)[0] for label in args.modes]
    if path == "none" or not any(m == "edge_sd" or (m in MODE_OPTIONS and MODE_OPTIONS[m].placement) for m in modes):
        return []
    return ["--draft", str(path)]


def start_edge(model: str | Path, endpoint: str, log: Path, *options: str, threads: int = 1) -> subprocess.Popen:
    """`covspec edge serve` on `model` at `endpoint` (`threads` torch threads, no authentication),
    its output in `log`; returns once it answers a PING."""
    edge = subprocess.Popen([sys.executable, "-m", "covspec.cli", "edge", "serve", "--model", str(model),
                             "--bind", endpoint, "--threads", str(threads), "--auth", "none", *options],
                            env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        wait_for_edge(endpoint)
    except BaseException:
        stop_edge(edge)
        raise
    return edge


def start_link(profile: str, upstream: int | str, stats_file: Path | None = None,
               keys=None) -> tuple[subprocess.Popen, str]:
    """A link emulator process on this machine in front of the edge at `upstream` (a port on this
    machine, or tcp://HOST:PORT, a remote edge): (process, its endpoint). `keys`: a CURVE edge's, for
    the PING that says the emulator is up (it forwards TCP bytes, CURVE and all)."""
    port = free_port()
    stats = ["--stats-json", str(stats_file), "--stats-interval", "0"] if stats_file else []
    address = f"127.0.0.1:{upstream}" if isinstance(upstream, int) else upstream.removeprefix("tcp://")
    link = subprocess.Popen([sys.executable, "-m", "covspec.cli", "link", "--listen", f"127.0.0.1:{port}",
                             "--upstream", address, "--profile", profile, *stats],
                            env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        wait_for_edge(endpoint, keys=keys)
    except BaseException:
        stop_link(link)
        raise
    return link, endpoint


def stop_link(link: subprocess.Popen) -> None:
    link.send_signal(signal.SIGTERM)
    link.wait(timeout=30)
