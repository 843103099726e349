"""The edge's round scheduling (edge_runtime.scheduling), one rule per test, on held requests and session
stand-ins (the rules read a session's first-token time, its committed tokens and whether it is done),
and the edge's loop doing it on real sockets."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_models
from test_runtimes import png

from covspec.edge_runtime import scheduling
from covspec.edge_runtime.context import Incoming
from covspec.edge_runtime.costs import EdgeCosts
from covspec.edge_runtime.server import EdgeServer
from covspec.edge_runtime.settings import EdgeSettings
from covspec.edge_runtime.table import SessionTable
from covspec.models import load_adapter
from covspec.slo import Slo
from covspec.transport import protocol as wire
from covspec.transport.channel import Client, Request

NOW = 1000.0
SLO = Slo(ttft_ms=500, tpot_ms=25)


def held(msg: wire.Message, peer: bytes, at: float = NOW) -> Incoming:
    return Incoming(Request(peer=peer, frames=[], user_id=None), msg, at=at)


def verify(sid: int, peer: bytes, k: int = 4, at: float = NOW) -> Incoming:
    return held(wire.Verify(sid=sid, round=0, tokens=np.arange(k, dtype=np.int32)), peer, at)


def open_(sid: int, peer: bytes, at: float = NOW) -> Incoming:
    return held(wire.Open(sid=sid, image=b"", prompt="p", mode="covspec"), peer, at)


def edge(**settings) -> tuple[SessionTable, EdgeSettings, EdgeCosts]:
    s = EdgeSettings(slo=SLO, **settings)
    costs = EdgeCosts()
    costs.observe_pass(5, 0.008)
    costs.observe_pass(40, 0.020)
    costs.observe_prefill(1, 0.011)
    costs.observe_prefill(8, 0.053)
    return SessionTable(s), s, costs


def in_decode(table: SessionTable, sid: int, first_at: float, tokens: int) -> None:
    """A session whose first token came at `first_at` and that has `tokens` committed: its next is due
    at first_at + 25 ms x tokens."""
    table.sessions[sid] = SimpleNamespace(first_at=first_at, committed=[0] * tokens, done=False)


def test_costs_predict_from_the_measured_passes():
    _, _, costs = edge()
    assert costs.pass_s(5) == pytest.approx(0.008) and costs.pass_s(40) == pytest.approx(0.020)
    assert costs.prefill_s(4) == pytest.approx(0.011 + 3 * 0.042 / 7)
    one = EdgeCosts()
    assert one.prefill_s(3) is None  # nothing measured: no prediction
    one.observe_prefill(2, 0.020)
    assert one.prefill_s(4) == pytest.approx(0.040)  # one size seen: proportional


def test_fifo_takes_arrival_order_up_to_max_batch_and_one_without_batching():
    table, settings, costs = edge(schedule="fifo", max_batch=2)
    requests = [open_(1, b"a"), verify(2, b"b"), verify(3, b"c")]
    assert scheduling.choose(requests, table, settings, costs, now=NOW) == requests[:2]
    table, settings, costs = edge(schedule="fifo", batch_wait_ms=0)
    assert scheduling.choose(requests, table, settings, costs, now=NOW) == requests[:1]


def test_windows_go_before_an_open_that_can_wait():
    table, settings, costs = edge()
    in_decode(table, 2, first_at=NOW - 0.05, tokens=4)
    requests = [open_(1, b"a"), verify(2, b"b"), held(wire.Stats(), b"c")]
    assert scheduling.choose(requests, table, settings, costs, now=NOW) == requests[1:]
    # the OPEN waited long enough: prefilling it after the windows would end past its due time
    late = [open_(1, b"a", at=NOW - 0.245), verify(2, b"b")]
    assert scheduling.choose(late, table, settings, costs, now=NOW) == late[:1]


def test_a_round_takes_the_windows_furthest_behind_their_pace_first():
    table, settings, costs = edge(max_batch=2)
    in_decode(table, 1, first_at=NOW - 0.01, tokens=10)  # due at NOW + 0.24
    in_decode(table, 2, first_at=NOW - 0.30, tokens=10)  # NOW - 0.05: behind
    in_decode(table, 3, first_at=NOW - 0.20, tokens=10)  # NOW + 0.05
    requests = [verify(1, b"a"), verify(2, b"b"), verify(3, b"c")]
    assert scheduling.choose(requests, table, settings, costs, now=NOW) == requests[1:]


def test_a_sessions_and_a_connections_requests_keep_their_order():
    table, settings, costs = edge()
    in_decode(table, 1, first_at=NOW, tokens=2)
    in_decode(table, 2, first_at=NOW - 1, tokens=2)
    ahead = [verify(1, b"a"), verify(1, b"b")]  # a window sent ahead: only after the one before it
    assert scheduling.choose(ahead, table, settings, costs, now=NOW) == ahead[:1]
    # the OPEN would wait, but it came before a chosen window on the same connection: it goes along
    shared = [open_(3, b"a"), verify(2, b"a")]
    assert scheduling.choose(shared, table, settings, costs, now=NOW) == shared


def test_a_prefill_round_stops_before_the_next_token_due_unless_the_opens_are_urgent():
    table, settings, costs = edge()
    opens = [open_(10 + i, bytes([i])) for i in range(8)]
    assert scheduling.choose(opens, table, settings, costs, now=NOW) == opens  # no answer in decode: all 8
    in_decode(table, 1, first_at=NOW - 0.010, tokens=1)  # its next token due in 15 ms: one prefill fits
    assert scheduling.choose(opens, table, settings, costs, now=NOW) == opens[:1]
    in_decode(table, 1, first_at=NOW - 0.010, tokens=2)  # due in 40 ms: 5 prompts (35 ms) fit, 6 (41 ms) do not
    assert scheduling.choose(opens, table, settings, costs, now=NOW) == opens[:5]
    waited = [open_(10 + i, bytes([i]), at=NOW - 0.25) for i in range(8)]  # due now, urgent: a full pass
    assert scheduling.choose(waited, table, settings, costs, now=NOW) == waited


def test_a_draining_edge_refuses_opens_at_once():
    table, settings, costs = edge()
    in_decode(table, 2, first_at=NOW, tokens=4)
    requests = [open_(1, b"a"), verify(2, b"b")]
    assert scheduling.choose(requests, table, settings, costs, opens_refused=True, now=NOW) == requests


def test_a_round_waits_for_more_windows_only_while_its_windows_are_ahead_of_their_pace():
    table, settings, costs = edge(batch_wait_ms=5)
    in_decode(table, 1, first_at=NOW, tokens=4)  # due in 100 ms
    in_decode(table, 2, first_at=NOW - 0.2, tokens=4)  # behind
    assert scheduling.batch_wait_s([verify(1, b"a")], table, settings, costs, now=NOW) == pytest.approx(0.005)
    assert scheduling.batch_wait_s([verify(1, b"a"), verify(2, b"b")], table, settings, costs, now=NOW) == 0.0
    assert scheduling.batch_wait_s([open_(3, b"c")], table, settings, costs, now=NOW) == 0.0
    in_decode(table, 1, first_at=NOW - 0.0955, tokens=4)  # 4.5 ms ahead, less the pass's 8 ms: none
    assert scheduling.batch_wait_s([verify(1, b"a")], table, settings, costs, now=NOW) == 0.0
    fifo_table, fifo, fifo_costs = edge(schedule="fifo", batch_wait_ms=5)
    assert scheduling.batch_wait_s([open_(3, b"c")], fifo_table, fifo, fifo_costs, now=NOW) == pytest.approx(0.005)


@pytest.mark.parametrize("schedule", ["slo", "fifo"])
def test_the_edge_verifies_a_waiting_window_before_it_prefills_a_new_answer(tmp_path, schedule):
    """On real sockets: one device's VERIFY and another's OPEN wait at the edge together. The slo edge's
    first round answers the VERIFY alone and holds the OPEN (due in 2.5 s) for the next round; the fifo
    edge handles both in its first round."""
    target = load_adapter(tiny_models.build_llava(tmp_path / "target", seed=0))
    server = EdgeServer(target, EdgeSettings(bind="tcp://127.0.0.1:*", schedule=schedule, slo=Slo(5000, 25)))
    try:
        with Client(server.endpoint, timeout_s=20, retries=0) as a, Client(server.endpoint, timeout_s=20, retries=0) as b:
            opening = a.send(wire.Open(sid=1, image=png(1), prompt="what is it", mode="vanilla_sd", max_new_tokens=8))
            while not a.poll(0.0):
                server.serve_once(timeout_s=0.05)
            token = a.recv(opening.seq).token
            new = b.send(wire.Open(sid=2, image=png(2), prompt="what is it", mode="vanilla_sd", max_new_tokens=8))
            window = a.send(wire.Verify(sid=1, round=0, tokens=np.array([token, 3], np.int32)))
            time.sleep(0.3)  # both queued at the edge
            server.serve_once(timeout_s=0.05)
            assert a.poll(1.0), "the VERIFY was not answered in the first round"
            assert b.poll(0.2) == (schedule == "fifo")
            held = server.stats()
            assert (held["requests_held"], held["opens_held"]) == ((1, 1) if schedule == "slo" else (0, 0))
            if schedule == "slo":
                assert server.held[0].msg.sid == 2
                server.serve_once(timeout_s=0.05)
            assert server.stats()["requests_held"] == 0
            assert isinstance(a.recv(window.seq), wire.Result) and isinstance(b.recv(new.seq), wire.Opened)
    finally:
        server.close()
