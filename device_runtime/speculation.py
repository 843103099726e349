"""One speculative answer on the device, without the socket: the draft's side of vanilla_sd and
CoVSpec as an object that takes the edge's messages and says what to send next.

    start(first_logits, ...)     before OPENED: the first window, drafted on the draft's guess of
                                 the target's first token while the edge prefills (a Flight, or None)
    on_opened(opened, ...)       OPENED arrived -> the next step
    while_waiting()              while a window is verified: drafts branches on its likely outcomes
                                 and yields the all-accepted branch's window, to be sent ahead
    on_result(result, reopened)  RESULT arrived -> the next step

A step is a `Flight` (a VERIFY to send unless `sent`, then await), `STREAM` (the edge generates the
rest alone: the caller streams it and hands the tokens to `streamed`), a `JoinStream` (the edge generates
the next `limit` tokens while the draft still prefills: streamed, then handed to `streamed` likewise) or
None (the answer is complete).
The answer's `phase` (`AnswerPhase`) changes in one place, `_to`, along `TRANSITIONS`; the windows
between drafting and their RESULT are `windows` (`WindowsInFlight`).
An ERROR is the caller's: on UNKNOWN_SESSION it re-OPENs the session with `committed`, sends the
awaited window again as round 0 and passes `reopened=True` with its RESULT.

The caller stamps each Flight it sends (`msg`: the sent copy, with its seq; `t0`: when). The clock
(`time.perf_counter`) times the rounds for the drafting policy; `ready()` says whether a reply is
waiting (branch drafting stops then). `tests/device/test_device_answer.py` drives it against an in-process
edge session.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from covspec.device_runtime.config import AnswerConfig
from covspec.device_runtime.records import RoundRecord
from covspec.drafter import Drafter, Window
from covspec.models.common import DecodeState
from covspec.models.draft import DraftModel, as_draft
from covspec.policy import (
    EDGE,
    EdgeOffer,
    MarginGate,
    OnlineStats,
    branch_roots,
    choose_window,
    edge_drafting_rate,
    place_drafting,
    speculation_could_pay,
    speculation_pays,
)
from covspec.sampling import correct_decoupled
from covspec.sampling import next_token as pick_token
from covspec.transport import protocol as wire


@dataclass
class Flight:
    """A VERIFY and the window it carries."""

    msg: wire.Verify  # once sent: the sent copy (its seq assigned)
    window: Window
    t0: float = 0.0  # when it was sent
    sent: bool = False


class StreamRest:
    """The step that hands the rest of the answer to the edge (STREAM)."""


STREAM = StreamRest()


@dataclass
class JoinStream(StreamRest):
    """The step that asks the edge for the next `limit` tokens while the draft prefills (STREAM with
    `limit`; `draft`: the edge drafts them with its own draft)."""

    limit: int
    draft: bool


Step = Flight | StreamRest | None


class AnswerPhase(Enum):
    """Where one answer stands, as the device sees it."""

    PREFILLING = "prefilling"  # before OPENED: the edge prefills (the first window may be in flight)
    JOINING = "joining"  # the edge generates the answer's start while this device's draft prefills
    SPECULATING = "speculating"  # rounds: windows drafted here, verified there
    STREAMING = "streaming"  # the edge generates the rest alone (STREAM)
    EDGE_DRAFTING = "edge_drafting"  # the edge drafts and verifies the rest itself (STREAM with draft)
    DONE = "done"


HANDED = (AnswerPhase.STREAMING, AnswerPhase.EDGE_DRAFTING)  # the edge generates the rest
# the phases each phase may change to: a stream cannot be undone, except that an edge that got loaded gives
# drafting back (EDGE_DRAFTING -> SPECULATING)
TRANSITIONS: dict[AnswerPhase, frozenset[AnswerPhase]] = {
    AnswerPhase.PREFILLING: frozenset({AnswerPhase.SPECULATING, AnswerPhase.JOINING, *HANDED, AnswerPhase.DONE}),
    AnswerPhase.JOINING: frozenset({AnswerPhase.SPECULATING, *HANDED, AnswerPhase.DONE}),
    AnswerPhase.SPECULATING: frozenset({*HANDED, AnswerPhase.DONE}),
    AnswerPhase.STREAMING: frozenset({AnswerPhase.DONE}),
    AnswerPhase.EDGE_DRAFTING: frozenset({AnswerPhase.SPECULATING, AnswerPhase.DONE}),
    AnswerPhase.DONE: frozenset(),
}


@dataclass
class Branch:
    """The draft forked on an assumed outcome of the window being verified, and the window it drafted."""

    drafter: Drafter
    accepted: int  # drafted tokens the edge is assumed to accept
    root: int | None  # the token assumed after them (None: the window accepted whole, the bonus as drafted)
    window: Window


@dataclass
class WindowsInFlight:
    """The windows of one answer between drafting and their RESULT."""

    early: Flight | None = None  # round 0, sent before OPENED
    in_flight: Flight | None = None  # the next window, already sent (ahead), confirmed by the last RESULT
    current: Flight | None = None  # the window whose RESULT is awaited
    prepared: Window | None = None  # the next window, already drafted on a branch that hit
    sent_ahead: tuple[Flight, Drafter] | None = None  # the window sent ahead, and its branch
    branches: list[Branch] = field(default_factory=list)  # drafted on the current window's likely outcomes


class Speculation:
    """The device's part of one speculative answer: its Drafter, the rounds, the windows in flight."""

    def __init__(self, draft: DraftModel, state: DecodeState | Callable[[], DecodeState], ask: AnswerConfig,
                 stats: OnlineStats, sid: int, vocab: int, ready: Callable[[], bool],
                 edge_offer: EdgeOffer | None = None, prefill_left: Callable[[], float] | None = None) -> None:
        """`state`: the draft's prefilled prompt; `ask`: the answer's sampling, length, fixed window
        (without the adaptive policy) and mechanisms (`ask.spec_options()`); `stats`: the drafting
        policy's estimates (updated here); `vocab`: the target's vocabulary width; `ready()`: whether a
        reply is waiting; `edge_offer`: what the edge last said of drafting itself (updated from OPENED
        and each RESULT); `prefill_left()`: where the draft prefills on a thread while the edge starts the
        answer (joining), the seconds it is expected to take still (0: done; `state` is then the function
        that returns its state)."""
        # `state`: a function that prefills the draft when the edge drafts this answer from the start (the
        # draft is then prefilled only if the edge gives drafting back)
        self.prefill = state if callable(state) else None
        self.state: DecodeState | None = None if callable(state) else state
        params, options = ask.params, ask.spec_options()
        self.draft, self.params, self.options, self.stats = as_draft(draft), params, options, stats
        self.sid, self.max_new_tokens, self.window, self.vocab, self.ready = sid, ask.max_new_tokens, ask.window, vocab, ready
        self.rng = None if params.greedy else params.rng()
        gate = MarginGate(options.margin_threshold) if options.adaptive else None
        self.gated = None if gate is None else lambda w: gate.stop(float(w.margins[-1]), len(w))
        self.eos = draft.eos_token_ids
        self.drafter: Drafter | None = None  # made on the first window's guess, or at OPENED
        self.pending: list[int] = []  # the answer so far while there is no drafter (the edge drafts it)
        self.informed = False  # the policy's estimates come from measurements, not priors
        self.phase = AnswerPhase.PREFILLING
        self.history: list[AnswerPhase] = [self.phase]  # every phase entered, in order
        # decided before OPENED: the phase OPENED leads to when a STREAM goes right behind the OPEN
        # (STREAMING, EDGE_DRAFTING, JOINING), else None (the rules are applied at OPENED)
        self.hand_to: AnswerPhase | None = None
        self.edge_step_s: float | None = None
        self.rounds: list[RoundRecord] = []
        self.windows = WindowsInFlight()
        self.device_root = False  # whether the last committed token is a correction the edge has not seen
        self.round_base = 0  # rounds before the session was last reopened (the edge counts from 0 again)
        self.k = 0  # this round's window limit
        self.ahead = False  # this round's window was sent before the last RESULT
        self.edge_offer = edge_offer
        self.paced_at: float | None = None  # when the last RESULT (or OPENED) came: the pace is measured between
        self.gave_back = 0  # times the edge gave drafting back to this device mid-answer
        self.prefill_left = prefill_left
        self.joined_at: int | None = None  # the answer's length when this device joined (took drafting over)
        self.joined_t: float | None = None  # and when (time.perf_counter)
        self.join_segments = 0  # STREAMs with a limit the edge generated while the draft prefilled

    def _to(self, phase: AnswerPhase) -> None:
        """The one place the answer's phase changes (along TRANSITIONS)."""
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"answer {self.sid}: no transition from {self.phase.name} to {phase.name}")
        self.phase = phase
        self.history.append(phase)

    def _done(self) -> Step:
        """The answer is complete: the step None."""
        self._to(AnswerPhase.DONE)
        return None

    @property
    def drafting(self) -> Drafter:
        """The Drafter, where this device drafts (made on the first window's guess, at OPENED or on `resume`)."""
        assert self.drafter is not None, "no draft prefilled here: the edge drafts this answer"
        return self.drafter

    def _hand(self, phase: AnswerPhase) -> StreamRest:
        """The edge generates the rest (`phase`: STREAMING or EDGE_DRAFTING): the step STREAM."""
        self._to(phase)
        return STREAM

    @property
    def streamed_rest(self) -> bool:
        """Whether the edge generated (some of) this answer's rest alone, drafting or not."""
        return any(phase in HANDED for phase in self.history)

    @property
    def edge_drafted(self) -> bool:
        """Whether the edge drafted (some of) this answer (asked to, before or after OPENED)."""
        return (AnswerPhase.EDGE_DRAFTING in self.history or self.hand_to is AnswerPhase.EDGE_DRAFTING
                or self.gave_back > 0)

    @property
    def committed(self) -> list[int]:
        """The answer so far (the tokens both sides agreed on, plus a device-drawn correction)."""
        return self.drafter.committed if self.drafter is not None else self.pending

    def extend(self, streamed: list[int]) -> None:
        """The tokens the edge streamed after the committed ones."""
        self.committed.extend(streamed)

    def streamed(self, tokens: list[int], next_round: int | None) -> Step:
        """The STREAM ended, `tokens` streamed: the answer is complete, or (`next_round`: the edge's next
        round) the edge got loaded and gave drafting back (`resume`), or a joining segment ended (`_joining`)."""
        self.extend(tokens)
        if next_round is None:
            return self._done()
        if self.phase is AnswerPhase.JOINING:
            return self._joining(next_round)
        return self.resume(next_round)

    def _joining(self, next_round: int) -> Step:
        """While the draft prefills (JOINING), at a round boundary (`next_round`: the edge's next round):
        another segment of the edge's tokens, sized to the prefill's expected rest, or (the draft ready)
        drafting taken over here, unless the edge drafting or streaming the rest beats this device."""
        if self.committed[-1] in self.eos or len(self.committed) >= self.max_new_tokens:
            return self._done()
        assert self.prefill_left is not None and self.prefill is not None, "joining needs a prefill under way"
        left = self.prefill_left()
        if left > 0:
            self.join_segments += 1
            draft = bool(self.options.placement and self.edge_offer is not None and self.edge_offer.offers)
            pace = (self.edge_offer.s_per_token if draft and self.edge_offer is not None else None) or self.edge_step_s
            room = self.max_new_tokens - len(self.committed)
            return JoinStream(limit=min(room, max(2, math.ceil(left / (pace or 0.02)))), draft=draft)
        self.state = self.prefill()
        self.drafter = Drafter(self.draft, self.state, self.pending[0], self.params, self.rng)
        self.drafter.committed = list(self.pending)  # fed with the first window
        self.round_base = len(self.rounds) - next_round
        self.joined_at = len(self.committed)
        self.paced_at = self.joined_t = time.perf_counter()
        if self._edge_drafting_wins(self.edge_step_s):
            return self._hand(AnswerPhase.EDGE_DRAFTING)  # the edge's drafting is faster: it keeps the answer
        if self._streaming_wins(self.edge_step_s):
            return self._hand(self._streaming_phase(self.edge_step_s))
        self._to(AnswerPhase.SPECULATING)
        return self._next_window()

    # --- events --------------------------------------------------------------------------------
    def start(self, first_logits: np.ndarray | None, informed: bool, edge_step_s: float | None,
              hand_over: bool = False, joining: bool = False) -> Flight | None:
        """Before OPENED, on the draft's first logits [V]: decides whether the edge streams the
        answer from the start (the rule applied after OPENED, on what earlier answers showed and
        the edge's streaming time, `edge_step_s`, from the last OPENED); returns the first window,
        drafted on the draft's guess of the target's first token, when it is sent before OPENED.
        `hand_over`: the caller asked the edge to draft this answer (STREAM with draft, sent already);
        `joining`: to start it while the draft prefills (STREAM with a limit, sent already)."""
        stats, options = self.stats, self.options
        self.informed = informed
        if joining:  # the rules are applied when this device joins (`_joining`)
            self.hand_to, self.join_segments = AnswerPhase.JOINING, 1
            return None
        edge_drafts = hand_over or self._edge_drafting_wins(edge_step_s)
        streams = edge_drafts or self._streaming_wins(edge_step_s)
        edge_drafts = edge_drafts or (streams and self._edge_beats_streaming(edge_step_s))
        self.hand_to = AnswerPhase.EDGE_DRAFTING if edge_drafts else AnswerPhase.STREAMING if streams else None
        if edge_drafts or self.state is None:  # the edge drafts from its first token, or the draft still
            return None  # prefills (joining): nothing to draft here first
        if not (options.ahead and self.max_new_tokens > 1 and (
                not options.adaptive or (streams and self.params.greedy)
                or (stats.rounds > 0 and not streams))):
            return None
        # the edge is still prefilling: the window is verified right after OPENED if the guess was right
        # (so the answer is unchanged either way) and the first round trip is hidden. Even where the
        # edge will stream the answer, it costs the edge one pass and may save it as many decode steps
        # (greedy only: a sampled rejection leaves the correction to the device, which a STREAM right
        # behind it could not wait for)
        assert self.state is not None and first_logits is not None, "a window before OPENED needs the draft prefilled"
        guess = pick_token(first_logits, self.params, self.rng)
        self.drafter = Drafter(self.draft, self.state, guess, self.params, self.rng)
        k = min(self._limit(self.max_new_tokens - 1), self.max_new_tokens - 1)
        first = self.drafting.draft(k, stop=lambda w: self.ready() or (self.gated is not None and self.gated(w)))
        self.windows.early = Flight(self._verify(0, first, root=guess, pos=1), first)
        return self.windows.early

    def on_opened(self, opened: wire.Opened, edge_step_s: float | None) -> Step:
        """OPENED: the target's first token (and the edge's timings). `edge_step_s`: the target's
        streaming time per token, as this OPENED (or the calibration profile) says."""
        windows = self.windows
        early = windows.early
        if early is not None and self.drafting.committed[0] == opened.token and not opened.done:
            windows.in_flight = early  # the guess was right: the edge verifies the first window next
        elif self.state is None:  # not prefilled: the edge drafts this answer (see `resume`)
            self.pending = [opened.token]
        else:
            if self.drafter is None:
                self.drafter = Drafter(self.draft, self.state, opened.token, self.params, self.rng)
            self.drafting.restart(opened.token)
        self.edge_step_s = edge_step_s
        self.paced_at = time.perf_counter()  # the pace of this device's speculation is measured from here
        if "verify_v0_s" in opened.timings and "verify_v1_s" in opened.timings:
            # the edge's own verify-time line, over every window it verified: the prior this device's
            # few rounds refine (generic anchors would set the slope while its windows have one length)
            self.stats.prior_v0, self.stats.prior_v1 = opened.timings["verify_v0_s"], opened.timings["verify_v1_s"]
        if opened.done:
            return self._done()
        self.edge_offer = EdgeOffer.from_reply(opened) or self.edge_offer
        if self.hand_to is None and windows.in_flight is None and self._edge_drafting_wins(edge_step_s):
            self.hand_to = AnswerPhase.EDGE_DRAFTING  # the edge drafts faster than this device over this link
        if self.hand_to is not None:  # the first window's verdict, if the edge verifies it, then the streaming
            self._to(self.hand_to)
            windows.current, windows.in_flight = windows.in_flight, None
            return windows.current if windows.current is not None else STREAM
        if windows.in_flight is None and self._streaming_wins(edge_step_s):
            # the link is too slow for drafts to beat the edge's own streaming: do not start speculating
            return self._hand(self._streaming_phase(edge_step_s))
        if self.drafter is None:  # the draft still prefills: the edge starts the answer meanwhile
            self._to(AnswerPhase.JOINING)
            return self._joining(0)
        self._to(AnswerPhase.SPECULATING)
        return self._next_window()

    def while_waiting(self) -> Iterator[Flight]:
        """While the current window is verified: forks the draft for the likely outcomes (all
        accepted; rejection at the positions where the first rejection most likely falls, by the
        learned acceptance per margin bin, or the lowest-margin ones until that is learned, corrected
        to the draft's runner-up) and drafts the next window on each until a reply is ready. With
        `options.ahead`, yields the all-accepted branch's window (to send at once) as soon as it is
        drafted, rooted at the draft's guess of the edge's bonus token; the edge verifies it only if
        that is what happened, so the round trip is hidden whenever it is."""
        windows = self.windows
        windows.branches, windows.sent_ahead = [], None
        if self.phase is not AnswerPhase.SPECULATING or not self.options.branching:
            return
        assert windows.current is not None, "while_waiting: no window in flight"
        window, next_round = windows.current.window, len(self.rounds) + 1 - self.round_base
        ranked = self.stats.acceptance_at if self.stats.margins_informed() else None  # else: lowest margin first
        outcomes: list[tuple[int, int | None]] = [(len(window), None)]
        outcomes += branch_roots(window.ids, window.margins, window.runner_up, self.options.branches,
                                 acceptance=ranked)
        for accepted, root in outcomes:
            if self.ready():
                break
            if root is None and int(window.ids[-1]) in self.eos:
                continue  # an answer that ends in this window has no continuation to draft
            branch = self.drafting.fork(window, accepted, root)
            room = self.max_new_tokens - len(branch.committed)  # answer tokens left after the assumed outcome
            if room <= 0:
                continue
            # the all-accepted branch's first drafted token stands for the edge's bonus token
            drafted = branch.draft(min(self.k + (1 if root is None else 0), room), stop=lambda _w: self.ready())
            windows.branches.append(Branch(branch, accepted, root, drafted))
            if root is None and self.options.ahead and len(drafted) > 1 and not self.ready():
                guess, rest = int(drafted.ids[0]), drafted.tail(1)
                flight = Flight(self._verify(next_round, rest, root=guess, pos=len(branch.committed) + 1), rest)
                yield flight  # answer index of rest's first token: pos
                windows.sent_ahead = (flight, branch)

    def on_result(self, result: wire.Result, reopened: bool) -> Step:
        """RESULT of the current window; `reopened`: the session was re-OPENed to get it."""
        windows = self.windows
        flight, windows.current = windows.current, None
        assert flight is not None, "a RESULT with no window in flight"
        if self.phase in HANDED:
            return self._first_verdict(flight, result)
        if reopened:
            self.round_base = len(self.rounds)
        now = time.perf_counter()
        wait_s = now - flight.t0
        if not reopened and self.paced_at is not None:
            self.stats.observe_pace(result.accepted + 1, now - self.paced_at)
        self.paced_at = now
        drafted = flight.window
        next_token = self._next_token(result, drafted)
        self.device_root = result.token is None and next_token is not None
        hit = self._confirmed_branch(result.accepted, next_token)
        if hit is not None:
            windows.prepared = self.drafting.adopt(hit.drafter, hit.window, hit.root)
            if windows.sent_ahead is not None and windows.sent_ahead[1] is hit.drafter and not reopened:
                # the window sent ahead assumed exactly this outcome: the edge verifies it next
                ahead = windows.sent_ahead[0]
                windows.in_flight = Flight(ahead.msg, windows.prepared, ahead.t0, sent=True)
                windows.prepared = None
        else:
            self.drafting.commit(drafted, result.accepted, next_token)
        self._record(drafted, result, wait_s, reopened, None if not windows.branches else hit is not None)
        if result.done or self.committed[-1] in self.eos or len(self.committed) >= self.max_new_tokens:
            return self._done()
        self.edge_offer = EdgeOffer.from_reply(result) or self.edge_offer
        if windows.in_flight is None and not self.device_root and self._edge_drafting_wins(self.edge_step_s):
            return self._hand(AnswerPhase.EDGE_DRAFTING)  # the edge drafts the rest faster than this device
        if windows.in_flight is None and self.options.adaptive and not self.device_root and speculation_loses(
                self.stats, self.rounds, self.options.k_max, self.edge_step_s):
            # on this link speculation loses to the target alone: let the edge stream the rest
            return self._hand(self._streaming_phase(self.edge_step_s))
        return self._next_window()

    def resume(self, next_round: int) -> Step:
        """The edge got loaded and gave drafting back mid-answer (its stream ended early, `extend` given
        what it streamed): drafting goes on here, the edge's next round being `next_round`; the edge is
        not asked again until a RESULT says it offers."""
        self._to(AnswerPhase.SPECULATING)
        self.gave_back += 1
        self.round_base = len(self.rounds) - next_round
        if self.edge_offer is not None:
            self.edge_offer = replace(self.edge_offer, offers=False)
        if self.committed[-1] in self.eos or len(self.committed) >= self.max_new_tokens:
            return self._done()
        if self.drafter is None:  # prefilled only now: the committed tokens are fed with the next window
            assert self.prefill is not None
            self.state = self.prefill()
            self.drafter = Drafter(self.draft, self.state, self.pending[0], self.params, self.rng)
            self.drafter.committed = list(self.pending)
        return self._next_window()

    # --- steps ---------------------------------------------------------------------------------
    def _edge_drafting_wins(self, edge_step_s: float | None) -> bool:
        """Whether the edge drafting the rest itself beats this device (policy.place_drafting), for a
        mode with placement and an edge that offers."""
        return bool(self.options.placement and place_drafting(self.stats, self.edge_offer, edge_step_s,
                                                              self.options.k_max) == EDGE)

    def _edge_beats_streaming(self, edge_step_s: float | None) -> bool:
        """Where this device would hand the rest to the target's streaming: whether the edge, when it
        offers, drafting the rest itself beats that (its measured pace, else the cost model with no
        round trip), so that a link too slow for windows still gets speculation, on the edge."""
        offer = self.edge_offer
        if not (self.options.placement and offer is not None and offer.offers and edge_step_s):
            return False
        rate = 1.0 / offer.s_per_token if offer.s_per_token else edge_drafting_rate(self.stats, offer, self.options.k_max)
        return rate > 1.0 / edge_step_s

    def _streaming_phase(self, edge_step_s: float | None) -> AnswerPhase:
        """How the edge generates the rest this device hands it: drafting itself when that beats the
        target's streaming (`_edge_beats_streaming`), else streaming."""
        return AnswerPhase.EDGE_DRAFTING if self._edge_beats_streaming(edge_step_s) else AnswerPhase.STREAMING

    def _streaming_wins(self, edge_step_s: float | None) -> bool:
        """Whether the edge streaming the answer alone beats speculating on this link, before any round
        of this answer (adaptive only; `edge_step_s`: the target's streaming time per token, when
        known). Uninformed (generic priors), only when not even a fully accepted window could win: on
        the priors' acceptance a device would stream every answer and, never measuring a round, never
        learn otherwise."""
        stats, k_max = self.stats, self.options.k_max
        return bool(self.options.adaptive and edge_step_s and (
            speculation_loses(stats, [], k_max, edge_step_s) if self.informed
            else not speculation_could_pay(stats, edge_step_s, k_max)))

    def _limit(self, room: int) -> int:
        return choose_window(self.stats, self.options.k_max, room) if self.options.adaptive else self.window

    def _next_window(self) -> Flight:
        """The next round's window: the one already in flight, else the one a branch prepared (cut to
        the limit), else a new one drafted now."""
        room = self.max_new_tokens - len(self.committed)
        self.k = k = min(self._limit(room), room)
        windows = self.windows
        self.ahead = windows.in_flight is not None
        if windows.in_flight is not None:  # sent before the last RESULT, and that RESULT confirmed it
            flight, windows.in_flight = windows.in_flight, None
        else:
            prepared = windows.prepared
            drafted = prepared if prepared is not None and len(prepared) else self.drafting.draft(k, stop=self.gated)
            drafted = drafted if len(drafted) <= k else self.drafting.cut(drafted, k)
            flight = Flight(self._verify(len(self.rounds) - self.round_base, drafted,
                                         root=self.committed[-1] if self.device_root else None), drafted)
        windows.prepared = None
        windows.current = flight
        return flight

    def _first_verdict(self, flight: Flight, result: wire.Result) -> Step:
        """The RESULT of the first window of an answer the edge streams: committed, then the rest streamed."""
        drafted = flight.window
        self.drafting.commit(drafted, result.accepted, result.token)
        self.rounds.append(RoundRecord(len(drafted), result.accepted, sum(drafted.step_s),
                                       time.perf_counter() - flight.t0, result.timings.get("verify_s", float("nan")),
                                       margins=drafted.margins.tolist(), ahead=True))
        self.stats.update(len(drafted), result.accepted, drafted.step_s, None, self.rounds[-1].verify_s,
                          drafted.margins)
        if result.done or self.committed[-1] in self.eos:
            return self._done()
        return STREAM

    def _next_token(self, result: wire.Result, drafted: Window) -> int | None:
        """The token after the accepted ones: the edge's, or the decoupled correction drawn here."""
        if result.token is None and result.cand_ids is not None:
            assert drafted.q is not None and self.rng is not None, "a decoupled correction comes only when sampling"
            q = pad_vocab(drafted.q[result.accepted], self.vocab)
            return correct_decoupled(result.cand_ids, result.cand_probs, q, self.rng)
        return result.token

    def _confirmed_branch(self, accepted: int, next_token: int | None) -> Branch | None:
        """The branch whose assumed outcome is the edge's (`accepted`, then `next_token`), if any."""
        if next_token is None:
            return None
        for branch in self.windows.branches:
            if branch.accepted != accepted or not len(branch.window):
                continue
            if branch.root is None and int(branch.window.ids[0]) == next_token:  # all accepted, bonus as drafted
                return branch
            if branch.root == next_token:
                return branch
        return None

    def _record(self, drafted: Window, result: wire.Result, wait_s: float, reopened: bool,
                branch_hit: bool | None) -> None:
        """The round's record and what the drafting policy learns from it."""
        stats = self.stats
        verify_s = result.timings.get("verify_s", float("nan"))
        self.rounds.append(RoundRecord(len(drafted), result.accepted, sum(drafted.step_s), wait_s, verify_s,
                                       branch_hit=branch_hit, margins=drafted.margins.tolist(), ahead=self.ahead))
        # a round that had to reopen the session waited for the timeout and a new prefill: its
        # acceptance counts, its wait says nothing of the link; nor does the wait of a window sent
        # ahead, which queued behind the one before it
        stats.update(len(drafted), result.accepted, drafted.step_s, None if reopened or self.ahead else wait_s,
                     None if reopened else verify_s, drafted.margins, branch_hit=branch_hit)
        if stats.rounds == 1 and not reopened:  # the first measurements replace the priors outright
            stats.rtt = max(0.0, wait_s - verify_s) if verify_s == verify_s else wait_s
            stats.t_draft = sum(drafted.step_s) / max(len(drafted.step_s), 1)

    def _verify(self, round_no: int, window: Window, root: int | None = None, pos: int | None = None) -> wire.Verify:
        """The VERIFY of a drafted window: token ids, and when sampling q(x_i) (decoupled) or every
        drafted token's full q (the conventional upload)."""
        verify = wire.Verify(sid=self.sid, round=round_no, tokens=window.ids.astype(np.int32),
                             root=root, pos=pos)
        if not self.params.greedy and self.options.decoupled:
            verify.q = window.q_of_drafted().astype(np.float32)
        elif not self.params.greedy:
            assert window.q is not None  # a sampled window carries q
            verify.dists = pad_vocab(window.q, self.vocab).astype(np.float32)
        return verify


