"""`covspec conformance --edge tcp://HOST:PORT`: does an edge keep the rules of transport/PROTOCOL.md?

A suite of named checks a device implementation's author (or an edge's) runs against a running edge,
speaking raw messages of this protocol version (transport.protocol.PROTOCOL_VERSION): requests through `transport.channel.Client`, and resends with the same
`seq` or deliberately malformed frames through a second DEALER of the same keys. Each check passes,
fails with the reason, or is skipped (saying why); the exit code is 1 when any fails, 2 when no edge
answers at the address or its CURVE handshake refuses this device (one error line). No torch, no
transformers: it runs wherever pyzmq, msgpack, numpy and Pillow do.

The checks open greedy sessions on a small generated image (`--prompt` must suit the edge's target),
close every session they open, and need at most two sessions open at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import zmq

from covspec.errors import CovspecError
from covspec.transport import protocol as wire
from covspec.transport.channel import (
    Client,
    ClientKeys,
    HandshakeRefused,
    MeteredSocket,
    PeerUnavailable,
    RemoteError,
    make_socket,
)

DEFAULT_PROMPT = "describe the image ."
NOT_A_FINGERPRINT = "conformance-check-not-a-fingerprint"


class CheckFailed(CovspecError):
    """A rule the edge broke: the message says which and what it sent instead."""


class CheckSkipped(CovspecError):
    """A check that cannot run against this edge (the reason says why)."""


@dataclass
class Outcome:
    name: str
    status: str  # "pass" | "fail" | "skip"
    reason: str
    seconds: float


def test_image(size: int = 64) -> bytes:
    """A small PNG: a red disc and a blue square on grey (built with numpy and Pillow)."""
    from PIL import Image

    y, x = np.mgrid[:size, :size]
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    pixels[(x - size // 3) ** 2 + (y - size // 3) ** 2 < (size // 6) ** 2] = (220, 30, 30)
    pixels[size // 2:size // 2 + size // 4, size // 2:size // 2 + size // 4] = (30, 30, 220)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Edge:
    """The edge under test: a Client for requests, a raw DEALER for resends and malformed frames."""

    def __init__(self, endpoint: str, keys: ClientKeys | None = None, timeout_s: float = 30.0,
                 prompt: str = DEFAULT_PROMPT, fingerprint: str | None = None) -> None:
        self.endpoint, self.keys, self.timeout_s = endpoint, keys, timeout_s
        self.prompt, self.fingerprint = prompt, fingerprint
        self.image = test_image()
        self.client = Client(endpoint, timeout_s=timeout_s, retries=0, keys=keys)
        self.raw = MeteredSocket(make_socket(zmq.Context.instance(), zmq.DEALER, client_keys=keys))
        self.raw.sock.connect(endpoint)
        self.welcome: wire.Welcome | None = None
        self.rng = random.Random()
        self._raw_seq = 1 << 40  # far from the Client's seqs

    def close(self) -> None:
        self.client.close()
        self.raw.close()

    # --- requests ------------------------------------------------------------------------------
    def request(self, msg: wire.Message) -> wire.Message:
        """The reply to `msg` (an ERROR reply is returned, not raised)."""
        try:
            return self.client.request(msg)
        except RemoteError as err:
            return wire.Error(sid=err.sid, seq=err.seq, code=err.code, message=err.message)

    def send_frames(self, frames: list[bytes]) -> wire.Message:
        """Sends raw frames on the second socket; the next reply, decoded."""
        self.raw.send_frames(frames)
        got = self.raw.recv_frames(self.timeout_s)
        if got is None:
            raise CheckFailed(f"no reply within {self.timeout_s:g} s (the edge must answer every message)")
        return wire.decode(got[1])

    def resend(self, msg: wire.Message) -> wire.Message:
        """`msg` sent again exactly as it is (same sid and seq) on the second socket: its reply."""
        return self.send_frames(wire.encode(msg))

    def raw_seq(self) -> int:
        self._raw_seq += 1
        return self._raw_seq

    def open(self, mode: str = "vanilla_sd", max_new_tokens: int = 64) -> tuple[wire.Open, wire.Opened]:
        msg = wire.Open(sid=self.rng.randrange(1, 2**63), image=self.image, prompt=self.prompt, mode=mode,
                        max_new_tokens=max_new_tokens)
        reply = self.request(msg)
        opened = expect(reply, wire.Opened, "OPEN")
        return replace(msg, seq=reply.seq), opened

    def close_session(self, sid: int) -> None:
        try:
            self.request(wire.Close(sid=sid))
        except Exception:  # noqa: BLE001 - cleanup: the check's own outcome is what matters
            pass


def expect(reply: wire.Message, kind: type[wire.Message], what: str) -> wire.Message:
    if isinstance(reply, wire.Error):
        raise CheckFailed(f"{what} answered ERROR {reply.code.name}: {reply.message[:200]}")
    if not isinstance(reply, kind):
        raise CheckFailed(f"{what} answered {reply.TYPE}, expected {kind.TYPE}")
    return reply


def expect_error(reply: wire.Message, code: wire.ErrorCode, what: str) -> wire.Error:
    if not isinstance(reply, wire.Error):
        raise CheckFailed(f"{what} answered {reply.TYPE}, expected ERROR {code.name}")
    if reply.code != code:
        raise CheckFailed(f"{what} answered ERROR {reply.code.name} ({reply.message[:150]}), expected {code.name}")
    return reply


def same_result(a: wire.Result, b: wire.Result) -> str | None:
    """What differs between two RESULTs of the same round (seq and timings aside), or None."""
    for name in ("round", "accepted", "token", "done"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} {getattr(a, name)!r} then {getattr(b, name)!r}"
    for name in ("cand_ids", "cand_probs"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            return f"{name} differs"
    return None


def check_result(result: wire.Result, verify: wire.Verify) -> None:
    """The rules of one greedy RESULT against its VERIFY."""
    k = len(verify.tokens)
    if result.sid != verify.sid or result.seq != verify.seq:
        raise CheckFailed(f"RESULT addressed to sid {result.sid} seq {result.seq}, sent sid {verify.sid} seq {verify.seq}")
    if result.round != verify.round:
        raise CheckFailed(f"RESULT.round {result.round} for VERIFY round {verify.round}")
    if not 0 <= result.accepted <= k:
        raise CheckFailed(f"RESULT.accepted {result.accepted} outside 0..{k}")
    if result.token is None and not result.done:
        raise CheckFailed("RESULT of a greedy session without a next token, and not done")
    if result.cand_ids is not None:
        raise CheckFailed("RESULT of a greedy session carries cand_ids/cand_probs")


# --- the checks ------------------------------------------------------------------------------------


def check_ping(edge: Edge) -> str:
    sent = wire.Ping(t=1234.5, echo=16)
    pong = expect(edge.request(sent), wire.Pong, "PING")
    if pong.t != sent.t:
        raise CheckFailed(f"PONG.t {pong.t}, PING sent {sent.t}")
    if pong.pad is None or len(pong.pad) != 16:
        raise CheckFailed(f"PONG.pad of {0 if pong.pad is None else len(pong.pad)} bytes, PING asked echo=16")
    return "PONG echoes t and 16 bytes of filler"


def check_hello(edge: Edge) -> str:
    wrong = edge.request(wire.Hello(fingerprint=NOT_A_FINGERPRINT, family="any", model="conformance"))
    expect_error(wrong, wire.ErrorCode.FINGERPRINT_MISMATCH, "HELLO with a foreign fingerprint")
    if edge.fingerprint is None:
        return "a foreign fingerprint is refused (FINGERPRINT_MISMATCH); WELCOME not checked (no --fingerprint)"
    welcome = expect(edge.request(wire.Hello(fingerprint=edge.fingerprint, family="any", model="conformance")),
                     wire.Welcome, "HELLO")
    if welcome.fingerprint != edge.fingerprint:
        raise CheckFailed(f"WELCOME.fingerprint {welcome.fingerprint[:16]}... is not the one HELLO matched")
    edge.welcome = welcome
    return (f"FINGERPRINT_MISMATCH for a foreign draft; WELCOME: vocab {welcome.vocab_size}, max_window "
            f"{welcome.max_window}, max_new_tokens {welcome.max_new_tokens}")


def check_version(edge: Edge) -> str:
    seq = edge.raw_seq()
    header = {"v": wire.PROTOCOL_VERSION + 1, "type": "HELLO", "sid": 0, "seq": seq, "fingerprint": "x",
              "family": "x", "model": "x"}
    import msgpack

    err = expect_error(edge.send_frames([msgpack.packb(header)]), wire.ErrorCode.BAD_VERSION,
                       f"HELLO of version {wire.PROTOCOL_VERSION + 1}")
    if err.seq != seq:
        raise CheckFailed(f"the BAD_VERSION reply carries seq {err.seq}, the request's was {seq}")
    return "a version-2 HELLO gets BAD_VERSION addressed to its seq"


def check_open(edge: Edge) -> str:
    msg, opened = edge.open(max_new_tokens=32)
    try:
        if opened.sid != msg.sid or opened.seq != msg.seq:
            raise CheckFailed(f"OPENED addressed to sid {opened.sid} seq {opened.seq}, OPEN had {msg.sid}/{msg.seq}")
        if edge.welcome is not None and opened.token >= edge.welcome.vocab_size:
            raise CheckFailed(f"OPENED.token {opened.token} is not below the vocabulary size {edge.welcome.vocab_size}")
        again = expect(edge.resend(msg), wire.Opened, "a retried OPEN (same sid and seq)")
        if (again.token, again.done) != (opened.token, opened.done):
            raise CheckFailed(f"a retried OPEN answered token {again.token} done {again.done}, first "
                              f"{opened.token} {opened.done}")
        zero = edge.request(replace(msg, sid=0))
        expect_error(zero, wire.ErrorCode.BAD_MESSAGE, "OPEN with sid 0")
        return f"OPENED token {opened.token} done {opened.done}; a retried OPEN gets the same; sid 0 refused"
    finally:
        edge.close_session(msg.sid)


def first_round(edge: Edge, k: int = 4) -> tuple[wire.Open, wire.Opened, wire.Verify, wire.Result]:
    """A greedy session and its round 0 on a window of k copies of OPENED's token (valid ids)."""
    msg, opened = edge.open(max_new_tokens=64)
    if opened.done:
        edge.close_session(msg.sid)
        raise CheckSkipped("the answer ended at its first token: no round to verify (try another --prompt)")
    verify = edge.client.send(wire.Verify(sid=msg.sid, round=0, tokens=np.full(k, opened.token, dtype=np.int32)))
    reply = edge.client.recv(verify.seq, edge.timeout_s)
    if reply is None:
        edge.close_session(msg.sid)
        raise CheckFailed(f"no RESULT within {edge.timeout_s:g} s")
    return msg, opened, verify, expect(reply, wire.Result, "VERIFY round 0")


