"""The DEALER tells a refused CURVE handshake, nothing listening, and a peer that speaks no ZeroMQ
apart, fast and in words; endpoints and binds fail with one clear line."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import zmq

from covspec.transport import channel
from covspec.transport import protocol as P
from covspec.transport.channel import (
    Client,
    EndpointError,
    HandshakeRefused,
    PeerUnavailable,
    bind,
    check_endpoint,
    generate_keys,
    load_client_keys,
    load_server_keys,
    make_socket,
    start_authenticator,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def curve_edge(tmp_path: Path):
    """A CURVE ROUTER admitting the key "phone"; yields (endpoint, keys folder, refused keys)."""
    allow = tmp_path / "allow"
    generate_keys(tmp_path, "edge")
    generate_keys(allow, "phone")
    generate_keys(tmp_path, "intruder")
    ctx = zmq.Context()
    refused: list[str] = []
    auth = start_authenticator(ctx, load_server_keys(tmp_path / "edge.key_secret", allow), refused.append)
    router = make_socket(ctx, zmq.ROUTER, server_keys=load_server_keys(tmp_path / "edge.key_secret", allow))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    router.bind(endpoint)
    yield endpoint, tmp_path, refused
    router.close(0)
    auth.stop()
    ctx.term()


def test_refused_key_is_reported_at_once_and_seen_by_the_edge(curve_edge) -> None:
    endpoint, root, refused = curve_edge
    keys = load_client_keys(root / "intruder.key_secret", root / "edge.key")
    with Client(endpoint, timeout_s=30, retries=2, keys=keys) as client:
        t = time.monotonic()
        with pytest.raises(HandshakeRefused) as err:
            client.request(P.Ping(t=0.0))
        assert time.monotonic() - t < 3.0, "a refused handshake must not wait out the timeouts"
    assert "does not admit this device's CURVE key" in str(err.value) and "--allow" in str(err.value)
    assert isinstance(err.value, PeerUnavailable)  # callers that retry on PeerUnavailable still work
    assert refused and refused[0] == (root / "intruder.key").read_text().split('public-key = "')[1].split('"')[0]


def test_wrong_edge_key_and_no_keys_are_refused_with_their_reason(curve_edge) -> None:
    endpoint, root, _ = curve_edge
    wrong_server = load_client_keys(root / "allow" / "phone.key_secret", root / "intruder.key")
    with Client(endpoint, timeout_s=30, retries=0, keys=wrong_server) as client:
        t = time.monotonic()
        with pytest.raises(HandshakeRefused) as err:
            client.request(P.Ping(t=0.0))
        assert time.monotonic() - t < 3.0
    assert "--edge-key" in str(err.value)
    # no keys: libzmq reports the mechanism mismatch as a refusal or, in a race, as a connection closed
    # mid-handshake (then the connect timeout, here 4 s): either way the error names the CURVE keys
    with Client(endpoint, timeout_s=30, retries=0, keys=None, connect_timeout_s=4.0) as client:
        t = time.monotonic()
        with pytest.raises(PeerUnavailable) as unavailable:
            client.request(P.Ping(t=0.0))
        assert time.monotonic() - t < 6.0
    assert "requires CURVE" in str(unavailable.value) and "--key" in str(unavailable.value)


def test_nothing_listening_is_reported_within_the_connect_timeout() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, timeout_s=30, retries=2, connect_timeout_s=1.0) as client:
        t = time.monotonic()
        with pytest.raises(PeerUnavailable) as err:
            client.request(P.Ping(t=0.0))
        assert time.monotonic() - t < 3.0
    assert "nothing accepts connections" in str(err.value) and endpoint in str(err.value)


def test_a_tcp_peer_that_speaks_no_zeromq_is_told_apart() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with Client(endpoint, timeout_s=30, retries=0, connect_timeout_s=1.0) as client:
            with pytest.raises(PeerUnavailable) as err:
                client.request(P.Ping(t=0.0))
    assert "completes no ZeroMQ handshake" in str(err.value)


@pytest.mark.parametrize("bad", ["127.0.0.1:5555", "localhost", "tcp://host", "tcp://h:99999", "http://h:1"])
def test_bad_endpoints_name_the_fix(bad: str) -> None:
    with pytest.raises(EndpointError) as err:
        check_endpoint(bad)
    assert repr(bad) in str(err.value) and ("tcp://HOST:PORT" in str(err.value) or "1..65535" in str(err.value))
    with pytest.raises(EndpointError):
        Client(bad)


def test_binding_a_port_in_use_says_so() -> None:
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first, second = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    try:
        bind(first, endpoint)
        with pytest.raises(EndpointError) as err:
            bind(second, endpoint)
        assert "already in use" in str(err.value) and endpoint in str(err.value)
    finally:
        first.close(0)
        second.close(0)
        ctx.term()


@pytest.mark.timeout(60)  # before the fix this test hung: the stalled I/O thread blocks the sockets' close
def test_a_client_left_unread_does_not_stall_the_other_sockets(monkeypatch):
    """libzmq's I/O thread sends socket-monitor events blocking: a Client nobody reads (an idle device
    whose edge is down, or one whose constructor raised) once filled its monitor's queue and then no
    connection of the whole process completed (seen in CI: every later test that talked to an edge failed).
    Its monitor takes only the events the watch reads, and never blocks the sender."""
    def eager(*args, **kw):  # a reconnection every millisecond: thousands of tries within the test
        sock = make_socket(*args, **kw)
        sock.setsockopt(zmq.RECONNECT_IVL, 1)
        return sock

    monkeypatch.setattr(channel, "make_socket", eager)
    idle = Client(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.2, retries=0)  # nothing listens there
    monkeypatch.undo()
    assert idle._monitor.getsockopt(zmq.RCVHWM) == 0
    time.sleep(3.0)
    server = make_socket(zmq.Context.instance(), zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    fresh = zmq.Context.instance().socket(zmq.DEALER)
    try:
        fresh.connect(f"tcp://127.0.0.1:{port}")
        fresh.send(b"hello")
        assert server.poll(5000), "a new connection did not complete while another client's monitor was unread"
    finally:
        fresh.close(0)
        server.close(0)
        idle.close()
