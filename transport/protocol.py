"""The CoVSpec wire protocol: one version number, one module.

A message is a ZeroMQ multipart frame list:

    frame 0   header: a msgpack map {"v": PROTOCOL_VERSION, "type": "VERIFY", "sid": int, "seq": int,
              ...type-specific scalar fields..., "bin": [[name, dtype, shape], ...]}
    frame 1.. one raw frame per "bin" entry, in that order: a little-endian C-order array whose dtype
              ("<i4", "<f4") and shape the entry declares, or encoded image bytes (dtype "bytes").

Never pickle. `encode(msg) -> list[bytes]` and `decode(frames) -> Message` validate every field
(types, ranges, dtype/shape against the frame's byte length, unknown or missing fields and frames,
size bounds) and raise `ProtocolError(code, message)` naming what was wrong; `decode` raises nothing
else, whatever the bytes.

Conventions:
- `sid`: session id, chosen by the device at OPEN (random, nonzero, < 2**63); 0 on session-less
  messages (HELLO/WELCOME, PING/PONG, an ERROR answering an undecodable message).
- `seq`: chosen by the sender of a request (increasing per socket); every reply (including ERROR and
  each STREAMED chunk) carries the request's `sid` and `seq`, so a DEALER matches replies to requests
  and drops stale ones. A retried request reuses its `seq`; a repeated VERIFY of a round gets the same
  RESULT.
- ROUTER sockets: the identity frame(s) that ZeroMQ prepends on receive (and expects on send) are not
  part of the message. The caller strips them before `decode` and prepends them to `encode`'s output.
- Requests -> replies: HELLO -> WELCOME, OPEN -> OPENED, VERIFY -> RESULT, STREAM -> STREAMED...
  (until one with done=True), CLOSE -> CLOSED, PING -> PONG, STATS -> STATSREPLY, INFO -> INFOREPLY; any
  request -> ERROR.
"""

from __future__ import annotations

import enum
import math
import re
import reprlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

import msgpack
import numpy as np

from covspec.errors import CovspecError

PROTOCOL_VERSION = 2  # 2: the edge's drafting offer and a yielded stream's next round are fields, not timings

U31 = 2**31 - 1  # token ids, rounds, counts
U63 = 2**63 - 1  # session ids, sequence numbers
U64 = 2**64 - 1  # seeds


class ErrorCode(enum.IntEnum):
    BAD_MESSAGE = 1  # malformed: not msgpack, wrong field type or range, bad frames
    BAD_VERSION = 2  # header "v" is not PROTOCOL_VERSION
    FINGERPRINT_MISMATCH = 3  # draft and target tokenizers differ
    UNKNOWN_SESSION = 4  # no such session (never opened, closed, or expired after idle timeout)
    BAD_ROUND = 5  # VERIFY round out of order, or a pipelined window dropped after a rejection
    BAD_STATE = 6  # request not valid in this session's state or mode
    LIMIT = 7  # over a limit of the edge: sessions, window length, max_new_tokens
    TOO_LARGE = 8  # message, header or image over its size bound
    BUSY = 9  # edge overloaded; retry later
    INTERNAL = 10  # the edge failed; its log says why
    UNAUTHORIZED = 11  # peer not allowed
    DUPLICATE = 12  # a repeat of a request already answered in full; a client drops it like a stale reply
    DRAINING = 13  # an OPEN refused by an edge that is shutting down: open it on another edge (a new connection)


class ProtocolError(CovspecError):
    """A message that breaks the protocol, or an ERROR reply. `sid`/`seq` are those of the offending
    message when they could be read (0 otherwise), so the receiver can address its ERROR reply."""

    def __init__(self, code: ErrorCode, message: str, sid: int = 0, seq: int = 0) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.sid = sid
        self.seq = seq