def check_verify(edge: Edge) -> str:
    try:
        msg, _, verify, result = first_round(edge)
    except RemoteError as err:
        raise CheckFailed(f"VERIFY round 0 answered ERROR {err.code.name}: {err.message[:200]}") from None
    try:
        check_result(result, verify)
        return f"round 0: {result.accepted} of {len(verify.tokens)} accepted, next token {result.token}"
    finally:
        edge.close_session(msg.sid)


def check_repeat(edge: Edge) -> str:
    msg, _, verify, result = first_round(edge)
    try:
        again = expect(edge.request(replace(verify, seq=0)), wire.Result, "VERIFY round 0 repeated (new seq)")
        if (diff := same_result(result, again)) is not None:
            raise CheckFailed(f"a repeated VERIFY of round 0 got a different RESULT: {diff}")
        resent = expect(edge.resend(verify), wire.Result, "VERIFY round 0 resent (same seq)")
        if (diff := same_result(result, resent)) is not None:
            raise CheckFailed(f"VERIFY round 0 resent with its seq got a different RESULT: {diff}")
        return "round 0 asked three times (new seq, same seq): the same RESULT each time"
    finally:
        edge.close_session(msg.sid)


def _next_window(result: wire.Result) -> tuple[int, int]:
    """(pos, root) of the window after a round-0 RESULT: where the answer goes on, and its last token."""
    return 1 + result.accepted + 1, result.token


