"""The device's candidate generator: a draft model's decode state and the committed answer so far.

`Drafter` keeps the draft's KV cache in step with the tokens both sides have agreed on. It drafts
a window of tokens autoregressively (recording the draft's distribution q at each position, which
sampling verification needs, and its top-1 minus top-2 margin, which the margin gate and branch
planning read) and, once the edge has answered, commits the accepted prefix plus the edge's next
token and rolls its cache back past the rejected tail.

Invariant: the cache holds the prompt plus `committed[:fed]`; tokens in `committed[fed:]` are not
in the cache yet and are fed in one pass at the start of the next window.

Parallel branching forks a Drafter (`fork`): a copy whose committed answer assumes an outcome of
the window in flight (all of it accepted, or a rejection at position i corrected to the draft's
runner-up there) and drafts the next window from it while the edge verifies. When the edge's answer
matches a branch's assumption, the device adopts the branch (`adopt`) and its window is sent at once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from covspec.models.common import DecodeState
from covspec.models.draft import DraftModel, as_draft
from covspec.sampling import SamplingParams, probabilities, sample, softmax


@dataclass
class Window:
    ids: np.ndarray  # [k] int64 drafted token ids
    q: np.ndarray | None  # [k, V] float32 the draft's sampling distribution at each drafted position (sampling only)
    margins: np.ndarray  # [k] float32 top-1 minus top-2 probability of the draft at each position
    runner_up: np.ndarray  # [k] int64 the draft's most likely token other than the drafted one
    step_s: list[float]  # time of each draft forward

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def q_of_drafted(self) -> np.ndarray:
        """q(x_i) [k]: the probability the draft gave each drafted token (the decoupled upload)."""
        return self.q[np.arange(len(self)), self.ids]

    def tail(self, start: int) -> Window:
        """The window without its first `start` tokens."""
        return Window(self.ids[start:], None if self.q is None else self.q[start:], self.margins[start:],
                      self.runner_up[start:], self.step_s[start:])




def runner_up_token(top2: np.ndarray, token: int) -> int:
    """top2 [2] the draft's two most likely token ids at a position -> the most likely one other than
    the drafted `token` (the root of a rejection branch there)."""
    return int(top2[1] if token == int(top2[0]) else top2[0])


class Drafter:
    def __init__(self, adapter: DraftModel, state: DecodeState, first_token: int,
                 params: SamplingParams, rng: np.random.Generator | None):
        self.adapter = as_draft(adapter)  # numpy in and out
        self.state = state
        self.prompt_length = state.length
        self.committed: list[int] = [first_token]
        self.fed = 0
        self.params = params
        self.rng = rng

    def draft(self, k: int, stop: Callable[[Window], bool] | None = None) -> Window:
        """Drafts up to k tokens after the committed ones; `stop(window so far, without q)` ends it early
        (the margin gate, or a reply that arrived while drafting a branch)."""
        ids: list[int] = []
        q_rows: list[np.ndarray] = []
        margins: list[float] = []
        runner_up: list[int] = []
        step_s: list[float] = []
        eos = self.adapter.eos_token_ids

        def window(with_q: bool) -> Window:  # q [k, V] stacked once, for the window returned
            return Window(np.asarray(ids, dtype=np.int64), np.stack(q_rows) if with_q and q_rows else None,
                          np.asarray(margins, dtype=np.float32), np.asarray(runner_up, dtype=np.int64), step_s)

        for i in range(k):
            t0 = time.perf_counter()
            if i == 0:  # feed the committed tokens not yet in the cache, in one pass
                feed = np.asarray(self.committed[self.fed:], dtype=np.int64)
                self.fed = len(self.committed)
            else:
                feed = np.asarray(ids[-1:], dtype=np.int64)
            logits = self.adapter.forward(self.state, feed)[-1]  # [V]
            p = softmax(logits)
            top2 = np.argpartition(p, p.size - 2)[-2:]  # [2] the two most likely ids
            top2 = top2[np.argsort(-p[top2], kind="stable")]  # largest first
            if self.params.greedy:
                token = int(np.argmax(logits))
            else:
                q = probabilities(logits, self.params)  # [V]
                q_rows.append(q)
                token = sample(q, self.rng)
            ids.append(token)
            margins.append(float(p[top2[0]] - p[top2[1]]))
            runner_up.append(runner_up_token(top2, token))
            step_s.append(time.perf_counter() - t0)
            if token in eos or (stop is not None and stop(window(with_q=False))):  # nothing follows an end
                break
        return window(with_q=True)

    def commit(self, window: Window, accepted: int, next_token_id: int | None) -> None:
        """Keeps the first `accepted` drafted tokens and the edge's next token (None when an accepted
        token ended the answer); rolls the cache back so it holds the committed tokens that were fed
        (the last drafted token is never fed)."""
        fed_drafts = len(window) - 1  # the window's last token was sampled, not fed
        self.committed.extend(int(t) for t in window.ids[:accepted])
        self.fed += min(accepted, fed_drafts)
        self.adapter.truncate(self.state, self.prompt_length + self.fed)
        if next_token_id is not None:
            self.committed.append(next_token_id)

    def restart(self, first_token: int) -> None:
        """Back to the prompt alone, the answer starting at `first_token` (a first window drafted on a
        guess of the target's first token that the edge did not confirm)."""
        self.adapter.truncate(self.state, self.prompt_length)
        self.committed, self.fed = [first_token], 0

    def cut(self, window: Window, k: int) -> Window:
        """A window drafted past the limit (a branch's): keeps its first k tokens and rolls the cache
        back past the rest (the k-th token, like any window's last, is not fed)."""
        self.adapter.truncate(self.state, self.prompt_length + self.fed + k - 1)
        return Window(window.ids[:k], None if window.q is None else window.q[:k], window.margins[:k],
                      window.runner_up[:k], window.step_s[:k])

    # --- parallel branching ----------------------------------------------------------------------
    def fork(self, window: Window, accepted: int, root: int | None) -> Drafter:
        """A copy that assumes the edge accepts `accepted` tokens of `window` and then gives `root`
        (None: the window accepted whole, the root left to the branch's own first drafted token)."""
        branch = copy.copy(self)
        branch.state = self.adapter.fork_state(self.state)
        branch.committed = list(self.committed)
        branch.commit(window, accepted, root)
        return branch

    def adopt(self, branch: Drafter, window: Window, root: int | None) -> Window:
        """Takes over a branch (forked with `root`, then drafted `window`) whose assumption the edge's
        answer confirmed; returns what of its window is still to be verified. For the all-accepted
        branch (root None) the window's first token was the edge's bonus token: committed here (and
        fed, when the branch drafted past it)."""
        self.state, self.committed, self.fed = branch.state, branch.committed, branch.fed
        if root is not None:
            return window
        self.committed.append(int(window.ids[0]))
        if len(window) > 1:
            self.fed += 1  # the bonus token was fed to draft the rest
        return window.tail(1)
