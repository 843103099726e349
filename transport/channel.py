"""ZeroMQ plumbing shared by both runtimes: the one socket factory, byte counters, a DEALER client.

Bytes on the wire, as the bench reports them, are counted here: the payload bytes of every frame a
socket sends or receives (a ROUTER's peer-identity frame is routing, not payload, and is not
counted), plus an estimate of ZMTP framing (2 bytes per frame under 256 bytes, 9 above). The link
emulator's counts, which also include ZMTP greetings and handshakes, are the cross-check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import zmq

from covspec.errors import CovspecError

from .protocol import DEFAULT_LIMITS, Error, Limits, Message, ProtocolError, decode, encode


class PeerUnavailable(CovspecError):
    """No reply from the peer after every retry."""

    def __init__(self, endpoint: str, what: str, attempts: int, timeout_s: float) -> None:
        super().__init__(
            f"no reply from {endpoint} to {what} after {attempts} attempt(s) of {timeout_s:g} s each: "
            "is the edge running and reachable at that address?"
        )
        self.endpoint = endpoint


class RemoteError(ProtocolError):
    """The peer answered with an ERROR message."""

    def __init__(self, endpoint: str, err: Error) -> None:
        super().__init__(err.code, f"{endpoint} answered: {err.message}", err.sid, err.seq)


@dataclass
class ByteCounters:
    bytes_sent: int = 0  # frame payload bytes
    bytes_recv: int = 0
    wire_sent: int = 0  # payload + ZMTP frame headers
    wire_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0

    def add(self, frames: list[bytes], sent: bool) -> None:
        n = sum(len(f) for f in frames)
        wire = n + sum(2 if len(f) < 256 else 9 for f in frames)
        if sent:
            self.bytes_sent, self.wire_sent, self.msgs_sent = self.bytes_sent + n, self.wire_sent + wire, self.msgs_sent + 1
        else:
            self.bytes_recv, self.wire_recv, self.msgs_recv = self.bytes_recv + n, self.wire_recv + wire, self.msgs_recv + 1


def make_socket(ctx: zmq.Context, kind: int, *, max_msg_bytes: int | None = None) -> zmq.Socket:
    """Every runtime socket is made here (CURVE keys will be set here too: a later issue).
    `max_msg_bytes`: ZeroMQ drops a peer that sends a bigger frame (ZMQ_MAXMSGSIZE)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if max_msg_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    return sock


class MeteredSocket:
    """A DEALER or ROUTER socket that counts the bytes of every frame. On a ROUTER, `peer` is the
    identity frame: recv returns it, send needs it; it is never passed to encode/decode."""

    def __init__(self, sock: zmq.Socket, counters: ByteCounters | None = None) -> None:
        self.sock = sock
        self.router = sock.type == zmq.ROUTER
        self.counters = counters or ByteCounters()

    def send_frames(self, frames: list[bytes], peer: bytes | None = None) -> None:
        self.counters.add(frames, sent=True)
        self.sock.send_multipart([peer, *frames] if self.router else frames, copy=False)

    def send(self, msg: Message, peer: bytes | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
        self.send_frames(encode(msg, limits), peer)

    def recv_frames(self, timeout_s: float | None = None) -> tuple[bytes | None, list[bytes]] | None:
        """(peer or None, frames), or None on timeout."""
        if timeout_s is not None and not self.sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart()
        peer = frames.pop(0) if self.router and frames else None
        self.counters.add(frames, sent=False)
        return peer, frames

    def close(self) -> None:
        self.sock.close(linger=0)


class Client:
    """The device's DEALER: request/response with a timeout and bounded retries.

    A retry resends the same message (same `seq`) on a fresh socket ("lazy pirate"), so requests must
    be idempotent on the edge (a repeated VERIFY of a round returns the same RESULT); replies whose
    `seq` is not the awaited one are stale and dropped. An ERROR reply to the awaited request, or one
    with seq 0 (the edge could not read which request it answers), raises RemoteError. Seqs start at 1."""

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0, retries: int = 2, ctx: zmq.Context | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.limits = limits
        self.counters = ByteCounters()  # across reconnections
        self.stale = 0  # replies dropped because their seq was not awaited
        self._ctx = ctx or zmq.Context.instance()
        self._seq = 0
        self._sock = self._connect()

    def _connect(self) -> MeteredSocket:
        sock = make_socket(self._ctx, zmq.DEALER, max_msg_bytes=self.limits.max_total_bytes)
        sock.connect(self.endpoint)
        return MeteredSocket(sock, self.counters)

    def send(self, msg: Message) -> Message:
        """Send without waiting (pipelined windows, STREAM); returns the message with its assigned seq."""
        self._seq += 1
        msg = replace(msg, seq=self._seq)
        self._sock.send(msg, limits=self.limits)
        return msg

    def recv(self, seq: int, timeout_s: float | None = None) -> Message | None:
        """The next reply to request `seq`, or None on timeout. Raises RemoteError on an ERROR reply."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while (left := deadline - time.monotonic()) > 0:
            got = self._sock.recv_frames(left)
            if got is None:
                return None
            reply = decode(got[1], self.limits)
            if isinstance(reply, Error) and reply.seq in (0, seq):  # seq 0: the edge could not read ours
                raise RemoteError(self.endpoint, reply)
            if reply.seq != seq:
                self.stale += 1
                continue
            return reply
        return None

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Whether a reply is waiting (without reading it)."""
        return bool(self._sock.sock.poll(int(timeout_s * 1000), zmq.POLLIN))

    def request(self, msg: Message, *, timeout_s: float | None = None, retries: int | None = None) -> Message:
        """Send `msg`, wait for its reply; retry up to `retries` times; raise PeerUnavailable then."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.retries if retries is None else retries)
        sent = self.send(msg)
        for attempt in range(attempts):
            if attempt:
                self._sock.close()
                self._sock = self._connect()
                self._sock.send(sent, limits=self.limits)
            reply = self.recv(sent.seq, timeout_s)
            if reply is not None:
                return reply
        raise PeerUnavailable(self.endpoint, f"{sent.TYPE} (seq {sent.seq})", attempts, timeout_s)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
