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

Rounds: each turn of the loop holds every request already queued (and, while the schedule lets the
round wait, up to `batch_wait_ms` for the VERIFYs of the other sessions mid-answer), and handles a
round of them (edge_runtime.scheduling: by default windows first and OPENs held while the SLO allows,
or arrival order with `schedule="fifo"`; at most `max_batch`); the rest stay held for the next turn.
The first VERIFY of each session in the round is scored in one packed pass, and the new sessions'
OPENs are prefilled in another (edge_runtime.batching); the round's requests are then handled one by
one in arrival order, exactly as without batching, each VERIFY using its precomputed window and each
OPEN its precomputed prefill (the rules stay in the handlers and TargetSession).

Draining (`drain()`, called on SIGTERM by `covspec edge serve`): the open sessions are served to the
end, every OPEN that would start a session is refused with ERROR DRAINING (the device opens it on
another edge), and `serve_forever` returns once no session is unfinished (the last one finished
given a moment for its CLOSE, and DRAIN_LINGER_S passed for a balancer to see /readyz fail) or
`settings.drain_timeout_s` has passed. `health()` is what the
HTTP /healthz and /readyz answer (edge_runtime.metrics): live while the loop turns, ready until drained.

Where each part lives: this module, the socket loop, the gathering of a round's requests and the
dispatch of each to its handler with its `RequestContext` (edge_runtime.context); which held requests a round
takes, edge_runtime.scheduling; the handlers,
edge_runtime.handlers; the session table with its quotas and idle expiry, edge_runtime.table; the
checks that decide what a VERIFY comes to, shared by its handler and the batched pass,
edge_runtime.planning; the round's batched passes, edge_runtime.prepass.
"""

from __future__ import annotations

import logging
import time

import zmq

from covspec.edge_runtime import scheduling
from covspec.edge_runtime.context import Incoming, Prepared, RequestContext
from covspec.edge_runtime.costs import EdgeCosts
from covspec.edge_runtime.counters import EdgeCounters
from covspec.edge_runtime.drafting import DraftedStream, DraftOffer, EdgeDrafting, advance
from covspec.edge_runtime.handlers import HANDLERS
from covspec.edge_runtime.prepass import Prepass
from covspec.edge_runtime.session import SessionError, TargetSession
from covspec.edge_runtime.settings import EdgeSettings
from covspec.edge_runtime.table import SessionTable
from covspec.edge_runtime.target import place_target, static_target
from covspec.errors import CovspecError, ImageError, PromptError
from covspec.models.base import VLMAdapter
from covspec.modes import Mode
from covspec.transport import protocol as wire
from covspec.transport.channel import MeteredSocket, Request, bind, make_socket, start_authenticator

__all__ = ["EdgeServer", "EdgeSettings"]

log = logging.getLogger("covspec.edge")

CLOSE_GRACE_S = 0.5  # a drained edge waits this long after its last session's activity, for the CLOSE
# a draining edge stays up at least this long, refusing OPENs, so that a balancer's readiness check
# takes it out of rotation before it goes (deploy/haproxy.cfg: 2 failed checks 0.25 s apart); one that
# exits sooner is still in rotation, and a device sent back to it loses its OPEN with the connection
DRAIN_LINGER_S = 2.0
STALL_S = 60.0  # /healthz fails when the loop has not come round for this long (a pass that hangs)


class EdgeServer:
    HANDLERS = HANDLERS  # message type -> handler(server, ctx, msg) (edge_runtime.handlers)

    def __init__(self, adapter: VLMAdapter, settings: EdgeSettings, name: str = "target",
                 draft: VLMAdapter | None = None):
        """Serves `adapter`, moved first to settings.device in settings.dtype where it is not there.
        `draft`: a draft of the same tokenizer run beside the target (edge-side speculation: mode
        edge_sd, and covspec devices that hand drafting to the edge), placed as the target is."""
        settings.check()
        self.adapter = static_target(place_target(adapter, settings.device, settings.dtype), settings)
        self.streams: list[DraftedStream] = []  # edge-drafted STREAMs in progress, advanced between requests
        self.held: list[Incoming] = []  # received, not yet handled, in arrival order (edge_runtime.scheduling)
        self.drafting = None if draft is None else EdgeDrafting(place_target(draft, settings.device, settings.dtype),
                                                                settings.draft_sessions)
        self.costs = EdgeCosts()  # step time, verify-time line, drafted pace: what OPENED and RESULT tell devices
        self.settings = settings
        self.name = name
        self.fingerprint = self.adapter.fingerprint()
        if draft is not None and draft.fingerprint() != self.fingerprint:
            raise CovspecError("the edge's draft tokenizes differently from its target: a draft must share "
                               "the target's tokenizer")
        self.table = SessionTable(settings)
        self.counters = EdgeCounters()
        self.prepass = Prepass(self.adapter, self.counters, self.costs, settings.max_image_pixels)
        keys = settings.keys
        # the ZAP handler is per context: an authenticating edge gets a context of its own
        self.ctx = zmq.Context.instance() if keys is None else zmq.Context()
        self.auth = None if keys is None else start_authenticator(self.ctx, keys, self._refused)
        self.sock = MeteredSocket(make_socket(self.ctx, zmq.ROUTER, max_msg_bytes=settings.limits.max_total_bytes,
                                              server_keys=keys))
        try:
            bind(self.sock.sock, settings.bind)  # a bad address or a port in use: one line naming it
        except CovspecError:
            self.close()
            raise
        self.endpoint = self.sock.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.draining_since: float | None = None  # when drain() was called (monotonic)
        self.turned = time.monotonic()  # when the loop last came round (liveness)

    @property
    def sessions(self) -> dict[int, TargetSession]:
        """The open sessions by id (the table's; read it, change it through `table`)."""
        return self.table.sessions

    @property
    def requests(self) -> int:
        return sum(self.counters.requests.values())

    @property
    def errors(self) -> int:
        return sum(self.counters.errors.values())

    def stats(self) -> dict[str, int | float]:
        """The counters (STATS, /metrics), with the requests held for a later round now."""
        return {**self.counters.snapshot(len(self.table.sessions), self.sock.counters), "requests_held": len(self.held)}

    def draft_offer(self) -> DraftOffer | None:
        """What a device's draft placement reads (edge_runtime.drafting): None without a draft here."""
        if self.drafting is None:
            return None
        return self.drafting.offer(sum(1 for s in self.table.sessions.values() if not s.done),
                                   self.costs.drafted_s_per_token)

    def _refused(self, key: str) -> None:
        """A device's CURVE handshake refused (called on the authenticator's thread)."""
        self.counters.refused_handshakes += 1
        log.warning("refused a device whose CURVE public key %s is not in %s (to admit it, copy its NAME.key "
                    "there and restart the edge)", key, self.settings.keys.allow_dir)

    def close(self) -> None:
        self.sock.close()
        if self.auth is not None:
            self.auth.stop()
            self.ctx.term()

    # --- draining and health ------------------------------------------------------------------
    def drain(self) -> None:
        """Stops taking new sessions (OPENs get DRAINING) and lets serve_forever return once the open
        ones are finished. Only sets a flag: safe to call from a signal handler or another thread."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def drained(self) -> bool:
        """Draining for DRAIN_LINGER_S at least, and nothing left to serve: no unfinished session, no
        edge-drafted stream, and the last session active at least CLOSE_GRACE_S ago (its device's
        CLOSE is on its way)."""
        if (self.draining_since is None or self.streams or self.held
                or time.monotonic() - self.draining_since < DRAIN_LINGER_S):
            return False
        sessions = list(self.table.sessions.values())
        quiet = time.monotonic() - max((s.last_active for s in sessions), default=0.0) > CLOSE_GRACE_S
        return all(s.done for s in sessions) and (not sessions or quiet)

    def health(self) -> dict[str, object]:
        """What /healthz and /readyz answer: `live` (the loop came round within STALL_S), `ready`
        (live and not draining), with the open sessions and how long the edge has been draining."""
        now = time.monotonic()
        live = now - self.turned < STALL_S
        draining = None if self.draining_since is None else round(now - self.draining_since, 3)
        return {"live": live, "ready": live and draining is None, "draining_s": draining,
                "sessions_open": len(self.table.sessions)}

    def _refuse_if_draining(self, msg: wire.Message) -> None:
        """A draining edge starts no session: an OPEN other than the retry of an open one gets DRAINING."""
        if self.draining_since is None or not isinstance(msg, wire.Open):
            return
        existing = self.table.sessions.get(msg.sid)
        if existing is None or existing.open_seq != msg.seq:
            raise wire.ProtocolError(wire.ErrorCode.DRAINING, "this edge is draining (shutting down): open the session "
                                     "on another edge (connect again; behind a balancer that reaches another replica)")

    # --- the loop ----------------------------------------------------------------------------
    def serve_forever(self, stop_after_s: float | None = None) -> None:
        """Serves until `stop_after_s`, or once drained (or drain_timeout_s after drain() was called)."""
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        while deadline is None or time.monotonic() < deadline:
            self.serve_once(timeout_s=0.05 if self.draining_since is not None else 0.5)
            if self.draining_since is not None and (
                    self.drained() or time.monotonic() - self.draining_since > self.settings.drain_timeout_s):
                left = sum(1 for s in self.table.sessions.values() if not s.done)
                log.info("drained in %.2f s (%d unfinished session(s) left)", time.monotonic() - self.draining_since, left)
                return

    def serve_once(self, timeout_s: float) -> None:
        """Handles a round of the held requests (edge_runtime.scheduling), waiting at most timeout_s for
        one when none is held (not at all while edge-drafted streams are in progress), then advances
        those streams a round."""
        self.turned = time.monotonic()
        if not self.held:
            got = self.sock.recv_request(0.0 if self.streams else timeout_s)
            if got is not None:
                self.held.append(Incoming(got, self._decode(got)))
        busy_from = time.perf_counter()  # the edge's busy time: handling requests and advancing streams
        self.free_idle_sessions()
        held = bool(self.held)
        if held:
            self._gather()
            self._handle_round(self._take_round())
        if self.streams:
            streams_from = time.perf_counter()
            self._advance_streams()
            self.costs.observe_streams_round(time.perf_counter() - streams_from)
        if held or self.streams:
            self.counters.busy_s += time.perf_counter() - busy_from

    def _take_round(self) -> list[Incoming]:
        """The held requests the schedule picks for this round, no longer held; an OPEN left for a later
        round (its prefill waits for windows) is counted once."""
        chosen = scheduling.choose(self.held, self.table, self.settings, self.costs,
                                   opens_refused=self.draining_since is not None,
                                   between_s=self.costs.streams_round_s if self.streams else 0.0)
        taken = set(chosen)
        self.held = [i for i in self.held if i not in taken]
        for incoming in self.held:
            if isinstance(incoming.msg, wire.Open) and not incoming.held_over:
                incoming.held_over = True
                self.counters.opens_held += 1
        return chosen

    def _handle_round(self, chosen: list[Incoming]) -> None:
        """The round's batched passes, then each request handled in turn, its replies sent."""
        batching = scheduling.batch_cap(self.settings) > 1
        prepared = self.prepass.run(self._not_refused(chosen), self.table) if batching else Prepared()
        for incoming in chosen:
            request = incoming.request
            for reply in self.handle(request.frames, request.device, decoded=incoming.msg, prepared=prepared):
                if isinstance(reply, DraftedStream):  # advanced between requests from now on
                    reply.peer = request.peer
                    self.streams.append(reply)
                else:
                    self._reply(reply, request.peer)

    def _advance_streams(self) -> None:
        """One round of every edge-drafted stream (edge_runtime.drafting.advance), its chunks sent; a
        stream whose session was closed or expired is dropped, a finished one counted."""
        self.streams = [s for s in self.streams if self.table.sessions.get(s.sid) is s.session]
        try:
            batched = advance(self.streams, self.drafting, self.adapter)
        except Exception as err:  # a bug must not take the server down: the streams get an ERROR
            log.exception("edge-drafted streams failed")
            for s in self.streams:
                self._reply(self._error(s.msg, wire.ErrorCode.INTERNAL, f"{type(err).__name__}: {err}"), s.peer)
            self.streams = []
            return
        if batched:
            self.counters.batches += 1
            self.counters.batched_windows += batched
            self.counters.batch_max = max(self.counters.batch_max, batched)
        unfinished = sum(1 for s in self.table.sessions.values() if not s.done)
        ended = []
        for stream in self.streams:
            for reply in stream.chunks():
                self._reply(reply, stream.peer)
            if not stream.session.done and stream.limit_reached():  # the device joins from the next round
                self._reply(stream.give_back(), stream.peer)
            elif (not stream.session.done and stream.asked and stream.session.usage.mode != Mode.EDGE_SD
                    and self.drafting is not None and not self.drafting.offers(unfinished)):
                self._reply(stream.give_back(), stream.peer)  # loaded: a device that can draft drafts again
                self.counters.drafting_given_back += 1
            elif not stream.session.done:
                continue
            ended.append(stream)
            self._count_stream(stream)
        self.streams = [s for s in self.streams if s not in ended]

    def _count_stream(self, stream: DraftedStream) -> None:
        """What an ended edge-drafted stream cost, in its session's usage and the edge's counters."""
        elapsed = time.perf_counter() - stream.start
        stream.session.usage.streamed += stream.streamed
        stream.session.usage.stream_s += elapsed
        self.counters.tokens_streamed += stream.streamed
        self.counters.tokens_edge_drafted += stream.streamed
        if stream.session.done:  # a whole drafted stream's rate: what OPENED tells devices
            self.costs.observe_drafted(elapsed, stream.streamed)

    def free_idle_sessions(self) -> None:
        self.counters.sessions_idle_freed += self.table.free_idle()

    def _reply(self, reply: wire.Message, peer: bytes) -> None:
        """Sends a reply; one that does not encode (a bug of the edge's, never the device's input) is
        logged and answered with an INTERNAL error instead, so the loop goes on."""
        try:
            self.sock.send(reply, peer=peer, limits=self.settings.limits)
        except wire.ProtocolError as err:
            log.exception("could not encode the %s reply", reply.TYPE)
            self.sock.send(self._error(reply, wire.ErrorCode.INTERNAL, f"the edge could not encode its {reply.TYPE}: {err}"),
                           peer=peer, limits=self.settings.limits)

    # --- gathering a round -------------------------------------------------------------------
    def _decode(self, request: Request) -> wire.Message | None:
        try:
            return wire.decode(request.frames, self.settings.limits)
        except Exception:  # answered by `handle`, which decodes it again and reports why
            return None

    def _gather(self) -> None:
        """Holds every request already queued on the socket, then waits for the windows of the other
        sessions that may send one, as long as the schedule lets the next round wait
        (scheduling.batch_wait_s), at most until max_batch sessions' windows are held."""
        while (request := self.sock.recv_request(0.0)) is not None:
            self.held.append(Incoming(request, self._decode(request)))
        s = self.settings
        wait_s = scheduling.batch_wait_s(self.held, self.table, s, self.costs)
        if wait_s <= 0:
            return
        wanted = min(s.max_batch, self.table.may_verify())
        verifying = {i.msg.sid for i in self.held if isinstance(i.msg, wire.Verify)}
        deadline = time.monotonic() + wait_s
        while len(verifying) < wanted and (left := deadline - time.monotonic()) > 0:
            request = self.sock.recv_request(left)
            if request is None:
                break
            incoming = Incoming(request, self._decode(request))
            self.held.append(incoming)
            if isinstance(incoming.msg, wire.Verify):
                verifying.add(incoming.msg.sid)

    def _not_refused(self, gathered: list[Incoming]) -> list[Incoming]:
        """The round's requests less the OPENs a draining edge refuses (their prefill is not batched)."""
        if self.draining_since is None:
            return gathered
        return [i for i in gathered if not isinstance(i.msg, wire.Open)]

    # --- dispatch ----------------------------------------------------------------------------
    def handle(self, frames: list, device: str = "local", decoded: wire.Message | None = None,
               prepared: Prepared | None = None):
        """Yields the replies to one request (several for STREAM). Never raises. `decoded`: the
        frames' message when already decoded; `prepared`: the round's batched passes."""
        msg: wire.Message | None = None
        ctx = RequestContext(device, prepared if prepared is not None else Prepared())
        try:
            try:
                msg = decoded if decoded is not None else wire.decode(frames, self.settings.limits)
            finally:
                self.counters.requests[msg.TYPE if msg is not None else "undecodable"] += 1
            handler = self.HANDLERS.get(type(msg))
            if handler is None:
                raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, f"{msg.TYPE} is not a request")
            self._refuse_if_draining(msg)
            yield from handler(self, ctx, msg)
        except wire.ProtocolError as err:
            # an undecodable message is answered at the sid/seq decode could still read
            yield self._error(msg or wire.Message(sid=err.sid, seq=err.seq), err.code, err.message)  # the code travels apart: not twice
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