def check_window_ahead(edge: Edge) -> str:
    msg, _, verify, result = first_round(edge)
    control = None
    try:
        if result.done or result.token is None:
            raise CheckSkipped("the answer ended in round 0")
        pos, root = _next_window(result)
        wrong_root = 0 if root != 0 else 1
        tokens = np.full(3, root, dtype=np.int32)
        for what, ahead in (("a wrong root", wire.Verify(sid=msg.sid, round=1, tokens=tokens, pos=pos, root=wrong_root)),
                            ("a wrong pos", wire.Verify(sid=msg.sid, round=1, tokens=tokens, pos=pos + 1, root=root))):
            expect_error(edge.request(ahead), wire.ErrorCode.BAD_ROUND, f"a window sent ahead on {what}")
        again = expect(edge.request(replace(verify, seq=0)), wire.Result, "VERIFY round 0 after the dropped windows")
        if (diff := same_result(result, again)) is not None:
            raise CheckFailed(f"after the dropped windows round 0's RESULT changed: {diff}")
        real = wire.Verify(sid=msg.sid, round=1, tokens=tokens, pos=pos, root=root)
        got = expect(edge.request(real), wire.Result, "the fitting round 1 after the dropped windows")
        check_result(got, replace(real, seq=got.seq))
        control, _, _, control_result = first_round(edge)  # the same rounds without the dropped windows
        if (diff := same_result(result, control_result)) is not None:
            raise CheckFailed(f"two identical greedy sessions disagree in round 0: {diff}")
        want = expect(edge.request(replace(real, sid=control.sid)), wire.Result, "round 1 on a control session")
        if (diff := same_result(got, want)) is not None:
            raise CheckFailed(f"round 1 after the dropped windows differs from a session without them: {diff}")
        return f"wrong root and wrong pos dropped with BAD_ROUND; round 1 (at pos {pos}) as on a fresh session"
    finally:
        edge.close_session(msg.sid)
        if control is not None:
            edge.close_session(control.sid)


