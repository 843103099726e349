"""`covspec device run`: answers an image + question with the draft on the device and the target on
the edge, in one of the modes:

    target_only  the edge generates and streams (the device only tokenizes and shows)
    draft_only   the device alone
    vanilla_sd   fixed window k, stop-and-wait; sampling uploads the draft's full distribution
                 of every drafted token (the conventional scheme)

Every request goes through `transport.channel.Client`, which counts the bytes of every frame sent
and received on the socket: those are the bytes per token the bench reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from covspec.drafter import Drafter
from covspec.generation import generate
from covspec.images import load_image
from covspec.models.base import VLMAdapter
from covspec.sampling import SamplingParams
from covspec.speculative import correct_decoupled
from covspec.transport import protocol as wire
from covspec.transport.channel import Client

MODES = ("target_only", "draft_only", "vanilla_sd")


class EdgeRefused(Exception):
    """The edge answered with something other than what the protocol promises."""


@dataclass
class RoundRecord:
    drafted: int
    accepted: int
    draft_s: float
    wait_s: float  # from sending VERIFY to its RESULT (round trip + edge verify)
    verify_s: float  # the edge's own verify time


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

    def __init__(self, draft: VLMAdapter, edge: str, timeout_s: float = 30.0, retries: int = 2):
        self.draft = draft
        self.client = Client(edge, timeout_s=timeout_s, retries=retries)
        self.welcome = self._hello()

    def _hello(self) -> wire.Welcome:
        reply = self.client.request(wire.Hello(fingerprint=self.draft.fingerprint(), family=self.draft.family,
                                               model=str(self.draft.path or "draft")))
        return self._expect(reply, wire.Welcome)

    @staticmethod
    def _expect(reply: wire.Message, kind: type) -> wire.Message:
        if not isinstance(reply, kind):
            raise EdgeRefused(f"expected {kind.TYPE}, the edge sent {reply.TYPE}")
        return reply

    def close(self) -> None:
        self.client.close()

    # --- one request ---------------------------------------------------------------------------
    def answer(self, image_bytes: bytes, prompt: str, mode: str, params: SamplingParams,
               max_new_tokens: int = 64, window: int = 4) -> Answer:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (modes: {', '.join(MODES)})")
        prompt = self.draft.check_prompt(prompt)
        up0, down0 = self.client.counters.bytes_sent, self.client.counters.bytes_recv
        start = time.perf_counter()
        if mode == "draft_only":
            answer = self._draft_only(image_bytes, prompt, params, max_new_tokens, start)
        else:
            sid = int.from_bytes(np.random.default_rng().bytes(7), "little") or 1
            opened = self._open(sid, image_bytes, prompt, mode, params, max_new_tokens)
            if mode == "target_only":
                answer = self._target_only(sid, opened, max_new_tokens, start)
            else:
                answer = self._speculative(sid, opened, image_bytes, prompt, params, max_new_tokens, window, start)
            self.client.request(wire.Close(sid=sid))
        answer.bytes_up = self.client.counters.bytes_sent - up0
        answer.bytes_down = self.client.counters.bytes_recv - down0
        return answer

    def _open(self, sid: int, image_bytes: bytes, prompt: str, mode: str, params: SamplingParams,
              max_new_tokens: int) -> wire.Opened:
        reply = self.client.request(wire.Open(
            sid=sid, image=image_bytes, prompt=prompt, mode=mode, temperature=params.temperature,
            top_k=params.top_k, top_p=params.top_p, seed=params.seed, max_new_tokens=max_new_tokens))
        return self._expect(reply, wire.Opened)

    def _draft_only(self, image_bytes: bytes, prompt: str, params: SamplingParams, max_new_tokens: int,
                    start: float) -> Answer:
        first: list[float] = []
        result = generate(self.draft, load_image(image_bytes), prompt, params, max_new_tokens,
                          on_token=lambda _: first.append(time.perf_counter()) if not first else None)
        end = time.perf_counter()
        return Answer("draft_only", result.ids, result.text, ttft_s=(first[0] if first else end) - start,
                      latency_s=end - start)

    def _target_only(self, sid: int, opened: wire.Opened, max_new_tokens: int, start: float) -> Answer:
        ttft = time.perf_counter() - start
        tokens = [opened.token]
        if not opened.done:
            sent = self.client.send(wire.Stream(sid=sid, chunk=1))
            while True:
                chunk = self.client.recv(sent.seq)
                if chunk is None:
                    raise EdgeRefused(f"the edge stopped streaming (no chunk within {self.client.timeout_s} s)")
                chunk = self._expect(chunk, wire.Streamed)
                tokens.extend(int(t) for t in chunk.tokens)
                if chunk.done:
                    break
        ids = final_answer(tokens, self.draft.eos_token_ids, max_new_tokens)
        return Answer("target_only", ids, self.draft.decode(ids), ttft_s=ttft,
                      latency_s=time.perf_counter() - start)

    @torch.inference_mode()
    def _speculative(self, sid: int, opened: wire.Opened, image_bytes: bytes, prompt: str,
                     params: SamplingParams, max_new_tokens: int, window: int, start: float) -> Answer:
        ttft = time.perf_counter() - start
        visual = self.draft.encode_image(self.draft.preprocess(load_image(image_bytes)))
        _, state = self.draft.prefill(visual, prompt)
        generator = None if params.greedy else params.generator()
        drafter = Drafter(self.draft, state, opened.token, params, generator)
        eos = self.draft.eos_token_ids
        vocab = self.welcome.vocab_size
        rounds: list[RoundRecord] = []
        done = opened.done
        while not done:
            room = max_new_tokens - len(drafter.committed)
            drafted = drafter.draft(min(window, room))
            dists = None
            if not params.greedy:  # the conventional upload: every drafted token's full q
                dists = pad_vocab(drafted.q, vocab).numpy().astype(np.float32)
            t0 = time.perf_counter()
            reply = self._expect(self.client.request(wire.Verify(
                sid=sid, round=len(rounds), tokens=drafted.ids.numpy().astype(np.int32), dists=dists)), wire.Result)
            wait_s = time.perf_counter() - t0
            next_token = reply.token
            if next_token is None and reply.cand_ids is not None:  # decoupled correction, drawn here
                q = pad_vocab(drafted.q[reply.accepted], vocab)
                next_token = correct_decoupled(torch.from_numpy(reply.cand_ids), torch.from_numpy(reply.cand_probs),
                                               q, generator)
            drafter.commit(drafted, reply.accepted, next_token)
            rounds.append(RoundRecord(len(drafted.ids), reply.accepted, sum(drafted.step_s), wait_s,
                                      reply.timings.get("verify_s", float("nan"))))
            done = reply.done or drafter.committed[-1] in eos or len(drafter.committed) >= max_new_tokens
        ids = final_answer(drafter.committed, eos, max_new_tokens)
        return Answer("vanilla_sd", ids, self.draft.decode(ids), ttft_s=ttft,
                      latency_s=time.perf_counter() - start, rounds=rounds)


def pad_vocab(q: torch.Tensor, width: int) -> torch.Tensor:
    """q [..., V_draft] zero-padded (or cut) to the target's vocabulary width."""
    v = q.shape[-1]
    if v == width:
        return q
    if v > width:
        return q[..., :width]
    return torch.nn.functional.pad(q, (0, width - v))
