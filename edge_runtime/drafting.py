"""Speculative decoding on the edge itself (mode edge_sd, and covspec's edge placement): the edge runs
a draft beside its target and produces the answer by draft-then-verify rounds with no round trip per
window, what a server-side engine's draft-model mode does for a device that only streams text.

`EdgeDrafting` is the edge's draft (`covspec edge serve --draft PATH`) and what it learned of it across
sessions: acceptance, draft step and verify times (an `OnlineStats` with no round trip), the same
window policy as the device's (margin gate + cost model, covspec.policy). `EdgeDraft` is one session's
draft state: the OPEN it prefills from (lazily, for a covspec session that may never ask the edge to
draft) and its `Drafter`. `speculate` runs the rounds on a `TargetSession`, each verified exactly as
a device's window is (`TargetSession.verify`: greedy, or the full-distribution scheme when sampling,
since the edge holds the draft's whole q), so the answer is the target's: identical when greedy,
distributed as the target's samples when sampling.

The edge's draft may start anywhere in an answer (a covspec device hands drafting over mid-answer):
`EdgeDraft.synced` brings the draft's cache to the committed tokens, keeping what it shares with them.

Load: the edge offers to draft for a device that drafts for itself only while it holds at most
`EdgeSettings.draft_sessions` unfinished sessions (`offers`); an edge_sd device, which has no draft,
is always served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from covspec.drafter import Drafter, Window
from covspec.edge_runtime.batching import WindowPass, can_batch, run_batch
from covspec.edge_runtime.session import SessionError, TargetSession
from covspec.edge_runtime.static_target import StaticTarget
from covspec.edge_runtime.visual import encode
from covspec.models.base import VLMAdapter
from covspec.models.draft import as_draft
from covspec.modes import COVSPEC, VerifyScheme
from covspec.policy import MarginGate, OnlineStats, choose_window
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire

log = logging.getLogger("covspec.edge")



def pad_vocab(q: torch.Tensor, width: int) -> torch.Tensor:
    """q [k, V_draft] zero-padded (or cut) to the target's vocabulary width [k, width]."""
    v = q.shape[-1]
    if v >= width:
        return q[..., :width]
    return torch.nn.functional.pad(q, (0, width - v))


@dataclass
class EdgeDraft:
    """One session's draft on the edge: the OPEN it prefills from, and its Drafter once prefilled."""

    msg: wire.Open
    drafter: Drafter | None = None

    def synced(self, adapter: VLMAdapter, committed: list[int], max_pixels: int) -> Drafter:
        """The Drafter, prefilled (once) and holding `committed` as its answer so far: the draft's cache
        keeps the longest fed prefix it shares with `committed`, the rest is fed with the next window."""
        if self.drafter is None:
            with torch.inference_mode():
                visual = encode(adapter, self.msg, max_pixels)
                _, state = adapter.prefill(visual, self.msg.prompt)
            params = self.drafter_params()
            self.drafter = Drafter(as_draft(adapter), state, committed[0], params, None if params.greedy else params.rng())
        d = self.drafter
        common, limit = 0, min(d.fed, len(committed) - 1)  # the last committed token is never fed
        while common < limit and d.committed[common] == committed[common]:
            common += 1
        if common < d.fed:
            adapter.truncate(d.state, d.prompt_length + common)
            d.fed = common
        d.committed = list(committed)
        return d

    def drafter_params(self) -> SamplingParams:
        """The OPEN's sampling, on a seed of the draft's own (the target's generator is the session's)."""
        m = self.msg
        return SamplingParams(temperature=m.temperature, top_k=m.top_k, top_p=m.top_p,
                              seed=None if m.seed is None else (m.seed + 1) % 2**63)


