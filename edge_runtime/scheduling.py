"""Which of the requests the edge holds its next round takes (`choose`), and how long that round may
wait for more windows (`batch_wait_s`). EdgeSettings.schedule: "slo" (the default) or "fifo".

A round is what `EdgeServer.serve_once` handles between two looks at the socket: its VERIFY windows
are scored in one batched target pass, its OPENs prefilled in another (edge_runtime.prepass), its
other requests handled as they are. Requests left out stay held for a later round. A session's
requests are handled in the order they came (only its first held request can be chosen), and so are a
connection's (a chosen request takes along those held before it on its connection).

fifo: the held requests in arrival order, at most max_batch (1 with batching off: batch_wait_ms 0); a round led by a VERIFY or an OPEN waits
up to batch_wait_ms for the windows of the other sessions in decode (the edge before SLO-aware rounds).

slo, in the spirit of WISP's SLO-aware verification batching, from the edge's SLO (EdgeSettings.slo,
the load bench's goodput SLO) and its measured passes (EdgeCosts.pass_s, prefill_s):

    pace(session) = its first token's time + TPOT x (tokens after the first + 1)
                    when its next token is due for the answer to keep its time per output token
    due(OPEN)     = its arrival + TTFT x EDGE_TTFT_SHARE (the device's pruning, the upload and the
                    reply take the rest of the time to first token)

1. Windows first. A round with windows to verify scores them (each session's first, at most
   max_batch, those furthest behind their pace first) and prefills nothing: no RESULT waits behind
   a prefill pass. A prefill on this edge costs as much as verifying 4-8 windows (results/capacity).
2. OPENs wait for a round without windows, unless they are urgent: prefilling every held OPEN (in
   passes of max_batch, each followed by a round of the edge-drafted streams) after the windows'
   round would end later than the soonest one's due time plus one such pass. Then the round prefills.
3. A prefill round takes the held OPENs by arrival: max_batch of them when they are urgent, else as
   many as the predicted prefill pass allows before the soonest pace of the sessions in decode (at
   least one).
4. A round with windows waits up to batch_wait_ms for the windows of other sessions in decode, only
   while its furthest-behind window would still be ahead of its pace after the wait and the pass.
"""

from __future__ import annotations

import time

from covspec.edge_runtime.context import Incoming
from covspec.edge_runtime.costs import EdgeCosts
from covspec.edge_runtime.session import TargetSession
from covspec.edge_runtime.settings import EdgeSettings
from covspec.edge_runtime.table import SessionTable
from covspec.transport import protocol as wire

EDGE_TTFT_SHARE = 0.5  # of the TTFT, the most an OPEN is held on the edge before its prefill starts


def pace(session: TargetSession, tpot_s: float) -> float:
    """When the session's next token is due (monotonic) for its answer to keep `tpot_s` per token."""
    return session.first_at + tpot_s * len(session.committed)


def due(incoming: Incoming, settings: EdgeSettings) -> float:
    """When an OPEN's prefill must start at the latest (monotonic)."""
    return incoming.at + settings.slo.ttft_s * EDGE_TTFT_SHARE


def eligible(held: list[Incoming]) -> list[Incoming]:
    """Each session's first held request, and every request of no session (undecodable, HELLO, STATS)."""
    seen: set[int] = set()
    out = []
    for incoming in held:
        sid = incoming.msg.sid if incoming.msg is not None else 0
        if sid and sid in seen:
            continue
        seen.add(sid)
        out.append(incoming)
    return out


def _window_pace(incoming: Incoming, table: SessionTable, tpot_s: float) -> float:
    session = table.sessions.get(incoming.msg.sid) if incoming.msg is not None else None
    return pace(session, tpot_s) if session is not None else incoming.at  # no session: answered at once


def batch_cap(settings: EdgeSettings) -> int:
    """Requests with a target pass one round takes at most: max_batch, or 1 with batching off (batch_wait_ms 0)."""
    return settings.max_batch if settings.batch_wait_ms > 0 else 1


def in_decode(table: SessionTable) -> list[TargetSession]:
    return [s for s in table.sessions.values() if not s.done]


