"""A running edge under 2,000+ malformed and hostile messages: it answers each with an ERROR (or
drops it), stays up, and still serves a normal request correctly afterwards."""

from __future__ import annotations

import io
import random

import msgpack
import numpy as np
import tiny_models
import zmq
from PIL import Image
from test_runtimes import RunningEdge, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire

HOSTILE = 2000


def hostile_messages(rng: random.Random, sid: int) -> list[list[bytes]]:
    """One of many kinds of bad request, as raw frame lists."""
    kind = rng.randrange(10)
    header = {"v": wire.PROTOCOL_VERSION, "type": "VERIFY", "sid": sid, "seq": rng.randrange(1, 10**6),
              "round": 0, "bin": [["tokens", "<i4", [2]]]}
    tokens = np.array([1, 2], dtype="<i4").tobytes()
    if kind == 0:  # random bytes
        return [[rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]]
    if kind == 1:  # wrong protocol version
        return [[msgpack.packb({**header, "v": rng.choice([0, wire.PROTOCOL_VERSION + 1, 99, "1", None])}), tokens]]
    if kind == 2:  # wrong types in fields
        key = rng.choice(["sid", "seq", "round", "type", "bin"])
        return [[msgpack.packb({**header, key: rng.choice(["x", -1, 2**64 - 1, [], {}, 1.5, None])}), tokens]]
    if kind == 3:  # declared array shape disagrees with the frame
        return [[msgpack.packb({**header, "bin": [["tokens", "<i4", [rng.randrange(3, 100)]]]}), tokens]]
    if kind == 4:  # unknown session
        return [[msgpack.packb({**header, "sid": sid + 1 + rng.randrange(10**9)}), tokens]]
    if kind == 5:  # out-of-order round on a live session
        return [[msgpack.packb({**header, "round": rng.randrange(5, 10**6)}), tokens]]
    if kind == 6:  # huge declared sizes
        return [[msgpack.packb({**header, "bin": [["tokens", "<i4", [2**31 - 1]]]}), tokens]]
    if kind == 7:  # a reply kind sent as a request, or an unknown type
        return [[msgpack.packb({**header, "type": rng.choice(["RESULT", "WELCOME", "NOPE", ""])}), tokens]]
    if kind == 8:  # token ids out of range for the vocabulary
        bad = np.array([rng.randrange(10**6, 2**31 - 1), -5], dtype="<i4").tobytes()
        return [[msgpack.packb(header), bad]]
    # an OPEN with a broken image
    open_header = {"v": wire.PROTOCOL_VERSION, "type": "OPEN", "sid": rng.randrange(1, 2**40), "seq": 1, "prompt": "what is it ?",
                   "mode": "vanilla_sd", "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None,
                   "max_new_tokens": 8, "bin": [["image", "bytes", [64]]]}
    return [[msgpack.packb(open_header), rng.randbytes(64)]]


def test_edge_survives_hostile_traffic(tmp_path):
    target_path = tiny_models.build_llava(tmp_path / "target", seed=0)
    edge = RunningEdge(target_path)
    try:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(edge.endpoint)
        # a live session, so that rounds and token ids reach the session logic
        sid = 4242
        sock.send_multipart(wire.encode(wire.Open(sid=sid, seq=1, image=png(0), prompt="what is it ?",
                                                  mode="vanilla_sd", max_new_tokens=8)))
        assert isinstance(wire.decode(sock.recv_multipart()), wire.Opened)
        rng = random.Random(0)
        answered = errors = 0
        for _ in range(HOSTILE):
            for frames in hostile_messages(rng, sid):
                sock.send_multipart(frames)
                if sock.poll(5000, zmq.POLLIN):
                    reply = wire.decode(sock.recv_multipart())
                    answered += 1
                    errors += isinstance(reply, wire.Error)
        assert answered == HOSTILE and errors == HOSTILE, (answered, errors)
        sock.close(0)
        # still serving: a normal request gives the target's own greedy answer
        image = png(7)
        device = DeviceRuntime(load_adapter(target_path), edge.endpoint, timeout_s=20)
        answer = device.answer(image, "describe this image .", "vanilla_sd", SamplingParams(), max_new_tokens=10)
        device.close()
        reference = generate(load_adapter(target_path), Image.open(io.BytesIO(image)).convert("RGB"),
                             "describe this image .", max_new_tokens=10)
        assert answer.ids == reference.ids
    finally:
        edge.close()
