"""`covspec fuzz`: the decoder's property over generated hostile messages, and a short fuzz of a real
edge process (every message answered, replies well-formed, same answer after, RSS bounded)."""

from __future__ import annotations

import json
import random

import tiny_models

from covspec.tools import fuzz
from covspec.transport import protocol as wire


def test_mutations_make_hostile_messages_the_decoder_refuses() -> None:
    report = fuzz.fuzz_decoder(5000, seed=1)
    assert report.messages == 5000
    assert report.failures == []
    refused = sum(report.refused.values())
    assert refused + report.decoded == 5000
    assert refused > 0.9 * 5000  # the mutations really break messages...
    assert {"BAD_MESSAGE", "BAD_VERSION"} <= set(report.refused)
    assert set(report.by_mutation) == {m.__name__.lstrip("_") for m in fuzz.MUTATIONS}  # ...of every kind


def test_check_decode_flags_what_breaks_the_property(monkeypatch) -> None:
    frames = wire.encode(wire.Ping(seq=1, t=1.0))
    assert fuzz.check_decode(frames) == ("decoded", None)
    assert fuzz.check_decode([b"\xc1"])[0] == "BAD_MESSAGE"

    def broken(frames, limits=wire.DEFAULT_LIMITS):
        raise IndexError("list index out of range")

    monkeypatch.setattr(wire, "decode", broken)
    outcome, problem = fuzz.check_decode(frames)
    assert outcome == "crashed" and "IndexError" in problem


def test_every_seed_message_is_valid_and_every_kind_is_there() -> None:
    seeds = fuzz.seed_messages(7, fuzz.png_bytes())
    assert {type(m) for m in seeds} == set(wire._BY_TYPE.values())
    for msg in seeds:
        assert wire.decode(wire.encode(msg)) == msg
    rng = random.Random(0)
    for msg in fuzz.wrong_state_messages(rng, 7, vocab=100):
        assert wire.decode(wire.encode(msg)) == msg  # well-formed: only the state makes them wrong


def test_fuzz_a_running_edge(tmp_path) -> None:
    target = tiny_models.build_llava(tmp_path / "target", seed=0)
    out = tmp_path / "fuzz"
    code = fuzz.main(["--decoder", "2000", "--edge", "1500", "--model", str(target), "--out", str(out)])
    report = json.loads((out / "fuzz.json").read_text())
    edge = report["edge"]
    assert edge["messages"] == 1500 and edge["unanswered"] == 0 and edge["malformed_replies"] == []
    assert edge["replies_by_type"]["ERROR"] > 1000
    assert edge["answer_before"] == edge["answer_after"] and len(edge["answer_before"]) > 1
    assert abs(edge["rss_growth"]) <= 0.10 and edge["passed"]
    assert report["total_messages"] == 3500 and code == 0


def test_regression_a_repeated_stream_is_answered(tmp_path) -> None:
    """Found by the fuzz (results/fuzz): a STREAM repeating an earlier one's seq on a live session got
    no reply at all (it was dropped as a duplicate), leaving its sender waiting for the timeout. It
    now gets ERROR DUPLICATE, which a client drops like a stale reply (a network-duplicated STREAM's
    ERROR may overtake the original's last chunk)."""
    import zmq
    from test_runtimes import RunningEdge

    edge = RunningEdge(tiny_models.build_llava(tmp_path / "target", seed=0))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.connect(edge.endpoint)
        sock.send_multipart(wire.encode(wire.Open(sid=11, seq=1, image=fuzz.png_bytes(), prompt="what is it ?",
                                                  mode="target_only", max_new_tokens=4)))
        assert isinstance(wire.decode(sock.recv_multipart()), wire.Opened)
        replies = []
        for _ in range(2):
            sock.send_multipart(wire.encode(wire.Stream(sid=11, seq=5)))
            while sock.poll(5000, zmq.POLLIN):
                replies.append(wire.decode(sock.recv_multipart()))
                if isinstance(replies[-1], wire.Error) or replies[-1].done:
                    break
        assert isinstance(replies[-2], wire.Streamed) and replies[-2].done
        assert isinstance(replies[-1], wire.Error) and replies[-1].code == wire.ErrorCode.DUPLICATE
        assert "served already" in replies[-1].message and replies[-1].seq == 5
    finally:
        sock.close(0)
        edge.close()