@dataclass(frozen=True)
class Limits:
    """Size bounds checked by encode and decode (the edge passes its own settings)."""

    max_header_bytes: int = 256 * 1024
    max_total_bytes: int = 64 * 1024 * 1024  # all frames together; [32, 152064] f32 dists is 19.5 MB
    max_image_bytes: int = 16 * 1024 * 1024
    max_window: int = 1024  # tokens in one VERIFY / STREAMED
    max_frames: int = 8


DEFAULT_LIMITS = Limits()
MAX_ECHO_BYTES = 1 << 20  # the most filler a PING may ask back (a bandwidth probe, not an amplifier)

# ---------------------------------------------------------------------------------------------------
# Messages. Every field is keyword-only; `sid`/`seq` are common. Arrays are numpy arrays (decode gives
# read-only views of the received frames). Timings are {name: milliseconds}.


@dataclass(kw_only=True, eq=False)
class Message:
    TYPE: ClassVar[str] = ""
    sid: int = 0
    seq: int = 0

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if a is None or b is None or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True


@dataclass(kw_only=True, eq=False)
class Hello(Message):
    TYPE: ClassVar[str] = "HELLO"
    fingerprint: str  # tokenizer/vocabulary fingerprint of the draft
    family: str  # model family, e.g. "llava"
    model: str  # model name


@dataclass(kw_only=True, eq=False)
class Welcome(Message):
    TYPE: ClassVar[str] = "WELCOME"
    fingerprint: str  # the target's
    family: str
    model: str
    edge: str = ""  # edge software/host description
    vocab_size: int  # target vocabulary
    max_message_bytes: int
    max_image_bytes: int
    max_window: int  # drafted tokens per VERIFY
    max_new_tokens: int
    idle_timeout_s: float  # a session idle longer than this is freed


@dataclass(kw_only=True, eq=False)
class Open(Message):
    TYPE: ClassVar[str] = "OPEN"
    image: bytes  # encoded image (PNG/JPEG)
    prompt: str
    mode: str  # "target_only", "vanilla_sd", "covspec", ablations...
    kept: np.ndarray | None = None  # int32 [k] sorted kept visual-token indices (target pruning)
    prefix: np.ndarray | None = None  # int32 [n] tokens already generated (reopen after an edge restart)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    max_new_tokens: int = 256
    edge_draft: bool | None = None  # True: a STREAM with draft follows (prefill the edge's draft now)


@dataclass(kw_only=True, eq=False)
class Opened(Message):
    TYPE: ClassVar[str] = "OPENED"
    token: int  # the target's first generated token
    done: bool = False
    offers_draft: bool | None = None  # an edge with a draft: whether it offers to draft this answer (None: no draft)
    edge_sessions: int | None = None  # with offers_draft: the unfinished sessions the edge holds
    stream_limit: bool | None = None  # True: the edge takes STREAM's `limit` (a device may join mid-answer)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True, eq=False)
class Verify(Message):
    TYPE: ClassVar[str] = "VERIFY"
    round: int  # 0, 1, 2... per session
    tokens: np.ndarray  # int32 [k] drafted token ids
    pos: int | None = None  # generated-sequence index of tokens[0] (pipelined windows)
    root: int | None = None  # the token the window follows, when the device chose it (a decoupled correction)
    q: np.ndarray | None = None  # float32 [k] draft probability of each drafted token (decoupled sampling)
    dists: np.ndarray | None = None  # float32 [k, V] full draft distributions (vanilla_sd sampling)


@dataclass(kw_only=True, eq=False)
class Result(Message):
    TYPE: ClassVar[str] = "RESULT"
    round: int
    accepted: int  # drafted tokens accepted, 0..k
    token: int | None = None  # next token (correction or bonus); None when the device draws the
    # correction from cand_ids/cand_probs, or when an accepted drafted token ended the answer
    done: bool = False
    cand_ids: np.ndarray | None = None  # int32 [m] support of the target's p at the rejected position
    cand_probs: np.ndarray | None = None  # float32 [m] p at those ids (device samples the correction)
    offers_draft: bool | None = None  # as in OPENED
    edge_sessions: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True, eq=False)
