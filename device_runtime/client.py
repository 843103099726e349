"""`covspec device run`: answers an image + question with the draft on the device and the target on
the edge, in one of the modes:

    target_only  the edge generates and streams (the device only tokenizes and shows)
    edge_sd      the edge drafts with its own draft and verifies, and streams (the device as in target_only)
    draft_only   the device alone
    vanilla_sd   fixed window k, stop-and-wait; sampling uploads the draft's full distribution
                 of every drafted token (the conventional scheme)
    covspec      the four mechanisms: visual tokens pruned before the draft's prefill, margin gate
                 and cost-model window length, branches drafted while a window is verified
                 and sent ahead of the RESULT they assume (windows in flight; the first one
                 before OPENED), decoupled verification (sampling uploads q(x_i) only; the
                 device corrects)
    covspec_no_prune / _no_adaptive / _no_branch / _no_ahead / _no_decoupled: one mechanism off each

This module owns the socket: what to draft and send in a speculative answer, and what a RESULT
means, is `speculation.Speculation`'s (socket-free); the answer and its rounds are `records`'.

Every request goes through `transport.channel.Client`, which counts the bytes of every frame sent
and received on the socket: those are the bytes per token the bench reports.

An edge that restarts mid-answer is survived: the Client's retries reach the new edge on a fresh
socket, which answers UNKNOWN_SESSION; the device re-OPENs the session with the tokens it already
has (`Open.prefix`; the edge prefills prompt + prefix) and carries on from there, so a greedy answer
is the one it would have been without the restart.

An edge that is draining (shutting down) answers an OPEN with DRAINING: the device connects again at
once (a fresh socket; behind a balancer the new TCP connection lands on another replica) and sends
the OPEN there, with the answer so far when it was resuming (`_moving`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from covspec.calibration.profile import CalibrationProfile
from covspec.device_runtime.config import AnswerConfig
from covspec.device_runtime.records import Answer, Joined, RoundRecord, final_answer
from covspec.device_runtime.speculation import (
    AnswerPhase,
    Flight,
    JoinStream,
    Speculation,
    StreamRest,
)
from covspec.errors import CovspecError
from covspec.generation import generate
from covspec.images import load_image
from covspec.models.common import DecodeState, VisualTokens
from covspec.models.draft import as_draft
from covspec.modes import MODE_OPTIONS, MODES, STREAMING_MODES, Mode, SpecOptions
from covspec.policy import EDGE, EdgeOffer, OnlineStats, long_link, place_drafting
from covspec.pruning import merged_visual, score_and_select
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import Client, ClientKeys, RemoteError

__all__ = ["MAX_REOPENS", "Answer", "DeviceRuntime", "EdgeRefused", "RoundRecord", "final_answer"]

PROBE_EVERY = 4  # answers drafted on the edge in a row before the device drafts one to measure itself again
PROBE_MAX = 64  # ... at most, once probes keep finding the edge faster (each doubles the wait)
MAX_REOPENS = 3  # edge restarts survived within one answer
MAX_MOVES = 5  # DRAINING edges left in a row for one OPEN (connecting again each time)
MOVE_PAUSE_S = 0.25  # the pause before the n-th connection after the first, times n (a balancer's health check catching up)
T = TypeVar("T")
JOIN_MIN_S = 0.05  # a draft's prefill expected to end within this (or a round trip) after OPENED is waited for


class EdgeRefused(CovspecError):
    """The edge answered with something other than what the protocol promises."""


@dataclass
class Opening:
    """What `_open_and_prefill` did: the OPEN as sent, the kept visual tokens' indices (or None), the
    STREAM sent right behind the OPEN (when drafting was handed over) and the draft's prefill: its first
    logits [V] and state, or (handed over) a function that prefills it when the edge gives drafting back."""

    sent: wire.Message
    kept: np.ndarray | None
    stream: tuple[wire.Message, float] | None
    first_logits: np.ndarray | None = None
    state: DecodeState | None = None
    prefill: Callable[[], DecodeState] | None = None
    joining: Prefilling | None = None  # the draft still prefilling on its thread (OPENED came first)


class Prefilling:
    """The draft's encode, pruning and prefill on a thread of its own, while the socket's thread reads the
    edge's replies (the heavy calls, in torch, onnxruntime, ExecuTorch or a profile's sleep, release the
    GIL). `expected_s`: how long it is expected to take (the last one measured, or a profile's figure)."""

    def __init__(self, work: Callable[[], tuple[np.ndarray | None, np.ndarray, DecodeState]],
                 expected_s: float | None) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.expected_s = expected_s
        self._result: tuple[np.ndarray | None, np.ndarray, DecodeState] | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(work,), name="covspec-prefill", daemon=True).start()

    def _run(self, work: Callable[[], tuple[np.ndarray | None, np.ndarray, DecodeState]]) -> None:
        try:
            self._result = work()
        except BaseException as err:  # raised again on the socket's thread, by result()
            self._error = err
        finally:
            self.ended = time.perf_counter()
            self._done.set()

    def wait(self, timeout_s: float | None) -> bool:
        return self._done.wait(timeout_s)

    def result(self) -> tuple[np.ndarray | None, np.ndarray, DecodeState]:
        """(kept indices or None, first logits [V], state), once done."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def left_s(self) -> float:
        """Seconds the prefill is expected to take still: 0 once done; while running, the expected rest (as
        long again as so far, with no expectation), at least 1 ms."""
        if self._done.is_set():
            return 0.0
        elapsed = time.perf_counter() - self.started
        expected = self.expected_s if self.expected_s is not None else 2 * elapsed
        return max(expected - elapsed, 0.001)

    @property
    def took_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


class DeviceRuntime:
    """A device: its draft model (or only its tokenizer, for target_only) and a link to one edge."""

    def __init__(self, draft: Any, edge: str, timeout_s: float = 30.0, retries: int = 2,
                 keys: ClientKeys | None = None, profile: CalibrationProfile | None = None) -> None:
        """`keys`: CURVE keys (this device's pair and the edge's public key) for an edge that
        authenticates; None for one that runs with --auth none. `profile`: what `covspec calibrate`
        measured for this device, edge and link, the drafting policy's starting estimates."""
        self.draft = as_draft(draft)  # numpy in and out, whether a bundle or a Hugging Face folder
        self.profile = profile
        self.client = Client(edge, timeout_s=timeout_s, retries=retries, keys=keys)
        self.reopens = 0
        self.moves = 0  # OPENs answered DRAINING, and so sent again on a new connection
        self.edge_step_s: float | None = None  # the target's streaming time per token, as the last OPENED said
        self.edge_offer: EdgeOffer | None = None  # what the edge last said of drafting itself (placement)
        self.yielded_round: int | None = None  # the last stream ended early: the edge's next round (it gave drafting back)
        self.edge_streak = 0  # answers in a row drafted on the edge (see _probes_device)
        self.probe_after = PROBE_EVERY  # that many before the next probe: doubles while probes find the edge faster
        self.probed = False  # the last answer was a probe (the next one's placement tells who won)
        self.prefill_s: float | None = None  # the draft's last encode + prefill on its thread (joining)
        self.edge_limits = False  # the edge takes STREAM's limit (OPENED says stream_limit: joining possible)
        self.prefilling: Prefilling | None = None  # the last answer's prefill thread (it may outlive its answer)
        self.opened_s: float | None = None  # the edge's last prefill plus a round trip: when OPENED is expected
        try:
            self.welcome = self._hello()
        except BaseException:  # a device that never got in leaves no socket behind (its monitor unread)
            self.client.close()
            raise
        # the drafting policy's estimates per set of mechanisms and greedy-or-sampled, carried from one
        # request to the next: acceptance, step, round-trip and verify times belong to this draft, edge
        # and link, not to one answer (starting every request from priors kept its first windows short)
        self.learned: dict[tuple[SpecOptions, bool], OnlineStats] = {}

    def _hello(self) -> wire.Welcome:
        reply = self.client.request(wire.Hello(fingerprint=self.draft.fingerprint(), family=self.draft.family,
                                               model=str(self.draft.path or "draft")))
        welcome = self._expect(reply, wire.Welcome)
        start = time.perf_counter()  # the link's round trip, for the drafting policy's first decision
        self._expect(self.client.request(wire.Ping(t=0.0)), wire.Pong)
        self.rtt_s = time.perf_counter() - start
        return welcome

    def _new_stats(self) -> OnlineStats:
        """The drafting policy's estimates for a new request: the calibration profile's when there is
        one (with this connection's own round trip), else generic priors."""
        if self.profile is None:
            return OnlineStats(t_draft=0.001, rtt=self.rtt_s, prior_v0=0.005, prior_v1=0.001)
        return OnlineStats(**{**self.profile.policy_priors(getattr(self.draft, "backend", "eager")), "rtt": self.rtt_s})

    @staticmethod
    def _expect(reply: wire.Message, kind: type[wire.Message]) -> Any:
        if not isinstance(reply, kind):
            raise EdgeRefused(f"expected {kind.TYPE}, the edge sent {reply.TYPE}")
        return reply

    def close(self) -> None:
        self.client.close()

    # --- one request ---------------------------------------------------------------------------
    def answer(self, image_bytes: bytes, prompt: str, mode: str, params: SamplingParams,
               max_new_tokens: int = 64, window: int = 4, options: SpecOptions | None = None) -> Answer:
        """One request. `window` is the fixed window of vanilla_sd (and of covspec without the
        adaptive policy); `options` overrides the mode's mechanisms (for sweeps)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
        if self.prefilling is not None:  # a prefill that outlived its answer still runs the draft's programs,
            self.prefilling.wait(None)  # which take one call at a time (ExecuTorch: InvalidState): let it end
            self.prefilling = None
        prompt = self.draft.check_prompt(prompt)
        up0, down0 = self.client.counters.bytes_sent, self.client.counters.bytes_recv
        reopens0, moves0 = self.reopens, self.moves
        start = time.perf_counter()
        if mode == Mode.DRAFT_ONLY:
            answer = self._draft_only(image_bytes, prompt, params, max_new_tokens, start)
        else:
            sid = int.from_bytes(np.random.default_rng().bytes(7), "little") or 1
            open_msg = wire.Open(sid=sid, image=image_bytes, prompt=prompt, mode=mode,
                                 temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                 seed=params.seed, max_new_tokens=max_new_tokens)
            if mode in STREAMING_MODES:
                answer = self._moving(lambda: self._target_only(open_msg, max_new_tokens, start))
            else:
                answer = self._moving(lambda: self._speculative(open_msg, image_bytes, prompt, params, max_new_tokens,
                                                                window, start, options or MODE_OPTIONS[mode]))
            self.client.request(wire.Close(sid=sid))
        answer.bytes_up = self.client.counters.bytes_sent - up0
        answer.bytes_down = self.client.counters.bytes_recv - down0
        answer.reopens = self.reopens - reopens0
        answer.moves = self.moves - moves0
        return answer

    def _draft_only(self, image_bytes: bytes, prompt: str, params: SamplingParams, max_new_tokens: int,
                    start: float) -> Answer:
        first: list[float] = []
        result = generate(self.draft, load_image(image_bytes), prompt, params, max_new_tokens,
                          on_token=lambda _: first.append(time.perf_counter()) if not first else None)
        end = time.perf_counter()
        return Answer(Mode.DRAFT_ONLY, result.ids, result.text, ttft_s=(first[0] if first else end) - start,
                      latency_s=end - start)

    def _probes_device(self, options: SpecOptions, stats: OnlineStats) -> bool:
        """After `probe_after` answers in a row drafted on the edge over a link that is not long, the device
        drafts one itself: placement compares the edge's measured pace with this device's, which is
        measured only while it drafts; a pace read off a few early rounds (short windows on priors, a
        busy moment) would otherwise keep drafting on the edge for good where the device is faster. Each
        probe after which the edge still drafts doubles the wait (PROBE_EVERY up to PROBE_MAX): a probe
        is an answer drafted at the slower pace (every 5th answer cost a lone device 3-4% of its goodput)."""
        return options.placement and self.edge_streak >= self.probe_after and not long_link(stats, self.edge_step_s)

    def _after_answer(self, edge_drafted: bool, probe: bool) -> None:
        """The probing schedule: the answer after a probe tells whether the edge's drafting still won."""
        if self.probed:
            self.probe_after = min(2 * self.probe_after, PROBE_MAX) if edge_drafted else PROBE_EVERY
        self.probed = probe
        self.edge_streak = self.edge_streak + 1 if edge_drafted else 0

    def _hands_over(self, options: SpecOptions | None, stats: OnlineStats | None) -> bool:
        """Whether a speculative answer is drafted on the edge from its start (policy.place_drafting on
        what earlier answers measured and what the edge last said); mid-answer, `Speculation` decides."""
        return bool(options is not None and options.placement and stats is not None
                    and place_drafting(stats, self.edge_offer, self.edge_step_s, options.k_max) == EDGE)

    def _target_only(self, open_msg: wire.Open, max_new_tokens: int, start: float) -> Answer:
        """The edge generates the answer and streams it (target_only; edge_sd, drafting on the edge)."""
        sent_open = self.client.send(open_msg)
        stream = self._send_stream(open_msg)  # right behind the OPEN: no round trip between the two
        opened = self._expect(self._await(sent_open), wire.Opened)
        ttft = time.perf_counter() - start
        tokens = [opened.token] + ([] if opened.done else self._stream_rest(open_msg, [opened.token], stream=stream))
        ids = final_answer(tokens, self.draft.eos_token_ids, max_new_tokens)
        return Answer(open_msg.mode, ids, self.draft.decode(ids), ttft_s=ttft, latency_s=time.perf_counter() - start)

    def _send_stream(self, open_msg: wire.Open, draft: bool = False, limit: int | None = None) -> tuple[wire.Message, float]:
        """Asks the edge to generate the rest of the answer alone (`draft`: drafting with its own draft
        and verifying; `limit`: at most that many tokens): (the STREAM sent, when)."""
        stream = wire.Stream(sid=open_msg.sid, chunk=1, draft=draft or None, limit=limit)
        return self.client.send(stream), time.perf_counter()

    def _stream_rest(self, open_msg: wire.Open, known: list[int], stats: OnlineStats | None = None,
                     stream: tuple[wire.Message, float] | None = None, draft: bool = False,
                     limit: int | None = None) -> list[int]:
        """The rest of the answer, generated by the edge alone: returns the streamed tokens. `stream`: a
        STREAM already sent (with when), else one is sent now. An edge that stops streaming
        (restarted: no chunk within the timeout, or UNKNOWN_SESSION) is given the session again with
        `known` + the tokens streamed so far, and asked for the rest. `stats`: the drafting policy's
        estimates, given the round trip the first chunk shows."""
        tokens: list[int] = []
        self.yielded_round = None
        for attempt in range(MAX_REOPENS + 1):
            if attempt:
                self._reopen(open_msg, known + tokens)
            sent, t_sent = stream if stream is not None and not attempt else self._send_stream(
                open_msg, draft, limit if not attempt else None)
            early: dict[int, wire.Streamed] = {}  # chunks that overtook an earlier one, by index
            index = 0
            while True:
                try:
                    chunk = self.client.recv(sent.seq)
                except RemoteError as err:
                    if err.code != wire.ErrorCode.UNKNOWN_SESSION:
                        raise
                    chunk = None
                if chunk is None:
                    break
                chunk = self._expect(chunk, wire.Streamed)
                if chunk.index < index:  # a duplicate
                    self.client.stale += 1
                    continue
                if chunk.index == 0 and not attempt and stats is not None:  # the round trip: its wait less the
                    # edge's own time, so that a link that got faster is noticed by the next request
                    stats.observe_rtt(time.perf_counter() - t_sent - chunk.timings.get("elapsed_s", 0.0))
                early[chunk.index] = chunk
                while index in early:  # in order, whatever order they came in
                    chunk = early.pop(index)
                    index += 1
                    tokens.extend(int(t) for t in chunk.tokens)
                    if chunk.done:  # an edge that got loaded may give drafting back before the end
                        self.yielded_round = chunk.yielded_round
                        return tokens
        raise EdgeRefused(f"the edge stopped streaming (no chunk within {self.client.timeout_s} s, "
                          f"{MAX_REOPENS} reopen(s) tried)")

    def _reopen(self, open_msg: wire.Open, committed: list[int]) -> wire.Opened:
        """The edge lost the session (it restarted): open it again with the answer so far."""
        self.reopens += 1
        msg = replace(open_msg, prefix=np.asarray(committed, dtype=np.int32))
        return self._expect(self._moving(lambda: self.client.request(msg)), wire.Opened)

    def _moving(self, attempt: Callable[[], T]) -> T:
        """`attempt()` (what starts with an OPEN), made again on a new connection each time the edge
        answers DRAINING (it is shutting down: behind a balancer the new connection reaches another
        replica), at most MAX_MOVES times. The OPEN was refused, so nothing of the session is lost."""
        for moved in range(MAX_MOVES + 1):
            try:
                return attempt()
            except RemoteError as err:
                if err.code != wire.ErrorCode.DRAINING or moved == MAX_MOVES:
                    raise
            self.moves += 1
            time.sleep(MOVE_PAUSE_S * moved)
            self.client.reconnect()
        raise AssertionError("unreachable")

    def _await_resuming(self, sent: wire.Verify, open_msg: wire.Open,
                        committed: list[int]) -> tuple[wire.Message, bool]:
        """The RESULT of a VERIFY already sent, and whether the session had to be reopened for it: on
        UNKNOWN_SESSION the session is reopened with `committed` and the window sent again as the
        new session's round 0."""
        for attempt in range(MAX_REOPENS + 1):
            try:
                return self._await(sent), attempt > 0
            except RemoteError as err:
                if err.code != wire.ErrorCode.UNKNOWN_SESSION or attempt == MAX_REOPENS:
                    raise
            self._reopen(open_msg, committed)
            sent = self.client.send(replace(sent, round=0, pos=None))  # nothing is ahead in a new session
        raise AssertionError("unreachable")

    def _speculative(self, open_msg: wire.Open, image_bytes: bytes, prompt: str, params: SamplingParams,
                     max_new_tokens: int, window: int, start: float, options: SpecOptions) -> Answer:
        """Speculative decoding against the edge (the rules: `speculation.Speculation`). This is the
        socket's side: every message the Speculation asks for is sent here, every reply fed back."""
        # 1. OPEN (before the draft's prefill, or after it with the pruned indices), STREAM(draft) right behind it
        # when the edge drafts this answer (policy.place_drafting), and the draft's prefill
        stats = self.learned.setdefault((options, params.greedy), self._new_stats())
        probe = self._probes_device(options, stats)  # this answer drafted here: the device's pace measured again
        options = replace(options, placement=False) if probe else options
        hand_over = self._hands_over(options, stats)
        opening = self._open_and_prefill(open_msg, image_bytes, prompt, options, hand_over)
        stream, kept = opening.stream, opening.kept
        sent_before = self.client.counters.bytes_sent
        state = opening.state if opening.state is not None else opening.prefill
        ask = AnswerConfig(open_msg.mode, params, max_new_tokens, window, options)
        joining = opening.joining
        spec = Speculation(self.draft, state, ask, stats, open_msg.sid, self.welcome.vocab_size,
                           ready=lambda: self.client.poll(0.0), edge_offer=self.edge_offer,
                           prefill_left=None if joining is None else joining.left_s)
        # 2. while the edge prefills: the first window on the draft's guess of its first token
        informed = stats.rounds > 0 or self.profile is not None  # estimates from measurements, not priors
        first = spec.start(opening.first_logits, informed, self.edge_step_s, hand_over,
                           joining=joining is not None and stream is not None)
        if first is not None:
            self._send(first)
        # 3. a STREAM right behind OPEN (and the first window) when the edge's streaming wins on this link
        if stream is None and spec.hand_to is not None:
            stream = self._send_stream(open_msg, spec.hand_to is AnswerPhase.EDGE_DRAFTING)
        # 4. OPENED: the target's first token; the edge's streaming time for the policy
        opened = self._expect(self._await(opening.sent), wire.Opened)
        ttft = time.perf_counter() - start
        self.edge_limits = bool(opened.stream_limit)
        self.opened_s = opened.timings.get("prefill_s", 0.0) + self.rtt_s
        if joining is not None and not self.edge_limits:  # an older edge: the answer waits for the draft
            joining.wait(None)
        self.edge_step_s = opened.timings.get("step_s") or (
            self.profile.target_step_ms / 1000 if self.profile and self.profile.target_step_ms else None)
        step = spec.on_opened(opened, self.edge_step_s)
        # 5. rounds: send the window (unless sent ahead), draft branches (sending the window ahead) while
        # the edge verifies it, then its RESULT (re-OPENing the session if the edge restarted)
        while step is not None:
            while isinstance(step, Flight):
                if not step.sent:
                    self._send(step)
                for ahead in spec.while_waiting():
                    self._send(ahead)
                reply, reopened = self._await_resuming(step.msg, open_msg, spec.committed)
                step = spec.on_result(self._expect(reply, wire.Result), reopened)
            # 6. the edge generates the rest alone (drafting with its own draft or not), unless it gets
            # loaded and gives drafting back: then the rounds go on from where it stopped
            if isinstance(step, StreamRest):
                limit, draft = (step.limit, step.draft) if isinstance(step, JoinStream) else (None, False)
                tokens = self._stream_rest(open_msg, spec.committed, stats, stream=stream, limit=limit,
                                           draft=draft or spec.phase is AnswerPhase.EDGE_DRAFTING)
                step, stream = spec.streamed(tokens, self.yielded_round), None
        self.edge_offer = spec.edge_offer
        self._after_answer(spec.edge_drafted, probe)
        answer = self._answer(open_msg.mode, spec, max_new_tokens, joining, kept, start, ttft)
        answer.decode_bytes_up = self.client.counters.bytes_sent - sent_before
        return answer

    def _answer(self, mode: str, spec: Speculation, max_new_tokens: int, joining: Prefilling | None,
                kept: np.ndarray | None, start: float, ttft: float) -> Answer:
        """A speculative answer's record (with how the device joined it, when its draft prefilled meanwhile)."""
        ids = final_answer(spec.committed, self.draft.eos_token_ids, max_new_tokens)
        joined = None
        if joining is not None:
            if joining.took_s is not None:
                self.prefill_s = joining.took_s
                kept = joining.result()[0]
            joined = Joined(prefill_s=joining.took_s, at_token=spec.joined_at, segments=spec.join_segments,
                            at_s=None if spec.joined_t is None else spec.joined_t - start)
        return Answer(mode, ids, self.draft.decode(ids), ttft_s=ttft, latency_s=time.perf_counter() - start,
                      rounds=spec.rounds, kept=None if kept is None else len(kept), streamed_rest=spec.streamed_rest,
                      edge_drafted=spec.edge_drafted, joined=joined)

    def _open_and_prefill(self, open_msg: wire.Open, image_bytes: bytes, prompt: str, options: SpecOptions,
                          hand_over: bool = False) -> Opening:
        """Sends the OPEN (before the draft's own prefill, so the edge prefills meanwhile; after the
        pruning when the target prunes too) and prefills the draft. With `hand_over` the edge drafts
        this answer: the draft is prefilled only if the edge gives drafting back (`Opening.prefill`, and
        there are no first logits), so the device spends nothing on an answer the edge drafts."""
        stream = None
        open_msg.edge_draft = True if hand_over else None  # the edge prefills its draft with the target
        if options.join and not hand_over and not options.prune_target:
            return self._open_joining(open_msg, image_bytes, prompt, options)
        if not options.prune_target:
            sent_open = self.client.send(open_msg)  # the edge prefills while the device does
            stream = self._send_stream(open_msg, True) if hand_over else None
        pixels = self.draft.preprocess(load_image(image_bytes))
        visual = kept = None
        if options.prune_target or not hand_over:
            visual, kept = self._encode_and_prune(pixels, prompt, options)
        if options.prune_target:
            open_msg.kept = None if kept is None else kept.astype(np.int32)
            sent_open = self.client.send(open_msg)
            stream = self._send_stream(open_msg, True) if hand_over else None
        if hand_over:
            def prefill() -> DecodeState:
                v, k = (visual, kept) if visual is not None else self._encode_and_prune(pixels, prompt, options)
                return self.draft.prefill(v, prompt, kept=k)[1]

            return Opening(sent_open, kept, stream, prefill=prefill)
        assert visual is not None  # encoded above: not handed over
        first_logits, state = self.draft.prefill(visual, prompt, kept=kept)  # [V] the first token's
        return Opening(sent_open, kept, stream, first_logits=first_logits, state=state)

    def _open_joining(self, open_msg: wire.Open, image_bytes: bytes, prompt: str, options: SpecOptions) -> Opening:
        """Sends the OPEN and prefills the draft on a thread (`Prefilling`) until OPENED arrives: a draft
        ready first goes on as before (its first window sent before OPENED); else the answer starts on
        the edge and this device joins when its draft is ready (`Opening.joining`)."""
        expected = self.prefill_s if self.prefill_s is not None else getattr(
            getattr(self.draft, "profile", None), "answer_start_s", None)
        early = self._early_join(options, expected)
        sent_open = self.client.send(open_msg)  # the edge's draft prefilled at the STREAM (OPENED not delayed by it)
        stream = None if early is None else self._send_stream(open_msg, early.draft, early.limit)

        def work() -> tuple[np.ndarray | None, np.ndarray, DecodeState]:
            visual, kept = self._encode_and_prune(self.draft.preprocess(load_image(image_bytes)), prompt, options)
            first_logits, state = self.draft.prefill(visual, prompt, kept=kept)
            return kept, first_logits, state

        prefilling = self.prefilling = Prefilling(work, expected)
        if stream is not None:  # the edge starts the answer: its STREAM is behind the OPEN already
            return Opening(sent_open, None, stream, prefill=lambda: prefilling.result()[2], joining=prefilling)
        while not prefilling.wait(0.0) and not self.client.poll(0.001):  # zmq's poll wakes as OPENED arrives
            pass
        # OPENED came first: a prefill about to end is waited for (joining costs a STREAM and a round trip)
        soon = max(JOIN_MIN_S, self.rtt_s)
        if prefilling.wait(0.0) or (prefilling.left_s() <= soon and prefilling.wait(soon)):
            self.prefill_s = prefilling.took_s
            kept, first_logits, state = prefilling.result()
            return Opening(sent_open, kept, None, first_logits=first_logits, state=state)
        return Opening(sent_open, None, None, prefill=lambda: prefilling.result()[2], joining=prefilling)

    def _early_join(self, options: SpecOptions, expected: float | None) -> JoinStream | None:
        """The first segment of a join decided at OPEN (its STREAM sent right behind the OPEN, no round trip
        between the two), where the draft's prefill is expected to end well after OPENED (what the last
        answer measured of both); None: decided when OPENED comes."""
        if not self.edge_limits or expected is None or self.opened_s is None:
            return None
        late = expected - self.opened_s
        if late <= max(JOIN_MIN_S, self.rtt_s):
            return None
        offer = self.edge_offer
        draft = bool(options.placement and offer is not None and offer.offers)
        pace = (offer.s_per_token if draft and offer is not None else None) or self.edge_step_s or 0.02
        return JoinStream(limit=max(2, math.ceil(late / pace)), draft=draft)

    def _encode_and_prune(self, pixels: dict[str, Any], prompt: str,
                          options: SpecOptions) -> tuple[VisualTokens, np.ndarray | None]:
        """The draft's visual tokens (the dropped ones merged in, with options.merge) and the kept ones' indices."""
        visual = self.draft.encode_image(pixels)
        kept = None
        if options.keep < 1.0:
            kept = score_and_select(visual, self.draft.prompt_embeddings(prompt), options.keep, options.prune_method)
            if options.merge:
                visual = merged_visual(visual, kept)
        return visual, kept

    def _send(self, flight: Flight) -> None:
        """Sends a window's VERIFY now; the flight keeps the sent copy (its seq) and the time."""
        flight.msg, flight.t0, flight.sent = self.client.send(flight.msg), time.perf_counter(), True

    def _await(self, sent: wire.Message) -> wire.Message:
        """The reply to a request already sent; on a timeout the request is retried as usual."""
        reply = self.client.recv(sent.seq)
        return reply if reply is not None else self.client.request(sent)
