"""The conformance suite (covspec/tools/conformance.py) against a real in-process edge on the demo target:
every check passes; with one rule of the edge deliberately broken the suite fails, naming that check;
the suite's module imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_runtimes import RunningEdge

import covspec.edge_runtime.handlers as handlers
from covspec.cli import main
from covspec.demo import default_target_path
from covspec.edge_runtime.planning import Outcome, VerifyPlan
from covspec.edge_runtime.session import TargetSession
from covspec.tools.conformance import CHECKS, EdgeUnreachable, run_suite
from covspec.transport.channel import generate_keys, load_client_keys, load_server_keys


@pytest.fixture(scope="module")
def edge():
    running = RunningEdge(default_target_path())
    yield running
    running.close()


def outcomes_by_name(edge, timeout_s: float = 60, **kwargs) -> dict[str, object]:
    return {o.name: o for o in run_suite(edge.endpoint, fingerprint=edge.server.fingerprint, timeout_s=timeout_s, **kwargs)}


def test_every_check_passes_against_the_edge(edge):
    outcomes = outcomes_by_name(edge)
    assert list(outcomes) == [name for name, _ in CHECKS]
    failed = {name: o.reason for name, o in outcomes.items() if o.status != "pass"}
    assert not failed, failed
    assert edge.server.sessions == {}, "the suite closes every session it opens"


def test_the_cli_exits_zero_on_a_conforming_edge(edge, capsys):
    code = main(["conformance", "--edge", edge.endpoint, "--check", "ping_pong", "--check", "unknown_session"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS  ping_pong" in out and "2 passed, 0 failed" in out


def test_a_repeated_verify_answered_anew_fails_the_suite(edge, monkeypatch, capsys):
    """Broken rule: the edge forgets the round it answered, so a retried VERIFY is not the same RESULT."""
    monkeypatch.setattr(TargetSession, "is_repeat", lambda self, round_no: False)
    outcomes = outcomes_by_name(edge, only=["ping_pong", "verify_result", "verify_repeat_same_result"])
    assert outcomes["ping_pong"].status == "pass" and outcomes["verify_result"].status == "pass"
    broken = outcomes["verify_repeat_same_result"]
    assert broken.status == "fail" and "VERIFY round 0 repeated" in broken.reason, broken.reason
    code = main(["conformance", "--edge", edge.endpoint, "--check", "verify_repeat_same_result"])
    assert code == 1 and "0 passed, 1 failed, 0 skipped: verify_repeat_same_result" in capsys.readouterr().out


def test_a_window_ahead_refused_without_bad_round_fails_the_suite(edge, monkeypatch):
    """Broken rule: a window sent ahead that does not fit is refused as an error instead of dropped."""
    real = handlers.plan_verify

    def no_drop(session, msg, vocab) -> VerifyPlan:
        plan = real(session, msg, vocab)
        return VerifyPlan(Outcome.REFUSE, plan.scheme, plan.root, plan.draft, plan.problem) if plan.outcome is Outcome.DROP else plan

    monkeypatch.setattr(handlers, "plan_verify", no_drop)
    outcomes = outcomes_by_name(edge, only=["window_ahead_dropped", "round_out_of_order"])
    assert outcomes["round_out_of_order"].status == "pass"
    broken = outcomes["window_ahead_dropped"]
    assert broken.status == "fail" and "expected BAD_ROUND" in broken.reason, broken.reason


def test_an_edge_that_stops_serving_after_a_malformed_message_fails(edge, monkeypatch):
    """Broken rule: PING is not answered (as if the loop had died on the malformed messages before it)."""
    monkeypatch.setitem(edge.server.HANDLERS, handlers.wire.Ping, lambda server, ctx, msg: iter(()))
    outcomes = outcomes_by_name(edge, timeout_s=2, only=["malformed_then_serving"])
    broken = outcomes["malformed_then_serving"]
    assert broken.status == "fail" and "no reply to a PING after the malformed messages" in broken.reason, broken.reason


def test_the_suite_imports_no_torch():
    code = ("import sys; import covspec.tools.conformance; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_suite_over_curve_with_key_files(tmp_path):
    """`covspec conformance --key/--edge-key` against a CURVE edge: the whole suite passes with an admitted
    device key; with a key the edge does not admit, the suite stops at once saying the handshake was refused."""
    generate_keys(tmp_path / "edge", "edge")
    generate_keys(tmp_path / "allowed", "phone")
    generate_keys(tmp_path / "intruder", "intruder")
    running = RunningEdge(default_target_path(),
                          keys=load_server_keys(tmp_path / "edge" / "edge.key_secret", tmp_path / "allowed"))
    try:
        edge_key = str(tmp_path / "edge" / "edge.key")
        admitted = ["conformance", "--edge", running.endpoint, "--key", str(tmp_path / "allowed" / "phone.key_secret"),
                    "--edge-key", edge_key, "--timeout", "60", "--json"]
        assert main(admitted) == 0
        refused = ["conformance", "--edge", running.endpoint, "--key",
                   str(tmp_path / "intruder" / "intruder.key_secret"), "--edge-key", edge_key,
                   "--check", "ping_pong", "--check", "open_opened"]
        with pytest.raises(EdgeUnreachable, match="refused the connection"):
            run_suite(running.endpoint, load_client_keys(tmp_path / "intruder" / "intruder.key_secret", edge_key),
                      only=["ping_pong", "open_opened"], timeout_s=10)
        assert main(refused) == 2  # the CLI's exit status for an error it names (CovspecError)
    finally:
        running.close()


def test_no_edge_at_the_address_is_one_clear_error():
    with pytest.raises(EdgeUnreachable, match="nothing accepts connections at tcp://127.0.0.1:9"):
        run_suite("tcp://127.0.0.1:9", timeout_s=1)
