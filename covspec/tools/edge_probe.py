"""What the bench asks a running edge: what it serves (INFO, before the first answer, with the draft's
fit checked) and its counters (STATS over the wire, or its Prometheus endpoint, `edge serve --metrics`)
before and after a run, for the edge's side of the figures: verify batches, busy share, CPU per answer.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from covspec.errors import CovspecError

if TYPE_CHECKING:
    from covspec.transport.channel import ClientKeys
    from covspec.transport.protocol import InfoReply

EDGE_FIGURES = ("batches", "batched_windows", "busy_s", "cpu_s", "sessions_opened", "tokens_verified",
                "tokens_accepted", "tokens_streamed")
METRIC_LINE = re.compile(r"^covspec_edge_([a-zA-Z0-9_]+?)(?:_total)? ([-+0-9.eE]+|NaN)$")


def client_keys(key: str | None, edge_key: str | None) -> ClientKeys | None:
    """The device's CURVE keys from `--key SECRET --edge-key PUBLIC` (both or neither)."""
    from covspec.transport.channel import load_client_keys

    if bool(key) != bool(edge_key):
        raise CovspecError("--key DEVICE_SECRET_FILE and --edge-key EDGE_PUBLIC_FILE go together")
    return load_client_keys(key, edge_key) if key else None


def ask_info(edge: str, keys: ClientKeys | None = None, timeout_s: float = 10.0) -> InfoReply | None:
    """The edge's INFOREPLY; None for an edge older than INFO. PeerUnavailable (HandshakeRefused for a
    refused key) when it cannot be reached within about `timeout_s`."""
    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client, RemoteError

    with Client(edge, timeout_s=timeout_s + 2, retries=0, keys=keys, connect_timeout_s=timeout_s) as client:
        try:
            reply = client.request(wire.Info())
        except RemoteError as err:
            if err.code == wire.ErrorCode.BAD_MESSAGE:  # an edge that predates INFO
                return None
            raise
    if not isinstance(reply, wire.InfoReply):
        raise CovspecError(f"the edge at {edge} answered INFO with {reply.TYPE}")
    return reply


def draft_fingerprint(draft: str | None, bundle: str | None) -> str:
    """The device draft's tokenizer fingerprint (what HELLO sends), without loading the model."""
    from covspec.models.common import tokenizer_fingerprint

    if bundle:
        from covspec.bundles.bundle import BundleError, load_bundle

        try:
            return str(load_bundle(bundle).manifest["tokenizer_fingerprint"])
        except BundleError as err:
            raise CovspecError(str(err)) from err
    from covspec.models.base import load_tokenizer

    return tokenizer_fingerprint(load_tokenizer(Path(draft)))


def check_edge_fits(edge: str, info: InfoReply | None, draft: str | None, bundle: str | None,
                    modes: tuple[str, ...]) -> str:
    """Refuses, before the first answer, a draft that tokenizes unlike the edge's target, and edge_sd on
    an edge without a draft; returns what the edge serves, in words."""
    from covspec.modes import split_label

    if info is None:
        return f"the edge at {edge} (older than INFO: its target is checked at the devices' HELLO)"
    mine = draft_fingerprint(draft, bundle)
    if mine != info.fingerprint:
        raise CovspecError(
            f"the edge at {edge} serves {info.model} ({info.family}, tokenizer fingerprint {info.fingerprint[:12]}...), "
            f"but the draft {bundle or draft} tokenizes differently ({mine[:12]}...): a draft must tokenize exactly "
            "like the edge's target; give the draft exported with that target (--bundle / --draft)")
    if info.draft is None and any(split_label(m)[0] == "edge_sd" for m in modes):
        raise CovspecError(f"the edge at {edge} runs no draft, so it cannot answer edge_sd: drop edge_sd from "
                           "--modes, or restart the edge with covspec edge serve --draft PATH")
    return (f"the edge at {edge}: {info.version}, target {info.model} ({info.family}), "
            + (f"draft {info.draft}" if info.draft else "no draft"))


def scrape_metrics(address: str, timeout_s: float = 10.0) -> dict[str, float]:
    """The counters of an edge's Prometheus endpoint (HOST:PORT or http://HOST:PORT[/metrics]), named as
    in STATS (`covspec_edge_batches_total` -> `batches`); the labelled families are left out."""
    url = address if address.startswith("http") else f"http://{address}"
    url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - a user-given http address
            text = reply.read().decode()
    except OSError as err:
        raise CovspecError(f"--edge-metrics {address}: cannot read {url} ({err}); start the edge with "
                           "covspec edge serve --metrics HOST:PORT") from None
    counters = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            counters[match.group(1)] = float(match.group(2))
    return counters


def stats_counters(edge: str, keys: ClientKeys | None = None) -> dict[str, float]:
    """The edge's counters over the wire (STATS)."""
    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client

    with Client(edge, timeout_s=30.0, retries=1, keys=keys) as client:
        return dict(client.request(wire.Stats()).counters)


@dataclass(frozen=True)
class EdgeCounters:
    """Reads an edge's counters: from its Prometheus endpoint when `metrics` is given, else over STATS."""

    edge: str
    metrics: str | None = None
    key: str | None = None
    edge_key: str | None = None

    def read(self) -> dict[str, float]:
        if self.metrics:
            return scrape_metrics(self.metrics)
        return stats_counters(self.edge, client_keys(self.key, self.edge_key))


def edge_side(before: dict[str, float], after: dict[str, float], answers: int, span_s: float) -> dict:
    """The edge's side of a run from its counters before and after: verify batches, windows per batch,
    busy share (its busy time over the run's span), CPU and busy ms per answer (None where the edge
    does not count it)."""
    delta = {k: after[k] - before.get(k, 0.0) for k in EDGE_FIGURES if k in after}
    batches = delta.get("batches", 0.0)
    return {
        "edge_batches": int(batches), "windows_per_batch": delta.get("batched_windows", 0.0) / batches if batches else 0.0,
        "edge_busy": delta["busy_s"] / span_s if "busy_s" in delta and span_s > 0 else None,
        "edge_busy_ms_per_answer": 1000 * delta["busy_s"] / answers if "busy_s" in delta and answers else None,
        "edge_cpu_ms_per_answer": 1000 * delta["cpu_s"] / answers if "cpu_s" in delta and answers else None,
    }