def check_out_of_order(edge: Edge) -> str:
    msg, _, verify, result = first_round(edge)
    try:
        late = wire.Verify(sid=msg.sid, round=5, tokens=verify.tokens)
        expect_error(edge.request(late), wire.ErrorCode.BAD_MESSAGE, "VERIFY round 5 after round 0 (no pos)")
        again = expect(edge.request(replace(verify, seq=0)), wire.Result, "VERIFY round 0 after the refused round")
        if (diff := same_result(result, again)) is not None:
            raise CheckFailed(f"a refused round changed round 0's RESULT: {diff}")
        return "a round out of order (no pos) refused with BAD_MESSAGE, the session unchanged"
    finally:
        edge.close_session(msg.sid)


def _stream_all(edge: Edge, stream: wire.Stream) -> list[wire.Streamed]:
    chunks: list[wire.Streamed] = []
    while not chunks or not chunks[-1].done:
        reply = edge.client.recv(stream.seq, edge.timeout_s)
        if reply is None:
            raise CheckFailed(f"STREAMED chunk {len(chunks)} did not come within {edge.timeout_s:g} s")
        chunks.append(expect(reply, wire.Streamed, f"STREAM (chunk {len(chunks)})"))
        if len(chunks) > 10_000:
            raise CheckFailed("over 10000 STREAMED chunks without done")
    return chunks


def check_stream(edge: Edge) -> str:
    max_new, chunk = 12, 4
    msg, opened = edge.open(mode="target_only", max_new_tokens=max_new)
    try:
        stream = edge.client.send(wire.Stream(sid=msg.sid, chunk=chunk))
        try:
            chunks = _stream_all(edge, stream)
        except RemoteError as err:
            raise CheckFailed(f"STREAM answered ERROR {err.code.name}: {err.message[:200]}") from None
        indices = [c.index for c in chunks]
        if indices != list(range(len(chunks))):
            raise CheckFailed(f"STREAMED indices {indices}, expected 0..{len(chunks) - 1}")
        if any(c.done for c in chunks[:-1]) or any(len(c.tokens) > chunk for c in chunks):
            raise CheckFailed(f"done before the last chunk, or a chunk over {chunk} tokens")
        tokens = [int(t) for c in chunks for t in c.tokens]
        if len(tokens) > max_new - 1:
            raise CheckFailed(f"{len(tokens)} tokens streamed after OPENED's, max_new_tokens {max_new}")
        dup = edge.resend(stream)
        expect_error(dup, wire.ErrorCode.DUPLICATE, "the same STREAM again (same seq)")
        return f"{len(chunks)} chunk(s), {len(tokens)} token(s), the last done; a repeated STREAM is a DUPLICATE"
    finally:
        edge.close_session(msg.sid)


