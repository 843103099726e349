"""Wire protocol: every kind round-trips; every malformed message is a ProtocolError naming the field."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covspec.transport import protocol as P
from covspec.transport.protocol import ErrorCode, Limits, ProtocolError, decode, encode

i32 = np.int32
f32 = np.float32

SAMPLES: list[P.Message] = [
    P.Hello(fingerprint="sha256:abc", family="llava", model="demo-draft"),
    P.Welcome(sid=0, seq=1, fingerprint="sha256:abc", family="llava", model="demo-target", edge="x", vocab_size=152064,
              max_message_bytes=1 << 26, max_image_bytes=1 << 24, max_window=64, max_new_tokens=1024, idle_timeout_s=30.0),
    P.Open(sid=7, seq=2, image=b"\x89PNG....", prompt="What colour is the circle?", mode="vanilla_sd"),
    P.Open(sid=7, seq=2, image=b"jpeg", prompt="é ✓", mode="covspec", kept=np.array([0, 3, 9], i32),
           prefix=np.array([5, 6], i32), temperature=0.7, top_k=50, top_p=0.9, seed=2**64 - 1, max_new_tokens=32),
    P.Opened(sid=7, seq=2, token=42, timings={"prefill_ms": 12.5}),
    P.Verify(sid=7, seq=3, round=0, tokens=np.array([1, 2, 3], i32)),
    P.Verify(sid=7, seq=4, round=1, pos=4, tokens=np.array([1, 2, 3], i32), q=np.array([0.5, 1.0, 1e-6], f32)),
    P.Verify(sid=7, seq=5, round=2, tokens=np.array([9, 8], i32),
             dists=np.random.default_rng(0).dirichlet(np.ones(1000), 2).astype(f32)),
    P.Verify(sid=7, seq=5, round=3, tokens=np.zeros(0, i32)),
    P.Result(sid=7, seq=3, round=0, accepted=3, token=11, timings={"verify_ms": 3.0}),
    P.Result(sid=7, seq=4, round=1, accepted=1, token=12, done=True, cand_ids=np.array([12, 40], i32),
             cand_probs=np.array([0.75, 0.25], f32)),
    P.Stream(sid=7, seq=6, chunk=4),
    P.Streamed(sid=7, seq=6, index=0, tokens=np.array([1, 2, 3, 4], i32)),
    P.Streamed(sid=7, seq=6, index=1, tokens=np.array([5], i32), done=True, timings={"decode_ms": 1.0}),
    P.Close(sid=7, seq=8),
    P.Closed(sid=7, seq=8),
    P.Ping(seq=9, t=123.456),
    P.Pong(seq=9, t=123.456),
    P.Stats(seq=10),
    P.StatsReply(seq=10, counters={"requests": 12, "errors.BAD_MESSAGE": 1, "uptime_s": 3.5}),
    P.Info(seq=11),
    P.InfoReply(seq=11, version="covspec-edge 0.1.0", protocol=1, fingerprint="ab" * 32, family="llava", model="t",
                vocab_size=100, draft="d"),
    P.Error(sid=7, seq=3, code=ErrorCode.UNKNOWN_SESSION, message="session 7 expired"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: P.Message) -> None:
    frames = encode(msg)
    assert all(type(f) is bytes for f in frames)
    header = msgpack.unpackb(frames[0])
    assert header["v"] == P.PROTOCOL_VERSION and header["type"] == msg.TYPE
    assert header["sid"] == msg.sid and header["seq"] == msg.seq
    back = decode(frames)
    assert type(back) is type(msg) and back == msg
    for name in ("tokens", "q", "dists", "kept", "prefix", "cand_ids", "cand_probs"):
        a = getattr(back, name, None)
        if a is not None:
            assert a.dtype in (np.int32, np.float32)
            assert a.shape == getattr(msg, name).shape
    assert encode(back) == frames  # stable


def test_every_kind_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(P._BY_TYPE.values())


def test_encode_converts_numpy_and_lists() -> None:
    m = P.Verify(sid=np.int64(3), seq=1, round=np.int32(0), tokens=[1, 2], q=np.array([0.5, 0.5]))
    back = decode(encode(m))
    assert back.sid == 3 and back.tokens.dtype == np.int32 and back.q.dtype == np.float32


def test_a_mode_enum_travels_as_its_string() -> None:
    from covspec.modes import Mode

    back = decode(encode(P.Open(sid=1, seq=1, image=b"x", prompt="p", mode=Mode.EDGE_SD)))
    assert type(back.mode) is str and back.mode == "edge_sd" == Mode.EDGE_SD


def test_bandwidth_of_vanilla_upload() -> None:
    dists = np.full((8, 152064), 1 / 152064, f32)
    frames = encode(P.Verify(sid=1, seq=1, round=0, tokens=np.arange(8, dtype=i32), dists=dists))
    assert len(frames[-1]) == 8 * 152064 * 4 and decode(frames).dists.shape == (8, 152064)


# --- malformed messages -------------------------------------------------------------------------------

VERIFY = encode(P.Verify(sid=5, seq=6, round=1, tokens=np.array([1, 2, 3], i32), q=np.array([0.5, 0.5, 0.5], f32)))
RESULT = encode(P.Result(sid=5, seq=6, round=1, accepted=1, token=2, cand_ids=np.array([1], i32),
                         cand_probs=np.array([1.0], f32)))
OPEN = encode(P.Open(sid=5, seq=6, image=b"img", prompt="q", mode="covspec", kept=np.array([1, 2], i32)))


def edit(frames: list[bytes], drop: tuple[str, ...] = (), **changes: object) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    for k in drop:
        del header[k]
    header.update(changes)
    return [msgpack.packb(header), *frames[1:]]


def head(**fields: object) -> bytes:
    return msgpack.packb({"v": P.PROTOCOL_VERSION, "sid": 1, "seq": 1, **fields})


NESTED = b"\x91" * 5000 + b"\xc0"  # [[[[...nil...]]]] 5000 deep
BAD_UTF8 = b"\x81\xa1v\xa2\xff\xfe"  # {"v": <invalid utf-8 string>}

MALFORMED = [
    ("not a list", 5, ErrorCode.BAD_MESSAGE, "message"),
    ("no frames", [], ErrorCode.BAD_MESSAGE, "message"),
    ("too many frames", [VERIFY[0]] * 9, ErrorCode.BAD_MESSAGE, "message"),
    ("str frame", ["hello"], ErrorCode.BAD_MESSAGE, "frame 0"),
    ("None frame", [VERIFY[0], None], ErrorCode.BAD_MESSAGE, "frame 1"),
    ("not msgpack", [b"\xc1"], ErrorCode.BAD_MESSAGE, "header"),
    ("truncated msgpack", [VERIFY[0][:-3]], ErrorCode.BAD_MESSAGE, "header"),
    ("trailing bytes", [VERIFY[0] + b"\x00", *VERIFY[1:]], ErrorCode.BAD_MESSAGE, "header"),
    ("empty header", [b""], ErrorCode.BAD_MESSAGE, "header"),
    ("header not a map", [msgpack.packb([1, 2])], ErrorCode.BAD_MESSAGE, "header"),
    ("deep nesting", [NESTED], ErrorCode.BAD_MESSAGE, "header"),
    ("invalid utf-8", [BAD_UTF8], ErrorCode.BAD_MESSAGE, "header"),
    ("int map key", [msgpack.packb({1: 2})], ErrorCode.BAD_MESSAGE, "header"),
    ("missing v", edit(VERIFY, drop=("v",)), ErrorCode.BAD_MESSAGE, "header.v"),
    ("wrong version", edit(VERIFY, v=P.PROTOCOL_VERSION + 1), ErrorCode.BAD_VERSION, f"protocol version {P.PROTOCOL_VERSION + 1}"),
    ("version as str", edit(VERIFY, v="1"), ErrorCode.BAD_VERSION, "header.v"),
    ("version as bool", edit(VERIFY, v=True), ErrorCode.BAD_VERSION, "header.v"),
    ("unknown type", edit(VERIFY, type="FOO"), ErrorCode.BAD_MESSAGE, "header.type"),
    ("type not str", edit(VERIFY, type=3), ErrorCode.BAD_MESSAGE, "header.type"),
    ("missing sid", edit(VERIFY, drop=("sid",)), ErrorCode.BAD_MESSAGE, "VERIFY.sid"),
    ("negative sid", edit(VERIFY, sid=-1), ErrorCode.BAD_MESSAGE, "VERIFY.sid"),
    ("huge seq", edit(VERIFY, seq=2**64 - 1), ErrorCode.BAD_MESSAGE, "VERIFY.seq"),
    ("seq as float", edit(VERIFY, seq=1.0), ErrorCode.BAD_MESSAGE, "VERIFY.seq"),
    ("unknown field", edit(VERIFY, colour="red"), ErrorCode.BAD_MESSAGE, "unknown field"),
    ("binary key", [msgpack.packb({**msgpack.unpackb(VERIFY[0]), b"round": 1}, use_bin_type=True), *VERIFY[1:]],
     ErrorCode.BAD_MESSAGE, "unknown field"),
    ("round as str", edit(VERIFY, round="1"), ErrorCode.BAD_MESSAGE, "VERIFY.round"),
    ("round as bool", edit(VERIFY, round=True), ErrorCode.BAD_MESSAGE, "VERIFY.round"),
    ("round negative", edit(VERIFY, round=-3), ErrorCode.BAD_MESSAGE, "VERIFY.round"),
    ("round nil", edit(VERIFY, round=None), ErrorCode.BAD_MESSAGE, "VERIFY.round"),
    ("missing round", edit(VERIFY, drop=("round",)), ErrorCode.BAD_MESSAGE, "VERIFY.round: missing"),
    ("missing accepted", edit(RESULT, drop=("accepted",)), ErrorCode.BAD_MESSAGE, "RESULT.accepted"),
    ("done as int", edit(RESULT, done=1), ErrorCode.BAD_MESSAGE, "RESULT.done"),
    ("timing negative", edit(RESULT, timings={"a": -1.0}), ErrorCode.BAD_MESSAGE, "RESULT.timings"),
    ("timings not a map", edit(RESULT, timings=[1]), ErrorCode.BAD_MESSAGE, "RESULT.timings"),
    ("temperature NaN", edit(OPEN, temperature=float("nan")), ErrorCode.BAD_MESSAGE, "OPEN.temperature"),
    ("temperature inf", edit(OPEN, temperature=float("inf")), ErrorCode.BAD_MESSAGE, "OPEN.temperature"),
    ("top_p zero", edit(OPEN, top_p=0.0), ErrorCode.BAD_MESSAGE, "OPEN.top_p"),
    ("top_k negative", edit(OPEN, top_k=-1), ErrorCode.BAD_MESSAGE, "OPEN.top_k"),
    ("max_new_tokens zero", edit(OPEN, max_new_tokens=0), ErrorCode.BAD_MESSAGE, "OPEN.max_new_tokens"),
    ("mode with spaces", edit(OPEN, mode="rm -rf"), ErrorCode.BAD_MESSAGE, "OPEN.mode"),
    ("prompt as bytes", edit(OPEN, prompt=b"q"), ErrorCode.BAD_MESSAGE, "OPEN.prompt"),
    ("seed negative", edit(OPEN, seed=-1), ErrorCode.BAD_MESSAGE, "OPEN.seed"),
    ("unknown error code", [head(type="ERROR", code=999, message="x")], ErrorCode.BAD_MESSAGE, "ERROR.code"),
    ("ping time as str", [head(type="PING", t="now")], ErrorCode.BAD_MESSAGE, "PING.t"),
    ("fewer frames than declared", VERIFY[:2], ErrorCode.BAD_MESSAGE, "VERIFY.bin"),
    ("extra frame", [*VERIFY, b"\x00" * 4], ErrorCode.BAD_MESSAGE, "VERIFY.bin"),
    ("frame without bin", [head(type="CLOSE"), b"x"], ErrorCode.BAD_MESSAGE, "CLOSE.bin"),
    ("bin not a list", edit(VERIFY, bin="tokens"), ErrorCode.BAD_MESSAGE, "VERIFY.bin"),
    ("bin entry short", edit(VERIFY, bin=[["tokens", "<i4"], ["q", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "VERIFY.bin[0]"),
    ("unknown bin name", edit(VERIFY, bin=[["tokens", "<i4", [3]], ["p", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "unknown binary field 'p'"),
    ("bin given twice", edit(VERIFY, bin=[["tokens", "<i4", [3]], ["tokens", "<i4", [3]]]), ErrorCode.BAD_MESSAGE, "twice"),
    ("wrong dtype", edit(VERIFY, bin=[["tokens", "<i8", [3]], ["q", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "VERIFY.tokens dtype"),
    ("big-endian dtype", edit(VERIFY, bin=[["tokens", ">i4", [3]], ["q", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "VERIFY.tokens dtype"),
    ("wrong ndim", edit(VERIFY, bin=[["tokens", "<i4", [3, 1]], ["q", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "VERIFY.tokens shape"),
    ("negative dim", edit(VERIFY, bin=[["tokens", "<i4", [-3]], ["q", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "VERIFY.tokens shape"),
    ("huge dim", edit(VERIFY, bin=[["tokens", "<i4", [2**40]], ["q", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "VERIFY.tokens shape"),
    ("shape vs bytes", edit(VERIFY, bin=[["tokens", "<i4", [4]], ["q", "<f4", [3]]]), ErrorCode.BAD_MESSAGE, "VERIFY.tokens: shape [4]"),
    ("odd byte count", [VERIFY[0], VERIFY[1][:-1], VERIFY[2]], ErrorCode.BAD_MESSAGE, "VERIFY.tokens"),
    ("missing tokens", [head(type="VERIFY", round=0)], ErrorCode.BAD_MESSAGE, "VERIFY.tokens: missing"),
    ("missing image", [edit(OPEN, bin=[["kept", "<i4", [2]]])[0], OPEN[2]], ErrorCode.BAD_MESSAGE, "OPEN.image"),
    ("negative token", [VERIFY[0], np.array([1, -2, 3], i32).tobytes(), VERIFY[2]], ErrorCode.BAD_MESSAGE, "VERIFY.tokens"),
    ("q zero", [*VERIFY[:2], np.array([0.5, 0, 0.5], f32).tobytes()], ErrorCode.BAD_MESSAGE, "VERIFY.q"),
    ("q above one", [*VERIFY[:2], np.array([0.5, 1.5, 0.5], f32).tobytes()], ErrorCode.BAD_MESSAGE, "VERIFY.q"),
    ("q NaN", [*VERIFY[:2], np.array([0.5, np.nan, 0.5], f32).tobytes()], ErrorCode.BAD_MESSAGE, "VERIFY.q"),
    ("q length", [edit(VERIFY, bin=[["tokens", "<i4", [3]], ["q", "<f4", [2]]])[0], VERIFY[1], VERIFY[2][:8]],
     ErrorCode.BAD_MESSAGE, "VERIFY.q: shape [2]"),
    ("dists rows", [edit(VERIFY, bin=[["tokens", "<i4", [3]], ["dists", "<f4", [2, 2]]])[0], VERIFY[1], b"\x00" * 16],
     ErrorCode.BAD_MESSAGE, "VERIFY.dists"),
    ("dists negative", [edit(VERIFY, bin=[["tokens", "<i4", [3]], ["dists", "<f4", [3, 1]]])[0], VERIFY[1],
                        np.array([0.5, -0.5, 0.5], f32).tobytes()], ErrorCode.BAD_MESSAGE, "VERIFY.dists"),
    ("cand ids alone", [edit(RESULT, bin=[["cand_ids", "<i4", [1]]])[0], RESULT[1]], ErrorCode.BAD_MESSAGE, "cand_ids/cand_probs"),
    ("cand lengths", [edit(RESULT, bin=[["cand_ids", "<i4", [1]], ["cand_probs", "<f4", [2]]])[0], RESULT[1], b"\x00" * 8],
     ErrorCode.BAD_MESSAGE, "RESULT.cand_probs"),
    ("kept unsorted", [*OPEN[:2], np.array([2, 1], i32).tobytes()], ErrorCode.BAD_MESSAGE, "OPEN.kept"),
    ("kept duplicate", [*OPEN[:2], np.array([2, 2], i32).tobytes()], ErrorCode.BAD_MESSAGE, "OPEN.kept"),
]


@pytest.mark.parametrize("frames, code, where", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed(frames: object, code: ErrorCode, where: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code == code, str(e.value)
    assert where in str(e.value), str(e.value)


def test_size_limits() -> None:
    small = Limits(max_total_bytes=100, max_header_bytes=50)
    with pytest.raises(ProtocolError, match="message: .* limit 100") as e:
        decode([VERIFY[0], b"x" * 100], small)
    assert e.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError, match="header: .* limit 50") as e:
        decode([head(type="PING", t=1.0, **{"pad": "x" * 60})], Limits(max_header_bytes=50))
    assert e.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError, match="OPEN.image") as e:
        decode(encode(P.Open(image=b"x" * 11, prompt="q", mode="covspec")), Limits(max_image_bytes=10))
    assert e.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError, match="VERIFY.tokens: 3 tokens, limit 2") as e:
        decode(VERIFY, Limits(max_window=2))
    assert e.value.code == ErrorCode.LIMIT
    with pytest.raises(ProtocolError) as e:  # encode refuses too, before anything is sent
        encode(P.Open(image=b"x" * 11, prompt="q", mode="covspec"), Limits(max_image_bytes=10))
    assert e.value.code == ErrorCode.TOO_LARGE


def test_error_is_addressed() -> None:
    """Once sid/seq are read, the error carries them so the edge can answer the right request."""
    with pytest.raises(ProtocolError) as e:
        decode(edit(VERIFY, round="x"))
    assert (e.value.sid, e.value.seq) == (5, 6)
    reply = decode(encode(P.Error.of(e.value)))
    assert reply.code == ErrorCode.BAD_MESSAGE and reply.seq == 6 and "VERIFY.round" in reply.message
    with pytest.raises(ProtocolError) as e:
        decode(edit(VERIFY, v=99))
    assert e.value.code == ErrorCode.BAD_VERSION and (e.value.sid, e.value.seq) == (5, 6)


@pytest.mark.parametrize("msg, where", [
    (P.Verify(round=-1, tokens=np.array([1], i32)), "VERIFY.round"),
    (P.Verify(round=0, tokens=np.array([[1]], i32)), "VERIFY.tokens"),
    (P.Verify(round=0, tokens=np.array([1, 2], i32), q=np.array([0.5], f32)), "VERIFY.q"),
    (P.Verify(round=0, tokens=["a"]), "VERIFY.tokens"),
    (P.Open(image=None, prompt="q", mode="covspec"), "OPEN.image"),
    (P.Open(image="not bytes", prompt="q", mode="covspec"), "OPEN.image"),
    (P.Ping(t=float("nan")), "PING.t"),
    (P.Error(code=42, message="x"), "ERROR.code"),
])
def test_encode_validates(msg: P.Message, where: str) -> None:
    with pytest.raises(ProtocolError, match=where.replace(".", r"\.")):
        encode(msg)


# --- property: decode never raises anything but ProtocolError -------------------------------------------

NAMES = sorted({"v", "type", "sid", "seq", "bin"} | {n for f in P._FIELDS.values() for n in f})
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
    st.binary(max_size=8), st.sampled_from([1, "VERIFY", "<i4", "<f4", "bytes", *P._BY_TYPE, *NAMES]),
)
value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
                     max_leaves=12)
header = st.dictionaries(st.sampled_from(NAMES), value, max_size=8).map(
    lambda h: {"v": P.PROTOCOL_VERSION, "sid": 1, "seq": 1, **h})
bins = st.lists(st.tuples(st.sampled_from(["tokens", "q", "dists", "image", "kept", "cand_ids", "x"]),
                          st.sampled_from(["<i4", "<f4", "bytes", "<f8", 3]),
                          st.lists(st.integers(-2, 6), max_size=3)).map(list), max_size=3)


@st.composite
def structured(draw: st.DrawFn) -> list[bytes]:
    h = draw(header)
    h["type"] = draw(st.sampled_from([*P._BY_TYPE, "NOPE"]))
    if draw(st.booleans()):
        h["bin"] = draw(bins)
    frames = [msgpack.packb(h, use_bin_type=draw(st.booleans()))]
    return frames + draw(st.lists(st.binary(max_size=32), max_size=3))


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    frames = [bytearray(f) for f in encode(draw(st.sampled_from(SAMPLES[:-1])))]
    for _ in range(draw(st.integers(1, 4))):
        f = frames[draw(st.integers(0, len(frames) - 1))]
        if f:
            f[draw(st.integers(0, len(f) - 1))] = draw(st.integers(0, 255))
    return [bytes(f) for f in frames[: draw(st.integers(1, len(frames)))]]


anything = st.one_of(
    st.lists(st.binary(max_size=64), max_size=4),
    structured(),
    mutated(),
    st.lists(st.one_of(st.binary(max_size=8), st.integers(), st.text(max_size=4), st.none()), max_size=3),
    value,
)


@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(anything)
def test_decode_never_raises_anything_else(frames: object) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as e:
        assert isinstance(e.code, ErrorCode) and e.message
    else:
        assert encode(msg)  # whatever decodes re-encodes
