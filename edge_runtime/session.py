"""One device's request on the edge: the target's decode state and the verification of windows.

Invariant: the target's cache holds the prompt plus `committed[:fed]`. The last committed token
(the window's root) is not in the cache yet; each VERIFY feeds [root, x_1..x_k] in one pass, so
the target's logits [k+1, V] score every drafted token and the token after them.

A repeated VERIFY of a round already answered returns the stored answer (retries are safe).

Windows in flight: a device may send the next window before the RESULT of the one before it, drafted
on the assumption that the edge accepts that window whole and picks the token the device guessed
(the window's root). Such a window names where it starts (`pos`, the answer index of its first
drafted token); it is verified only when the answer is exactly there with that root, and otherwise
dropped (`WindowDropped`) with the session left as it was, so the answer is unchanged either way.

When the edge batched the window with other sessions' (edge_runtime.batching), verify gets the
target's logits precomputed and extends the cache by the kept positions only; the rules are the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from covspec.edge_runtime.batching import WindowPass, commit
from covspec.edge_runtime.counters import SessionUsage
from covspec.errors import CovspecError
from covspec.models.base import DecodeState, VLMAdapter
from covspec.modes import VerifyScheme
from covspec.sampling import SamplingParams
from covspec.sampling_torch import next_token
from covspec.speculative import Verdict, verify_decoupled, verify_full, verify_greedy


class SessionError(CovspecError):
    """A request that does not fit the session's state (wrong round, wrong root, finished)."""


class WindowDropped(SessionError):
    """A window sent ahead (`pos` given) whose assumption the answer did not meet: not verified."""


@dataclass
class RoundAnswer:
    round: int
    verdict: Verdict
    done: bool
    verify_s: float


