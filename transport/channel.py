"""ZeroMQ plumbing shared by both runtimes: the one socket factory, byte counters, a DEALER client.

Bytes on the wire, as the bench reports them, are counted here: the payload bytes of every frame a
socket sends or receives (a ROUTER's peer-identity frame is routing, not payload, and is not
counted), plus an estimate of ZMTP framing (2 bytes per frame under 256 bytes, 9 above). The link
emulator's counts, which also include ZMTP greetings and handshakes, are the cross-check.

Authentication is ZeroMQ CURVE: key pairs are the files `zmq.auth.create_certificates` writes
(NAME.key public, NAME.key_secret both halves). The edge's ROUTER is a CURVE server whose ZAP handler
(`start_authenticator`) admits only the public keys found in an allow folder; a device's DEALER is a
CURVE client that knows the edge's public key. On the edge, each received message carries the
device's public key (z85) as its "User-Id" property: `MeteredSocket.recv_request` returns it.

The Client watches its connection with a ZeroMQ socket monitor (`LinkWatch`), so it tells a refused
CURVE handshake (`HandshakeRefused`, at once), nothing listening at the endpoint, and a peer that
accepts TCP but never completes a ZeroMQ handshake apart, within `connect_timeout_s` (10 s) instead
of after every retry's timeout; it logs progress to the `covspec.transport` logger while it waits.
The same monitor tells when an established connection drops (the edge, or behind a balancer its
replica, went away): the requests sent on it are known lost at once, and the caller's retry goes out on
ZeroMQ's reconnection without waiting out its timeout.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from covspec.errors import CovspecError

from .protocol import DEFAULT_LIMITS, Error, ErrorCode, Limits, Message, ProtocolError, decode, encode

_MONITORS = itertools.count()  # socket monitors made by this process


class PeerUnavailable(CovspecError):
    """No reply from the peer after every retry."""

    def __init__(self, endpoint: str, what: str, attempts: int, timeout_s: float) -> None:
        super().__init__(
            f"no reply from {endpoint} to {what} after {attempts} attempt(s) of {timeout_s:g} s each: "
            "is the edge running and reachable at that address?"
        )
        self.endpoint = endpoint

    @classmethod
    def because(cls, endpoint: str, reason: str) -> PeerUnavailable:
        err = cls.__new__(cls)
        CovspecError.__init__(err, reason)
        err.endpoint = endpoint
        return err


class HandshakeRefused(PeerUnavailable):
    """The peer refused the ZeroMQ security handshake: retrying cannot help."""

    def __init__(self, endpoint: str, reason: str) -> None:
        CovspecError.__init__(self, f"the edge at {endpoint} refused the connection: {reason}")
        self.endpoint = endpoint


class EndpointError(CovspecError):
    """An endpoint that is not of the form ZeroMQ takes, or that cannot be bound."""


log = logging.getLogger("covspec.transport")
ENDPOINT = re.compile(r"^(tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\*|\d{1,5})|ipc://.+|inproc://.+)$")


def check_endpoint(endpoint: str, what: str = "endpoint") -> str:
    """`endpoint` if ZeroMQ can use it (tcp://HOST:PORT, ipc://PATH, inproc://NAME), else a clear error."""
    if not isinstance(endpoint, str) or not ENDPOINT.match(endpoint):
        hint = f" (did you mean tcp://{endpoint}?)" if isinstance(endpoint, str) and ":" in endpoint and "//" not in endpoint else ""
        raise EndpointError(f"{what} {endpoint!r} is not a ZeroMQ address: write tcp://HOST:PORT{hint}")
    port = endpoint.rsplit(":", 1)[-1]
    if endpoint.startswith("tcp://") and port != "*" and not 0 < int(port) < 65536:
        raise EndpointError(f"{what} {endpoint!r}: port {port} is outside 1..65535")
    return endpoint


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """Binds `sock`, turning ZeroMQ's errors into one line that names the address and the fix."""
    check_endpoint(endpoint, "bind address")
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as err:
        if err.errno == zmq.EADDRINUSE:
            raise EndpointError(f"cannot bind {endpoint}: the address is already in use (another edge running? "
                                "stop it or choose another port)") from None
        raise EndpointError(f"cannot bind {endpoint}: {err.strerror} (is the host one of this machine's "
                            "addresses?)") from None


HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the edge does not admit this device's CURVE key (add its public key "
                                     "NAME.key to the edge's --allow folder and restart the edge)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed (is --edge-key the edge's own public key, "
                                          "and does the edge use --auth curve? through a link emulator: is the "
                                          "edge behind it up?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security mechanisms differ (does the edge run --auth none while "
                                         "this device sends keys?)",
}