def choose(held: list[Incoming], table: SessionTable, settings: EdgeSettings, costs: EdgeCosts,
           opens_refused: bool = False, between_s: float = 0.0, now: float | None = None) -> list[Incoming]:
    """The held requests (in arrival order) the next round takes. `opens_refused`: a draining edge
    answers every OPEN at once (with DRAINING), so OPENs count as plain requests. `between_s`: the
    work the edge does after each round (a round of its edge-drafted streams)."""
    if settings.schedule == "fifo":
        return held[:batch_cap(settings)]
    now = time.monotonic() if now is None else now
    tpot_s = settings.slo.tpot_s
    first = eligible(held)
    windows = [i for i in first if isinstance(i.msg, wire.Verify)]
    opens = [] if opens_refused else [i for i in first if isinstance(i.msg, wire.Open)]
    plain = [i for i in first if i not in windows and i not in opens]
    windows = sorted(windows, key=lambda i: _window_pace(i, table, tpot_s))[:batch_cap(settings)]
    if opens and (not windows or _open_first(opens, windows, settings, costs, now, between_s)):
        chosen = plain + prefill_round(opens, table, settings, costs, now, between_s)
    else:
        chosen = plain + windows
    return in_connection_order(held, chosen)


def in_connection_order(held: list[Incoming], chosen: list[Incoming]) -> list[Incoming]:
    """`chosen` and every request held before one of them on the same connection, in arrival order: a
    connection's replies go out in the order its requests came (a device's client reads them so)."""
    taken = set(chosen)
    last: dict[bytes, int] = {}
    for index, incoming in enumerate(held):
        if incoming in taken:
            last[incoming.request.peer] = index
    return [i for index, i in enumerate(held) if index <= last.get(i.request.peer, -1)]


def prefill_work_s(opens: int, settings: EdgeSettings, costs: EdgeCosts, between_s: float = 0.0) -> float:
    """The predicted time to prefill this many OPENs, in passes of at most max_batch, with `between_s`
    of other work after each pass (0 before any pass was measured)."""
    cap = batch_cap(settings)
    full, rest = divmod(opens, cap)
    passes = full * ((costs.prefill_s(cap) or 0.0) + between_s)
    return passes + ((costs.prefill_s(rest) or 0.0) + between_s if rest else 0.0)


def opens_urgent(opens: list[Incoming], settings: EdgeSettings, costs: EdgeCosts, now: float,
                 ahead_s: float = 0.0, between_s: float = 0.0) -> bool:
    """Whether the held OPENs must be prefilled now: after `ahead_s` of other work, prefilling them all
    (`between_s` of other work after each pass) would end past the soonest one's due time plus one pass."""
    soonest = min(due(i, settings) for i in opens)
    work = prefill_work_s(len(opens), settings, costs, between_s)
    return now + ahead_s + work >= soonest + prefill_work_s(1, settings, costs, between_s)


def _open_first(opens: list[Incoming], windows: list[Incoming], settings: EdgeSettings, costs: EdgeCosts,
                now: float, between_s: float) -> bool:
    """Rule 2: the OPENs are urgent even after the windows' round."""
    tokens = sum(len(i.msg.tokens) + 1 for i in windows)
    return opens_urgent(opens, settings, costs, now, (costs.pass_s(tokens) or 0.0) + between_s, between_s)


def prefill_round(opens: list[Incoming], table: SessionTable, settings: EdgeSettings, costs: EdgeCosts,
                  now: float, between_s: float = 0.0) -> list[Incoming]:
    """Rule 3: the OPENs (by arrival) one prefill pass takes: as many as it may when they are urgent,
    else as many as end before the soonest pace of the sessions in decode (at least one)."""
    cap = batch_cap(settings)
    if opens_urgent(opens, settings, costs, now, between_s=between_s):
        return opens[:cap]
    tpot_s = settings.slo.tpot_s
    soonest = min((pace(s, tpot_s) for s in in_decode(table)), default=None)
    taken = opens[:1]
    for incoming in opens[1:cap]:
        predicted = costs.prefill_s(len(taken) + 1)
        if soonest is not None and predicted is not None and now + predicted > soonest:
            break
        taken.append(incoming)
    return taken


def batch_wait_s(held: list[Incoming], table: SessionTable, settings: EdgeSettings, costs: EdgeCosts,
                 now: float | None = None) -> float:
    """How long the next round may wait for other sessions' windows (rule 4; fifo: batch_wait_ms when a
    VERIFY or an OPEN leads it)."""
    wait_s = settings.batch_wait_ms / 1000
    if not held or wait_s <= 0 or settings.max_batch <= 1:
        return 0.0
    if settings.schedule == "fifo":
        return wait_s if isinstance(held[0].msg, wire.Verify | wire.Open) else 0.0
    now = time.monotonic() if now is None else now
    tpot_s = settings.slo.tpot_s
    windows = [i for i in eligible(held) if isinstance(i.msg, wire.Verify)]
    if not windows:
        return 0.0
    tokens = sum(len(i.msg.tokens) + 1 for i in windows)
    slack = min(_window_pace(i, table, tpot_s) for i in windows) - now - (costs.pass_s(tokens) or 0.0)
    return max(0.0, min(wait_s, slack))