class Stream(Message):
    TYPE: ClassVar[str] = "STREAM"
    chunk: int = 1  # at most this many tokens per STREAMED
    draft: bool | None = None  # True: the edge drafts with its own draft and verifies (edge-side speculation)
    limit: int | None = None  # at most this many tokens, then the stream ends (done) with yielded_round set,
    # the session open for the device's windows (a device whose draft is still prefilling: joining)


@dataclass(kw_only=True, eq=False)
class Streamed(Message):
    TYPE: ClassVar[str] = "STREAMED"
    index: int  # 0, 1, 2... chunk number
    tokens: np.ndarray  # int32 [n]
    done: bool = False
    yielded_round: int | None = None  # last chunk of a stream the edge stopped drafting: the session's next round
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(kw_only=True, eq=False)
class Close(Message):
    TYPE: ClassVar[str] = "CLOSE"


@dataclass(kw_only=True, eq=False)
class Closed(Message):
    TYPE: ClassVar[str] = "CLOSED"


@dataclass(kw_only=True, eq=False)
class Ping(Message):
    TYPE: ClassVar[str] = "PING"
    t: float = 0.0  # sender's clock, echoed in PONG
    pad: bytes | None = None  # filler, to time an upload (link bandwidth, `covspec calibrate`)
    echo: int = 0  # bytes of filler wanted back in PONG, to time a download (at most MAX_ECHO_BYTES)


@dataclass(kw_only=True, eq=False)
class Pong(Message):
    TYPE: ClassVar[str] = "PONG"
    t: float = 0.0
    pad: bytes | None = None  # PING's `echo` bytes of filler


@dataclass(kw_only=True, eq=False)
class Stats(Message):
    TYPE: ClassVar[str] = "STATS"


@dataclass(kw_only=True, eq=False)
class StatsReply(Message):
    TYPE: ClassVar[str] = "STATSREPLY"
    counters: dict[str, int | float] = field(default_factory=dict)  # the edge's counters, by name


@dataclass(kw_only=True, eq=False)
class Info(Message):
    TYPE: ClassVar[str] = "INFO"


@dataclass(kw_only=True, eq=False)
class InfoReply(Message):
    TYPE: ClassVar[str] = "INFOREPLY"
    version: str  # the edge software's version ("covspec-edge 0.1.0")
    protocol: int  # PROTOCOL_VERSION the edge speaks
    fingerprint: str  # the target's tokenizer fingerprint (what HELLO checks a draft against)
    family: str  # the target's model family
    model: str  # the target's name
    vocab_size: int
    draft: str | None = None  # the draft the edge runs for edge_sd (and covspec's hand-over); None: no draft


@dataclass(kw_only=True, eq=False)
class Error(Message):
    TYPE: ClassVar[str] = "ERROR"
    code: ErrorCode
    message: str = ""

    @classmethod
    def of(cls, exc: ProtocolError) -> Error:
        """The ERROR reply to a message that raised `exc`."""
        return cls(sid=exc.sid, seq=exc.seq, code=exc.code, message=exc.message[:1000])


# ---------------------------------------------------------------------------------------------------
# Field validators: check(where, value) -> normalised value, or raise ProtocolError(BAD_MESSAGE).

Check = Callable[[str, Any], Any]
_MISSING = object()


def _show(value: Any) -> str:
    try:
        return f"{reprlib.repr(value)} ({type(value).__name__})"
    except Exception:  # noqa: BLE001 - a repr must never fail the error path
        return type(value).__name__


def _bad(where: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, f"{where}: expected {expected}, got {_show(value)}")


