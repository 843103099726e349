"""`covspec device run`: answers an image + question with the draft on the device and the target on
the edge, in one of the modes:

    target_only  the edge generates and streams (the device only tokenizes and shows)
    draft_only   the device alone
    vanilla_sd   fixed window k, stop-and-wait; sampling uploads the draft's full distribution
                 of every drafted token (the conventional scheme)
    covspec      the four mechanisms: visual tokens pruned before the draft's prefill, margin gate
                 and cost-model window length, branches drafted while a window is verified
                 and sent ahead of the RESULT they assume (windows in flight; the first one
                 before OPENED), decoupled verification (sampling uploads q(x_i) only; the
                 device corrects)
    covspec_no_prune / _no_adaptive / _no_branch / _no_ahead / _no_decoupled: one mechanism off each

Every request goes through `transport.channel.Client`, which counts the bytes of every frame sent
and received on the socket: those are the bytes per token the bench reports.

An edge that restarts mid-answer is survived: the Client's retries reach the new edge on a fresh
socket, which answers UNKNOWN_SESSION; the device re-OPENs the session with the tokens it already
has (`Open.prefix`; the edge prefills prompt + prefix) and carries on from there, so a greedy answer
is the one it would have been without the restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from covspec.calibration.profile import CalibrationProfile
from covspec.drafter import Drafter, Window
from covspec.generation import generate
from covspec.images import load_image
from covspec.models.base import VLMAdapter
from covspec.modes import MODE_OPTIONS, MODES, SpecOptions
from covspec.policy import (
    MarginGate,
    OnlineStats,
    branch_roots,
    choose_window,
    speculation_could_pay,
    speculation_pays,
)
from covspec.pruning import merged_visual, score_and_select
from covspec.sampling import SamplingParams
from covspec.sampling import next_token as pick_token
from covspec.speculative import correct_decoupled
from covspec.transport import protocol as wire
from covspec.transport.channel import Client, ClientKeys, RemoteError

MAX_REOPENS = 3  # edge restarts survived within one answer


class EdgeRefused(Exception):
    """The edge answered with something other than what the protocol promises."""


@dataclass
class RoundRecord:
    drafted: int
    accepted: int
    draft_s: float
    wait_s: float  # from sending VERIFY to its RESULT (round trip + edge verify)
    verify_s: float  # the edge's own verify time
    branch_hit: bool | None = None  # whether a branch drafted during the wait was used (None: no branches)
    margins: list[float] | None = None  # the drafted tokens' top-1 minus top-2 draft probabilities
    ahead: bool = False  # the window was sent before the previous round's RESULT (windows in flight)


@dataclass
class Answer:
    mode: str
    ids: list[int]
    text: str
    ttft_s: float  # request start to the first token known on the device
    latency_s: float  # request start to the last token
    rounds: list[RoundRecord] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    kept: int | None = None  # visual tokens the draft prefilled with, when pruned
    decode_bytes_up: int = 0  # bytes sent after OPEN: the drafted windows (what the schemes differ in)
    streamed_rest: bool = False  # the adaptive policy found speculation not paying and switched to STREAM
    reopens: int = 0  # times the session was re-OPENed with the answer so far (the edge had lost it)

    @property
    def decode_tokens_per_s(self) -> float:
        span = self.latency_s - self.ttft_s
        return (len(self.ids) - 1) / span if len(self.ids) > 1 and span > 0 else float("nan")

    @property
    def mean_accepted(self) -> float:
        return float(np.mean([r.accepted for r in self.rounds])) if self.rounds else float("nan")

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(r.drafted for r in self.rounds)
        return sum(r.accepted for r in self.rounds) / drafted if drafted else float("nan")


def final_answer(tokens: list[int], eos: set[int], max_new_tokens: int) -> list[int]:
    """The answer as target-only generation would give it: cut at the first end token and the limit."""
    out: list[int] = []
    for token in tokens:
        if token in eos or len(out) >= max_new_tokens:
            break
        out.append(token)
    return out


class DeviceRuntime:
    """A device: its draft model (or only its tokenizer, for target_only) and a link to one edge."""

    def __init__(self, draft: VLMAdapter, edge: str, timeout_s: float = 30.0, retries: int = 2,
                 keys: ClientKeys | None = None, profile: CalibrationProfile | None = None):
        """`keys`: CURVE keys (this device's pair and the edge's public key) for an edge that
        authenticates; None for one that runs with --auth none. `profile`: what `covspec calibrate`
        measured for this device, edge and link, the drafting policy's starting estimates."""
        self.draft = draft
        self.profile = profile
        self.client = Client(edge, timeout_s=timeout_s, retries=retries, keys=keys)
        self.reopens = 0
        self.edge_step_s: float | None = None  # the target's streaming time per token, as the last OPENED said
        self.welcome = self._hello()
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
    def _expect(reply: wire.Message, kind: type) -> wire.Message:
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
        prompt = self.draft.check_prompt(prompt)
        up0, down0 = self.client.counters.bytes_sent, self.client.counters.bytes_recv
        reopens0 = self.reopens
        start = time.perf_counter()
        if mode == "draft_only":
            answer = self._draft_only(image_bytes, prompt, params, max_new_tokens, start)
        else:
            sid = int.from_bytes(np.random.default_rng().bytes(7), "little") or 1
            open_msg = wire.Open(sid=sid, image=image_bytes, prompt=prompt, mode=mode,
                                 temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                 seed=params.seed, max_new_tokens=max_new_tokens)
            if mode == "target_only":
                answer = self._target_only(open_msg, max_new_tokens, start)
            else:
                answer = self._speculative(sid, open_msg, image_bytes, prompt, params, max_new_tokens, window,
                                           start, options or MODE_OPTIONS[mode])
            self.client.request(wire.Close(sid=sid))
        answer.bytes_up = self.client.counters.bytes_sent - up0
        answer.bytes_down = self.client.counters.bytes_recv - down0
        answer.reopens = self.reopens - reopens0
        return answer

    def _draft_only(self, image_bytes: bytes, prompt: str, params: SamplingParams, max_new_tokens: int,
                    start: float) -> Answer:
        first: list[float] = []
        result = generate(self.draft, load_image(image_bytes), prompt, params, max_new_tokens,
                          on_token=lambda _: first.append(time.perf_counter()) if not first else None)
        end = time.perf_counter()
        return Answer("draft_only", result.ids, result.text, ttft_s=(first[0] if first else end) - start,
                      latency_s=end - start)

    def _target_only(self, open_msg: wire.Open, max_new_tokens: int, start: float) -> Answer:
        sent_open = self.client.send(open_msg)
        stream = self._send_stream(open_msg)  # right behind the OPEN: no round trip between the two
        opened = self._expect(self._await(sent_open), wire.Opened)
        ttft = time.perf_counter() - start
        tokens = [opened.token] + ([] if opened.done else self._stream_rest(open_msg, [opened.token], stream=stream))
        ids = final_answer(tokens, self.draft.eos_token_ids, max_new_tokens)
        return Answer("target_only", ids, self.draft.decode(ids), ttft_s=ttft,
                      latency_s=time.perf_counter() - start)

    def _send_stream(self, open_msg: wire.Open) -> tuple[wire.Message, float]:
        """Asks the edge to generate the rest of the answer alone: (the STREAM sent, when)."""
        return self.client.send(wire.Stream(sid=open_msg.sid, chunk=1)), time.perf_counter()

    def _stream_rest(self, open_msg: wire.Open, known: list[int], stats: OnlineStats | None = None,
                     stream: tuple[wire.Message, float] | None = None) -> list[int]:
        """The rest of the answer, generated by the edge alone: returns the streamed tokens. `stream`: a
        STREAM already sent (with when), else one is sent now. An edge that stops streaming
        (restarted: no chunk within the timeout, or UNKNOWN_SESSION) is given the session again with
        `known` + the tokens streamed so far, and asked for the rest. `stats`: the drafting policy's
        estimates, given the round trip the first chunk shows."""
        tokens: list[int] = []
        for attempt in range(MAX_REOPENS + 1):
            if attempt:
                self._reopen(open_msg, known + tokens)
            sent, t_sent = stream if stream is not None and not attempt else self._send_stream(open_msg)
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
                    if chunk.done:
                        return tokens
        raise EdgeRefused(f"the edge stopped streaming (no chunk within {self.client.timeout_s} s, "
                          f"{MAX_REOPENS} reopen(s) tried)")

    def _reopen(self, open_msg: wire.Open, committed: list[int]) -> wire.Opened:
        """The edge lost the session (it restarted): open it again with the answer so far."""
        self.reopens += 1
        msg = replace(open_msg, prefix=np.asarray(committed, dtype=np.int32))
        return self._expect(self.client.request(msg), wire.Opened)

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

    @torch.inference_mode()
    def _speculative(self, sid: int, open_msg: wire.Open, image_bytes: bytes, prompt: str,
                     params: SamplingParams, max_new_tokens: int, window: int, start: float,
                     options: SpecOptions) -> Answer:
        """Speculative decoding against the edge. vanilla_sd: fixed window, stop-and-wait, full q
        upload when sampling. covspec: pruned draft prefill, margin gate + cost-model window,
        branches drafted while a window is verified, decoupled q(x) upload when sampling."""
        if not options.prune_target:
            sent_open = self.client.send(open_msg)  # the edge prefills while the device does
        visual = self.draft.encode_image(self.draft.preprocess(load_image(image_bytes)))
        kept = None
        if options.keep < 1.0:
            kept = score_and_select(visual, self.draft.prompt_embeddings(prompt), options.keep, options.prune_method)
            if options.merge:
                visual = merged_visual(visual, kept)
        if options.prune_target:
            open_msg.kept = None if kept is None else kept.numpy().astype(np.int32)
            sent_open = self.client.send(open_msg)
        first_logits, state = self.draft.prefill(visual, prompt, kept=kept)  # [V] the first token's
        sent_before = self.client.counters.bytes_sent
        generator = None if params.greedy else params.generator()
        stats = self.learned.setdefault((options, params.greedy), self._new_stats())
        gate = MarginGate(options.margin_threshold) if options.adaptive else None
        gated = None if gate is None else lambda w: gate.stop(float(w.margins[-1]), len(w))
        # whether the edge's streaming beats speculating on this link, decided before OPENED by the rule
        # applied after it (below) on what earlier answers showed (the edge's streaming time included)
        informed = stats.rounds > 0 or self.profile is not None  # estimates from measurements, not priors
        streams = bool(options.adaptive and self.edge_step_s and (
            speculation_loses(stats, [], options.k_max, self.edge_step_s) if informed
            else not speculation_could_pay(stats, self.edge_step_s, options.k_max)))
        early: tuple[wire.Verify, Window, float] | None = None  # round 0, sent before OPENED
        if options.ahead and max_new_tokens > 1 and (
                not options.adaptive or (streams and params.greedy) or (stats.rounds > 0 and not streams)):
            # the edge is still prefilling: draft the first window on the draft's own guess of the
            # target's first token and send it now; the edge verifies it right after OPENED if the guess
            # was right (so the answer is unchanged either way) and the first round trip is hidden.
            # Even where the edge will stream the answer, that window costs the edge one pass and may
            # save it as many decode steps (greedy only: a sampled rejection leaves the correction to
            # the device, which a STREAM right behind it could not wait for)
            guess = pick_token(first_logits, params, generator)
            drafter = Drafter(self.draft, state, guess, params, generator)
            k = min(choose_window(stats, options.k_max, max_new_tokens - 1) if options.adaptive else window,
                    max_new_tokens - 1)
            first = drafter.draft(k, stop=lambda w: self.client.poll(0.0) or (gated is not None and gated(w)))
            early = (self.client.send(self._verify(sid, 0, first, params, options, root=guess, pos=1)), first,
                     time.perf_counter())
        stream = self._send_stream(open_msg) if streams else None  # right behind OPEN (and the first window)
        opened = self._expect(self._await(sent_open), wire.Opened)
        ttft = time.perf_counter() - start
        in_flight: tuple[wire.Verify, Window, float] | None = None  # the next window, sent ahead and verified
        if early is not None and drafter.committed[0] == opened.token and not opened.done:
            in_flight = early
        else:
            self.draft.truncate(state, state.length if early is None else drafter.prompt_length)
            drafter = Drafter(self.draft, state, opened.token, params, generator)
        eos = self.draft.eos_token_ids
        vocab = self.welcome.vocab_size
        self.edge_step_s = edge_step_s = opened.timings.get("step_s") or (
            self.profile.target_step_ms / 1000 if self.profile and self.profile.target_step_ms else None)
        if "verify_v0_s" in opened.timings and "verify_v1_s" in opened.timings:
            # the edge's own verify-time line, over every window it verified: the prior this device's
            # few rounds refine (generic anchors would set the slope while its windows have one length)
            stats.prior_v0, stats.prior_v1 = opened.timings["verify_v0_s"], opened.timings["verify_v1_s"]
        rounds: list[RoundRecord] = []
        done = opened.done
        prepared: Window | None = None  # the next window, already drafted on a branch that hit
        streamed_rest = False
        device_root = False  # whether the last committed token is a correction the edge has not seen
        round_base = 0  # rounds before the session was last reopened (the edge counts from 0 again)
        if streams and not done:  # the first window's verdict, if the edge verified it, then the streaming
            if in_flight is not None:
                sent, drafted, t0 = in_flight
                in_flight = None
                reply, _ = self._await_resuming(sent, open_msg, drafter.committed)
                reply = self._expect(reply, wire.Result)
                drafter.commit(drafted, reply.accepted, reply.token)
                rounds.append(RoundRecord(len(drafted), reply.accepted, sum(drafted.step_s), time.perf_counter() - t0,
                                          reply.timings.get("verify_s", float("nan")), margins=drafted.margins.tolist(),
                                          ahead=True))
                stats.update(len(drafted), reply.accepted, drafted.step_s, None, rounds[-1].verify_s, drafted.margins)
                done = reply.done or drafter.committed[-1] in eos
            if not done:
                drafter.committed.extend(self._stream_rest(open_msg, drafter.committed, stats, stream=stream))
            streamed_rest = done = True
        elif not done and in_flight is None and options.adaptive and edge_step_s and (
                speculation_loses(stats, [], options.k_max, edge_step_s) if informed
                else not speculation_could_pay(stats, edge_step_s, options.k_max)):
            # the link is too slow for drafts to beat the edge's own streaming: do not start speculating.
            # Uninformed (generic priors), only when not even a fully accepted window could win: on the
            # priors' acceptance a device would stream every answer and, never measuring a round,
            # never learn otherwise
            drafter.committed.extend(self._stream_rest(open_msg, drafter.committed, stats))
            streamed_rest = done = True
        while not done:
            room = max_new_tokens - len(drafter.committed)
            k = min(choose_window(stats, options.k_max, room) if options.adaptive else window, room)
            ahead = in_flight is not None
            if in_flight is not None:  # sent before the last RESULT, and that RESULT confirmed it
                sent, drafted, t0 = in_flight
                in_flight = None
            else:
                drafted = prepared if prepared is not None and len(prepared) else drafter.draft(k, stop=gated)
                drafted = drafted if len(drafted) <= k else _cut(drafter, drafted, k)
                t0 = time.perf_counter()
                sent = self.client.send(self._verify(sid, len(rounds) - round_base, drafted, params, options,
                                                     root=drafter.committed[-1] if device_root else None))
            prepared = None
            branches, sent_ahead = self._draft_branches(
                drafter, drafted, options, k, stats, params, sid, len(rounds) + 1 - round_base, max_new_tokens) \
                if options.branching else ([], None)
            reply, reopened = self._await_resuming(sent, open_msg, drafter.committed)
            reply = self._expect(reply, wire.Result)
            if reopened:
                round_base = len(rounds)
            wait_s = time.perf_counter() - t0
            next_token = reply.token
            if next_token is None and reply.cand_ids is not None:  # decoupled correction, drawn here
                q = pad_vocab(drafted.q[reply.accepted], vocab)
                next_token = correct_decoupled(torch.from_numpy(reply.cand_ids.copy()),
                                               torch.from_numpy(reply.cand_probs.copy()), q, generator)
            device_root = reply.token is None and next_token is not None
            hit = _matching_branch(branches, reply.accepted, next_token)
            if hit is not None:
                branch, branch_window = hit
                drafter.adopt(branch)
                prepared = branch_window
                if sent_ahead is not None and sent_ahead[1] is branch and not reopened:
                    # the window sent ahead assumed exactly this outcome: the edge verifies it next
                    in_flight, prepared = (sent_ahead[0], prepared, sent_ahead[2]), None
            else:
                drafter.commit(drafted, reply.accepted, next_token)
            verify_s = reply.timings.get("verify_s", float("nan"))
            rounds.append(RoundRecord(len(drafted), reply.accepted, sum(drafted.step_s), wait_s, verify_s,
                                      branch_hit=hit is not None if branches else None,
                                      margins=drafted.margins.tolist(), ahead=ahead))
            # a round that had to reopen the session waited for the timeout and a new prefill: its
            # acceptance counts, its wait says nothing of the link; nor does the wait of a window sent
            # ahead, which queued behind the one before it
            stats.update(len(drafted), reply.accepted, drafted.step_s, None if reopened or ahead else wait_s,
                         None if reopened else verify_s, drafted.margins,
                         branch_hit=hit is not None if branches else None)
            if stats.rounds == 1 and not reopened:  # the first measurements replace the priors outright
                stats.rtt = max(0.0, wait_s - verify_s) if verify_s == verify_s else wait_s
                stats.t_draft = sum(drafted.step_s) / max(len(drafted.step_s), 1)
            done = reply.done or drafter.committed[-1] in eos or len(drafter.committed) >= max_new_tokens
            if not done and in_flight is None and options.adaptive and not device_root and speculation_loses(
                    stats, rounds, options.k_max, edge_step_s):
                # on this link speculation loses to the target alone: let the edge stream the rest
                drafter.committed.extend(self._stream_rest(open_msg, drafter.committed, stats))
                streamed_rest = True
                break
        ids = final_answer(drafter.committed, eos, max_new_tokens)
        return Answer(open_msg.mode, ids, self.draft.decode(ids), ttft_s=ttft,
                      latency_s=time.perf_counter() - start, rounds=rounds, kept=None if kept is None else len(kept),
                      decode_bytes_up=self.client.counters.bytes_sent - sent_before, streamed_rest=streamed_rest)

    def _verify(self, sid: int, round_no: int, window: Window, params: SamplingParams, options: SpecOptions,
                root: int | None = None, pos: int | None = None) -> wire.Verify:
        """The VERIFY of a drafted window: token ids, and when sampling q(x_i) (decoupled) or every
        drafted token's full q (the conventional upload)."""
        verify = wire.Verify(sid=sid, round=round_no, tokens=window.ids.numpy().astype(np.int32), root=root, pos=pos)
        if not params.greedy and options.decoupled:
            verify.q = window.q_of_drafted().numpy().astype(np.float32)
        elif not params.greedy:
            verify.dists = pad_vocab(window.q, self.welcome.vocab_size).numpy().astype(np.float32)
        return verify

    def _draft_branches(self, drafter: Drafter, window: Window, options: SpecOptions, k: int, stats: OnlineStats,
                        params: SamplingParams, sid: int, next_round: int, max_new_tokens: int,
                        ) -> tuple[list[tuple[Drafter, int, int | None, Window]], tuple[wire.Verify, Drafter, float] | None]:
        """While the window is verified: fork the draft for the likely outcomes (all accepted;
        rejection at the positions where the first rejection most likely falls, by the learned
        acceptance per margin bin, or the lowest-margin ones until that is learned, corrected to the
        draft's runner-up) and draft the next window on each until the edge's answer arrives.
        With `options.ahead`, the all-accepted branch's window is sent as round `next_round` as soon
        as it is drafted, rooted at the draft's guess of the edge's bonus token; the edge verifies
        it only if that is what happened, so the round trip is hidden whenever it is.
        ([(branch, accepted, root, window)], (the VERIFY sent ahead, its branch, when) or None)."""
        ready = lambda _w=None: self.client.poll(0.0)  # noqa: E731
        outcomes: list[tuple[int, int | None]] = [(len(window), None)]
        ranked = stats.acceptance_at if stats.margins_informed() else None  # else: lowest margin first
        for position, token in branch_roots(window.ids, window.margins, window.runner_up, options.branches,
                                            acceptance=ranked):
            outcomes.append((position, token))
        branches = []
        sent_ahead = None
        for accepted, root in outcomes:
            if ready():
                break
            if root is None and int(window.ids[-1]) in self.draft.eos_token_ids:
                continue  # an answer that ends in this window has no continuation to draft
            branch = drafter.fork(window, accepted, root)
            room = max_new_tokens - len(branch.committed)  # answer tokens left after the assumed outcome
            if room <= 0:
                continue
            # the all-accepted branch's first drafted token stands for the edge's bonus token
            drafted = branch.draft(min(k + (1 if root is None else 0), room), stop=ready)
            branches.append((branch, accepted, root, drafted))
            if root is None and options.ahead and len(drafted) > 1 and not ready():
                guess, rest = int(drafted.ids[0]), drafted.tail(1)
                verify = self._verify(sid, next_round, rest, params, options, root=guess,
                                      pos=len(branch.committed) + 1)  # answer index of rest's first token
                sent_ahead = (self.client.send(verify), branch, time.perf_counter())
        return branches, sent_ahead

    def _await(self, sent: wire.Message) -> wire.Message:
        """The reply to a request already sent; on a timeout the request is retried as usual."""
        reply = self.client.recv(sent.seq)
        return reply if reply is not None else self.client.request(sent)


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


