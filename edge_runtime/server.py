"""`covspec edge serve`: the target VLM behind a ZeroMQ ROUTER socket.

One loop: receive a request, decode it (a bad one gets an ERROR reply naming what was wrong),
dispatch it to its handler, send the reply. Sessions are keyed by the device-chosen session id,
hold their own KV cache, and are freed on CLOSE, when the answer is done and closed, or after the
idle timeout. Nothing a device sends can stop the loop: every failure inside a handler becomes an
ERROR reply.

Security and limits (EdgeSettings, all with safe defaults): with `keys`, the ROUTER is a CURVE server
that admits only the device public keys in the allow folder, and a session answers only the device
that opened it; message, image (bytes and pixels), window, answer length, sessions in all and per
device (keyed by the device's public key, or by its connection without authentication) and idle time
are bounded. Counters are served by STATS; one JSON line per finished request goes to the
"covspec.edge.requests" logger (edge_runtime.stats).

Batching: a VERIFY or OPEN takes along the requests already queued behind it, and waits up to
`batch_wait_ms` for the VERIFYs of the other sessions that are mid-answer (at most `max_batch`
requests in all). The first VERIFY of each session among the gathered requests that would feed the
target is scored in one packed pass, and the new sessions' OPENs are prefilled in another
(edge_runtime.batching); the requests are then handled one by one in arrival order, exactly as
without batching, each VERIFY using its precomputed window and each OPEN its precomputed prefill
(the rules stay in the handlers and TargetSession).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from covspec.edge_runtime.batching import Window, can_batch, can_prefill_batch, prefill_batch, run_batch
from covspec.edge_runtime.session import SessionError, TargetSession, WindowDropped
from covspec.edge_runtime.settings import EdgeSettings
from covspec.edge_runtime.stats import EdgeCounters, SessionUsage, log_completion
from covspec.errors import CovspecError, ImageError, PromptError
from covspec.images import load_image
from covspec.models.base import DecodeState, VisualTokens, VLMAdapter
from covspec.policy import add_point, fit_line
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import MeteredSocket, Request, make_socket, start_authenticator

log = logging.getLogger("covspec.edge")


CLOSED_REMEMBERED = 4096  # sessions whose OPEN is remembered after CLOSE (a late duplicate is refused)


@dataclass
class Incoming:
    """A received request and its decoded message (None when it does not decode: `handle` answers it)."""

    request: Request
    msg: wire.Message | None


@dataclass
class Prefilled:
    """An OPEN's prefill, done in a batched pass before its handler runs."""

    seq: int
    visual: VisualTokens
    logits: torch.Tensor  # [V] the prompt's last position
    state: DecodeState
    pass_s: float


def _kept(msg: wire.Open) -> torch.Tensor | None:
    """The OPEN's kept visual-token indices (target pruning), or None."""
    return None if msg.kept is None else torch.from_numpy(msg.kept.astype(np.int64))


VERIFY_DECAY = 0.99  # weight kept by older verify passes in the edge's cost line, per pass