@dataclass
class LinkWatch:
    """What a DEALER's socket monitor said of its connection: whether a ZeroMQ handshake completed,
    whether TCP got through at all, and a handshake refusal. `down_since`: when the link last went
    down (or the watch started)."""

    down_since: float
    up: bool = False
    tcp: bool = False
    refused: int | None = None  # a HANDSHAKE_FAILURES event
    drops: int = 0  # connections lost after their handshake (ZeroMQ reconnects by itself)

    def on_event(self, event: int, now: float) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up, self.refused = True, None
        elif event == zmq.EVENT_CONNECTED:
            self.tcp = True
        elif event in HANDSHAKE_FAILURES:
            self.refused = event
        elif event == zmq.EVENT_DISCONNECTED and self.up:
            self.up, self.tcp, self.down_since = False, False, now
            self.drops += 1

    def why_down(self, endpoint: str, keyless: bool = False) -> str:
        if self.tcp:
            # a keyless device's CURVE mismatch reads, in a race inside libzmq, as a connection closed
            # mid-handshake as often as a refusal: the likeliest cause is then named too
            curve = (", or the edge requires CURVE keys: pass this device's --key and the edge's --edge-key"
                     if keyless else "")
            return (f"{endpoint} accepts TCP connections but completes no ZeroMQ handshake (a link emulator "
                    f"whose edge is down, or not a covspec edge{curve})")
        return f"nothing accepts connections at {endpoint} (is the edge running, and is the address right?)"


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

    def add(self, frames: Sequence[bytes | zmq.Frame], sent: bool) -> None:
        n = sum(len(f) for f in frames)
        wire = n + sum(2 if len(f) < 256 else 9 for f in frames)
        if sent:
            self.bytes_sent, self.wire_sent, self.msgs_sent = self.bytes_sent + n, self.wire_sent + wire, self.msgs_sent + 1
        else:
            self.bytes_recv, self.wire_recv, self.msgs_recv = self.bytes_recv + n, self.wire_recv + wire, self.msgs_recv + 1


class KeyFileError(CovspecError):
    """A key file that is missing or not a CURVE key file of the expected kind."""


@dataclass(frozen=True)
class ServerKeys:
    """The edge's CURVE key pair and the folder of device public keys it admits."""

    public: bytes
    secret: bytes
    allow_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    """A device's CURVE key pair and the edge's public key."""

    public: bytes
    secret: bytes
    server_public: bytes