def check_agrees_with_stream(edge: Edge) -> str:
    """A greedy target's own continuation, drafted as a window, is accepted whole with the next one as bonus."""
    msg, opened = edge.open(mode="target_only", max_new_tokens=12)
    try:
        chunks = _stream_all(edge, edge.client.send(wire.Stream(sid=msg.sid, chunk=16)))
    finally:
        edge.close_session(msg.sid)
    tokens = [int(t) for c in chunks for t in c.tokens]
    if len(tokens) < 2:
        raise CheckSkipped(f"the streamed answer has {len(tokens)} token(s) after the first: too short")
    k = min(4, len(tokens) - 1)
    other, again = edge.open(max_new_tokens=12)
    try:
        if again.token != opened.token:
            raise CheckFailed(f"two identical greedy OPENs gave first tokens {opened.token} and {again.token}")
        verify = wire.Verify(sid=other.sid, round=0, tokens=np.array(tokens[:k], dtype=np.int32))
        result = expect(edge.request(verify), wire.Result, "VERIFY of the target's own continuation")
        if (result.accepted, result.token) != (k, tokens[k]):
            raise CheckFailed(f"the target's own {k} next tokens got accepted {result.accepted}, token "
                              f"{result.token}; expected {k} accepted and bonus {tokens[k]}")
        return f"the streamed continuation's {k} tokens all accepted, bonus = the streamed token after them"
    finally:
        edge.close_session(other.sid)


def check_close(edge: Edge) -> str:
    msg, opened = edge.open(max_new_tokens=16)
    expect(edge.request(wire.Close(sid=msg.sid)), wire.Closed, "CLOSE")
    after = wire.Verify(sid=msg.sid, round=0, tokens=np.array([opened.token], dtype=np.int32))
    expect_error(edge.request(after), wire.ErrorCode.UNKNOWN_SESSION, "VERIFY on a closed session")
    expect_error(edge.request(wire.Stream(sid=msg.sid)), wire.ErrorCode.UNKNOWN_SESSION, "STREAM on a closed session")
    expect(edge.request(wire.Close(sid=msg.sid)), wire.Closed, "CLOSE of a closed session")
    late = edge.resend(msg)
    expect_error(late, wire.ErrorCode.BAD_STATE, "a late copy of the closed session's OPEN")
    return "CLOSED; then VERIFY and STREAM get UNKNOWN_SESSION, CLOSE again CLOSED, the OPEN's late copy BAD_STATE"


def check_malformed(edge: Edge) -> str:
    import msgpack

    seq = edge.raw_seq()
    cases: list[tuple[str, list[bytes], int]] = [
        ("bytes that are not msgpack", [b"\xc1 not a message"], 0),
        ("an unknown header field", [msgpack.packb({"v": wire.PROTOCOL_VERSION, "type": "PING", "sid": 0, "seq": seq,
                                                   "bogus": 1})], seq),
        ("a reply type (RESULT) as a request", wire.encode(wire.Result(seq=seq + 1, round=0, accepted=0)), seq + 1),
        ("a frame its header does not declare", [*wire.encode(wire.Ping(seq=seq + 2)), b"extra"], seq + 2),
    ]
    edge.raw_seq(), edge.raw_seq()
    for what, frames, want_seq in cases:
        err = expect_error(edge.send_frames(frames), wire.ErrorCode.BAD_MESSAGE, what)
        if err.seq != want_seq:
            raise CheckFailed(f"the ERROR for {what} carries seq {err.seq}, expected {want_seq}")
    try:
        expect(edge.request(wire.Ping(t=1.0)), wire.Pong, "PING after the malformed messages")
    except PeerUnavailable:
        raise CheckFailed("no reply to a PING after the malformed messages: the edge stopped serving") from None
    return f"{len(cases)} malformed messages each answered BAD_MESSAGE (addressed); the edge still answers PING"


