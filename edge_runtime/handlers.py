"""The edge's answer to each request type: `handler(server, ctx, msg)` yields the replies (several
for STREAM). `server` is what a handler may read and update of the edge (`EdgeState`: EdgeServer is
one): its sessions, counters and cost model (`costs.observe_*`), never the socket. A handler raises ProtocolError (or SessionError, PromptError, ImageError, ValueError)
for a request it refuses; `EdgeServer.handle` turns that into the ERROR reply. `ctx` says who sent
the request and holds the round's batched work, which the handler takes for its own session.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from covspec.edge_runtime.batching import WindowPass
from covspec.edge_runtime.context import RequestContext
from covspec.edge_runtime.costs import EdgeCosts
from covspec.edge_runtime.counters import EdgeCounters, SessionUsage
from covspec.edge_runtime.drafting import DraftedStream, DraftOffer, EdgeDraft, EdgeDrafting, start_drafting
from covspec.edge_runtime.planning import Outcome, VerifyPlan, plan_verify
from covspec.edge_runtime.session import RoundAnswer, SessionError, TargetSession
from covspec.edge_runtime.settings import EdgeSettings
from covspec.edge_runtime.table import SessionTable
from covspec.edge_runtime.visual import encode, kept_indices
from covspec.models.base import VLMAdapter
from covspec.modes import MODE_OPTIONS, MODES, NO_EDGE_DRAFT, Mode
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire

log = logging.getLogger("covspec.edge")


class EdgeState(Protocol):
    """What the handlers read and update of the edge (edge_runtime.server.EdgeServer)."""

    adapter: VLMAdapter
    settings: EdgeSettings
    name: str
    fingerprint: str
    table: SessionTable
    counters: EdgeCounters
    costs: EdgeCosts
    drafting: EdgeDrafting | None
    streams: list[DraftedStream]  # edge-drafted STREAMs in progress

    def draft_offer(self) -> DraftOffer | None: ...

    def stats(self) -> dict[str, int | float]: ...

def on_hello(server: EdgeState, ctx: RequestContext, msg: wire.Hello):
    if msg.fingerprint != server.fingerprint:
        raise wire.ProtocolError(
            wire.ErrorCode.FINGERPRINT_MISMATCH,
            f"the draft's tokenizer (fingerprint {msg.fingerprint[:12]}...) differs from the target's "
            f"({server.fingerprint[:12]}...): a draft must tokenize exactly like its target")
    s = server.settings
    yield wire.Welcome(seq=msg.seq, fingerprint=server.fingerprint, family=server.adapter.family, model=server.name,
                       edge="covspec-edge", vocab_size=server.adapter.vocab_size,
                       max_message_bytes=s.limits.max_total_bytes, max_image_bytes=s.limits.max_image_bytes,
                       max_window=s.limits.max_window, max_new_tokens=s.max_new_tokens,
                       idle_timeout_s=s.idle_timeout_s)


def _prefix(server: EdgeState, msg: wire.Open) -> list[int]:
    """The answer so far a resuming device sends (empty for a fresh OPEN), checked against the limits."""
    if msg.max_new_tokens > server.settings.max_new_tokens:
        raise wire.ProtocolError(wire.ErrorCode.LIMIT,
                                 f"OPEN.max_new_tokens: {msg.max_new_tokens}, limit {server.settings.max_new_tokens}")
    prefix = [] if msg.prefix is None else [int(t) for t in msg.prefix]
    vocab = server.adapter.vocab_size
    if prefix and max(prefix) >= vocab:
        raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, f"OPEN.prefix: token ids must be below the vocabulary size {vocab}")
    if len(prefix) > msg.max_new_tokens:
        raise wire.ProtocolError(wire.ErrorCode.LIMIT, f"OPEN.prefix: {len(prefix)} tokens, more than max_new_tokens {msg.max_new_tokens}")
    return prefix


def _start(server: EdgeState, ctx: RequestContext, msg: wire.Open, prefix: list[int]) -> tuple[TargetSession, int]:
    """A new session for the OPEN, prefilled (by this round's batched pass when it did): (session,
    its visual-token count). Its `opened` reply is set."""
    params = SamplingParams(temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p, seed=msg.seed)
    start = time.perf_counter()
    prefilled = ctx.prepared.prefills.pop(msg.sid, None)  # this round's batched pass over its prompt, if any
    if prefilled is not None and prefilled.seq == msg.seq:
        visual, done = prefilled.visual, (prefilled.logits, prefilled.state)
    else:
        visual, done = encode(server.adapter, msg, server.settings.max_image_pixels), None
    with torch.inference_mode():
        session = TargetSession.open(server.adapter, visual, msg.prompt, kept_indices(msg), params, msg.max_new_tokens,
                                     prefix, prefilled=done)
    session.open_seq = msg.seq
    prefill_s = time.perf_counter() - start + (prefilled.pass_s if done is not None else 0.0)
    if done is None and not prefix:  # a prefill of its own (a batched one is observed whole, by the prepass)
        server.costs.observe_prefill(1, prefill_s)
    session.usage = SessionUsage(device=ctx.device, mode=msg.mode, prefix=len(prefix), prefill_s=prefill_s)
    session.opened = wire.Opened(sid=msg.sid, seq=msg.seq, token=session.committed[-1], done=session.done,
                                 stream_limit=True, timings={"prefill_s": prefill_s, **server.costs.timings()})
    return session, visual.count


def on_open(server: EdgeState, ctx: RequestContext, msg: wire.Open):
    if msg.mode not in MODES:
        raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE,
                                 f"OPEN.mode: unknown mode {msg.mode!r} (modes: {', '.join(MODES)})")
    retried = server.table.admit(msg, ctx.device)
    if retried is not None:
        yield retried.opened  # a retried OPEN
        return
    if msg.mode == Mode.EDGE_SD and server.drafting is None:
        raise wire.ProtocolError(wire.ErrorCode.BAD_STATE, "OPEN.mode edge_sd: this edge has no draft to run "
                                 "(start it with covspec edge serve --draft PATH)")
    prefix = _prefix(server, msg)
    session, visual_count = _start(server, ctx, msg, prefix)
    server.table.add(msg.sid, session)
    _attach_draft(server, session, msg)  # after: the edge's load counts this session
    server.counters.sessions_opened += 1
    server.counters.sessions_reopened += bool(prefix)
    log.info("session %d opened: mode %s, %d visual tokens%s%s, prefill %.1f ms", msg.sid, msg.mode,
             visual_count, "" if msg.kept is None else f" ({len(msg.kept)} kept)",
             f", resumed after {len(prefix)} tokens" if prefix else "", session.usage.prefill_s * 1000)
    yield session.opened


def _attach_draft(server: EdgeState, session: TargetSession, msg: wire.Open) -> None:
    """With a draft on the edge: the session's edge draft and what the device's placement rule reads, in
    OPENED. The draft prefills at the first edge-drafted STREAM, even for edge_sd and a device that says
    it hands drafting over (OPEN.edge_draft): that STREAM comes right behind the OPEN, and OPENED (the
    first token) then waits for the target's prefill only (it waited for both: 5-7 ms more TTFT on wifi)."""
    if server.drafting is None or msg.mode in NO_EDGE_DRAFT:
        return
    session.edge_draft = EdgeDraft(msg)
    offer = server.draft_offer()
    if offer is not None:
        offer.apply(session.opened)