def generate_keys(out_dir: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Writes NAME.key (public) and NAME.key_secret (mode 0600) into out_dir; returns both paths."""
    out = Path(out_dir)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not overwrite and (public.exists() or secret.exists()):
        raise KeyFileError(f"{public} or {secret} exists already: choose another --name or remove them")
    out.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(out), name)
    Path(secret_file).chmod(0o600)
    return Path(public_file), Path(secret_file)


def _load(path: str | Path, secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(path)
    what = "secret key file (NAME.key_secret)" if secret else "public key file (NAME.key)"
    if not path.is_file():
        raise KeyFileError(f"{path}: no such {what}; make one with `covspec keys gen`")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as err:
        raise KeyFileError(f"{path}: not a CURVE {what}: {err}") from None
    if secret and secret_key is None:
        raise KeyFileError(f"{path}: holds no secret key; pass the NAME.key_secret file")
    return public, secret_key


def load_server_keys(secret_file: str | Path, allow_dir: str | Path) -> ServerKeys:
    allow = Path(allow_dir)
    if not allow.is_dir():
        raise KeyFileError(f"{allow}: no such folder of allowed device public keys")
    if not any(allow.glob("*.key")):
        raise KeyFileError(f"{allow}: holds no device public key (*.key), so no device could connect")
    public, secret = _load(secret_file, secret=True)
    assert secret is not None  # a secret key file holds both keys
    return ServerKeys(public, secret, allow)


def load_client_keys(secret_file: str | Path, server_public_file: str | Path) -> ClientKeys:
    public, secret = _load(secret_file, secret=True)
    assert secret is not None  # a secret key file holds both keys
    server_public, _ = _load(server_public_file, secret=False)
    return ClientKeys(public, secret, server_public)


class _Authenticator(ThreadAuthenticator):
    """ThreadAuthenticator that reports each refused CURVE key (z85) to `on_refused`."""

    def __init__(self, ctx: zmq.Context, on_refused: Callable[[str], None] | None) -> None:
        super().__init__(ctx)
        self.on_refused = on_refused

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed and self.on_refused is not None:
            self.on_refused(z85.encode(client_key).decode())
        return allowed, reason


def start_authenticator(ctx: zmq.Context, keys: ServerKeys,
                        on_refused: Callable[[str], None] | None = None) -> ThreadAuthenticator:
    """The ZAP handler of `ctx` (one per context): CURVE clients whose public key is a *.key file in
    keys.allow_dir are admitted, every other connection is refused at the handshake, and the refused
    key (z85) is passed to `on_refused` (called on the authenticator's thread). The folder is read
    now; restart the edge to admit new devices."""
    auth = _Authenticator(ctx, on_refused)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.allow_dir))
    return auth


def make_socket(ctx: zmq.Context, kind: int, *, max_msg_bytes: int | None = None,
                server_keys: ServerKeys | None = None, client_keys: ClientKeys | None = None) -> zmq.Socket:
    """Every runtime socket is made here. `max_msg_bytes`: ZeroMQ drops a peer that sends a bigger
    frame (ZMQ_MAXMSGSIZE). `server_keys`: a CURVE server (the context needs `start_authenticator`
    for the allow list to apply); `client_keys`: a CURVE client of the server with that public key."""
    if server_keys is not None and client_keys is not None:
        raise ValueError("a socket is a CURVE server or a CURVE client, not both")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if max_msg_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if server_keys is not None:
        sock.curve_secretkey = server_keys.secret
        sock.curve_publickey = server_keys.public
        sock.curve_server = True
    if client_keys is not None:
        sock.curve_secretkey = client_keys.secret
        sock.curve_publickey = client_keys.public
        sock.curve_serverkey = client_keys.server_public
    return sock


@dataclass
class Request:
    """One message received on a ROUTER: who sent it and its frames."""

    peer: bytes  # routing identity (changes when the device reconnects)
    frames: list[zmq.Frame]
    user_id: str | None  # the device's CURVE public key (z85) when the socket authenticates, else None

    @property
    def device(self) -> str:
        """What identifies the device: its public key when authenticated, else its connection."""
        return self.user_id if self.user_id else "peer:" + self.peer.hex()


class MeteredSocket:
    """A DEALER or ROUTER socket that counts the bytes of every frame. On a ROUTER, `peer` is the
    identity frame: recv returns it, send needs it; it is never passed to encode/decode."""

    def __init__(self, sock: zmq.Socket, counters: ByteCounters | None = None) -> None:
        self.sock = sock
        self.router = sock.type == zmq.ROUTER
        self.counters = counters or ByteCounters()
        self.dropped = 0  # messages that could not be queued (no usable connection)

    def send_frames(self, frames: list[bytes], peer: bytes | None = None) -> bool:
        """Queues the message without ever blocking. A DEALER with no usable connection (an edge
        that refused the CURVE handshake, or is down) drops it and returns False: the request then
        times out like a lost one, and the Client retries on a fresh socket."""
        assert peer is not None or not self.router, "a ROUTER sends to a peer"
        try:
            self.sock.send_multipart([peer, *frames] if peer is not None and self.router else frames, copy=False,
                                     flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.counters.add(frames, sent=True)
        return True

    def send(self, msg: Message, peer: bytes | None = None, limits: Limits = DEFAULT_LIMITS) -> bool:
        return self.send_frames(encode(msg, limits), peer)

    def recv_frames(self, timeout_s: float | None = None) -> tuple[bytes | None, list[bytes]] | None:
        """(peer or None, frames), or None on timeout."""
        if timeout_s is not None and not self.sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart()
        peer = frames.pop(0) if self.router and frames else None
        self.counters.add(frames, sent=False)
        return peer, frames

    def recv_request(self, timeout_s: float | None = None) -> Request | None:
        """ROUTER: the next message with its sender, or None on timeout. Frames are zero-copy."""
        if timeout_s is not None and not self.sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        frames = self.sock.recv_multipart(copy=False)
        peer = frames.pop(0).bytes if frames else b""
        user_id = None
        if frames:
            try:
                user_id = str(frames[0].get("User-Id")) or None
            except zmq.ZMQError:  # no such property: the connection is not authenticated
                user_id = None
        self.counters.add(frames, sent=False)
        return Request(peer, frames, user_id)

    def close(self) -> None:
        self.sock.close(linger=0)


# the monitor events LinkWatch reads; a refused TCP connect (nothing listening) raises none of them
WATCHED_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _watch_events(sock: zmq.Socket) -> zmq.Socket:
    """The PAIR that receives `sock`'s monitor events, with no receive high-water mark: libzmq's I/O
    thread sends monitor events blocking, so a monitor nobody reads for a while (an idle device whose
    edge is down, reconnecting every 100 ms) would otherwise fill it and stall every socket of the
    context (seen: after ~2 minutes, no new connection of the process completed)."""
    # a name of its own: pyzmq's default (the socket's fd) can still be bound by a closed socket's monitor
    # that ZeroMQ's reaper has not torn down yet, when a new socket gets the same fd ("Address already in use")
    addr = f"inproc://covspec-monitor-{next(_MONITORS)}-{uuid.uuid4().hex}"
    sock.monitor(addr, WATCHED_EVENTS)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.setsockopt(zmq.RCVHWM, 0)
    monitor.connect(addr)
    return monitor


class Client:
    """The device's DEALER: request/response with a timeout and bounded retries.

    A retry resends the same message (same `seq`) on a fresh socket ("lazy pirate"), so requests must
    be idempotent on the edge (a repeated VERIFY of a round returns the same RESULT); replies whose
    `seq` is not the awaited one are stale and dropped. An ERROR reply to the awaited request, or one
    with seq 0 (the edge could not read which request it answers), raises RemoteError. Seqs start at 1."""

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0, retries: int = 2, ctx: zmq.Context | None = None,
                 limits: Limits = DEFAULT_LIMITS, keys: ClientKeys | None = None, connect_timeout_s: float = 10.0,
                 reconnect_timeout_s: float = 30.0) -> None:
        self.endpoint = check_endpoint(endpoint, "edge address")
        self.keys = keys
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s  # no handshake this long after start: give up
        self.reconnect_timeout_s = reconnect_timeout_s  # a lost edge not back this long: give up
        self.ever_up = False  # a handshake completed once (the edge was there)
        self.retries = retries
        self.limits = limits
        self.counters = ByteCounters()  # across reconnections
        self.stale = 0  # replies dropped because their seq was not awaited
        self._ctx = ctx or zmq.Context.instance()
        self._seq = 0
        self._lost_upto = 0  # requests up to this seq went out on a connection that dropped: no reply can come
        self._sock = self._connect()

    def _connect(self) -> MeteredSocket:
        sock = make_socket(self._ctx, zmq.DEALER, max_msg_bytes=self.limits.max_total_bytes, client_keys=self.keys)
        self._monitor = _watch_events(sock)
        old = getattr(self, "_watch", None)  # a retry's fresh socket: a link that was down stays down since then
        self._watch = LinkWatch(old.down_since if old is not None and not old.up else time.monotonic())
        self._said = 0.0
        self._lost_upto = 0  # a fresh socket: what is sent (or sent again) on it is not lost yet
        sock.connect(self.endpoint)
        return MeteredSocket(sock, self.counters)

    def _check_link(self) -> None:
        """Reads the socket monitor; raises HandshakeRefused on a refused handshake, PeerUnavailable
        when the edge was never reached within connect_timeout_s (or, once lost, reconnect_timeout_s)."""
        now = time.monotonic()
        watch = self._watch
        drops = watch.drops
        while self._monitor.poll(0):
            watch.on_event(recv_monitor_message(self._monitor)["event"], now)
        if watch.drops > drops:  # the edge (or the balancer's replica) went away with what was sent
            self._lost_upto = self._seq
        if watch.refused == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.keys is None:
            watch.refused = None  # not a refusal: a CURVE edge answers a keyless device with FAILED_PROTOCOL;
            watch.tcp = True  # this is a connection dropped mid-handshake (a link emulator whose edge is not up)
        if watch.refused is not None:
            reason = HANDSHAKE_FAILURES[watch.refused]
            if self.keys is None:
                reason = "the edge requires CURVE keys: pass this device's --key and the edge's --edge-key"
            raise HandshakeRefused(self.endpoint, reason)
        if watch.up:
            self.ever_up = True
            return
        waited = now - watch.down_since
        limit = self.reconnect_timeout_s if self.ever_up else self.connect_timeout_s
        if waited > limit:
            what = "lost the edge and it did not come back" if self.ever_up else "could not reach the edge"
            raise PeerUnavailable.because(self.endpoint, f"{what} within {limit:g} s: {watch.why_down(self.endpoint, self.keys is None)}")
        if waited > 2.0 and now - self._said > 2.0:
            self._said = now
            log.warning("waiting for the edge at %s (%.0f s of %g): %s", self.endpoint, waited, limit,
                        watch.why_down(self.endpoint, self.keys is None))

    def send(self, msg: Message) -> Message:
        """Send without waiting (pipelined windows, STREAM); returns the message with its assigned seq."""
        self._seq += 1
        msg = replace(msg, seq=self._seq)
        self._sock.send(msg, limits=self.limits)
        return msg

    def recv(self, seq: int, timeout_s: float | None = None) -> Message | None:
        """The next reply to request `seq`, or None on timeout, or at once (once what had arrived is
        read) when the connection it went out on dropped: the edge's reply cannot come then, and
        the caller's retry goes out on the reconnection (behind a balancer, another replica). Raises
        RemoteError on an ERROR reply."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while (left := deadline - time.monotonic()) > 0:
            self._check_link()
            lost = seq <= self._lost_upto
            got = self._sock.recv_frames(0.0 if lost else min(left, 0.25))
            if got is None:
                if lost:
                    log.info("the connection to %s dropped with request %d unanswered", self.endpoint, seq)
                    return None
                continue
            reply = decode(got[1], self.limits)
            if isinstance(reply, Error) and reply.code == ErrorCode.DUPLICATE:  # a duplicated request's answer
                self.stale += 1
                continue
            if isinstance(reply, Error) and reply.seq in (0, seq):  # seq 0: the edge could not read ours
                raise RemoteError(self.endpoint, reply)
            if reply.seq != seq:
                self.stale += 1
                continue
            return reply
        return None

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Whether a reply is waiting (without reading it)."""
        self._check_link()
        return bool(self._sock.sock.poll(int(timeout_s * 1000), zmq.POLLIN))

    def request(self, msg: Message, *, timeout_s: float | None = None, retries: int | None = None) -> Message:
        """Send `msg`, wait for its reply; retry up to `retries` times; raise PeerUnavailable then."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.retries if retries is None else retries)
        sent = self.send(msg)
        for attempt in range(attempts):
            if attempt:
                log.info("no reply from %s to %s in %g s: retrying (%d of %d)", self.endpoint, sent.TYPE,
                         timeout_s, attempt, attempts - 1)
                self._close_socket()
                self._sock = self._connect()
                self._sock.send(sent, limits=self.limits)
            reply = self.recv(sent.seq, timeout_s)
            if reply is not None:
                return reply
        if not self._watch.up:
            raise PeerUnavailable.because(self.endpoint, f"no reply from {self.endpoint} to {sent.TYPE} after {attempts} "
                                          f"attempt(s) of {timeout_s:g} s each: {self._watch.why_down(self.endpoint, self.keys is None)}")
        raise PeerUnavailable(self.endpoint, f"{sent.TYPE} (seq {sent.seq})", attempts, timeout_s)

    def reconnect(self) -> None:
        """A fresh socket and connection to the endpoint (behind a balancer: maybe another edge);
        replies still due on the old one are dropped with it."""
        self._close_socket()
        self._sock = self._connect()

    def _close_socket(self) -> None:
        self._sock.sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close()

    def close(self) -> None:
        if not self._sock.sock.closed:
            self._close_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
