"""The device's speculative answer (`device_runtime.speculation.Speculation`) driven without a socket:
its messages go to an in-process edge session (`TargetSession`, planned as the edge plans them), its
replies come back in the order a single-session edge sends them. The greedy answer is the target's
own, and the messages go out in the order the protocol promises (the first window before OPENED,
each window sent ahead before the RESULT it assumes)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

from covspec.device_runtime.config import AnswerConfig
from covspec.device_runtime.records import final_answer
from covspec.device_runtime.speculation import (
    STREAM,
    TRANSITIONS,
    AnswerPhase,
    Flight,
    JoinStream,
    Speculation,
)
from covspec.drafter import Drafter
from covspec.edge_runtime.planning import Outcome, plan_verify
from covspec.edge_runtime.session import TargetSession
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.models.draft import as_draft
from covspec.modes import MODE_OPTIONS, SpecOptions
from covspec.policy import EdgeOffer, OnlineStats
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire

PROMPT = "describe this image ."
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("answer")
    target = load_adapter(tiny_models.build_llava(root / "target", seed=0))
    draft = load_adapter(tiny_models.build_llava(root / "draft", seed=1))
    return target, draft


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28, 3), dtype=np.uint8))


@dataclass
class InProcessEdge:
    """One session of an edge, in this process: VERIFYs queue up and are verified in the order sent
    (a window sent ahead whose assumption failed is dropped, as the edge drops it)."""

    session: TargetSession
    vocab: int
    queue: list[wire.Verify] = field(default_factory=list)
    replies: dict[int, wire.Message] = field(default_factory=dict)  # by seq
    trace: list[str] = field(default_factory=list)  # what crossed the wire, in order
    seq: int = 0

    def send(self, flight: Flight) -> None:
        self.seq += 1
        flight.msg, flight.t0, flight.sent = replace(flight.msg, seq=self.seq), time.perf_counter(), True
        self.queue.append(flight.msg)
        self.trace.append(f"VERIFY {flight.msg.round}" + (" ahead" if flight.msg.pos is not None else ""))

    def reply(self, sent: wire.Verify) -> wire.Message:
        while sent.seq not in self.replies:
            self._verify(self.queue.pop(0))
        reply = self.replies.pop(sent.seq)
        self.trace.append(f"{reply.TYPE} {reply.round}")
        return reply

    def _verify(self, msg: wire.Verify) -> None:
        plan = plan_verify(self.session, msg, self.vocab)
        if plan.outcome is Outcome.DROP:
            self.replies[msg.seq] = wire.Error(sid=msg.sid, seq=msg.seq, code=wire.ErrorCode.BAD_ROUND,
                                               message=plan.problem)
            return
        assert plan.outcome is Outcome.VERIFY, plan.problem
        answer = self.session.verify(msg.round, plan.root, plan.draft, plan.scheme, pos=msg.pos)
        self.replies[msg.seq] = wire.Result(sid=msg.sid, seq=msg.seq, round=answer.round,
                                            accepted=answer.verdict.accepted, token=answer.verdict.next_token,
                                            done=answer.done, timings={"verify_s": answer.verify_s})

    def stream(self) -> list[int]:
        tokens = self.session.stream()
        next(tokens)  # the first token went out in OPENED
        self.trace.append("STREAM")
        return list(tokens)


def drive(edge: InProcessEdge, spec: Speculation, step) -> object:
    """The rounds from `step` until the answer is complete or handed to the edge (STREAM)."""
    while isinstance(step, Flight):
        if not step.sent:
            edge.send(step)
        for ahead in spec.while_waiting():
            edge.send(ahead)
        reply = edge.reply(step.msg)
        assert isinstance(reply, wire.Result), reply
        step = spec.on_result(reply, reopened=False)
    return step


@torch.inference_mode()
def answer(target, draft, picture: Image.Image, mode: str, n: int, stats: OnlineStats | None = None,
           ) -> tuple[list[int], Speculation, list[str]]:
    """One greedy answer of `mode`, the Speculation driven by hand as the client drives it."""
    session = TargetSession.open(target, target.encode_image(target.preprocess(picture)), PROMPT, None, GREEDY, n)
    edge = InProcessEdge(session, target.vocab_size)
    draft = as_draft(draft)  # numpy in and out, as DeviceRuntime sees it
    first_logits, state = draft.prefill(draft.encode_image(draft.preprocess(picture)), PROMPT)
    stats = stats or OnlineStats(t_draft=0.001, rtt=0.001, prior_v0=0.005, prior_v1=0.001)
    ask = AnswerConfig(mode, GREEDY, max_new_tokens=n, window=4, options=replace(MODE_OPTIONS[mode], keep=1.0))
    spec = Speculation(draft, state, ask, stats, sid=1, vocab=target.vocab_size, ready=lambda: False)
    first = spec.start(first_logits, informed=stats.rounds > 0, edge_step_s=None)
    if first is not None:
        edge.send(first)
    edge.trace.append("OPENED")
    step = drive(edge, spec, spec.on_opened(wire.Opened(sid=1, token=session.committed[0], done=session.done), None))
    if step is STREAM:
        step = spec.streamed(edge.stream(), next_round=None)
    assert step is None and spec.phase is AnswerPhase.DONE
    return final_answer(spec.committed, draft.eos_token_ids, n), spec, edge.trace


def reference(target, picture: Image.Image, n: int) -> list[int]:
    return generate(target, picture, PROMPT, GREEDY, n).ids


@pytest.mark.parametrize("mode", ["vanilla_sd", "covspec", "covspec_no_adaptive", "covspec_no_branch"])
def test_greedy_answer_is_the_targets(models, mode):
    target, draft = models
    for seed in range(3):
        picture = image(seed)
        ids, spec, trace = answer(target, draft, picture, mode, 24)
        assert ids == reference(target, picture, 24)
        assert spec.rounds and sum(r.accepted for r in spec.rounds) < sum(r.drafted for r in spec.rounds)
        results = [int(t.split()[1]) for t in trace if t.startswith("RESULT")]
        assert results == list(range(len(results)))  # rounds answered in order, none missing
        if mode == "vanilla_sd":  # stop-and-wait: one window, its RESULT, the next
            assert trace == ["OPENED"] + [f"{kind} {r}" for r in results for kind in ("VERIFY", "RESULT")]


def test_identical_draft_sends_every_window_ahead(models):
    """The target drafting for itself: every window is accepted whole, so the first one (sent before
    OPENED) and every window sent ahead is verified, each sent before the RESULT it assumes."""
    target, _ = models
    picture = image(0)
    ids, spec, trace = answer(target, target, picture, "covspec_no_adaptive", 20)
    assert ids == reference(target, picture, 20)
    assert trace[:3] == ["VERIFY 0 ahead", "OPENED", "VERIFY 1 ahead"]
    assert all(r.accepted == r.drafted for r in spec.rounds)
    assert all(r.ahead for r in spec.rounds) and all(r.branch_hit for r in spec.rounds[:-1])
    for r in range(1, len(spec.rounds)):  # window r went out before the RESULT of window r - 1
        assert trace.index(f"VERIFY {r} ahead") < trace.index(f"RESULT {r - 1}")
    assert not spec.streamed_rest


def test_an_informed_adaptive_device_sends_its_first_window_before_opened(models):
    """The policy's estimates carried from an earlier answer: covspec drafts the first window on its
    guess of the target's first token and sends it before OPENED; the answer is the target's still."""
    target, draft = models
    stats = OnlineStats(t_draft=0.001, rtt=0.001, prior_v0=0.005, prior_v1=0.001)
    answer(target, draft, image(1), "covspec", 24, stats)
    assert stats.rounds > 0
    picture = image(2)
    ids, _, trace = answer(target, draft, picture, "covspec", 24, stats)
    assert ids == reference(target, picture, 24)
    assert trace[:2] == ["VERIFY 0 ahead", "OPENED"]


def test_the_drafter_rolls_its_own_cache_back(models):
    """cut, restart and adopt keep the Drafter's invariant: the cache holds the prompt plus committed[:fed]."""
    _, draft = models
    with torch.inference_mode():
        _, state = draft.prefill(draft.encode_image(draft.preprocess(image(0))), PROMPT)
        drafter = Drafter(draft, state, 5, GREEDY, None)
        window = drafter.draft(6)
        cut = drafter.cut(window, 3)
        assert cut.ids.tolist() == window.ids[:3].tolist()
        assert state.length == drafter.prompt_length + drafter.fed + 2  # root fed, the 3rd token not
        branch = drafter.fork(cut, len(cut), None)
        more = branch.draft(4)
        rest = drafter.adopt(branch, more, None)  # the edge accepted all 3 and its bonus is more[0]
        assert drafter.committed == [5, *cut.ids.tolist(), int(more.ids[0])]
        assert rest.ids.tolist() == more.ids[1:].tolist()
        assert state is not drafter.state and drafter.state.length == drafter.prompt_length + drafter.fed + len(rest) - 1
        drafter.restart(7)
        assert drafter.committed == [7] and drafter.state.length == drafter.prompt_length