def _int(lo: int, hi: int) -> Check:
    def check(where: str, v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _bad(where, f"an integer in [{lo}, {hi}]", v)
        return v

    return check


def _float(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(where: str, v: Any) -> float:
        ok = type(v) in (int, float) and (lo < v if lo_open else lo <= v) and v <= hi and math.isfinite(v)
        if not ok:
            raise _bad(where, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}]", v)
        return float(v)

    return check


def _str(max_len: int, pattern: str | None = None) -> Check:
    rx = re.compile(pattern) if pattern else None

    def check(where: str, v: Any) -> str:
        if type(v) is not str or len(v) > max_len or (rx is not None and not rx.fullmatch(v)):
            raise _bad(where, f"a string of at most {max_len} characters" + (f" matching {pattern}" if rx else ""), v)
        return v

    return check


def _bool(where: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _bad(where, "a boolean", v)
    return v


def _code(where: str, v: Any) -> ErrorCode:
    if type(v) is not int or v not in ErrorCode._value2member_map_:
        raise _bad(where, f"an error code in {[c.value for c in ErrorCode]}", v)
    return ErrorCode(v)


def _timings(where: str, v: Any) -> dict[str, float]:
    if type(v) is not dict or len(v) > 32:
        raise _bad(where, "a map of at most 32 timings", v)
    key, ms = _str(32), _float(0.0, 1e9)
    return {key(f"{where} key", k): ms(f"{where}[{k!r}]", x) for k, x in v.items()}


def _counters(where: str, v: Any) -> dict[str, int | float]:
    if type(v) is not dict or len(v) > 256:
        raise _bad(where, "a map of at most 256 counters", v)
    key = _str(64)
    out: dict[str, int | float] = {}
    for k, x in v.items():
        if type(x) not in (int, float) or not (math.isfinite(x) and abs(x) <= 1e18):
            raise _bad(f"{where}[{k!r}]", "a finite number of magnitude at most 1e18", x)
        out[key(f"{where} key", k)] = x
    return out


def _opt(check: Check) -> Check:
    def opt(where: str, v: Any) -> Any:
        return None if v is None else check(where, v)

    return opt


_ID = _int(0, U31)
_NAME = _str(256)

# scalar header fields per message kind (sid, seq are common)
_FIELDS: dict[type[Message], dict[str, Check]] = {
    Hello: {"fingerprint": _NAME, "family": _NAME, "model": _NAME},
    Welcome: {
        "fingerprint": _NAME, "family": _NAME, "model": _NAME, "edge": _NAME, "vocab_size": _int(1, U31),
        "max_message_bytes": _int(0, U63), "max_image_bytes": _int(0, U63), "max_window": _int(1, U31),
        "max_new_tokens": _int(1, U31), "idle_timeout_s": _float(0.0, 1e9, lo_open=True),
    },
    Open: {
        "prompt": _str(100_000), "mode": _str(32, r"[a-z][a-z0-9_]*"), "temperature": _float(0.0, 100.0),
        "top_k": _int(0, U31), "top_p": _float(0.0, 1.0, lo_open=True), "seed": _opt(_int(0, U64)),
        "max_new_tokens": _int(1, U31), "edge_draft": _opt(_bool),
    },
    Opened: {"token": _ID, "done": _bool, "offers_draft": _opt(_bool), "edge_sessions": _opt(_ID),
             "stream_limit": _opt(_bool), "timings": _timings},
    Verify: {"round": _ID, "pos": _opt(_ID), "root": _opt(_ID)},
    Result: {"round": _ID, "accepted": _ID, "token": _opt(_ID), "done": _bool, "offers_draft": _opt(_bool),
             "edge_sessions": _opt(_ID), "timings": _timings},
    Stream: {"chunk": _int(1, U31), "draft": _opt(_bool), "limit": _opt(_int(1, U31))},
    Streamed: {"index": _ID, "done": _bool, "yielded_round": _opt(_ID), "timings": _timings},
    Close: {},
    Closed: {},
    Ping: {"t": _float(-1e12, 1e12), "echo": _int(0, MAX_ECHO_BYTES)},
    Pong: {"t": _float(-1e12, 1e12)},
    Stats: {},
    StatsReply: {"counters": _counters},
    Info: {},
    InfoReply: {"version": _NAME, "protocol": _int(1, U31), "fingerprint": _NAME, "family": _NAME, "model": _NAME,
                "vocab_size": _int(1, U31), "draft": _opt(_NAME)},
    Error: {"code": _code, "message": _str(4096)},
}


# Binary frames per message kind: dtype ("bytes" for opaque bytes), ndim, content check.
@dataclass(frozen=True)
class _Bin:
    dtype: str
    ndim: int = 1
    check: Callable[[np.ndarray], str | None] | None = None  # returns what is wrong, or None


def _ids(a: np.ndarray) -> str | None:
    return None if a.size == 0 or int(a.min()) >= 0 else "token ids must be >= 0"


def _sorted_ids(a: np.ndarray) -> str | None:
    return _ids(a) or (None if bool(np.all(np.diff(a) > 0)) else "indices must be strictly increasing")


def _q(a: np.ndarray) -> str | None:
    return None if bool(np.all((a > 0) & (a <= 1))) else "probabilities must be finite and in (0, 1]"


def _probs(a: np.ndarray) -> str | None:
    return None if bool(np.all((a >= 0) & (a <= 1))) else "probabilities must be finite and in [0, 1]"


_IDS = _Bin("<i4", 1, _ids)
_FRAMES: dict[type[Message], dict[str, _Bin]] = {
    Open: {"image": _Bin("bytes"), "kept": _Bin("<i4", 1, _sorted_ids), "prefix": _IDS},
    Verify: {"tokens": _IDS, "q": _Bin("<f4", 1, _q), "dists": _Bin("<f4", 2, _probs)},
    Result: {"cand_ids": _IDS, "cand_probs": _Bin("<f4", 1, _probs)},
    Streamed: {"tokens": _IDS},
    Ping: {"pad": _Bin("bytes")},
    Pong: {"pad": _Bin("bytes")},
}


def _cross(msg: Message, limits: Limits) -> None:
    """Checks that relate several fields."""
    t = msg.TYPE

    def fail(code: ErrorCode, text: str) -> None:
        raise ProtocolError(code, f"{t}.{text}", msg.sid, msg.seq)

    if isinstance(msg, Open) and len(msg.image) > limits.max_image_bytes:
        fail(ErrorCode.TOO_LARGE, f"image: {len(msg.image)} bytes, limit {limits.max_image_bytes}")
    if isinstance(msg, Verify | Streamed) and len(msg.tokens) > limits.max_window:
        fail(ErrorCode.LIMIT, f"tokens: {len(msg.tokens)} tokens, limit {limits.max_window}")
    if isinstance(msg, Verify):
        k = len(msg.tokens)
        if msg.q is not None and msg.q.shape != (k,):
            fail(ErrorCode.BAD_MESSAGE, f"q: shape {list(msg.q.shape)}, expected [{k}] (one per drafted token)")
        if msg.dists is not None and (msg.dists.shape[0] != k or msg.dists.shape[1] == 0):
            fail(ErrorCode.BAD_MESSAGE, f"dists: shape {list(msg.dists.shape)}, expected [{k}, V>0]")
    if isinstance(msg, Result) and (msg.cand_ids is None) != (msg.cand_probs is None):
        fail(ErrorCode.BAD_MESSAGE, "cand_ids/cand_probs: both or neither")
    if (isinstance(msg, Result) and msg.cand_ids is not None and msg.cand_probs is not None
            and msg.cand_ids.shape != msg.cand_probs.shape):
        fail(ErrorCode.BAD_MESSAGE, f"cand_probs: shape {list(msg.cand_probs.shape)}, expected {list(msg.cand_ids.shape)}")


_BY_TYPE: dict[str, type[Message]] = {cls.TYPE: cls for cls in _FIELDS}
_COMMON = {"v", "type", "sid", "seq", "bin"}
_SID, _SEQ = _int(0, U63), _int(0, U63)


# ---------------------------------------------------------------------------------------------------
# encode / decode


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """Message -> [header, *binary frames]. Raises ProtocolError for a field that would not decode."""
    cls = type(msg)
    if cls not in _FIELDS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not a protocol message: {_show(msg)}")
    where = msg.TYPE
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "type": where,
        "sid": _SID(f"{where}.sid", _plain(msg.sid)), "seq": _SEQ(f"{where}.seq", _plain(msg.seq)),
    }
    for name, check in _FIELDS[cls].items():
        value = check(f"{where}.{name}", _plain(getattr(msg, name)))
        if value is not None:
            header[name] = value
    frames: list[bytes] = []
    bins: list[list[Any]] = []
    arrays: dict[str, Any] = {}
    for name, spec in _FRAMES.get(cls, {}).items():
        value = getattr(msg, name)
        if value is None:
            if not _has_default(_field_of(where, name)):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{where}.{name}: missing")
            continue
        if spec.dtype == "bytes":
            if not isinstance(value, bytes | bytearray | memoryview):
                raise _bad(f"{where}.{name}", "bytes", value)
            data = bytes(value)
            bins.append([name, "bytes", [len(data)]])
            arrays[name] = data
        else:
            try:
                arr = np.ascontiguousarray(value, dtype=spec.dtype)
            except (TypeError, ValueError, OverflowError) as e:
                raise _bad(f"{where}.{name}", f"an array convertible to {spec.dtype}", value) from e
            _check_array(where, name, spec, arr)
            data = arr.tobytes()
            bins.append([name, spec.dtype, list(arr.shape)])
            arrays[name] = arr
        frames.append(data)
    if bins:
        header["bin"] = bins
    _cross(replace(msg, **arrays), limits)
    head = msgpack.packb(header, use_bin_type=True)
    _check_sizes(len(head), len(head) + sum(len(f) for f in frames), limits)
    return [head, *frames]


def decode(frames: Any, limits: Limits = DEFAULT_LIMITS) -> Message:
    """[header, *binary frames] -> Message. Raises ProtocolError and nothing else, whatever `frames` is."""
    ids = [0, 0]  # sid, seq once known, so that errors can be addressed
    try:
        return _decode(frames, limits, ids)
    except ProtocolError as e:
        e.sid, e.seq = ids
        raise
    except Exception as e:  # noqa: BLE001 - the contract: nothing but ProtocolError escapes
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"undecodable message ({type(e).__name__})", *ids) from None


