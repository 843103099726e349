"""User-space TCP link emulator (this kernel has no netem).

`Link` listens on a local port and forwards every accepted connection to an upstream TCP address,
shaping each direction like a link of the profile: "up" is client -> upstream (device -> edge),
"down" is upstream -> client (edge -> device).

Model, per direction, shared by all connections through one Link (they share the radio):
a chunk of n bytes read at time `now` starts serialising at `start = max(now, free_at)`, occupies the
link until `free_at = start + n * 8 / bandwidth` (FIFO), and is delivered at `free_at + rtt / 2`.
A writer thread per connection and direction sleeps until each chunk's delivery timestamp (absolute,
so there is no drift from sleeping after every read). Reads are capped at ~2 ms of link time so big
transfers arrive progressively, and a reader stops reading while the link has more than 50 ms of
backlog (the sender then sees TCP backpressure, like a full router queue).

`covspec link --listen HOST:PORT --upstream HOST:PORT --profile NAME` runs `main(argv)`;
`measure_link(profile)` measures the RTT and throughput a profile really gives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

Address = tuple[str, int]


@dataclass(frozen=True)
class LinkProfile:
    name: str
    rtt_ms: float = 0.0  # round trip; each direction gets rtt_ms / 2
    up_mbit: float | None = None  # device -> edge, Mbit/s; None = unlimited
    down_mbit: float | None = None  # edge -> device


PROFILES: dict[str, LinkProfile] = {
    "loopback": LinkProfile("loopback"),
    "wifi": LinkProfile("wifi", 10.0, 100.0, 100.0),
    "5g": LinkProfile("5g", 30.0, 20.0, 50.0),
    "4g": LinkProfile("4g", 60.0, 5.0, 10.0),
    "weak": LinkProfile("weak", 150.0, 1.0, 1.0),
}


def get_profile(name: str = "loopback", rtt_ms: float | None = None, up_mbit: float | None = None,
                down_mbit: float | None = None) -> LinkProfile:
    """A named profile, with any of its figures overridden ("custom" starts from loopback)."""
    base = PROFILES.get(name, LinkProfile("custom") if name == "custom" else None)
    if base is None:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join([*PROFILES, 'custom'])}")
    over = {k: v for k, v in (("rtt_ms", rtt_ms), ("up_mbit", up_mbit), ("down_mbit", down_mbit)) if v is not None}
    for k, v in over.items():
        if v < 0 or (k != "rtt_ms" and v == 0):
            raise ValueError(f"{k} must be {'>= 0' if k == 'rtt_ms' else '> 0'}, got {v}")
    return replace(base, name=base.name if not over else "custom" if name == "custom" else f"{name}*", **over)


def parse_address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return (host or "127.0.0.1", int(port))


class _Direction:
    """One direction of the link: its serialisation clock, delay and byte count."""

    def __init__(self, mbit: float | None, delay_s: float) -> None:
        self.rate = mbit * 1e6 / 8 if mbit else None  # bytes/s
        self.delay = delay_s
        self.free_at = 0.0  # monotonic time the link finishes serialising what it has
        self.bytes = 0
        self.lock = threading.Lock()
        self.chunk = 65536 if self.rate is None else int(min(65536, max(1460, self.rate * 0.002)))
        self.passthrough = self.rate is None and delay_s == 0

    def schedule(self, n: int, now: float) -> float:
        """Delivery time of an n-byte chunk read at `now`."""
        with self.lock:
            start = max(now, self.free_at)
            self.free_at = start + (n / self.rate if self.rate else 0.0)
            return self.free_at + self.delay

    def backlog_s(self, now: float) -> float:
        return self.free_at - now

    def count(self, n: int) -> None:
        with self.lock:
            self.bytes += n


class _Conn:
    """One forwarded TCP connection: a reader and a writer thread per direction."""

    def __init__(self, client: socket.socket, upstream: socket.socket, up: _Direction, down: _Direction) -> None:
        self.socks = (client, upstream)
        self.closed = threading.Event()
        self.done = 0
        self.lock = threading.Lock()
        for src, dst, d, tag in ((client, upstream, up, "up"), (upstream, client, down, "down")):
            threading.Thread(target=self._pump, args=(src, dst, d), name=f"link-{tag}", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, d: _Direction) -> None:
        if d.passthrough:
            self._read(src, d, lambda t, data: self._write(dst, d, data))
            return
        q: queue.SimpleQueue[tuple[float, bytes | None]] = queue.SimpleQueue()
        writer = threading.Thread(target=self._deliver, args=(q, dst, d), daemon=True)
        writer.start()
        self._read(src, d, lambda t, data: q.put((t, data)))

    def _read(self, src: socket.socket, d: _Direction, put: Any) -> None:
        try:
            while not self.closed.is_set():
                wait = d.backlog_s(time.monotonic()) - 0.05
                if wait > 0:
                    time.sleep(wait)
                data = src.recv(d.chunk)
                now = time.monotonic()
                if not data:
                    break
                put(d.schedule(len(data), now), data)
            put(d.schedule(0, time.monotonic()), None)  # FIN travels like data
        except OSError:
            put(0.0, None)
            self.close()

    def _deliver(self, q: queue.SimpleQueue, dst: socket.socket, d: _Direction) -> None:
        while True:
            t, data = q.get()
            wait = t - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not self._write(dst, d, data):
                return

    def _write(self, dst: socket.socket, d: _Direction, data: bytes | None) -> bool:
        try:
            if data is None:
                dst.shutdown(socket.SHUT_WR)
                self._half_done()
                return False
            d.count(len(data))  # before sending: a receiver never sees bytes the stats do not
            dst.sendall(data)
            return True
        except OSError:
            self.close()
            return False

    def _half_done(self) -> None:
        with self.lock:
            self.done += 1
            if self.done == 2:
                self.close()

    def close(self) -> None:
        self.closed.set()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class Link:
    """In-process link emulator: `with Link(upstream, get_profile("4g")) as link: connect to link.address`."""

    def __init__(self, upstream: Address | str, profile: LinkProfile | str = "loopback",
                 listen: Address | str = ("127.0.0.1", 0)) -> None:
        self.upstream = parse_address(upstream) if isinstance(upstream, str) else upstream
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self._listen = parse_address(listen) if isinstance(listen, str) else listen
        half = self.profile.rtt_ms / 2000
        self._up = _Direction(self.profile.up_mbit, half)
        self._down = _Direction(self.profile.down_mbit, half)
        self._conns: list[_Conn] = []
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._started = 0.0
        self._nconn = 0

    @property
    def address(self) -> Address:
        assert self._sock is not None, "Link not started"
        return self._sock.getsockname()[:2]

    @property
    def endpoint(self) -> str:
        """The ZeroMQ endpoint a device connects to."""
        host, port = self.address
        return f"tcp://{host}:{port}"

    def start(self) -> Link:
        self._sock = socket.create_server(self._listen, reuse_port=False)
        self._sock.settimeout(0.2)
        self._started = time.monotonic()
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns = [c for c in self._conns if not c.closed.is_set()]
            self._conns.append(_Conn(client, upstream, self._up, self._down))
            self._nconn += 1

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        for c in self._conns:
            c.close()

    def stats(self) -> dict[str, Any]:
        """Bytes delivered each way since start (up = client -> upstream)."""
        return {
            **asdict(self.profile), "bytes_up": self._up.bytes, "bytes_down": self._down.bytes,
            "connections": self._nconn, "uptime_s": round(time.monotonic() - self._started, 3),
        }

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------
# Measuring what a profile really gives


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise ConnectionError("connection closed")
        buf += part
    return bytes(buf)


def _sink_recv(s: socket.socket, n: int) -> float:
    """Receive n bytes; return the receiver-side rate in bytes/s (bytes after the first read / time)."""
    first = s.recv(65536)
    t0, got = time.monotonic(), len(first)
    t1 = t0
    while got < n:
        part = s.recv(min(1 << 20, n - got))
        if not part:
            raise ConnectionError("connection closed")
        got += len(part)
        t1 = time.monotonic()
    return (n - len(first)) / (t1 - t0) if t1 > t0 else float("inf")


def _measure_server(s: socket.socket) -> None:
    """Commands: b"P" + echo 1-byte pings; b"U" + 8-byte n + n bytes -> 8-byte rate; b"D" + 8-byte n -> n bytes."""
    with s, contextlib.suppress(OSError):  # the client may go away mid-command
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cmd = _recv_exact(s, 1)
        if cmd == b"P":
            while data := s.recv(1):
                s.sendall(data)
        elif cmd == b"U":
            n = int.from_bytes(_recv_exact(s, 8), "little")
            rate = _sink_recv(s, n)
            s.sendall(int(min(rate, 2**62)).to_bytes(8, "little"))
        elif cmd == b"D":
            n = int.from_bytes(_recv_exact(s, 8), "little")
            s.sendall(bytes(n))


def measure_link(profile: LinkProfile | str, *, pings: int = 15, transfer_s: float = 0.6,
                 link: Link | None = None) -> dict[str, Any]:
    """Measure RTT (median of 1-byte pings, ms) and up/down throughput (Mbit/s) through a Link of the
    profile (or the given running `link`, whose upstream must be a measure server: see `_measure_server`).
    Each bulk transfer is sized to take about `transfer_s` on the profile's bandwidth."""
    prof = get_profile(profile) if isinstance(profile, str) else profile
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                s, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_measure_server, args=(s,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    own = link is None
    link = link or Link(server.getsockname()[:2], prof).start()
    try:
        def connect(cmd: bytes) -> socket.socket:
            c = socket.create_connection(link.address)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sendall(cmd)
            return c

        with connect(b"P") as c:
            rtts = []
            for i in range(pings + 2):
                t = time.perf_counter()
                c.sendall(b"x")
                _recv_exact(c, 1)
                if i >= 2:  # the first ones include connection set-up
                    rtts.append((time.perf_counter() - t) * 1000)

        def size(mbit: float | None) -> int:
            return int(min(64 << 20, (mbit or 800.0) * 1e6 / 8 * transfer_s))

        n_up = size(prof.up_mbit)
        with connect(b"U" + n_up.to_bytes(8, "little")) as c:
            c.sendall(bytes(n_up))
            up = int.from_bytes(_recv_exact(c, 8), "little") * 8 / 1e6
        n_down = size(prof.down_mbit)
        with connect(b"D" + n_down.to_bytes(8, "little")) as c:
            down = _sink_recv(c, n_down) * 8 / 1e6
    finally:
        if own:
            link.stop()
        server.close()
    out: dict[str, Any] = {
        "profile": prof.name, "rtt_ms": round(statistics.median(rtts), 3),
        "up_mbit": round(up, 3), "down_mbit": round(down, 3),
        "expected": {"rtt_ms": prof.rtt_ms, "up_mbit": prof.up_mbit, "down_mbit": prof.down_mbit},
    }
    out["rel_error"] = {k: round(out[k] / v - 1, 4) for k, v in out["expected"].items() if v}
    return out


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept device connections on (port 0: any free one)")
    ap.add_argument("--upstream", help="HOST:PORT of the edge (required unless --measure)")
    ap.add_argument("--profile", default="loopback", help=f"one of {', '.join([*PROFILES, 'custom'])}")
    ap.add_argument("--rtt-ms", type=float, help="round-trip time in ms (default: the profile's; custom starts from loopback)")
    ap.add_argument("--up-mbit", type=float, help="device -> edge bandwidth in Mbit/s (default: the profile's)")
    ap.add_argument("--down-mbit", type=float, help="edge -> device bandwidth in Mbit/s (default: the profile's)")
    ap.add_argument("--stats-json", help="write the byte counts here (every interval and at exit)")
    ap.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats lines (0: exit only)")
    ap.add_argument("--measure", action="store_true", help="measure the profile's RTT and throughput, print JSON, exit")


def run(args: argparse.Namespace) -> int:
    """`covspec link`'s handler: serves until SIGINT or SIGTERM."""
    try:
        prof = get_profile(args.profile, args.rtt_ms, args.up_mbit, args.down_mbit)
        if args.measure:
            print(json.dumps(measure_link(prof)), flush=True)
            return 0
        if not args.upstream:
            print("covspec link: error: --upstream is required", file=sys.stderr)
            return 2
        link = Link(parse_address(args.upstream), prof, parse_address(args.listen)).start()
    except (ValueError, OSError) as e:
        print(f"covspec link: {e}", file=sys.stderr)
        return 2
    # a plain flag: a handler that set a threading.Event could run while the main thread is inside that
    # Event's wait, holding its lock, and deadlock (a link that then ignored every further SIGTERM)
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    host, port = link.address
    print(f"link {host}:{port} -> {args.upstream} profile {prof}", flush=True)

    def report() -> None:
        s = link.stats()
        print(f"link bytes_up={s['bytes_up']} bytes_down={s['bytes_down']} connections={s['connections']}", flush=True)
        if args.stats_json:
            tmp = f"{args.stats_json}.tmp"
            with open(tmp, "w") as f:
                json.dump(s, f)
            os.replace(tmp, args.stats_json)

    last = time.monotonic()
    while not stopping:
        time.sleep(0.2)
        if args.stats_interval and time.monotonic() - last >= args.stats_interval:
            last = time.monotonic()
            report()
    link.stop()
    report()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`covspec link ARGS` (the one CLI parser)."""
    from covspec.cli import main as cli_main

    return cli_main(["link", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