def test_a_device_that_hands_drafting_over_at_open_prefills_only_when_it_comes_back(models):
    """Handed over at OPEN (the edge drafts the answer), the device spends nothing on its draft; when the
    edge gives drafting back after some streamed tokens, the draft is prefilled then, fed what was streamed
    in one pass, and the answer goes on to the target's own."""
    target, draft = models
    draft = as_draft(draft)
    picture = image(7)
    n = 24
    expected = reference(target, picture, n)
    session = TargetSession.open(target, target.encode_image(target.preprocess(picture)), PROMPT, None, GREEDY, n)
    edge = InProcessEdge(session, target.vocab_size)
    prefills = []

    def prefill():
        prefills.append(1)
        return draft.prefill(draft.encode_image(draft.preprocess(picture)), PROMPT)[1]

    stats = OnlineStats(t_draft=0.001, rtt=0.001, prior_v0=0.005, prior_v1=0.001)
    ask = AnswerConfig("covspec", GREEDY, max_new_tokens=n, window=4, options=replace(MODE_OPTIONS["covspec"], keep=1.0))
    spec = Speculation(draft, prefill, ask, stats, sid=1, vocab=target.vocab_size, ready=lambda: False)
    assert spec.start(None, informed=False, edge_step_s=None, hand_over=True) is None  # nothing drafted here
    step = spec.on_opened(wire.Opened(sid=1, token=session.committed[0], done=session.done), None)
    assert step is STREAM and not prefills
    tokens = session.stream()  # the edge's own generation (here: the target's streaming)
    next(tokens)  # the first token went out in OPENED
    streamed = [next(tokens) for _ in range(5)]  # five tokens, then it gives drafting back
    assert spec.phase is AnswerPhase.EDGE_DRAFTING
    step = spec.streamed(streamed, next_round=0)  # resumes drafting here
    assert prefills == [1] and spec.committed == expected[:6] and spec.phase is AnswerPhase.SPECULATING
    step = drive(edge, spec, step)
    assert len(spec.rounds) >= 1  # drafted and verified here after the hand-back
    if step is STREAM:  # this random draft's windows do not pay: the rest is streamed
        step = spec.streamed(edge.stream(), next_round=None)
    assert step is None
    assert final_answer(spec.committed, draft.eos_token_ids, n) == expected and prefills == [1]


