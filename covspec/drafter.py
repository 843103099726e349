"""The device's candidate generator: a draft model's decode state and the committed answer so far.

`Drafter` keeps the draft's KV cache in step with the tokens both sides have agreed on. It drafts
a window of tokens autoregressively (recording the draft's distribution q at each position, which
sampling verification needs) and, once the edge has answered, commits the accepted prefix plus the
edge's next token and rolls its cache back past the rejected tail.

Invariant: the cache holds the prompt plus `committed[:fed]`; tokens in `committed[fed:]` are not
in the cache yet and are fed in one pass at the start of the next window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from covspec.models.base import DecodeState, VLMAdapter
from covspec.sampling import SamplingParams, next_token, probabilities


@dataclass
class Window:
    ids: torch.Tensor  # [k] drafted token ids
    q: torch.Tensor | None  # [k, V] the draft's sampling distribution at each drafted position (sampling only)
    margins: torch.Tensor  # [k] top-1 minus top-2 probability of the draft at each position
    step_s: list[float]  # time of each draft forward


class Drafter:
    def __init__(self, adapter: VLMAdapter, state: DecodeState, first_token: int,
                 params: SamplingParams, generator: torch.Generator | None):
        self.adapter = adapter
        self.state = state
        self.prompt_length = state.length
        self.committed: list[int] = [first_token]
        self.fed = 0
        self.params = params
        self.generator = generator

    def _feed_pending(self) -> torch.Tensor:
        """Feeds committed tokens not yet in the cache; returns the logits [V] after the last."""
        pending = torch.tensor(self.committed[self.fed:])
        logits = self.adapter.forward(self.state, pending)[-1]
        self.fed = len(self.committed)
        return logits

    @torch.inference_mode()
    def draft(self, k: int) -> Window:
        """Drafts k tokens after the committed ones."""
        ids: list[int] = []
        q_rows: list[torch.Tensor] = []
        margins: list[float] = []
        step_s: list[float] = []
        t0 = time.perf_counter()
        logits = self._feed_pending()
        for i in range(k):
            if i > 0:
                t0 = time.perf_counter()
                logits = self.adapter.forward(self.state, torch.tensor([ids[-1]]))[-1]
            probs = logits.float().softmax(-1)
            top2 = torch.topk(probs, 2).values
            margins.append(float(top2[0] - top2[1]))
            if self.params.greedy:
                token = next_token(logits, self.params, None)
            else:
                q = probabilities(logits, self.params)
                q_rows.append(q)
                token = int(torch.multinomial(q, 1, generator=self.generator).item())
            ids.append(token)
            step_s.append(time.perf_counter() - t0)
            if token in self.adapter.eos_token_ids:  # nothing follows an end of answer
                break
        return Window(ids=torch.tensor(ids), q=torch.stack(q_rows) if q_rows else None,
                      margins=torch.tensor(margins), step_s=step_s)

    def commit(self, window: Window, accepted: int, next_token_id: int | None) -> None:
        """Keeps the first `accepted` drafted tokens and the edge's next token (None when an accepted
        token ended the answer); rolls the cache back so it holds the committed tokens that were fed
        (the last drafted token is never fed)."""
        fed_drafts = len(window.ids) - 1  # the window's last token was sampled, not fed
        keep_fed = min(accepted, fed_drafts)
        self.committed.extend(int(t) for t in window.ids[:accepted])
        self.fed += keep_fed
        self.adapter.truncate(self.state, self.prompt_length + self.fed)
        if next_token_id is not None:
            self.committed.append(next_token_id)

    @property
    def answer(self) -> list[int]:
        return self.committed
