"""The edge on a network it does not control: CURVE admits only listed device keys, the handshake
refuses a wrong protocol version with a clear ERROR, limits hold (sessions per device, answer length,
image size), counters come back by STATS and every finished request is one JSON log line."""

from __future__ import annotations

import io
import json
import logging
import stat

import msgpack
import numpy as np
import pytest
import tiny_models
import zmq
from PIL import Image
from test_runtimes import RunningEdge, png

from covspec.cli import main
from covspec.device_runtime.client import DeviceRuntime
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import (
    Client,
    PeerUnavailable,
    RemoteError,
    generate_keys,
    load_client_keys,
    load_server_keys,
)

PROMPT = "describe this image ."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys (edge, two allowed devices, an intruder), a tiny target, a CURVE edge."""
    root = tmp_path_factory.mktemp("security")
    generate_keys(root / "edge", "edge")
    for name in ("phone", "tablet"):
        generate_keys(root / "allowed", name)
    generate_keys(root / "intruder", "intruder")
    target = tiny_models.build_llava(root / "target", seed=0)
    edge = RunningEdge(target, keys=load_server_keys(root / "edge" / "edge.key_secret", root / "allowed"),
                       max_sessions_per_device=2, max_new_tokens=32)
    yield root, target, edge
    edge.close()


def client_keys(root, owner: str, name: str):
    return load_client_keys(root / owner / f"{name}.key_secret", root / "edge" / "edge.key")


def open_msg(sid: int, **kw) -> wire.Open:
    return wire.Open(sid=sid, image=png(0), prompt=PROMPT, mode="vanilla_sd", max_new_tokens=8, **kw)


def test_allowed_device_is_served_and_others_get_nothing(world):
    root, target, edge = world
    image = png(5)
    device = DeviceRuntime(load_adapter(target), edge.endpoint, timeout_s=20, keys=client_keys(root, "allowed", "phone"))
    answer = device.answer(image, PROMPT, "vanilla_sd", SamplingParams(), max_new_tokens=8, window=3)
    device.close()
    reference = generate(load_adapter(target), Image.open(io.BytesIO(image)).convert("RGB"), PROMPT, max_new_tokens=8)
    assert answer.ids == reference.ids
    handled = edge.server.requests
    for keys in (client_keys(root, "intruder", "intruder"), None):  # an unknown key; no CURVE at all
        with pytest.raises(PeerUnavailable):
            DeviceRuntime(load_adapter(target), edge.endpoint, timeout_s=0.4, retries=1, keys=keys)
    assert edge.server.requests == handled, "a device without an allowed key must get nothing handled"


def test_wrong_protocol_version_is_refused_clearly(world):
    root, target, edge = world
    with Client(edge.endpoint, timeout_s=10, retries=0, keys=client_keys(root, "allowed", "phone")) as client:
        sock = client._sock.sock
        hello = {"v": 1, "type": "HELLO", "sid": 0, "seq": 77, "fingerprint": "x", "family": "llava", "model": "d"}  # an older device
        sock.send_multipart([msgpack.packb(hello)])
        assert sock.poll(10_000, zmq.POLLIN)
        reply = wire.decode(sock.recv_multipart())
    assert isinstance(reply, wire.Error) and reply.code == wire.ErrorCode.BAD_VERSION and reply.seq == 77
    assert "protocol version 1" in reply.message and f"this side speaks {wire.PROTOCOL_VERSION}" in reply.message


def test_sessions_per_device_and_owner_only(world):
    root, target, edge = world
    phone = Client(edge.endpoint, timeout_s=20, retries=0, keys=client_keys(root, "allowed", "phone"))
    tablet = Client(edge.endpoint, timeout_s=20, retries=0, keys=client_keys(root, "allowed", "tablet"))
    try:
        for sid in (101, 102):
            assert isinstance(phone.request(open_msg(sid)), wire.Opened)
        with pytest.raises(RemoteError) as err:
            phone.request(open_msg(103))
        assert err.value.code == wire.ErrorCode.LIMIT and "limit of 2 open sessions" in err.value.message
        assert isinstance(tablet.request(open_msg(201)), wire.Opened)  # the quota is per device
        # another device's session does not exist for it; it cannot close it either
        with pytest.raises(RemoteError) as err:
            tablet.request(wire.Verify(sid=101, round=0, tokens=np.array([1], np.int32)))
        assert err.value.code == wire.ErrorCode.UNKNOWN_SESSION
        tablet.request(wire.Close(sid=101))
        assert 101 in edge.server.sessions
        for client, sid in ((phone, 101), (phone, 102), (tablet, 201)):
            client.request(wire.Close(sid=sid))
        assert isinstance(phone.request(open_msg(103)), wire.Opened)  # room again
        phone.request(wire.Close(sid=103))
    finally:
        phone.close()
        tablet.close()


def test_limits_stats_and_request_log(world, caplog):
    root, target, edge = world
    keys = client_keys(root, "allowed", "phone")
    with Client(edge.endpoint, timeout_s=20, retries=0, keys=keys) as client:
        with pytest.raises(RemoteError) as err:
            client.request(wire.Open(sid=301, image=png(0), prompt=PROMPT, mode="vanilla_sd", max_new_tokens=33))
        assert err.value.code == wire.ErrorCode.LIMIT
        before = client.request(wire.Stats()).counters
    with caplog.at_level(logging.INFO, logger="covspec.edge.requests"):
        device = DeviceRuntime(load_adapter(target), edge.endpoint, timeout_s=20, keys=keys)
        device.answer(png(2), PROMPT, "vanilla_sd", SamplingParams(), max_new_tokens=8, window=2)
        device.close()
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "covspec.edge.requests"]
    assert len(records) == 1
    line = records[0]
    assert line["event"] == "request" and line["end"] == "closed" and line["mode"] == "vanilla_sd"
    assert line["tokens"] >= 1 and line["rounds"] >= 1 and line["mean_accepted"] is not None
    assert line["device"] == keys.public.decode()[:40]
    assert {"prefill_ms", "verify_ms", "duration_ms"} <= set(line)
    with Client(edge.endpoint, timeout_s=20, retries=0, keys=keys) as client:
        after = client.request(wire.Stats()).counters
    assert after["errors.LIMIT"] >= 1 and after["sessions_open"] == 0
    assert after["requests.VERIFY"] - before.get("requests.VERIFY", 0) == line["rounds"]
    assert after["tokens_verified"] - before["tokens_verified"] == line["drafted"]
    assert after["tokens_accepted"] - before["tokens_accepted"] == line["accepted"]
    assert after["bytes_in"] > before["bytes_in"] and after["bytes_out"] > before["bytes_out"]
    assert after["sessions_closed"] == before["sessions_closed"] + 1


def test_image_limits(tmp_path):
    target = tiny_models.build_llava(tmp_path / "target", seed=0)
    edge = RunningEdge(target, max_image_pixels=20 * 20, limits=wire.Limits(max_image_bytes=4000))
    try:
        with Client(edge.endpoint, timeout_s=20, retries=0) as client:
            with pytest.raises(RemoteError) as err:
                client.request(open_msg(1))  # a 28x28 image: over the pixel bound
            assert "pixels" in err.value.message
            with pytest.raises(RemoteError) as err:
                client.request(wire.Open(sid=2, image=png(0, size=64), prompt=PROMPT, mode="vanilla_sd"))
            assert err.value.code == wire.ErrorCode.TOO_LARGE
    finally:
        edge.close()


def test_cli_keys_and_auth_must_be_named(tmp_path, capsys):
    assert main(["keys", "gen", "--out", str(tmp_path / "k"), "--name", "edge"]) == 0
    assert (tmp_path / "k" / "edge.key").is_file()
    assert stat.S_IMODE((tmp_path / "k" / "edge.key_secret").stat().st_mode) == 0o600
    assert main(["keys", "gen", "--out", str(tmp_path / "k"), "--name", "edge"]) == 2  # no silent overwrite
    capsys.readouterr()
    assert main(["edge", "serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert "--auth none" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["edge", "serve", "--model", str(tmp_path), "--key", str(tmp_path / "k" / "edge.key_secret"),
                 "--allow", str(tmp_path / "empty")]) == 2
    assert "no device public key" in capsys.readouterr().err
    assert main(["device", "run", "--model", "m", "--edge", "tcp://127.0.0.1:1", "--image", __file__,
                 "--prompt", "p", "--key", str(tmp_path / "k" / "edge.key_secret")]) == 2
    assert "go together" in capsys.readouterr().err