class EdgeServer:
    def __init__(self, adapter: VLMAdapter, settings: EdgeSettings, name: str = "target"):
        settings.check()
        self.adapter = adapter
        self.step_s: float | None = None  # the target's last measured streaming time per token
        self.verify_sums = [0.0] * 5  # decayed fit of verify time on window size, all sessions (OPENED tells it)
        self.settings = settings
        self.name = name
        self.fingerprint = adapter.fingerprint()
        self.sessions: dict[int, TargetSession] = {}
        self.closed: OrderedDict[int, int] = OrderedDict()  # sid -> seq of its OPEN, for closed sessions
        self.counters = EdgeCounters()
        self.device = ""  # who sent the request being handled (SessionUsage.device)
        self.windows: dict[int, Window] = {}  # sid -> its VERIFY's window from this round's batched pass
        self.prefills: dict[int, Prefilled] = {}  # sid -> its OPEN's prefill from this round's batched pass
        self.batching_refused = False  # batching was found impossible (logged once)
        self.prefills_batch = can_prefill_batch(adapter)  # whether OPEN prefills can share a pass
        keys = settings.keys
        # the ZAP handler is per context: an authenticating edge gets a context of its own
        self.ctx = zmq.Context.instance() if keys is None else zmq.Context()
        self.auth = None if keys is None else start_authenticator(self.ctx, keys)
        self.sock = MeteredSocket(make_socket(self.ctx, zmq.ROUTER, max_msg_bytes=settings.limits.max_total_bytes,
                                              server_keys=keys))
        self.sock.sock.bind(settings.bind)
        self.endpoint = self.sock.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def requests(self) -> int:
        return sum(self.counters.requests.values())

    @property
    def errors(self) -> int:
        return sum(self.counters.errors.values())

    def stats(self) -> dict[str, int | float]:
        return self.counters.snapshot(len(self.sessions), self.sock.counters)

    def close(self) -> None:
        self.sock.close()
        if self.auth is not None:
            self.auth.stop()
            self.ctx.term()

    # --- the loop ----------------------------------------------------------------------------
    def serve_forever(self, stop_after_s: float | None = None) -> None:
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        while deadline is None or time.monotonic() < deadline:
            self.serve_once(timeout_s=0.5)

    def serve_once(self, timeout_s: float) -> None:
        got = self.sock.recv_request(timeout_s)
        self.free_idle_sessions()
        if got is None:
            return
        gathered = self._gather(Incoming(got, self._decode(got)))
        self.windows = self._batch(gathered)
        self.prefills = self._prefill(gathered)
        try:
            for incoming in gathered:
                request = incoming.request
                for reply in self.handle(request.frames, request.device, decoded=incoming.msg):
                    self._reply(reply, request.peer)
        finally:
            self.windows, self.prefills = {}, {}

    def _reply(self, reply: wire.Message, peer: bytes) -> None:
        """Sends a reply; one that does not encode (a bug of the edge's, never the device's input) is
        logged and answered with an INTERNAL error instead, so the loop goes on."""
        try:
            self.sock.send(reply, peer=peer, limits=self.settings.limits)
        except wire.ProtocolError as err:
            log.exception("could not encode the %s reply", reply.TYPE)
            self.sock.send(self._error(reply, wire.ErrorCode.INTERNAL, f"the edge could not encode its {reply.TYPE}: {err}"),
                           peer=peer, limits=self.settings.limits)

    def handle(self, frames: list, device: str = "local", decoded: wire.Message | None = None):
        """Yields the replies to one request (several for STREAM). Never raises. `decoded`: the
        frames' message when already decoded."""
        msg: wire.Message | None = None
        self.device = device
        try:
            try:
                msg = decoded if decoded is not None else wire.decode(frames, self.settings.limits)
            finally:
                self.counters.requests[msg.TYPE if msg is not None else "undecodable"] += 1
            handler = self.HANDLERS.get(type(msg))
            if handler is None:
                raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, f"{msg.TYPE} is not a request")
            yield from handler(self, msg)
        except wire.ProtocolError as err:
            # an undecodable message is answered at the sid/seq decode could still read
            yield self._error(msg or wire.Message(sid=err.sid, seq=err.seq), err.code, str(err))
        except (SessionError, PromptError, ImageError, ValueError) as err:
            yield self._error(msg, wire.ErrorCode.BAD_MESSAGE, str(err))
        except CovspecError as err:
            yield self._error(msg, wire.ErrorCode.INTERNAL, str(err))
        except Exception as err:  # a bug must not take the server down; it is logged and answered
            log.exception("internal error on %s", getattr(msg, "TYPE", "?"))
            yield self._error(msg, wire.ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")

    def _error(self, msg: wire.Message | None, code: wire.ErrorCode, text: str) -> wire.Error:
        self.counters.errors[code.name] += 1
        sid, seq = (msg.sid, msg.seq) if msg is not None else (0, 0)
        return wire.Error(sid=sid, seq=seq, code=code, message=text[:4000])

    # --- batched verification ----------------------------------------------------------------
    def _decode(self, request: Request) -> wire.Message | None:
        try:
            return wire.decode(request.frames, self.settings.limits)
        except Exception:  # answered by `handle`, which decodes it again and reports why
            return None

    def _may_verify(self) -> int:
        """Sessions that may send a VERIFY now: open, not finished, not streaming-only."""
        return sum(1 for s in self.sessions.values() if not s.done and s.usage is not None and s.usage.mode != "target_only")

    def _gather(self, first: Incoming) -> list[Incoming]:
        """`first` and, when it is a VERIFY or an OPEN, the requests queued behind it and those that
        arrive within batch_wait_ms while other sessions that may send a VERIFY have not: at most
        max_batch requests."""
        s = self.settings
        if not isinstance(first.msg, (wire.Verify, wire.Open)) or s.batch_wait_ms <= 0 or s.max_batch <= 1:
            return [first]
        wanted = min(s.max_batch, self._may_verify())
        gathered = [first]
        verifying = {first.msg.sid} if isinstance(first.msg, wire.Verify) else set()
        deadline = time.monotonic() + s.batch_wait_ms / 1000
        while len(gathered) < s.max_batch:
            waiting = len(verifying) < wanted
            request = self.sock.recv_request(max(0.0, deadline - time.monotonic()) if waiting else 0.0)
            if request is None:
                break
            incoming = Incoming(request, self._decode(request))
            gathered.append(incoming)
            if isinstance(incoming.msg, wire.Verify):
                verifying.add(incoming.msg.sid)
        return gathered

    def _window_ids(self, msg: wire.Verify, device: str) -> torch.Tensor | None:
        """The ids [k+1] this VERIFY will feed the target, or None when it will not feed any (it
        will be refused, or repeats a round): what `on_verify` and `TargetSession.verify` check."""
        session = self.sessions.get(msg.sid)
        if session is None or (self.settings.keys is not None and session.usage.device != device):
            return None
        vocab = self.adapter.vocab_size
        tokens = msg.tokens
        if len(tokens) and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
            return None
        if msg.root is None and not session.root_known:
            return None
        root = msg.root if msg.root is not None else session.committed[-1]
        if not 0 <= root < vocab:
            return None
        return session.window_ids(msg.round, root, torch.from_numpy(tokens.astype(np.int64)), msg.pos)

    def _planned(self, gathered: list[Incoming]) -> dict[int, torch.Tensor]:
        """sid -> the ids [k+1] of its VERIFY, for the gathered VERIFYs that will feed the target and
        are their session's first request here (each session's requests are still handled in order)."""
        planned: dict[int, torch.Tensor] = {}
        for incoming in self._first_requests(gathered):
            msg = incoming.msg
            if isinstance(msg, wire.Verify) and (ids := self._window_ids(msg, incoming.request.device)) is not None:
                planned[msg.sid] = ids
        return planned

    def _batch(self, gathered: list[Incoming]) -> dict[int, Window]:
        """One target pass over the planned windows of the gathered VERIFYs: sid -> window. Empty when
        fewer than two windows can share a pass, or when the pass fails (the sessions are untouched
        then, and each verifies on its own)."""
        try:
            planned = self._planned(gathered)
            if len(planned) < 2:
                return {}
            states = [self.sessions[sid].state for sid in planned]
            if not can_batch(self.adapter, states):
                if not self.batching_refused:
                    log.info("batched verification: not possible for this target's caches; each session verifies on its own")
                self.batching_refused = True
                return {}
            windows = run_batch(self.adapter, states, list(planned.values()))
        except Exception:
            log.exception("batched verification failed; the windows are verified one by one")
            return {}
        log.debug("batched %d windows (%d tokens) in %.1f ms", len(windows), sum(w.size for w in windows),
                  windows[0].pass_s * 1000)
        self.counters.batches += 1
        self.counters.batched_windows += len(windows)
        self.counters.batch_max = max(self.counters.batch_max, len(windows))
        return dict(zip(planned, windows, strict=True))

    def _first_requests(self, gathered: list[Incoming]) -> list[Incoming]:
        """The gathered requests that are their session's first among them (each session's requests
        are handled in order, so only its first can be computed ahead)."""
        seen: set[int] = set()
        first = []
        for incoming in gathered:
            if incoming.msg is not None and incoming.msg.sid not in seen:
                seen.add(incoming.msg.sid)
                first.append(incoming)
        return first

    def _prefill(self, gathered: list[Incoming]) -> dict[int, Prefilled]:
        """One target pass over the prompts of the gathered OPENs that start a session (retried OPENs
        and ones that will be refused for their image or prompt are left to `on_open`): sid -> its
        prefill. Empty when fewer than two can share a pass, or when the pass fails."""
        opens = [i.msg for i in self._first_requests(gathered) if isinstance(i.msg, wire.Open) and i.msg.sid
                 and not (i.msg.sid in self.sessions and self.sessions[i.msg.sid].open_seq == i.msg.seq)]
        if len(opens) < 2 or not self.prefills_batch:
            return {}
        prepared = {}
        for msg in opens:
            try:
                visual = self._encode(msg)
                with torch.inference_mode():
                    prepared[msg.sid] = (msg.seq, visual, self.adapter.prefill_inputs(visual, msg.prompt, _kept(msg)))
            except Exception:  # refused by on_open, which says why
                continue
        if len(prepared) < 2:
            return {}
        start = time.perf_counter()
        try:
            results = prefill_batch(self.adapter, [inputs for _, _, inputs in prepared.values()])
        except Exception:
            log.exception("batched prefill failed; the sessions are prefilled one by one")
            return {}
        pass_s = time.perf_counter() - start
        log.debug("prefilled %d prompts in one pass of %.1f ms", len(results), pass_s * 1000)
        self.counters.prefill_batches += 1
        self.counters.batched_prefills += len(results)
        return {sid: Prefilled(seq, visual, logits, state, pass_s)
                for (sid, (seq, visual, _)), (logits, state) in zip(prepared.items(), results, strict=True)}

    def _encode(self, msg: wire.Open) -> VisualTokens:
        """The OPEN's image through the target's vision side (ImageError when it is not a valid one)."""
        return self.adapter.encode_image(self.adapter.preprocess(load_image(msg.image, max_pixels=self.settings.max_image_pixels)))

    def free_idle_sessions(self) -> None:
        now = time.monotonic()
        for sid in [s for s, sess in self.sessions.items() if now - sess.last_active > self.settings.idle_timeout_s]:
            log.info("session %d idle for over %g s: freed", sid, self.settings.idle_timeout_s)
            session = self.sessions.pop(sid)
            self.counters.sessions_idle_freed += 1
            log_completion(sid, session.usage, len(session.committed), "idle")

    def _owns(self, session: TargetSession) -> bool:
        """Whether the device being answered opened `session`. Only authenticated devices can be
        told apart: without CURVE a device's connection changes with every reconnection."""
        return self.settings.keys is None or session.usage.device == self.device

    def _session(self, msg: wire.Message) -> TargetSession:
        session = self.sessions.get(msg.sid)
        if session is None or not self._owns(session):
            # another device's session is answered as if it did not exist
            raise wire.ProtocolError(wire.ErrorCode.UNKNOWN_SESSION, f"no open session {msg.sid} (closed, expired or never opened)")
        session.last_active = time.monotonic()
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
        if existing is not None and existing.open_seq == msg.seq and self._owns(existing):
            yield existing.opened  # a retried OPEN
            return
        if msg.sid == 0:
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, "OPEN.sid: must be a nonzero session id")
        if existing is not None and not self._owns(existing):
            raise wire.ProtocolError(wire.ErrorCode.BAD_STATE, f"OPEN.sid: session {msg.sid} is another device's")
        # (the owner's new OPEN of an open session replaces it: a device resuming with a prefix)
        if existing is None and self.closed.get(msg.sid) == msg.seq:
            raise wire.ProtocolError(wire.ErrorCode.BAD_STATE, f"OPEN: a late copy of session {msg.sid}'s OPEN, closed since")
        s = self.settings
        if existing is None and len(self.sessions) >= s.max_sessions:
            raise wire.ProtocolError(wire.ErrorCode.BUSY, f"the edge holds its limit of {s.max_sessions} sessions")
        mine = sum(1 for sid, other in self.sessions.items() if sid != msg.sid and other.usage.device == self.device)
        if mine >= s.max_sessions_per_device:
            raise wire.ProtocolError(wire.ErrorCode.LIMIT,
                                     f"this device holds its limit of {s.max_sessions_per_device} open sessions: close one")
        if msg.max_new_tokens > s.max_new_tokens:
            raise wire.ProtocolError(wire.ErrorCode.LIMIT, f"OPEN.max_new_tokens: {msg.max_new_tokens}, limit {s.max_new_tokens}")
        prefix = [] if msg.prefix is None else [int(t) for t in msg.prefix]
        if prefix and max(prefix) >= self.adapter.vocab_size:
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE,
                                     f"OPEN.prefix: token ids must be below the vocabulary size {self.adapter.vocab_size}")
        if len(prefix) > msg.max_new_tokens:
            raise wire.ProtocolError(wire.ErrorCode.LIMIT, f"OPEN.prefix: {len(prefix)} tokens, more than max_new_tokens {msg.max_new_tokens}")
        params = SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p, seed=msg.seed)
        start = time.perf_counter()
        prefilled = self.prefills.pop(msg.sid, None)  # this round's batched pass over its prompt, if any
        if prefilled is not None and prefilled.seq == msg.seq:
            visual, done = prefilled.visual, (prefilled.logits, prefilled.state)
        else:
            visual, done = self._encode(msg), None
        with torch.inference_mode():
            session = TargetSession.open(self.adapter, visual, msg.prompt, _kept(msg), params, msg.max_new_tokens,
                                         prefix, prefilled=done)
        session.open_seq = msg.seq
        prefill_s = time.perf_counter() - start + (prefilled.pass_s if done is not None else 0.0)
        session.usage = SessionUsage(device=self.device, mode=msg.mode, prefix=len(prefix), prefill_s=prefill_s)
        session.opened = wire.Opened(sid=msg.sid, seq=msg.seq, token=session.committed[-1], done=session.done,
                                     timings={"prefill_s": prefill_s, **self._cost_timings()})
        self.sessions[msg.sid] = session
        self.counters.sessions_opened += 1
        self.counters.sessions_reopened += bool(prefix)
        log.info("session %d opened: mode %s, %d visual tokens%s%s, prefill %.1f ms", msg.sid, msg.mode,
                 visual.count, "" if msg.kept is None else f" ({len(msg.kept)} kept)",
                 f", resumed after {len(prefix)} tokens" if prefix else "", prefill_s * 1000)
        yield session.opened

    def _cost_timings(self) -> dict[str, float]:
        """What the devices' drafting policies price windows with: the target's streaming time per
        token and, once windows of more than one length were verified, the verify-time line."""
        out = {"step_s": self.step_s} if self.step_s else {}
        line = fit_line(self.verify_sums, min_spread=0.25)
        if line is not None:  # a steep slope can put the intercept below 0: no pass takes negative time
            out["verify_v0_s"], out["verify_v1_s"] = max(line[0], 0.0), line[1]
        return out

    def on_verify(self, msg: wire.Verify):
        window = self.windows.pop(msg.sid, None)  # this round's batched pass over its window, if any
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
        before = session.last
        try:
            answer = session.verify(msg.round, root, torch.from_numpy(msg.tokens.astype(np.int64)), scheme,
                                    q_of_draft=q_of_draft, q_full=q_full, window=window, pos=msg.pos)
        except WindowDropped as err:  # a window sent ahead on an outcome that did not happen: normal, not an error
            self.counters.windows_dropped += 1
            yield wire.Error(sid=msg.sid, seq=msg.seq, code=wire.ErrorCode.BAD_ROUND, message=f"dropped: {err}")
            return
        v = answer.verdict
        if answer is not before:  # a new round, not a repeat
            self.counters.windows_ahead += msg.pos is not None
            usage = session.usage
            usage.rounds, usage.drafted, usage.accepted = usage.rounds + 1, usage.drafted + len(msg.tokens), usage.accepted + v.accepted
            usage.verify_s += answer.verify_s
            if len(msg.tokens):
                self.verify_sums = add_point(self.verify_sums, len(msg.tokens), answer.verify_s, decay=VERIFY_DECAY)
            self.counters.tokens_verified += len(msg.tokens)
            self.counters.tokens_accepted += v.accepted
        cand_ids = None if v.support_ids is None else v.support_ids.numpy().astype(np.int32)
        cand_probs = None if v.support_probs is None else v.support_probs.numpy().astype(np.float32)
        yield wire.Result(sid=msg.sid, seq=msg.seq, round=answer.round, accepted=v.accepted,
                          token=v.next_token, done=answer.done,
                          cand_ids=cand_ids, cand_probs=cand_probs, timings={"verify_s": answer.verify_s})

    def on_stream(self, msg: wire.Stream):
        session = self._session(msg)
        if msg.seq in session.stream_seqs:  # a duplicate: its chunks went out already, before this reply
            raise wire.ProtocolError(wire.ErrorCode.DUPLICATE,
                                     f"STREAM seq {msg.seq} of session {msg.sid} was served already (a duplicate)")
        session.stream_seqs.add(msg.seq)
        start = time.perf_counter()
        chunk: list[int] = []
        index = 0
        tokens = session.stream()
        next(tokens)  # the first token went out in OPENED
        for token in tokens:
            chunk.append(token)
            session.usage.streamed += 1
            self.counters.tokens_streamed += 1
            if len(chunk) >= msg.chunk:
                yield self._streamed(msg, index, chunk, False, start)
                index, chunk = index + 1, []
        elapsed = time.perf_counter() - start
        session.usage.stream_s += elapsed
        if session.usage.streamed:  # per streamed token, sending included: what a device weighs drafting against
            self.step_s = elapsed / session.usage.streamed
        session.last_active = time.monotonic()
        yield self._streamed(msg, index, chunk, True, start)

    @staticmethod
    def _streamed(msg: wire.Stream, index: int, chunk: list[int], done: bool, start: float) -> wire.Streamed:
        return wire.Streamed(sid=msg.sid, seq=msg.seq, index=index, tokens=np.asarray(chunk, dtype=np.int32),
                             done=done, timings={"elapsed_s": time.perf_counter() - start})

    def on_close(self, msg: wire.Close):
        session = self.sessions.get(msg.sid)
        if session is not None and self._owns(session):
            del self.sessions[msg.sid]
            self.counters.sessions_closed += 1
            self.closed[msg.sid] = session.open_seq
            while len(self.closed) > CLOSED_REMEMBERED:
                self.closed.popitem(last=False)
            log_completion(msg.sid, session.usage, len(session.committed), "closed")
        yield wire.Closed(sid=msg.sid, seq=msg.seq)  # closing twice (a retried CLOSE) is fine

    def on_ping(self, msg: wire.Ping):
        yield wire.Pong(sid=msg.sid, seq=msg.seq, t=msg.t, pad=bytes(msg.echo) if msg.echo else None)

    def on_stats(self, msg: wire.Stats):
        yield wire.StatsReply(sid=msg.sid, seq=msg.seq, counters=self.stats())

    HANDLERS = {wire.Hello: on_hello, wire.Open: on_open, wire.Verify: on_verify, wire.Stream: on_stream,
                wire.Close: on_close, wire.Ping: on_ping, wire.Stats: on_stats}
