"""`covspec edge serve`: the target VLM behind a ZeroMQ ROUTER socket.

One loop: receive a request, decode it (a bad one gets an ERROR reply naming what was wrong),
dispatch it to its handler, send the reply. Sessions are keyed by the device-chosen session id,
hold their own KV cache, and are freed on CLOSE, when the answer is done and closed, or after the
idle timeout. Nothing a device sends can stop the loop: every failure inside a handler becomes an
ERROR reply.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from covspec.edge_runtime.session import SessionError, TargetSession
from covspec.errors import CovspecError, ImageError, PromptError
from covspec.images import load_image
from covspec.models.base import VLMAdapter
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import MeteredSocket, make_socket

log = logging.getLogger("covspec.edge")


@dataclass
class EdgeSettings:
    bind: str = "tcp://127.0.0.1:5555"
    max_sessions: int = 64
    idle_timeout_s: float = 120.0
    max_new_tokens: int = 1024
    max_image_pixels: int = 2048 * 2048
    limits: wire.Limits = wire.DEFAULT_LIMITS


class EdgeServer:
    def __init__(self, adapter: VLMAdapter, settings: EdgeSettings, name: str = "target"):
        self.adapter = adapter
        self.settings = settings
        self.name = name
        self.fingerprint = adapter.fingerprint()
        self.sessions: dict[int, TargetSession] = {}
        self.ctx = zmq.Context.instance()
        self.sock = MeteredSocket(make_socket(self.ctx, zmq.ROUTER, max_msg_bytes=settings.limits.max_total_bytes))
        self.sock.sock.bind(settings.bind)
        self.endpoint = self.sock.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.requests = 0
        self.errors = 0

    # --- the loop ----------------------------------------------------------------------------
    def serve_forever(self, stop_after_s: float | None = None) -> None:
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        while deadline is None or time.monotonic() < deadline:
            self.serve_once(timeout_s=0.5)

    def serve_once(self, timeout_s: float) -> None:
        got = self.sock.recv_frames(timeout_s)
        self.free_idle_sessions()
        if got is None:
            return
        peer, frames = got
        self.requests += 1
        for reply in self.handle(frames):
            self.sock.send(reply, peer=peer, limits=self.settings.limits)

    def handle(self, frames: list[bytes]):
        """Yields the replies to one request (several for STREAM). Never raises."""
        msg: wire.Message | None = None
        try:
            msg = wire.decode(frames, self.settings.limits)
            handler = self.HANDLERS.get(type(msg))
            if handler is None:
                raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, f"{msg.TYPE} is not a request")
            yield from handler(self, msg)
        except wire.ProtocolError as err:
            yield self._error(msg, err.code, str(err))
        except (SessionError, PromptError, ImageError, ValueError) as err:
            yield self._error(msg, wire.ErrorCode.BAD_MESSAGE, str(err))
        except CovspecError as err:
            yield self._error(msg, wire.ErrorCode.INTERNAL, str(err))
        except Exception as err:  # a bug must not take the server down; it is logged and answered
            log.exception("internal error on %s", getattr(msg, "TYPE", "?"))
            yield self._error(msg, wire.ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")

    def _error(self, msg: wire.Message | None, code: wire.ErrorCode, text: str) -> wire.Error:
        self.errors += 1
        sid, seq = (msg.sid, msg.seq) if msg is not None else (0, 0)
        return wire.Error(sid=sid, seq=seq, code=code, message=text[:4000])

    def free_idle_sessions(self) -> None:
        now = time.monotonic()
        for sid in [s for s, sess in self.sessions.items() if now - sess.last_active > self.settings.idle_timeout_s]:
            log.info("session %d idle for over %.0f s: freed", sid, self.settings.idle_timeout_s)
            del self.sessions[sid]

    def _session(self, msg: wire.Message) -> TargetSession:
        session = self.sessions.get(msg.sid)
        if session is None:
            raise wire.ProtocolError(wire.ErrorCode.UNKNOWN_SESSION, f"no open session {msg.sid} (closed, expired or never opened)")
        return session

    # --- handlers ----------------------------------------------------------------------------
    def on_hello(self, msg: wire.Hello):
        if msg.fingerprint != self.fingerprint:
            raise wire.ProtocolError(
                wire.ErrorCode.FINGERPRINT_MISMATCH,
                f"the draft's tokenizer (fingerprint {msg.fingerprint[:12]}...) differs from the target's "
                f"({self.fingerprint[:12]}...): a draft must tokenize exactly like its target")
        s = self.settings
        yield wire.Welcome(seq=msg.seq, fingerprint=self.fingerprint, family=self.adapter.family, model=self.name,
                           edge="covspec-edge", vocab_size=self.adapter.vocab_size,
                           max_message_bytes=s.limits.max_total_bytes, max_image_bytes=s.limits.max_image_bytes,
                           max_window=s.limits.max_window, max_new_tokens=s.max_new_tokens,
                           idle_timeout_s=s.idle_timeout_s)

    def on_open(self, msg: wire.Open):
        existing = self.sessions.get(msg.sid)
        if existing is not None and existing.open_seq == msg.seq:  # a retried OPEN
            yield existing.opened
            return
        if msg.sid == 0:
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, "OPEN.sid: must be a nonzero session id")
        if msg.sid not in self.sessions and len(self.sessions) >= self.settings.max_sessions:
            raise wire.ProtocolError(wire.ErrorCode.BUSY, f"the edge holds its limit of {self.settings.max_sessions} sessions")
        if msg.max_new_tokens > self.settings.max_new_tokens:
            raise wire.ProtocolError(wire.ErrorCode.LIMIT, f"OPEN.max_new_tokens: {msg.max_new_tokens}, limit {self.settings.max_new_tokens}")
        params = SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p, seed=msg.seed)
        start = time.perf_counter()
        image = load_image(msg.image, max_pixels=self.settings.max_image_pixels)
        visual = self.adapter.encode_image(self.adapter.preprocess(image))
        kept = None if msg.kept is None else torch.from_numpy(msg.kept.astype(np.int64))
        with torch.inference_mode():
            session = TargetSession.open(self.adapter, visual, msg.prompt, kept, params, msg.max_new_tokens)
        session.open_seq = msg.seq
        prefill_s = time.perf_counter() - start
        session.opened = wire.Opened(sid=msg.sid, seq=msg.seq, token=session.committed[0], done=session.done,
                                     timings={"prefill_s": prefill_s})
        self.sessions[msg.sid] = session
        log.info("session %d opened: mode %s, %d visual tokens%s, prefill %.1f ms", msg.sid, msg.mode,
                 visual.count, "" if kept is None else f" ({len(kept)} kept)", prefill_s * 1000)
        yield session.opened

    def on_verify(self, msg: wire.Verify):
        session = self._session(msg)
        if msg.dists is not None:
            scheme, q_full = "full", torch.from_numpy(msg.dists.copy())
        elif msg.q is not None:
            scheme, q_full = "decoupled", None
        else:
            scheme, q_full = "greedy", None
        if scheme != "greedy" and session.params.greedy:
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, "VERIFY: q/dists sent for a greedy session")
        if scheme == "greedy" and not session.params.greedy:
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, "VERIFY: a sampling session needs q or dists")
        if q_full is not None and q_full.shape[1] != self.adapter.vocab_size:
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE,
                                     f"VERIFY.dists: width {q_full.shape[1]}, the target's vocabulary is {self.adapter.vocab_size}")
        vocab = self.adapter.vocab_size
        if (len(msg.tokens) and int(msg.tokens.max()) >= vocab) or (msg.root is not None and msg.root >= vocab):
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, f"VERIFY.tokens: token ids must be below the vocabulary size {vocab}")
        if msg.root is None and not session.root_known:
            raise wire.ProtocolError(wire.ErrorCode.BAD_STATE,
                                     "VERIFY.root: the last round was corrected on the device; send the correction as root")
        root = msg.root if msg.root is not None else session.committed[-1]
        q_of_draft = None if msg.q is None else torch.from_numpy(msg.q)
        answer = session.verify(msg.round, root, torch.from_numpy(msg.tokens.astype(np.int64)), scheme,
                                q_of_draft=q_of_draft, q_full=q_full)
        v = answer.verdict
        cand_ids = None if v.support_ids is None else v.support_ids.numpy().astype(np.int32)
        cand_probs = None if v.support_probs is None else v.support_probs.numpy().astype(np.float32)
        yield wire.Result(sid=msg.sid, seq=msg.seq, round=answer.round, accepted=v.accepted,
                          token=v.next_token, done=answer.done,
                          cand_ids=cand_ids, cand_probs=cand_probs, timings={"verify_s": answer.verify_s})

    def on_stream(self, msg: wire.Stream):
        session = self._session(msg)
        start = time.perf_counter()
        chunk: list[int] = []
        index = 0
        tokens = session.stream()
        next(tokens)  # the first token went out in OPENED
        for token in tokens:
            chunk.append(token)
            if len(chunk) >= msg.chunk:
                yield self._streamed(msg, index, chunk, False, start)
                index, chunk = index + 1, []
        yield self._streamed(msg, index, chunk, True, start)

    @staticmethod
    def _streamed(msg: wire.Stream, index: int, chunk: list[int], done: bool, start: float) -> wire.Streamed:
        return wire.Streamed(sid=msg.sid, seq=msg.seq, index=index, tokens=np.asarray(chunk, dtype=np.int32),
                             done=done, timings={"elapsed_s": time.perf_counter() - start})

    def on_close(self, msg: wire.Close):
        self.sessions.pop(msg.sid, None)
        yield wire.Closed(sid=msg.sid, seq=msg.seq)

    def on_ping(self, msg: wire.Ping):
        yield wire.Pong(sid=msg.sid, seq=msg.seq, t=msg.t)

    HANDLERS = {wire.Hello: on_hello, wire.Open: on_open, wire.Verify: on_verify, wire.Stream: on_stream,
                wire.Close: on_close, wire.Ping: on_ping}