@dataclass
class EdgeDrafting:
    """The edge's draft model and its window policy's estimates (shared by all sessions)."""

    adapter: VLMAdapter
    draft_sessions: int = 4  # offer drafting to devices that can draft while at most this many sessions are unfinished
    k_max: int = COVSPEC.k_max
    margin_threshold: float = COVSPEC.margin_threshold
    stats: dict[bool, OnlineStats] = field(default_factory=dict)  # greedy or sampled -> estimates

    def policy(self, greedy: bool) -> OnlineStats:
        """The estimates for greedy or sampled sessions: no round trip on the edge."""
        if greedy not in self.stats:
            self.stats[greedy] = OnlineStats(t_draft=0.001, rtt=0.0, prior_v0=0.005, prior_v1=0.001)
        return self.stats[greedy]

    def offers(self, unfinished: int) -> bool:
        """Whether the edge drafts for a device that could draft for itself, with `unfinished` sessions open."""
        return unfinished <= self.draft_sessions

    def offer(self, unfinished: int, s_per_token: float | None) -> DraftOffer:
        """What a device's placement rule reads (sent in OPENED and RESULT): whether the edge offers
        to draft, its unfinished sessions, and what its drafting measured (draft step, per-token
        acceptance, and `s_per_token`, its drafted streams' pace: costs.EdgeCosts)."""
        timings: dict[str, float] = {}
        stats = self.stats.get(True) or self.stats.get(False)
        if stats is not None and stats.rounds:
            timings["edge_draft_step_s"], timings["edge_acceptance"] = stats.t_draft, stats.acceptance
        if s_per_token:
            timings["edge_sd_s_per_token"] = s_per_token
        return DraftOffer(self.offers(unfinished), unfinished, timings)


@dataclass
class DraftOffer:
    """The edge's drafting offer, as OPENED and RESULT carry it (covspec.policy.EdgeOffer reads it)."""

    offers: bool
    sessions: int  # unfinished sessions on the edge
    timings: dict[str, float]  # what its drafting measured

    def apply(self, reply: wire.Opened | wire.Result) -> None:
        reply.offers_draft, reply.edge_sessions = self.offers, self.sessions
        reply.timings.update(self.timings)


def start_drafting(session: TargetSession, draft: EdgeDraft, drafting: EdgeDrafting, max_pixels: int) -> Drafter:
    """The session's edge draft, ready to draft after its committed tokens. Refuses (SessionError) a
    session whose last token is a correction the device drew and has not sent (decoupled sampling)."""
    if not session.root_known:
        raise SessionError("the edge cannot draft from here: the device drew the last correction (send it in a VERIFY)")
    return draft.synced(drafting.adapter, session.committed, max_pixels)


def draft_window(session: TargetSession, drafter: Drafter, drafting: EdgeDrafting, cap: int | None = None) -> Window:
    """The next window, as long as the window policy says (margin gate, cost model with no round trip).
    `cap`: a STREAM's limit ahead: at most that many tokens, and k_max rather than the cost model's
    (timed) choice, so that where a limited stream stops depends on the tokens alone (a replayed load
    run's messages then fit the edge's replies)."""
    stats = drafting.policy(session.params.greedy)
    gate = MarginGate(drafting.margin_threshold)
    room = session.max_new_tokens - len(session.committed)
    k = choose_window(stats, drafting.k_max, room) if cap is None else max(1, min(drafting.k_max, room, cap))
    return drafter.draft(k, stop=lambda w: gate.stop(float(w.margins[-1]), len(w)))


def target_passes(adapter: VLMAdapter, sessions: list[TargetSession], windows: list[Window]) -> list[WindowPass | None]:
    """The target's passes over several sessions' windows in one batch (as VERIFYs are batched), or
    None for each where they cannot share one (a single session, caches that do not pack, a failure)."""
    if len(sessions) < 2:
        return [None] * len(sessions)
    states = [s.state for s in sessions]
    ids = [s.feed_ids(s.committed[-1], torch.from_numpy(w.ids)) for s, w in zip(sessions, windows, strict=True)]  # [k_i + 1] each
    try:
        if isinstance(adapter, StaticTarget):
            return list(adapter.run_batch(states, ids))
        if can_batch(adapter, states):
            return list(run_batch(adapter, states, ids))
    except Exception:
        log.exception("batched edge-drafted verification failed; each session verifies on its own")
    return [None] * len(sessions)


