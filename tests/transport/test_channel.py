"""DEALER client: retries, a clear give-up error, stale replies dropped, bytes counted on the socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import zmq

from covspec.transport import protocol as P
from covspec.transport.channel import Client, MeteredSocket, PeerUnavailable, RemoteError, make_socket
from covspec.transport.link import Link


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Edge:
    """A ROUTER in a thread; `answer(msg, n)` returns the replies to the n-th request (0-based)."""

    def __init__(self, answer: Callable[[P.Message, int], list[P.Message]], endpoint: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = MeteredSocket(make_socket(self.ctx, zmq.ROUTER))
        self.endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
        self.sock.sock.bind(self.endpoint)
        self.seen: list[P.Message] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(answer,), daemon=True)
        self.thread.start()

    def _run(self, answer: Callable[[P.Message, int], list[P.Message]]) -> None:
        while not self.stop.is_set():
            got = self.sock.recv_frames(0.02)
            if got is None:
                continue
            peer, frames = got
            try:
                msg = P.decode(frames)
            except P.ProtocolError as e:
                self.sock.send(P.Error.of(e), peer)
                continue
            self.seen.append(msg)
            for reply in answer(msg, len(self.seen) - 1):
                self.sock.send(reply, peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()
        self.ctx.term()


def pong(msg: P.Message, n: int) -> list[P.Message]:
    return [P.Pong(sid=msg.sid, seq=msg.seq, t=msg.t)]


def test_gives_up_with_clear_error() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, timeout_s=0.1, retries=2) as c:
        t = time.monotonic()
        with pytest.raises(PeerUnavailable) as e:
            c.request(P.Ping(t=1.0))
        elapsed = time.monotonic() - t
        assert c.counters.msgs_sent == 3
    assert endpoint in str(e.value) and "3 attempt(s)" in str(e.value) and "PING" in str(e.value)
    assert 0.25 < elapsed < 1.5


def test_retry_resends_same_seq_and_succeeds() -> None:
    edge = Edge(lambda m, n: [] if n == 0 else pong(m, n))  # drops the first copy
    try:
        with Client(edge.endpoint, timeout_s=0.3, retries=2) as c:
            reply = c.request(P.Ping(t=2.5))
            assert isinstance(reply, P.Pong) and reply.t == 2.5
            assert [m.seq for m in edge.seen] == [reply.seq, reply.seq]
            assert isinstance(c.request(P.Ping(t=3.0)), P.Pong)  # and the next request works at once
    finally:
        edge.close()


def test_stale_replies_dropped_and_errors_raised() -> None:
    def answer(m: P.Message, n: int) -> list[P.Message]:
        if isinstance(m, P.Close):
            return [P.Error(sid=m.sid, seq=m.seq, code=P.ErrorCode.UNKNOWN_SESSION, message=f"no session {m.sid}")]
        if isinstance(m, P.Stream):
            return [P.Error(code=P.ErrorCode.BAD_VERSION, message="protocol version 2, this side speaks 1")]
        return [P.Pong(seq=m.seq + 100, t=-1.0), *pong(m, n)]

    edge = Edge(answer)
    try:
        with Client(edge.endpoint, timeout_s=1.0, retries=0) as c:
            assert c.request(P.Ping(t=4.0)).t == 4.0 and c.stale == 1
            with pytest.raises(RemoteError, match="no session 9") as e:
                c.request(P.Close(sid=9))
            assert e.value.code == P.ErrorCode.UNKNOWN_SESSION
            with pytest.raises(RemoteError, match="version") as e:  # unaddressed (seq 0) errors count too
                c.request(P.Stream(sid=9))
            assert e.value.code == P.ErrorCode.BAD_VERSION
    finally:
        edge.close()


def pong_or_result(m: P.Message, n: int) -> list[P.Message]:
    if isinstance(m, P.Verify):
        return [P.Result(sid=m.sid, seq=m.seq, round=m.round, accepted=len(m.tokens), token=1)]
    return pong(m, n)


def test_byte_counters_exact_and_link_cross_check() -> None:
    msgs = [P.Ping(t=1.0), P.Verify(sid=3, round=0, tokens=np.arange(8, dtype=np.int32),
                                    dists=np.full((8, 5000), 2e-4, np.float32))]
    edge = Edge(pong_or_result)
    try:
        port = int(edge.endpoint.rsplit(":", 1)[1])
        with Link(("127.0.0.1", port), "wifi") as link, Client(link.endpoint, timeout_s=2.0, retries=0) as c:
            replies = [c.request(m) for m in msgs]
            sent = sum(len(f) for i, m in enumerate(msgs) for f in P.encode(replace(m, seq=i + 1)))
            recv = sum(len(f) for r in replies for f in P.encode(r))
            time.sleep(0.05)
            s = link.stats()
        assert c.counters.bytes_sent == sent == edge.sock.counters.bytes_recv
        assert c.counters.bytes_recv == recv == edge.sock.counters.bytes_sent
        # the link also carries ZMTP greetings and handshakes: a small constant on top of the socket's count
        assert 0 <= s["bytes_up"] - c.counters.wire_sent < 200, (s, c.counters)
        assert 0 <= s["bytes_down"] - c.counters.wire_recv < 200, (s, c.counters)
    finally:
        edge.close()
