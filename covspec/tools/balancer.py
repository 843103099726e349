"""HAProxy in front of edge replicas, for the slow replica test and scripts/measure_drain.py: the
shipped deploy/haproxy.cfg with ports of one's own, and its admin socket (`show stat`, `disable server`)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

BACKEND = "covspec_replicas"  # deploy/haproxy.cfg's backend


def haproxy_config(template: str, front: int, servers: list[tuple[str, int, int]], admin: Path) -> str:
    """deploy/haproxy.cfg's text with the frontend on 127.0.0.1:`front`, one `server NAME 127.0.0.1:PORT
    port METRICS_PORT` line per (name, port, metrics port) and its admin socket at `admin`."""
    text = template.replace("/tmp/covspec-haproxy.sock", str(admin))
    text = re.sub(r"bind 127\.0\.0\.1:\d+", f"bind 127.0.0.1:{front}", text)
    lines = "".join(f"    server {name} 127.0.0.1:{port} port {metrics}\n" for name, port, metrics in servers)
    text, replaced = re.subn(r"(    server \S+ .*\n)+", lines, text)
    if replaced != 1:
        raise ValueError("the HAProxy template has no block of `server` lines to replace")
    return text


def haproxy_admin(admin: Path, command: str) -> str:
    """One command on HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(admin))
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


def server_states(admin: Path) -> dict[str, str]:
    """Each replica's status in HAProxy's `show stat` (UP, DOWN, MAINT, ...), by server name."""
    rows = [line.split(",") for line in haproxy_admin(admin, "show stat").splitlines()
            if line and not line.startswith("#")]
    return {row[1]: row[17] for row in rows if row[0] == BACKEND and row[1] not in ("FRONTEND", "BACKEND")}