def _verified(server: EdgeState, session: TargetSession, msg: wire.Verify, plan: VerifyPlan,
              window: WindowPass | None) -> RoundAnswer:
    """Runs the planned round (or finds the answered one again) and counts a new round's tokens."""
    q_full = None if msg.dists is None else torch.from_numpy(msg.dists.copy())  # [k, V]
    q_of_draft = None if msg.q is None else torch.from_numpy(msg.q)  # [k]
    before = session.last
    answer = session.verify(msg.round, plan.root, plan.draft, plan.scheme, q_of_draft=q_of_draft, q_full=q_full,
                            window=window, pos=msg.pos)
    if answer is not before:  # a new round, not a repeat
        k, accepted = len(msg.tokens), answer.verdict.accepted
        server.counters.windows_ahead += msg.pos is not None
        usage = session.usage
        usage.rounds, usage.drafted, usage.accepted = usage.rounds + 1, usage.drafted + k, usage.accepted + accepted
        usage.verify_s += answer.verify_s
        server.costs.observe_verify(k, answer.verify_s)
        if window is None:  # a pass of its own (a batched pass is observed whole, by the prepass)
            server.costs.observe_pass(k + 1, answer.verify_s)
        server.counters.tokens_verified += k
        server.counters.tokens_accepted += accepted
    return answer


def on_verify(server: EdgeState, ctx: RequestContext, msg: wire.Verify):
    window = ctx.prepared.windows.pop(msg.sid, None)  # this round's batched pass over its window, if any
    session = server.table.active(msg, ctx.device)
    plan = plan_verify(session, msg, server.adapter.vocab_size)
    if plan.outcome is Outcome.DROP:  # a window sent ahead on an outcome that did not happen: normal, not an error
        server.counters.windows_dropped += 1
        yield wire.Error(sid=msg.sid, seq=msg.seq, code=wire.ErrorCode.BAD_ROUND, message=f"dropped: {plan.problem}")
        return
    if plan.outcome is Outcome.REFUSE:
        raise SessionError(plan.problem)
    answer = _verified(server, session, msg, plan, window)
    v = answer.verdict
    cand_ids = None if v.support_ids is None else v.support_ids.numpy().astype(np.int32)
    cand_probs = None if v.support_probs is None else v.support_probs.numpy().astype(np.float32)
    result = wire.Result(sid=msg.sid, seq=msg.seq, round=answer.round, accepted=v.accepted,
                         token=v.next_token, done=answer.done,
                         cand_ids=cand_ids, cand_probs=cand_probs, timings={"verify_s": answer.verify_s})
    offer = server.draft_offer()
    if offer is not None:
        offer.apply(result)
    yield result