def speculation_loses(stats: OnlineStats, rounds: list[RoundRecord], k_max: int,
                      edge_step_s: float | None = None) -> bool:
    """Whether the edge streaming alone would be faster than speculating on this link. The target's
    per-token time is the edge's own streaming figure when it sent one, else the cheapest
    verification seen (one pass over a window costs about one decode step here). Clear evidence
    (half the streaming rate) decides at once; a closer call waits for three rounds (this answer's or
    the earlier ones' the estimates carry: an informed device decides before its first round) and holds even
    at the optimistic end of the acceptance estimate (one standard error up): handing the rest of
    the answer to the edge cannot be undone, and a few rounds say little (on the demo pair's wifi
    a fresh device's [4/4, 4/4, 2/8] gave 0.87 where its long-run rate is 0.92, and it streamed
    its first answer at 0.8-1.0x target_only)."""
    times = [r.verify_s for r in rounds if r.verify_s == r.verify_s]
    if edge_step_s is None and not times:
        return False
    target_step_s = edge_step_s or min(times)
    if not speculation_pays(stats, target_step_s, k_max=k_max, margin=0.5):
        return True
    return stats.rounds >= 3 and not speculation_pays(stats, target_step_s, k_max=k_max,
                                                      acceptance=stats.acceptance_upper())


def pad_vocab(q: np.ndarray, width: int) -> np.ndarray:
    """q [..., V_draft] zero-padded (or cut) to the target's vocabulary width."""
    v = q.shape[-1]
    if v == width:
        return q
    if v > width:
        return q[..., :width]
    return np.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, width - v)])
