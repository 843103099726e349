"""The edge's counters (the STATS reply) and its one structured log line per finished request.

A request is one session: OPEN (or a re-OPEN after a restart) to CLOSE, or to its idle timeout.
The log line is JSON on the "covspec.edge.requests" logger, so that `covspec edge serve 2>&1 | grep
'"event": "request"'` gives one parseable record per answer.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from covspec.transport.channel import ByteCounters

request_log = logging.getLogger("covspec.edge.requests")


@dataclass
class SessionUsage:
    """What one session cost the edge, for its completion line."""

    device: str  # the device's public key (z85) when authenticated, else its connection
    mode: str
    prefix: int = 0  # tokens it was reopened with (0: a fresh OPEN)
    opened_at: float = field(default_factory=time.monotonic)
    prefill_s: float = 0.0
    rounds: int = 0
    drafted: int = 0  # tokens sent for verification
    accepted: int = 0
    verify_s: float = 0.0
    streamed: int = 0
    stream_s: float = 0.0

    def record(self, sid: int, tokens: int, end: str) -> dict[str, object]:
        return {
            "event": "request", "session": sid, "device": self.device[:40], "mode": self.mode, "end": end,
            "tokens": tokens, "reopened_with": self.prefix, "rounds": self.rounds, "drafted": self.drafted,
            "accepted": self.accepted,
            "mean_accepted": round(self.accepted / self.rounds, 3) if self.rounds else None,
            "streamed": self.streamed,
            "prefill_ms": round(self.prefill_s * 1000, 2), "verify_ms": round(self.verify_s * 1000, 2),
            "stream_ms": round(self.stream_s * 1000, 2),
            "duration_ms": round((time.monotonic() - self.opened_at) * 1000, 2),
        }


def log_completion(sid: int, usage: SessionUsage, tokens: int, end: str) -> None:
    request_log.info(json.dumps(usage.record(sid, tokens, end)))


@dataclass
class EdgeCounters:
    started: float = field(default_factory=time.monotonic)
    requests: Counter[str] = field(default_factory=Counter)  # by message type
    errors: Counter[str] = field(default_factory=Counter)  # by ErrorCode name
    sessions_opened: int = 0
    sessions_reopened: int = 0  # OPENs with a prefix (a device resuming after an edge restart)
    sessions_closed: int = 0
    sessions_idle_freed: int = 0
    tokens_verified: int = 0
    tokens_accepted: int = 0
    tokens_streamed: int = 0
    tokens_edge_drafted: int = 0  # streamed tokens the edge drafted and verified itself (edge-side speculation)
    drafting_given_back: int = 0  # edge-drafted streams ended early: the edge got loaded, the device drafts again
    plain_streams_drafted: int = 0  # STREAMs asked plain that the edge served by drafting (handlers.drafts_plain_stream)
    batches: int = 0  # target passes shared by several sessions' VERIFY windows
    batched_windows: int = 0  # windows verified in those passes
    batch_max: int = 0  # the most windows in one pass
    opens_held: int = 0  # OPENs a round left for a later one (their prefill waited for windows: edge_runtime.scheduling)
    prefill_batches: int = 0  # target passes shared by several sessions' OPEN prefills
    batched_prefills: int = 0  # prompts prefilled in those passes
    windows_ahead: int = 0  # windows sent before the previous RESULT (pipelined) and verified
    windows_dropped: int = 0  # windows sent ahead on an outcome that did not happen, dropped unverified
    refused_handshakes: int = 0  # CURVE handshakes refused: devices whose public key is not allowed
    busy_s: float = 0.0  # wall time spent handling requests and advancing edge-drafted streams

    def snapshot(self, sessions_open: int, wire: ByteCounters) -> dict[str, int | float]:
        out: dict[str, int | float] = {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "requests": sum(self.requests.values()), "errors": sum(self.errors.values()),
            "sessions_open": sessions_open, "sessions_opened": self.sessions_opened,
            "sessions_reopened": self.sessions_reopened, "sessions_closed": self.sessions_closed,
            "sessions_idle_freed": self.sessions_idle_freed, "tokens_verified": self.tokens_verified,
            "tokens_accepted": self.tokens_accepted, "tokens_streamed": self.tokens_streamed,
            "tokens_edge_drafted": self.tokens_edge_drafted, "drafting_given_back": self.drafting_given_back,
            "plain_streams_drafted": self.plain_streams_drafted,
            "batches": self.batches, "batched_windows": self.batched_windows, "batch_max": self.batch_max,
            "prefill_batches": self.prefill_batches, "batched_prefills": self.batched_prefills,
            "opens_held": self.opens_held,
            "windows_ahead": self.windows_ahead, "windows_dropped": self.windows_dropped,
            "refused_handshakes": self.refused_handshakes,
            "busy_s": round(self.busy_s, 6), "cpu_s": round(time.process_time(), 6),  # process CPU, all threads
            "bytes_in": wire.bytes_recv, "bytes_out": wire.bytes_sent,
            "messages_in": wire.msgs_recv, "messages_out": wire.msgs_sent,
        }
        out.update({f"requests.{kind}": n for kind, n in sorted(self.requests.items())})
        out.update({f"errors.{code}": n for code, n in sorted(self.errors.items())})
        return out