def test_every_phase_transition(models):
    """Each transition of TRANSITIONS, driven by the rule that takes it, the answer the target's each
    time; a transition the table does not hold raises."""
    target, draft = models
    draft = as_draft(draft)
    n = 24
    picture = image(3)
    expected = reference(target, picture, n)
    visual = target.encode_image(target.preprocess(picture))
    taken: set[tuple[AnswerPhase, AnswerPhase]] = set()

    def new(mode: str | SpecOptions, state=None, stats=None, offer=None,
            prefill_left=None) -> tuple[Speculation, InProcessEdge, np.ndarray]:
        session = TargetSession.open(target, visual, PROMPT, None, GREEDY, n)
        logits, prefilled = draft.prefill(draft.encode_image(draft.preprocess(picture)), PROMPT)
        stats = stats or OnlineStats(t_draft=0.001, rtt=0.001, prior_v0=0.005, prior_v1=0.001)
        options = replace(MODE_OPTIONS.get(mode, mode), keep=1.0)
        spec = Speculation(draft, prefilled if state is None else state, AnswerConfig(options=options, max_new_tokens=n),
                           stats, sid=1, vocab=target.vocab_size, ready=lambda: False, edge_offer=offer,
                           prefill_left=prefill_left)
        if prefill_left is not None:  # joining: the draft "prefills" until prefill_left() says 0
            spec.prefill, spec.state = lambda: prefilled, None
        return spec, InProcessEdge(session, target.vocab_size), logits

    def segment(spec: Speculation, edge: InProcessEdge, step):
        """A joining segment: the edge streams step.limit tokens (or to the end), the step that follows."""
        assert isinstance(step, JoinStream) and spec.phase is AnswerPhase.JOINING
        tokens = edge.session.stream()
        next(tokens)
        got = [t for _, t in zip(range(step.limit), tokens, strict=False)]
        session = edge.session
        return spec.streamed(got, None if session.done or session._finished() else 0)

    def opened(spec: Speculation, edge: InProcessEdge, edge_step_s=None, done=False):
        session = edge.session
        return spec.on_opened(wire.Opened(sid=1, token=session.committed[0], done=done or session.done), edge_step_s)

    def finish(spec: Speculation, edge: InProcessEdge, step) -> None:
        if step is STREAM:
            step = spec.streamed(edge.stream(), next_round=None)
        assert step is None and spec.phase is AnswerPhase.DONE
        assert final_answer(spec.committed, draft.eos_token_ids, n) == expected
        taken.update(zip(spec.history, spec.history[1:], strict=False))

    # PREFILLING -> SPECULATING -> DONE: rounds to the end
    spec, edge, logits = new("vanilla_sd")
    spec.start(logits, informed=False, edge_step_s=None)
    finish(spec, edge, drive(edge, spec, opened(spec, edge)))
    # PREFILLING -> DONE: the answer was complete at OPENED
    spec, edge, logits = new("vanilla_sd")
    spec.start(logits, informed=False, edge_step_s=None)
    assert opened(spec, edge, done=True) is None and spec.history == [AnswerPhase.PREFILLING, AnswerPhase.DONE]
    taken.add((AnswerPhase.PREFILLING, AnswerPhase.DONE))
    # PREFILLING -> STREAMING -> DONE: an informed device on an edge that streams far faster than it drafts
    # decides before OPENED (its first window, sent on a guess, is verified first)
    spec, edge, logits = new("covspec", stats=OnlineStats(t_draft=0.001, rtt=0.001, prior_v0=0.005, prior_v1=0.001))
    spec.stats.rounds = 5
    spec.start(logits, informed=True, edge_step_s=1e-6)
    assert spec.hand_to is AnswerPhase.STREAMING
    finish(spec, edge, drive(edge, spec, opened(spec, edge, edge_step_s=1e-6)))
    assert spec.streamed_rest and not spec.edge_drafted
    # SPECULATING -> STREAMING: the target's streaming turns out faster mid-answer
    spec, edge, logits = new("covspec_no_branch")
    spec.start(logits, informed=False, edge_step_s=None)
    step = opened(spec, edge)
    assert spec.phase is AnswerPhase.SPECULATING
    spec.edge_step_s = 1e-6
    step = drive(edge, spec, step)
    assert step is STREAM and spec.phase is AnswerPhase.STREAMING
    finish(spec, edge, step)
    # SPECULATING -> EDGE_DRAFTING -> DONE: an edge that offers to draft, measured far faster, after 3 rounds
    offer = EdgeOffer(offers=True, draft_step_s=1e-7, acceptance=0.99, s_per_token=1e-7)
    spec, edge, logits = new(SpecOptions(placement=True), offer=offer)  # fixed windows, stop-and-wait
    spec.start(logits, informed=False, edge_step_s=None)
    step = drive(edge, spec, opened(spec, edge))
    assert step is STREAM and spec.phase is AnswerPhase.EDGE_DRAFTING and len(spec.rounds) >= 3
    finish(spec, edge, step)
    assert spec.edge_drafted
    # PREFILLING -> EDGE_DRAFTING -> SPECULATING -> ...: handed over at OPEN, given back after 5 tokens
    spec, edge, _ = new("covspec")
    assert spec.start(None, informed=False, edge_step_s=None, hand_over=True) is None
    assert opened(spec, edge) is STREAM and spec.phase is AnswerPhase.EDGE_DRAFTING
    tokens = edge.session.stream()
    next(tokens)  # the first token went out in OPENED
    step = drive(edge, spec, spec.streamed([next(tokens) for _ in range(5)], next_round=0))
    if step is STREAM:
        step = spec.streamed(edge.stream(), next_round=None)
    finish(spec, edge, step)
    # PREFILLING -> EDGE_DRAFTING -> DONE: handed over at OPEN, drafted to the end there
    spec, edge, _ = new("covspec")
    spec.start(None, informed=False, edge_step_s=None, hand_over=True)
    finish(spec, edge, opened(spec, edge))
    # PREFILLING -> JOINING -> SPECULATING -> DONE: OPENED before the draft's prefill; two segments streamed
    # meanwhile, then the device drafts from a round boundary mid-answer
    left = iter([0.05, 0.05, 0.0])
    spec, edge, _ = new("covspec_no_placement", prefill_left=lambda: next(left))
    assert spec.start(None, informed=False, edge_step_s=None) is None
    step = segment(spec, edge, opened(spec, edge, edge_step_s=0.01))
    assert isinstance(step, JoinStream) and step.limit == 5 and not step.draft  # 50 ms left / 10 ms a token
    step = segment(spec, edge, step)
    assert spec.phase is AnswerPhase.SPECULATING and spec.joined_at == 11 and spec.join_segments == 2
    finish(spec, edge, drive(edge, spec, step))
    # JOINING -> DONE: the edge finished the answer while the draft prefilled
    spec, edge, _ = new("covspec", prefill_left=lambda: 10.0)
    spec.start(None, informed=False, edge_step_s=None)
    step = segment(spec, edge, opened(spec, edge, edge_step_s=0.01))
    assert step is None and spec.joined_at is None
    finish(spec, edge, step)
    # JOINING -> EDGE_DRAFTING: ready, the device finds the edge's drafting far faster (it keeps the answer)
    left = iter([0.02, 0.0])
    spec, edge, _ = new(SpecOptions(placement=True), prefill_left=lambda: next(left))
    spec.start(None, informed=False, edge_step_s=None)
    step = opened(spec, edge)
    spec.edge_offer, spec.stats.rounds = offer, 5  # what the edge's segments showed meanwhile
    step = segment(spec, edge, step)
    assert step is STREAM and spec.phase is AnswerPhase.EDGE_DRAFTING
    finish(spec, edge, step)
    # JOINING -> STREAMING: ready, the device finds the target's streaming far faster
    left = iter([0.02, 0.0])
    spec, edge, _ = new("covspec_no_placement", prefill_left=lambda: next(left))
    spec.start(None, informed=False, edge_step_s=None)
    step = opened(spec, edge, edge_step_s=0.01)
    spec.edge_step_s = 1e-6
    step = segment(spec, edge, step)
    assert step is STREAM and spec.phase is AnswerPhase.STREAMING
    finish(spec, edge, step)
    assert taken == {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    with pytest.raises(RuntimeError, match="no transition from DONE to SPECULATING"):
        spec.resume(0)
