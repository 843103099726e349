"""A gathered round's batched target passes, run before its requests are handled one by one.

The first VERIFY of each session among the gathered requests that will feed the target
(`planning.plan_verify` says VERIFY) is scored in one packed pass, and the first OPENs that start a
session are prefilled in another (edge_runtime.batching). Each result is keyed by session id, for
the handler of the request it was made for. A pass that cannot run, or fails, leaves nothing: the
sessions are untouched and their requests run on their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import cast

import torch

from covspec.edge_runtime.batching import WindowPass, can_batch, can_prefill_batch, prefill_batch, run_batch
from covspec.edge_runtime.context import Incoming, Prefilled, Prepared
from covspec.edge_runtime.costs import EdgeCosts
from covspec.edge_runtime.counters import EdgeCounters
from covspec.edge_runtime.planning import Outcome, plan_verify
from covspec.edge_runtime.static_target import StaticTarget
from covspec.edge_runtime.table import SessionTable
from covspec.edge_runtime.visual import encode, kept_indices
from covspec.models.base import CachedDecoderAdapter, PrefillInputs, VisualTokens, VLMAdapter
from covspec.transport import protocol as wire

log = logging.getLogger("covspec.edge")


def first_requests(gathered: list[Incoming]) -> list[Incoming]:
    """The gathered requests that are their session's first among them (each session's requests
    are handled in order, so only its first can be computed ahead)."""
    seen: set[int] = set()
    first = []
    for incoming in gathered:
        if incoming.msg is not None and incoming.msg.sid not in seen:
            seen.add(incoming.msg.sid)
            first.append(incoming)
    return first


def planned_windows(gathered: list[Incoming], table: SessionTable, vocab: int) -> dict[int, torch.Tensor]:
    """sid -> the ids [k+1] of its VERIFY, for the gathered VERIFYs that are their session's first
    request here and that the handler will verify."""
    planned: dict[int, torch.Tensor] = {}
    for incoming in first_requests(gathered):
        msg = incoming.msg
        if not isinstance(msg, wire.Verify):
            continue
        session = table.find(msg.sid, incoming.request.device)
        if session is None:
            continue
        try:
            plan = plan_verify(session, msg, vocab)
        except wire.ProtocolError:  # answered by the handler
            continue
        if plan.outcome is Outcome.VERIFY:
            planned[msg.sid] = plan.ids
    return planned


@dataclass
class Prepass:
    """Runs a round's batched passes for the edge (`run`), counting them in `counters`."""

    adapter: VLMAdapter
    counters: EdgeCounters
    costs: EdgeCosts  # observes each pass (what the scheduler predicts the next ones with)
    max_image_pixels: int
    batching_refused: bool = False  # batching was found impossible (logged once)
    prefills_batch: bool = field(init=False)  # whether OPEN prefills can share a pass

    def __post_init__(self) -> None:
        adapter = self.adapter
        self.prefills_batch = can_prefill_batch(adapter.inner if isinstance(adapter, StaticTarget) else adapter)

    def run(self, gathered: list[Incoming], table: SessionTable) -> Prepared:
        windows = self.windows(gathered, table)
        return Prepared(windows=windows, prefills=self.prefills(gathered, table))

    def windows(self, gathered: list[Incoming], table: SessionTable) -> dict[int, WindowPass]:
        """One target pass over the planned windows of the gathered VERIFYs: sid -> window. Empty when
        fewer than two windows can share a pass, or when the pass fails."""
        try:
            planned = planned_windows(gathered, table, self.adapter.vocab_size)
            if len(planned) < 2:
                return {}
            states = [table.sessions[sid].state for sid in planned]
            if isinstance(self.adapter, StaticTarget):  # one bucketed pass on the static cache
                windows = self.adapter.run_batch(states, list(planned.values()))
            elif not can_batch(self.adapter, states):
                if not self.batching_refused:
                    log.info("batched verification: not possible for this target's caches; each session verifies on its own")
                self.batching_refused = True
                return {}
            else:
                windows = run_batch(self.adapter, states, list(planned.values()))
        except Exception:
            log.exception("batched verification failed; the windows are verified one by one")
            return {}
        log.debug("batched %d windows (%d tokens) in %.1f ms", len(windows), sum(w.size for w in windows),
                  windows[0].pass_s * 1000)
        self.costs.observe_pass(sum(w.size for w in windows), windows[0].pass_s)
        self.counters.batches += 1
        self.counters.batched_windows += len(windows)
        self.counters.batch_max = max(self.counters.batch_max, len(windows))
        return dict(zip(planned, windows, strict=True))

    def _prepared_opens(self, gathered: list[Incoming],
                        table: SessionTable) -> dict[int, tuple[int, VisualTokens, PrefillInputs]]:
        """sid -> (seq, visual tokens, prefill inputs) for the gathered OPENs that start a session
        (retried OPENs and ones refused for their image or prompt are left to the handler)."""
        opens = [i.msg for i in first_requests(gathered) if isinstance(i.msg, wire.Open) and i.msg.sid
                 and not (i.msg.sid in table.sessions and table.sessions[i.msg.sid].open_seq == i.msg.seq)]
        adapter = self.adapter
        if len(opens) < 2 or not self.prefills_batch or not isinstance(adapter, CachedDecoderAdapter | StaticTarget):
            return {}
        prepared = {}
        for msg in opens:
            try:
                visual = encode(self.adapter, msg, self.max_image_pixels)
                with torch.inference_mode():
                    prepared[msg.sid] = (msg.seq, visual, adapter.prefill_inputs(visual, msg.prompt, kept_indices(msg)))
            except Exception:  # refused by the handler, which says why
                continue
        return prepared

    def prefills(self, gathered: list[Incoming], table: SessionTable) -> dict[int, Prefilled]:
        """One target pass over the prompts of the gathered OPENs that start a session: sid -> its
        prefill. Empty when fewer than two can share a pass, or when the pass fails."""
        prepared = self._prepared_opens(gathered, table)
        if len(prepared) < 2:
            return {}
        start = time.perf_counter()
        try:
            batch = [inputs for _, _, inputs in prepared.values()]
            adapter = self.adapter  # a StaticTarget's states then go into their slots
            results = (adapter.prefill_batch(batch) if isinstance(adapter, StaticTarget)
                       else prefill_batch(cast(CachedDecoderAdapter, adapter), batch))
        except Exception:
            log.exception("batched prefill failed; the sessions are prefilled one by one")
            return {}
        pass_s = time.perf_counter() - start
        log.debug("prefilled %d prompts in one pass of %.1f ms", len(results), pass_s * 1000)
        self.costs.observe_prefill(len(results), pass_s)
        self.counters.prefill_batches += 1
        self.counters.batched_prefills += len(results)
        return {sid: Prefilled(seq, visual, logits, state, pass_s)
                for (sid, (seq, visual, _)), (logits, state) in zip(prepared.items(), results, strict=True)}
