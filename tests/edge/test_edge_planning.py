"""The edge's parts on their own, without sockets: what a VERIFY comes to (planning.plan_verify, one
function for the handler and the batched pass) and the session table's ownership, quotas, late
OPENs and idle expiry (table.SessionTable)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_models
from PIL import Image

from covspec.edge_runtime.context import Incoming
from covspec.edge_runtime.counters import SessionUsage
from covspec.edge_runtime.planning import Outcome, plan_verify
from covspec.edge_runtime.prepass import planned_windows
from covspec.edge_runtime.session import TargetSession
from covspec.edge_runtime.settings import EdgeSettings
from covspec.edge_runtime.table import SessionTable
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import Request, ServerKeys

PROMPT = "what is the color of the circle ?"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    adapter = load_adapter(tiny_models.build_llava(tmp_path_factory.mktemp("planning") / "target", seed=0))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    return adapter, adapter.encode_image(adapter.preprocess(image))


GREEDY = SamplingParams()


def open_session(target, params: SamplingParams = GREEDY, max_new_tokens: int = 32, device: str = "a") -> TargetSession:
    adapter, visual = target
    session = TargetSession.open(adapter, visual, PROMPT, None, params, max_new_tokens)
    session.usage = SessionUsage(device=device, mode="vanilla_sd")
    return session


def verify(sid: int = 1, round_no: int = 0, tokens=(3, 4), **fields) -> wire.Verify:
    return wire.Verify(sid=sid, seq=round_no + 10, round=round_no, tokens=np.asarray(tokens, dtype=np.int32), **fields)


def test_a_fitting_window_is_verified_with_the_root_first_and_within_the_token_limit(target):
    session = open_session(target)
    plan = plan_verify(session, verify(tokens=(3, 4, 5)), target[0].vocab_size)
    assert plan.outcome is Outcome.VERIFY and plan.scheme == "greedy"
    assert plan.ids.tolist() == [session.committed[-1], 3, 4, 5]
    short = open_session(target, max_new_tokens=3)  # one token committed: room for 2 more
    assert plan_verify(short, verify(tokens=(3, 4, 5)), target[0].vocab_size).ids.tolist() == [short.committed[-1], 3, 4]


def test_misfits_are_refused_or_dropped_and_a_retry_is_a_repeat(target):
    adapter, _ = target
    session = open_session(target)
    late = plan_verify(session, verify(round_no=2), adapter.vocab_size)
    assert late.outcome is Outcome.REFUSE and "out of order" in late.problem and late.ids is None
    ahead = plan_verify(session, verify(round_no=0, pos=5), adapter.vocab_size)  # the answer goes on at 1
    assert ahead.outcome is Outcome.DROP and "answer goes on at 1" in ahead.problem
    wrong_root = plan_verify(session, verify(root=(session.committed[-1] + 1) % adapter.vocab_size), adapter.vocab_size)
    assert wrong_root.outcome is Outcome.REFUSE and "root token" in wrong_root.problem
    plan = plan_verify(session, verify(), adapter.vocab_size)
    session.verify(0, plan.root, plan.draft, plan.scheme)
    assert plan_verify(session, verify(), adapter.vocab_size).outcome is Outcome.REPEAT


@pytest.mark.parametrize("fields, params, code", [
    ({"q": np.full(2, 0.5, dtype=np.float32)}, SamplingParams(), wire.ErrorCode.BAD_MESSAGE),  # q for greedy
    ({}, SamplingParams(temperature=1.0), wire.ErrorCode.BAD_MESSAGE),  # sampling without q or dists
    ({"tokens": (3, 10**6)}, SamplingParams(), wire.ErrorCode.BAD_MESSAGE),  # beyond the vocabulary
])
def test_a_message_that_does_not_fit_its_session_is_an_error(target, fields, params, code):
    session = open_session(target, params)
    with pytest.raises(wire.ProtocolError) as err:
        plan_verify(session, verify(**fields), target[0].vocab_size)
    assert err.value.code == code


def test_the_batched_pass_scores_only_first_verifies_the_handler_will_verify(target):
    table = SessionTable(EdgeSettings())
    for sid in (1, 2, 3, 4):
        table.add(sid, open_session(target, SamplingParams(temperature=1.0) if sid == 3 else SamplingParams()))

    def incoming(msg: wire.Message) -> Incoming:
        return Incoming(Request(peer=b"p", frames=[], user_id="a"), msg)

    gathered = [incoming(verify(1)), incoming(verify(1, round_no=1)), incoming(verify(2, pos=7)),
                incoming(verify(3)), incoming(verify(4)), incoming(verify(9))]
    planned = planned_windows(gathered, table, target[0].vocab_size)
    # 1: its first VERIFY only; 2: dropped (sent ahead to the wrong place); 3: no q for sampling; 9: no session
    assert sorted(planned) == [1, 4]
    assert planned[1].tolist() == [table.sessions[1].committed[-1], 3, 4]


def fake_session(device: str, open_seq: int = 1) -> SimpleNamespace:
    return SimpleNamespace(usage=SessionUsage(device=device, mode="vanilla_sd"), open_seq=open_seq, committed=[1],
                           last_active=time.monotonic(), done=False)


def open_msg(sid: int, seq: int = 1) -> wire.Open:
    return wire.Open(sid=sid, seq=seq, prompt=PROMPT, mode="vanilla_sd", image=b"", max_new_tokens=8)


def test_the_table_admits_within_its_quotas_and_refuses_late_opens():
    table = SessionTable(EdgeSettings(max_sessions=3, max_sessions_per_device=2))
    assert table.admit(open_msg(1), "a") is None
    table.add(1, fake_session("a"))
    assert table.admit(open_msg(1), "a") is table.sessions[1]  # a retried OPEN
    table.add(2, fake_session("a"))
    with pytest.raises(wire.ProtocolError) as err:
        table.admit(open_msg(3), "a")
    assert err.value.code == wire.ErrorCode.LIMIT
    assert table.admit(open_msg(2, seq=5), "a") is None  # the owner reopening its own session is no new one
    table.add(3, fake_session("b"))
    with pytest.raises(wire.ProtocolError) as err:
        table.admit(open_msg(4), "c")
    assert err.value.code == wire.ErrorCode.BUSY
    assert table.close(3, "b") is not None and table.close(3, "b") is None
    with pytest.raises(wire.ProtocolError) as err:
        table.admit(open_msg(3), "b")  # a late copy of the closed session's OPEN
    assert err.value.code == wire.ErrorCode.BAD_STATE
    with pytest.raises(wire.ProtocolError) as err:
        table.admit(open_msg(0), "b")
    assert err.value.code == wire.ErrorCode.BAD_MESSAGE


def test_with_keys_a_session_answers_only_its_device_and_idle_ones_are_freed():
    keys = ServerKeys(public=b"", secret=b"", allow_dir=Path("."))
    table = SessionTable(EdgeSettings(keys=keys, idle_timeout_s=0.05))
    table.add(1, fake_session("a"))
    assert table.find(1, "b") is None and table.find(1, "a") is not None
    with pytest.raises(wire.ProtocolError) as err:
        table.active(wire.Stream(sid=1, seq=2), "b")
    assert err.value.code == wire.ErrorCode.UNKNOWN_SESSION
    with pytest.raises(wire.ProtocolError) as err:
        table.admit(open_msg(1, seq=9), "b")
    assert err.value.code == wire.ErrorCode.BAD_STATE
    assert table.close(1, "b") is None and 1 in table.sessions
    table.add(2, fake_session("b"))
    table.sessions[1].last_active -= 1.0
    assert table.free_idle() == 1 and list(table.sessions) == [2]