def check_unknown_session(edge: Edge) -> str:
    sid = edge.rng.randrange(1, 2**63)
    verify = wire.Verify(sid=sid, round=0, tokens=np.array([0], dtype=np.int32))
    err = expect_error(edge.request(verify), wire.ErrorCode.UNKNOWN_SESSION, "VERIFY on a session never opened")
    if err.sid != sid:
        raise CheckFailed(f"the UNKNOWN_SESSION reply carries sid {err.sid}, the request's was {sid}")
    expect_error(edge.request(wire.Stream(sid=sid)), wire.ErrorCode.UNKNOWN_SESSION, "STREAM on a session never opened")
    expect(edge.request(wire.Close(sid=sid)), wire.Closed, "CLOSE of a session never opened")
    return "VERIFY and STREAM get UNKNOWN_SESSION (addressed); CLOSE gets CLOSED"


def check_limits(edge: Edge) -> str:
    """WELCOME's bounds are enforced: a longer window, a longer answer; an OPEN of an unknown mode."""
    mode = edge.request(wire.Open(sid=edge.rng.randrange(1, 2**63), image=edge.image, prompt=edge.prompt,
                                  mode="no_such_mode", max_new_tokens=4))
    expect_error(mode, wire.ErrorCode.BAD_MESSAGE, "OPEN of an unknown mode")
    welcome = edge.welcome
    if welcome is None:
        raise CheckSkipped("an unknown mode gets BAD_MESSAGE; WELCOME's limits not checked (no --fingerprint)")
    long = wire.Open(sid=edge.rng.randrange(1, 2**63), image=edge.image, prompt=edge.prompt, mode="vanilla_sd",
                     max_new_tokens=welcome.max_new_tokens + 1)
    expect_error(edge.request(long), wire.ErrorCode.LIMIT, f"OPEN of max_new_tokens {long.max_new_tokens}")
    k = welcome.max_window + 1
    if k > 1_000_000:
        return f"unknown mode BAD_MESSAGE; max_new_tokens over {welcome.max_new_tokens} gets LIMIT (max_window too big to try)"
    wide = wire.Verify(sid=edge.rng.randrange(1, 2**63), seq=edge.raw_seq(), round=0, tokens=np.zeros(k, np.int32))
    frames = wire.encode(wide, wire.Limits(max_window=k))
    expect_error(edge.send_frames(frames), wire.ErrorCode.LIMIT, f"VERIFY of {k} tokens (max_window {k - 1})")
    return f"unknown mode BAD_MESSAGE; max_new_tokens over {welcome.max_new_tokens} and {k} tokens per VERIFY get LIMIT"


def check_stats(edge: Edge) -> str:
    reply = expect(edge.request(wire.Stats()), wire.StatsReply, "STATS")
    if not reply.counters:
        raise CheckFailed("STATSREPLY without counters")
    return f"{len(reply.counters)} counters"


def check_info(edge: Edge) -> str:
    reply = expect(edge.request(wire.Info()), wire.InfoReply, "INFO")
    if reply.protocol != wire.PROTOCOL_VERSION:
        raise CheckFailed(f"INFOREPLY says protocol {reply.protocol}, the edge answered version-{wire.PROTOCOL_VERSION} messages")
    welcome = edge.welcome
    if welcome is not None and (reply.fingerprint, reply.model) != (welcome.fingerprint, welcome.model):
        raise CheckFailed(f"INFOREPLY names target {reply.model} ({reply.fingerprint[:12]}...), WELCOME "
                          f"{welcome.model} ({welcome.fingerprint[:12]}...)")
    return f"{reply.version}, target {reply.model}, " + (f"draft {reply.draft}" if reply.draft else "no draft")