def _decode(frames: Any, limits: Limits, ids: list[int]) -> Message:
    if not isinstance(frames, list | tuple) or not 1 <= len(frames) <= limits.max_frames:
        raise _bad("message", f"a list of 1 to {limits.max_frames} frames", frames)
    views: list[memoryview] = []
    for i, f in enumerate(frames):
        try:
            views.append(memoryview(f).cast("B"))
        except (TypeError, ValueError):
            raise _bad(f"frame {i}", "bytes", f) from None
    _check_sizes(views[0].nbytes, sum(v.nbytes for v in views), limits)
    try:
        header = msgpack.unpackb(views[0], raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises many kinds (ExtraData, ValueError, Unicode...)
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"header: not a msgpack map ({type(e).__name__}: {e})"[:300]) from None
    if type(header) is not dict:
        raise _bad("header", "a msgpack map", header)
    for i, name in enumerate(("sid", "seq")):  # best effort first, so that even BAD_VERSION is addressed
        if type(header.get(name)) is int and 0 <= header[name] <= U63:
            ids[i] = header[name]
    v = header.get("v", _MISSING)
    if v is _MISSING:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "header.v: missing protocol version")
    if v != PROTOCOL_VERSION or type(v) is not int:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"header.v: protocol version {_show(v)}, this side speaks {PROTOCOL_VERSION}")
    kind = header.get("type")
    cls = _BY_TYPE.get(kind) if type(kind) is str else None
    if cls is None:
        raise _bad("header.type", f"one of {sorted(_BY_TYPE)}", kind)
    t = cls.TYPE
    for i, (name, check) in enumerate((("sid", _SID), ("seq", _SEQ))):
        if name not in header:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}.{name}: missing")
        ids[i] = check(f"{t}.{name}", header[name])
    checks = _FIELDS[cls]
    unknown = [k for k in header if k not in _COMMON and k not in checks]
    if unknown:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}: unknown field(s) {', '.join(reprlib.repr(k) for k in unknown[:5])}")
    kwargs: dict[str, Any] = {"sid": ids[0], "seq": ids[1]}
    defaults = {f.name: f for f in fields(cls)}
    for name, check in checks.items():
        if name in header:
            kwargs[name] = check(f"{t}.{name}", header[name])
        elif not _has_default(defaults[name]):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}.{name}: missing")
    kwargs.update(_decode_bins(t, header.get("bin", []), views[1:], _FRAMES.get(cls, {})))
    msg = cls(**kwargs)
    _cross(msg, limits)
    return msg