def _streamed(msg: wire.Stream, index: int, chunk: list[int], done: bool, start: float) -> wire.Streamed:
    return wire.Streamed(sid=msg.sid, seq=msg.seq, index=index, tokens=np.asarray(chunk, dtype=np.int32),
                         done=done, timings={"elapsed_s": time.perf_counter() - start})


def on_stream(server: EdgeState, ctx: RequestContext, msg: wire.Stream):
    """The rest of the answer: drafted and verified on the edge for an edge_sd session or a STREAM that
    asks for it (when the edge has a draft), yielded as a DraftedStream that the server advances a
    round at a time between requests; else generated by the target alone here, a token at a time."""
    session = server.table.active(msg, ctx.device)
    if msg.seq in session.stream_seqs:  # a duplicate: its chunks went out already, before this reply
        raise wire.ProtocolError(wire.ErrorCode.DUPLICATE,
                                 f"STREAM seq {msg.seq} of session {msg.sid} was served already (a duplicate)")
    if any(stream.session is session for stream in server.streams):
        raise wire.ProtocolError(wire.ErrorCode.BAD_STATE, f"session {msg.sid} is being streamed already")
    asked = session.usage.mode == Mode.EDGE_SD or bool(msg.draft)
    if session.edge_draft is not None and (asked or drafts_plain_stream(server.settings, session)):
        drafter = start_drafting(session, session.edge_draft, server.drafting, server.settings.max_image_pixels)
        session.stream_seqs.add(msg.seq)
        server.counters.plain_streams_drafted += not asked
        yield DraftedStream(msg.sid, session, drafter, msg, asked=asked)
        return
    session.stream_seqs.add(msg.seq)
    start = time.perf_counter()
    chunk: list[int] = []
    index = 0
    tokens = session.stream()
    next(tokens)  # the first token went out in OPENED
    streamed = 0
    for token in tokens:
        chunk.append(token)
        streamed += 1
        session.usage.streamed += 1
        server.counters.tokens_streamed += 1
        if msg.limit is not None and streamed >= msg.limit and not session._finished():
            break  # the device joins: the rest is its windows' (the session stays open)
        if len(chunk) >= msg.chunk:
            yield _streamed(msg, index, chunk, False, start)
            index, chunk = index + 1, []
    elapsed = time.perf_counter() - start
    session.usage.stream_s += elapsed
    server.costs.observe_stream(elapsed, streamed)  # this STREAM's tokens (a joining device's may be one of several)
    session.last_active = time.monotonic()
    last = _streamed(msg, index, chunk, True, start)
    if not session.done:  # stopped at the limit: the round the device's next window is
        last.yielded_round = 0 if session.last is None else session.last.round + 1
    yield last


def drafts_plain_stream(settings: EdgeSettings, session: TargetSession) -> bool:
    """Whether the edge serves a plain STREAM (the device is not drafting: its draft still prefills, or
    drafting does not pay on its link) by drafting with its own draft: a window verified per target pass
    instead of one token, the same answer (verified as the device's windows are). Only for modes that
    place drafting where it pays (covspec's placement), and where the edge can draft from the session's
    last token (not after a decoupled rejection whose correction the device drew)."""
    options = MODE_OPTIONS.get(session.usage.mode)
    return (settings.draft_streams and session.edge_draft is not None and session.root_known
            and options is not None and options.placement)


def on_close(server: EdgeState, ctx: RequestContext, msg: wire.Close):
    if server.table.close(msg.sid, ctx.device) is not None:
        server.counters.sessions_closed += 1
    yield wire.Closed(sid=msg.sid, seq=msg.seq)  # closing twice (a retried CLOSE) is fine


def on_ping(server: EdgeState, ctx: RequestContext, msg: wire.Ping):
    yield wire.Pong(sid=msg.sid, seq=msg.seq, t=msg.t, pad=bytes(msg.echo) if msg.echo else None)


def on_stats(server: EdgeState, ctx: RequestContext, msg: wire.Stats):
    yield wire.StatsReply(sid=msg.sid, seq=msg.seq, counters=server.stats())


def on_info(server: EdgeState, ctx: RequestContext, msg: wire.Info):
    """What this edge serves: a bench or a device asks before its first answer (no draft needed)."""
    from covspec import __version__

    draft = None if server.drafting is None else Path(str(getattr(server.drafting.adapter, "path", "draft"))).name
    yield wire.InfoReply(sid=msg.sid, seq=msg.seq, version=f"covspec-edge {__version__}", protocol=wire.PROTOCOL_VERSION,
                         fingerprint=server.fingerprint, family=server.adapter.family, model=server.name,
                         vocab_size=server.adapter.vocab_size, draft=draft)


HANDLERS = {wire.Hello: on_hello, wire.Open: on_open, wire.Verify: on_verify, wire.Stream: on_stream,
            wire.Close: on_close, wire.Ping: on_ping, wire.Stats: on_stats, wire.Info: on_info}