CHECKS: tuple[tuple[str, Callable[[Edge], str]], ...] = (
    ("ping_pong", check_ping),
    ("hello_fingerprint", check_hello),
    ("version_refused", check_version),
    ("open_opened", check_open),
    ("verify_result", check_verify),
    ("verify_repeat_same_result", check_repeat),
    ("window_ahead_dropped", check_window_ahead),
    ("round_out_of_order", check_out_of_order),
    ("stream_chunks", check_stream),
    ("verify_accepts_streamed", check_agrees_with_stream),
    ("close_then_verify", check_close),
    ("malformed_then_serving", check_malformed),
    ("unknown_session", check_unknown_session),
    ("limits", check_limits),
    ("stats", check_stats),
    ("info", check_info),
)


def run_check(edge: Edge, name: str, check: Callable[[Edge], str]) -> Outcome:
    start = time.perf_counter()
    try:
        status, reason = "pass", check(edge)
    except CheckFailed as err:
        status, reason = "fail", str(err)
    except CheckSkipped as err:
        status, reason = "skip", str(err)
    except (wire.ProtocolError, RemoteError) as err:  # an undecodable or unexpected reply
        status, reason = "fail", f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - PeerUnavailable and the like: this check fails, the suite goes on
        status, reason = "fail", f"{type(err).__name__}: {err}"
    return Outcome(name, status, reason, time.perf_counter() - start)


class EdgeUnreachable(CovspecError):
    """No edge to check at that address (nothing listening, a refused handshake): the suite does not run."""


def reach(edge: Edge) -> None:
    """One PING before the checks, so that an edge that is not there is one clear error, not every check failing."""
    try:
        edge.client.request(wire.Ping(t=0.0))
    except HandshakeRefused as err:
        raise EdgeUnreachable(f"{err} (pass --key and --edge-key for an edge with --auth curve)") from None
    except PeerUnavailable as err:
        if not edge.client.ever_up:  # a ZeroMQ peer that does not answer PING is for the checks to judge
            raise EdgeUnreachable(f"no edge to check: {err}") from None
    except (RemoteError, wire.ProtocolError):
        pass  # something answers: the checks say what is wrong with it


def run_suite(endpoint: str, keys: ClientKeys | None = None, *, fingerprint: str | None = None,
              prompt: str = DEFAULT_PROMPT, timeout_s: float = 30.0, only: list[str] | None = None) -> list[Outcome]:
    """Runs the checks (all, or those named in `only`) against the edge at `endpoint`; EdgeUnreachable
    when no edge answers there."""
    names = [name for name, _ in CHECKS]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)} (checks: {', '.join(names)})")
    edge = Edge(endpoint, keys, timeout_s=timeout_s, prompt=prompt, fingerprint=fingerprint)
    try:
        reach(edge)
        return [run_check(edge, name, check) for name, check in CHECKS if not only or name in only]
    finally:
        edge.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--edge", required=True, help="the edge's address, tcp://HOST:PORT")
    parser.add_argument("--key", help="this device's secret key file (NAME.key_secret), for an edge with --auth curve")
    parser.add_argument("--edge-key", help="the edge's public key file (NAME.key)")
    parser.add_argument("--fingerprint", help="the target's tokenizer fingerprint, to check HELLO's WELCOME "
                                              "(without it only a foreign fingerprint's refusal is checked)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt of the sessions the checks open")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply")
    parser.add_argument("--check", action="append", default=None, metavar="NAME",
                        help=f"run only this check (repeatable): {', '.join(name for name, _ in CHECKS)}")
    parser.add_argument("--json", action="store_true", help="print the outcomes as JSON")


def run(args: argparse.Namespace) -> int:
    """`covspec conformance`'s handler: 0 when no check failed."""
    from covspec.tools.edge_probe import client_keys

    outcomes = run_suite(args.edge, client_keys(args.key, args.edge_key), fingerprint=args.fingerprint, prompt=args.prompt,
                         timeout_s=args.timeout, only=args.check)
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=1))
    else:
        for o in outcomes:
            print(f"{o.status.upper():4}  {o.name:28} {o.seconds * 1000:7.0f} ms  {o.reason}")
    failed = [o.name for o in outcomes if o.status == "fail"]
    passed = sum(o.status == "pass" for o in outcomes)
    print(f"{passed} passed, {len(failed)} failed, {len(outcomes) - passed - len(failed)} skipped"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