def _decode_bins(t: str, bins: Any, views: list[memoryview], specs: dict[str, _Bin]) -> dict[str, Any]:
    if type(bins) is not list:
        raise _bad(f"{t}.bin", "a list of [name, dtype, shape]", bins)
    if len(bins) != len(views):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}.bin: header declares {len(bins)} binary frame(s), message has {len(views)}")
    out: dict[str, Any] = {}
    for i, (entry, view) in enumerate(zip(bins, views, strict=True)):
        if type(entry) is not list or len(entry) != 3 or type(entry[0]) is not str:
            raise _bad(f"{t}.bin[{i}]", "[name, dtype, shape]", entry)
        name, dtype, shape = entry
        spec = specs.get(name)
        if spec is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}.bin[{i}]: unknown binary field {name!r}, expected one of {sorted(specs)}")
        if name in out:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}.{name}: binary frame given twice")
        where = f"{t}.{name}"
        if dtype != spec.dtype:
            raise _bad(f"{where} dtype", repr(spec.dtype), dtype)
        if type(shape) is not list or len(shape) != spec.ndim or any(type(d) is not int or not 0 <= d <= U31 for d in shape):
            raise _bad(f"{where} shape", f"{spec.ndim} integer dimension(s) in [0, {U31}]", shape)
        itemsize = 1 if dtype == "bytes" else np.dtype(dtype).itemsize
        need = math.prod(shape) * itemsize
        if need != view.nbytes:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{where}: shape {shape} of {dtype} needs {need} bytes, frame has {view.nbytes}")
        if dtype == "bytes":
            out[name] = view.tobytes()
        else:
            out[name] = np.frombuffer(view, dtype=dtype).reshape(shape)
            _check_array(t, name, spec, out[name])
    for name in specs:
        if name not in out and not _has_default(_field_of(t, name)):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}.{name}: missing binary frame")
    return out


def _check_array(t: str, name: str, spec: _Bin, arr: np.ndarray) -> None:
    if arr.ndim != spec.ndim:
        raise _bad(f"{t}.{name}", f"a {spec.ndim}-d array", f"shape {list(arr.shape)}")
    problem = spec.check(arr) if spec.check else None
    if problem:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{t}.{name}: {problem}")


def _check_sizes(header_bytes: int, total_bytes: int, limits: Limits) -> None:
    if total_bytes > limits.max_total_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message: {total_bytes} bytes, limit {limits.max_total_bytes}")
    if header_bytes > limits.max_header_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"header: {header_bytes} bytes, limit {limits.max_header_bytes}")


def _plain(v: Any) -> Any:
    """numpy scalars, IntEnums and StrEnums (covspec.modes.Mode) -> Python scalars, so that np.int64(3)
    encodes like 3 and Mode.COVSPEC like "covspec"."""
    if isinstance(v, enum.IntEnum):
        return int(v)
    if isinstance(v, enum.StrEnum):
        return str(v)
    return v.item() if isinstance(v, np.generic) else v


def _has_default(f: Any) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _field_of(t: str, name: str) -> Any:
    return {f.name: f for f in fields(_BY_TYPE[t])}[name]
