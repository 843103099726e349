"""The edge's counters in the Prometheus text format (version 0.0.4), served on an opt-in HTTP address
(`covspec edge serve --metrics HOST:PORT`): GET /metrics answers the STATS counters, each as
`covspec_edge_<name>`; the per-type and per-code ones ("requests.OPEN", "errors.LIMIT") as one
family with a label (`covspec_edge_requests_by_type_total{type="OPEN"}`). A small HTTP server on a
thread of its own (the standard library's); it only reads the counters.

Beside them, what a balancer and an orchestrator probe (JSON bodies, `health()`'s): GET /healthz,
liveness: 200 while the edge's loop turns (and while the target loads), 503 when it has stalled;
GET /readyz, readiness: 200 once the target is loaded and serving, 503 while it loads and from the
moment it drains (SIGTERM) until it exits, so a balancer sends it no new connection.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from covspec.errors import CovspecError

log = logging.getLogger("covspec.edge.metrics")

PREFIX = "covspec_edge_"
GAUGES = {"uptime_s": "seconds since the edge started", "sessions_open": "sessions open now",
          "batch_max": "the most windows verified in one batched pass",
          "requests_held": "requests received and held for a later round (edge_runtime.scheduling)"}
LABELLED = {"requests": ("requests_by_type_total", "type", "requests received, by message type"),
            "errors": ("errors_by_code_total", "code", "ERROR replies sent, by error code")}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def render(stats: dict[str, int | float]) -> str:
    """The counters of a STATS reply as Prometheus text exposition."""
    lines: list[str] = []
    labelled: dict[str, list[tuple[str, int | float]]] = {}
    for name, value in sorted(stats.items()):
        family, dot, label = name.partition(".")
        if dot:
            labelled.setdefault(family, []).append((label, value))
            continue
        metric = re.sub(r"[^a-zA-Z0-9_]", "_", name)
        if name in GAUGES:
            lines += [f"# HELP {PREFIX}{metric} {GAUGES[name]}", f"# TYPE {PREFIX}{metric} gauge"]
        else:
            metric += "_total"
            lines += [f"# HELP {PREFIX}{metric} {name.replace('_', ' ')} since the edge started",
                      f"# TYPE {PREFIX}{metric} counter"]
        lines.append(f"{PREFIX}{metric} {_number(value)}")
    for family, values in sorted(labelled.items()):
        metric, key, text = LABELLED.get(family, (f"{family}_total", "kind", family))
        lines += [f"# HELP {PREFIX}{metric} {text}", f"# TYPE {PREFIX}{metric} counter"]
        lines += [f'{PREFIX}{metric}{{{key}="{label}"}} {_number(value)}' for label, value in values]
    return "\n".join(lines) + "\n"


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT", ":PORT" (all interfaces is not implied: 127.0.0.1) or "http://HOST:PORT"."""
    text = address.removeprefix("http://").rstrip("/")
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) < 65536:
        raise CovspecError(f"--metrics {address!r}: write HOST:PORT, e.g. 127.0.0.1:9100")
    return host.strip("[]") or "127.0.0.1", int(port)


LOADING: dict[str, object] = {"live": True, "ready": False, "loading": True}  # health() before the target is loaded
PROBES = {"/healthz": "live", "/readyz": "ready"}


class MetricsServer:
    """GET /metrics on `address`, answered with render(stats()) from a daemon thread; GET /healthz and
    /readyz with health() as JSON, 200 when its "live" / "ready" is true, else 503."""

    def __init__(self, address: str, stats: Callable[[], dict[str, int | float]],
                 health: Callable[[], dict[str, object]] = lambda: LOADING):
        host, port = parse_address(address)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                path = self.path.split("?")[0]
                if path in PROBES:
                    state = health()
                    self._send(200 if state.get(PROBES[path]) else 503, "application/json",
                               (json.dumps(state) + "\n").encode())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE, render(read(stats)).encode())
                else:
                    self.send_error(404, "the metrics are at /metrics, the probes at /healthz and /readyz")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug(format, *args)

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise CovspecError(f"--metrics {address}: cannot listen there: {err.strerror} (another process on "
                               "that port? choose another)") from None
        self.httpd.daemon_threads = True
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="covspec-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def read(stats: Callable[[], dict[str, int | float]]) -> dict[str, int | float]:
    """`stats()` taken while the edge's loop may be counting (a counter added meanwhile: read again)."""
    for _ in range(5):
        try:
            return stats()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return stats()