def _matching_branch(branches: list[tuple[Drafter, int, int | None, Window]], accepted: int,
                     next_token: int | None) -> tuple[Drafter, Window] | None:
    """The branch whose assumed outcome is the edge's, ready to continue: (branch, its next window)."""
    if next_token is None:
        return None
    for branch, assumed, root, drafted in branches:
        if assumed != accepted or not len(drafted):
            continue
        if root is None and int(drafted.ids[0]) == next_token:  # all accepted, bonus as drafted
            branch.committed.append(next_token)
            if len(drafted) > 1:
                branch.fed += 1  # the bonus token was fed to draft the rest
            return branch, drafted.tail(1)
        if root == next_token:
            return branch, drafted
    return None


def _cut(drafter: Drafter, window: Window, k: int) -> Window:
    """A prepared window longer than the limit: keep k tokens, roll the cache back past the rest."""
    drafter.adapter.truncate(drafter.state, drafter.prompt_length + drafter.fed + k - 1)
    return Window(window.ids[:k], None if window.q is None else window.q[:k], window.margins[:k],
                  window.runner_up[:k], window.step_s[:k])


def pad_vocab(q: torch.Tensor, width: int) -> torch.Tensor:
    """q [..., V_draft] zero-padded (or cut) to the target's vocabulary width."""
    v = q.shape[-1]
    if v == width:
        return q
    if v > width:
        return q[..., :width]
    return torch.nn.functional.pad(q, (0, width - v))