@dataclass
class TargetSession:
    adapter: VLMAdapter
    state: DecodeState
    params: SamplingParams
    max_new_tokens: int
    generator: torch.Generator | None
    committed: list[int] = field(default_factory=list)  # the answer so far (root last, when known)
    root_known: bool = True  # False after a decoupled rejection: the device supplies the root
    fed: int = 0
    prompt_length: int = 0
    last: RoundAnswer | None = None
    done: bool = False
    last_active: float = field(default_factory=time.monotonic)
    first_at: float = field(default_factory=time.monotonic)  # when its first token was picked (the answer's pace starts)
    open_seq: int = -1  # the OPEN request that made this session (a retried OPEN gets `opened` again)
    opened: object = None
    usage: SessionUsage | None = None  # what the session cost, for the edge's request log
    stream_seqs: set[int] = field(default_factory=set)  # STREAM requests served (a repeat is a duplicate)
    edge_draft: object = None  # the edge's own draft for this session (edge_runtime.drafting.EdgeDraft), if any

    @classmethod
    def open(cls, adapter: VLMAdapter, visual, prompt: str, kept: torch.Tensor | None,
             params: SamplingParams, max_new_tokens: int, prefix: list[int] | None = None,
             prefilled: tuple[torch.Tensor, DecodeState] | None = None) -> TargetSession:
        """Prefills the prompt and picks the first token. With a `prefix` (the answer so far, as the
        device holds it after an edge restart) the prompt and the prefix are prefilled instead and
        the session continues from there: its root is the prefix's last token. `prefilled`: the
        prompt's (last logits [V], state) when a batched pass already prefilled it."""
        logits, state = prefilled if prefilled is not None else adapter.prefill(visual, prompt, kept=kept)
        generator = None if params.greedy else params.generator()
        session = cls(adapter=adapter, state=state, params=params, max_new_tokens=max_new_tokens,
                      generator=generator, prompt_length=state.length)
        if prefix:
            if len(prefix) > 1:  # the root (last token) stays out of the cache, as after any round
                adapter.forward(state, torch.tensor(prefix[:-1], dtype=torch.long))
            session.fed = len(prefix) - 1
            session.committed.extend(prefix)
            session.done = session._finished()
            return session
        first = next_token(logits, params, generator)
        session.committed.append(first)
        session.done = first in adapter.eos_token_ids or max_new_tokens <= 1
        return session

    def _finished(self) -> bool:
        if self.root_known and self.committed[-1] in self.adapter.eos_token_ids:
            return True
        return len(self.committed) >= self.max_new_tokens

    def is_repeat(self, round_no: int) -> bool:
        """Whether `round_no` is the round just answered (a retry: its answer is sent again)."""
        return self.last is not None and round_no == self.last.round

    def round_problem(self, round_no: int, root: int, pos: int | None = None) -> str | None:
        """What keeps a new round `round_no` after `root` from fitting the state, or None when it fits.
        `pos`: the answer index of a window sent ahead's first token. Changes nothing."""
        expected = 0 if self.last is None else self.last.round + 1
        start = len(self.committed) + (0 if self.root_known else 1)  # where the window's first token goes
        if round_no != expected:
            return f"round {round_no} out of order: expected {expected}"
        if self.done:
            return "the answer is already complete"
        if pos is not None and pos != start:
            return f"window sent ahead for answer position {pos}, the answer goes on at {start}"
        if self.root_known and root != self.committed[-1]:
            return f"root token {root} differs from the committed token {self.committed[-1]}"
        return None

    def _check_round(self, round_no: int, root: int, pos: int | None = None) -> None:
        """Raises SessionError when a new round does not fit the state (`round_problem`);
        WindowDropped instead for a window sent ahead."""
        problem = self.round_problem(round_no, root, pos)
        if problem is not None:
            raise WindowDropped(problem) if pos is not None else SessionError(problem)

    def _room(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """The drafted tokens that could still be emitted: never verify past the token limit."""
        room = self.max_new_tokens - len(self.committed) - (0 if self.root_known else 1)
        return draft_ids[:max(room, 0)]

    def feed_ids(self, root: int, draft_ids: torch.Tensor) -> torch.Tensor:
        """The ids [k+1] a fitting new round after `root` feeds the target: the root and the drafted
        tokens [k] that could still be emitted. Changes nothing."""
        return torch.cat([torch.tensor([root]), self._room(draft_ids).long()])

    def _matches(self, window: WindowPass | None, ids: torch.Tensor) -> bool:
        """Whether a batched `window` was computed for exactly these ids [k+1] on exactly this state."""
        return window is not None and window.length == self.state.length and torch.equal(window.ids, ids)

    @torch.inference_mode()
    def verify(self, round_no: int, root: int, draft_ids: torch.Tensor, scheme: VerifyScheme,
               q_of_draft: torch.Tensor | None = None, q_full: torch.Tensor | None = None,
               window: WindowPass | None = None, pos: int | None = None) -> RoundAnswer:
        """Verifies a window drafted after `root`. scheme: greedy | full | decoupled. `window`: the
        target's pass over this very window, computed beforehand in a batch with other sessions
        (edge_runtime.batching); without it (or when it does not match) the session runs its own.
        `pos`: given for a window sent ahead, which is dropped (WindowDropped) unless it fits."""
        self.last_active = time.monotonic()
        if self.is_repeat(round_no):
            assert self.last is not None
            return self.last  # a retry of the round just answered
        self._check_round(round_no, root, pos)
        if not self.root_known:  # the device drew the correction itself
            self.committed.append(root)
            self.root_known = True
        draft_ids = self._room(draft_ids)
        k = int(draft_ids.shape[0])

        start = time.perf_counter()
        fed_before = self.fed
        ids = torch.cat([torch.tensor([root]), draft_ids.long()])  # [k+1]
        batched = window is not None and self._matches(window, ids)
        logits = window.logits if batched and window is not None else self.adapter.forward(self.state, ids)  # [k+1, V]
        if scheme == VerifyScheme.GREEDY:
            verdict = verify_greedy(draft_ids, logits)
        elif scheme == VerifyScheme.FULL:
            assert q_full is not None  # planning.check_message: the full scheme comes with VERIFY.dists
            verdict = verify_full(draft_ids, q_full[:k], logits, self.params, self.generator)
        elif scheme == VerifyScheme.DECOUPLED:
            assert q_of_draft is not None  # the decoupled scheme comes with VERIFY.q
            verdict = verify_decoupled(draft_ids, q_of_draft[:k], logits, self.params, self.generator)
        else:
            raise SessionError(f"unknown verification scheme {scheme!r}")
        # keep the root and the accepted drafts in the cache; drop the rejected tail
        self.fed = fed_before + 1 + verdict.accepted
        if batched and window is not None:  # the batched pass left the cache as it was: add what is kept
            commit(self.state, window, 1 + verdict.accepted)
        else:
            self.adapter.truncate(self.state, self.prompt_length + self.fed)
        self.committed.extend(int(t) for t in draft_ids[:verdict.accepted])
        if self.committed[-1] in self.adapter.eos_token_ids:  # an accepted draft ended the answer
            verdict.next_token = None
        elif verdict.next_token is None:
            self.root_known = False
        else:
            self.committed.append(verdict.next_token)
        self.done = self._finished()
        shared_s = window.pass_s if batched and window is not None else 0.0  # the batched pass ran before `start`
        self.last = RoundAnswer(round=round_no, verdict=verdict, done=self.done,
                                verify_s=time.perf_counter() - start + shared_s)
        return self.last

    @torch.inference_mode()
    def stream(self):
        """Target-only decoding: yields each committed token as it is produced (the first included)."""
        yield self.committed[-1]
        while not self._finished():
            logits = self.adapter.forward(self.state, torch.tensor([self.committed[-1]]))[-1]
            self.fed += 1
            self.committed.append(next_token(logits, self.params, self.generator))
            yield self.committed[-1]
        self.done = True