def finish_round(session: TargetSession, drafter: Drafter, drafting: EdgeDrafting, window: Window,
                 batched: WindowPass | None = None) -> list[int]:
    """Verifies an edge-drafted window as the session's next round (with the batched pass, when there
    is one) and commits it on both sides: the new committed tokens."""
    greedy = session.params.greedy
    round_no = 0 if session.last is None else session.last.round + 1
    q_full = None if greedy else pad_vocab(torch.from_numpy(window.q), session.adapter.vocab_size)  # [k, V]
    before = len(session.committed)
    answer = session.verify(round_no, session.committed[-1], torch.from_numpy(window.ids), VerifyScheme.GREEDY if greedy else VerifyScheme.FULL,
                            q_full=q_full, window=batched)
    drafter.commit(window, answer.verdict.accepted, answer.verdict.next_token)
    drafting.policy(greedy).update(len(window), answer.verdict.accepted, window.step_s, verify_s=answer.verify_s,
                                   margins=window.margins)
    return session.committed[before:]


def speculate(session: TargetSession, draft: EdgeDraft, drafting: EdgeDrafting,
              max_pixels: int) -> Iterator[list[int]]:
    """Draft-then-verify rounds on the edge until the answer is complete, one session on its own:
    yields each round's new committed tokens."""
    drafter = start_drafting(session, draft, drafting, max_pixels)
    while not session.done:
        yield finish_round(session, drafter, drafting, draft_window(session, drafter, drafting))


@dataclass
class DraftedStream:
    """An edge-drafted STREAM in progress: the server advances every such stream a round at a time
    between requests (`advance`), their windows verified in one batched target pass."""

    sid: int
    session: TargetSession
    drafter: Drafter
    msg: wire.Stream
    start: float = field(default_factory=time.perf_counter)
    asked: bool = True  # the device asked the edge to draft (edge_sd, placement); False: it asked a plain STREAM
    peer: bytes | None = None  # the device's connection, set by the server
    index: int = 0  # next chunk number
    pending: list[int] = field(default_factory=list)  # tokens not sent yet
    streamed: int = 0

    def chunks(self) -> list[wire.Streamed]:
        """The STREAMED replies the tokens so far fill (msg.chunk tokens each), and the last one, done,
        once the answer is complete."""
        out = []
        while len(self.pending) >= self.msg.chunk:
            out.append(self._streamed(self.pending[:self.msg.chunk], False))
            self.pending = self.pending[self.msg.chunk:]
        if self.session.done:
            out.append(self._streamed(self.pending, True))
            self.pending = []
        return out

    def room(self) -> int | None:
        """The longest window that cannot take the stream past its STREAM's `limit` (a round commits up to
        the window plus one token); None: no limit."""
        return None if self.msg.limit is None else self.msg.limit - self.streamed - 1

    def limit_reached(self) -> bool:
        """Whether the stream is within a token of its STREAM's `limit` (a joining device takes over at this
        round's end): no window fits before it."""
        room = self.room()
        return room is not None and room < 1

    def give_back(self) -> wire.Streamed:
        """The last STREAMED of a stream the edge stops drafting before the answer ends (it got loaded and
        the device can draft): the tokens not sent yet and, in its timings, the session's next round
        (`yielded_round`), from which the device's windows go on."""
        last = self.session.last
        reply = self._streamed(self.pending, True)
        reply.yielded_round = 0 if last is None else last.round + 1
        self.pending = []
        return reply

    def _streamed(self, tokens: list[int], done: bool) -> wire.Streamed:
        reply = wire.Streamed(sid=self.sid, seq=self.msg.seq, index=self.index, tokens=np.asarray(tokens, dtype=np.int32),
                              done=done, timings={"elapsed_s": time.perf_counter() - self.start})
        self.index += 1
        return reply


def advance(streams: list[DraftedStream], drafting: EdgeDrafting, adapter: VLMAdapter) -> int:
    """One round of every unfinished stream: each session's draft drafts its window, the target verifies
    them all in one batched pass where it can, each stream's new tokens wait in `pending`. Returns how
    many windows shared a pass (0: none)."""
    live = [s for s in streams if not s.session.done and not s.limit_reached()]
    windows = [draft_window(s.session, s.drafter, drafting, s.room()) for s in live]
    passes = target_passes(adapter, [s.session for s in live], windows)
    for stream, window, batched in zip(live, windows, passes, strict=True):
        new = finish_round(stream.session, stream.drafter, drafting, window, batched)
        stream.pending += new
        stream.streamed += len(new)
        stream.session.last_active = time.monotonic()
    return sum(p is not None for p in passes)
