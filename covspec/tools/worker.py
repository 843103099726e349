"""The bench's device worker, a process of its own: `python -m covspec.tools.worker SETTINGS.json`.

The bench (and the load bench) write each worker's settings as one JSON file in their output folder
(`WorkerSettings`) and start the worker on it; the worker answers held-out demo prompts in its modes
through the edge and appends one JSON row per request to `rows` (answer ids, time to first token,
latency, decode tokens/s, bytes up/down counted on its socket, rounds, accepted lengths, score).
A load run's workers start together (`go`), may record their messages (`record`) or replay recorded
ones instead of running the draft (`replay_file`, covspec/tools/load.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class WorkerSettings:
    draft: str  # draft checkpoint folder (run on PyTorch unless `bundle`)
    edge: str  # endpoint the worker connects to (the edge, or a link emulator in front of it)
    link: str  # the rows' link label
    modes: tuple[str, ...]  # mode labels (MODE or MODE@K), asked in turn on every prompt
    rows: str  # JSON-lines file the rows are appended to
    prompts: int = 10
    start: int = 0  # index of the first held-out prompt
    question_type: str | None = None  # every scene asked this kind of question (None or "mixed": mixed)
    max_new_tokens: int = 48
    window: int = 4
    keep: float | None = None
    merge: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    device: int = 0  # this worker's number in a load run
    go: str | None = None  # a load run: wait for this file before starting
    record: str | None = None  # a load run's recording pass: append every request's messages here
    replay_file: str | None = None  # a load generator: replay these recorded messages, no draft
    bundle: str | None = None  # the draft as an exported device bundle (covspec export's OUT/device) instead
    backend: str = "executorch"  # what runs the bundle: executorch or onnx
    show_answers: bool = False  # print each answer's text under its row line
    edge_pid: int | None = None  # the edge process on this machine: its CPU time per answer goes in the rows
    hand_over: bool = True  # False: covspec never hands drafting to the edge (a recording of devices on a loaded edge)
    prompts_file: str | None = None  # the user's prompts, checked (covspec/tools/prompts.py), as a JSON list
    key: str | None = None  # this device's CURVE secret key file, for an edge with --auth curve
    edge_key: str | None = None  # the edge's CURVE public key file
    rate: float | None = None  # open loop: this device's requests arrive at this rate (Poisson, per second)
    edge_side: bool = False  # read the edge's counters before and after each answer (its busy and CPU time)
    edge_metrics: str | None = None  # ... from its Prometheus endpoint instead of STATS
    device_profile: str | None = None  # the draft run at this named device's pace (device_runtime/profiles.json)

    @classmethod
    def from_bench(cls, args: argparse.Namespace, **settings) -> WorkerSettings:
        """The sampling, prompt and mode options of a `covspec bench` run, with `settings` on top."""
        shared = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name) and f.name not in ("prompts_file", "rate")}
        merged = {"prompts_file": getattr(args, "checked_prompts", None), **shared, **settings}
        return cls(**{**merged, "modes": tuple(merged["modes"]), "draft": str(merged["draft"])})

    def save(self, path: Path) -> list[str]:
        """Writes the settings to `path`; the command line that starts a worker on them."""
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return [sys.executable, "-m", "covspec.tools.worker", str(path)]

    @classmethod
    def load(cls, path: str | Path) -> WorkerSettings:
        data = json.loads(Path(path).read_text())
        return cls(**{**data, "modes": tuple(data["modes"])})


def mode_options(mode: str, s: WorkerSettings):
    """The mode's mechanisms as the settings change them (pruning; no hand-over of drafting), or None."""
    from dataclasses import replace

    from covspec.modes import MODE_OPTIONS, pruning_options

    options = pruning_options(mode, s.keep, s.merge)
    if not s.hand_over and MODE_OPTIONS.get(mode) is not None and MODE_OPTIONS[mode].placement:
        options = replace(options or MODE_OPTIONS[mode], placement=False)
    return options


@dataclass(frozen=True)
class Item:
    """One prompt a worker asks: a demo held-out item or one of the user's."""

    index: int
    image: bytes  # encoded (PNG, JPEG, ...), as sent to the edge
    question: str
    qtype: str  # the demo's question kind, or "user"
    score: Callable[[str], float | None]  # the answer's task score (None: no reference)


def worker_items(s: WorkerSettings) -> list[Item]:
    """The settings' prompts: `prompts` of them from `start`, the user's (cycling through the file) or
    the demo's held-out ones."""
    if s.prompts_file:
        from covspec.tools.prompts import task_score

        users = json.loads(Path(s.prompts_file).read_text())
        items = []
        for index in range(s.start, s.start + s.prompts):
            p = users[index % len(users)]
            reference = p.get("reference")
            items.append(Item(index, Path(p["image"]).read_bytes(), p["prompt"], "user",
                              (lambda text, r=reference: task_score(text, r)) if reference is not None
                              else (lambda text: None)))
        return items
    from covspec.demo.evaluate import score_answer
    from covspec.demo.task import make_item, sample_split
    from covspec.images import png_bytes

    demo = sample_split("heldout", s.prompts, seed=0, start=s.start)
    if s.question_type and s.question_type != "mixed":  # the same scenes, all asked this kind of question
        demo = (make_item("heldout", i, 0, qtype=s.question_type) for i in range(s.start, s.start + s.prompts))
    return [Item(s.start + i, png_bytes(item.image), item.question, item.qtype,
                 lambda text, item=item: score_answer(item, text)) for i, item in enumerate(demo)]


def edge_reader(s: WorkerSettings):
    """Reads the edge's counters (busy and CPU seconds) when the settings ask for the edge's side."""
    if not s.edge_side:
        return None
    from covspec.tools.edge_probe import EdgeCounters

    return EdgeCounters(s.edge, s.edge_metrics, s.key, s.edge_key)


def run_worker(s: WorkerSettings) -> int:
    from covspec.bundles.backend import load_draft
    from covspec.device_runtime.client import DeviceRuntime
    from covspec.modes import split_label
    from covspec.sampling import SamplingParams
    from covspec.tools.edge_probe import client_keys
    from covspec.tools.procs import process_cpu_s
    from covspec.tools.replay import Arrivals

    if not s.bundle:  # a checkpoint draft runs on torch; a bundle's runtime takes its threads at load, torch-free
        import torch

        torch.set_num_threads(1)
    params = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
    items = worker_items(s)
    draft = load_draft(None if s.bundle else s.draft, s.bundle, s.backend, threads=1)
    if s.device_profile:  # a labelled emulation of that device's pace, named in every row
        from covspec.device_runtime.profiles import Paced, load_profile

        draft = Paced(draft, load_profile(s.device_profile))
    device = DeviceRuntime(draft, s.edge, timeout_s=120.0, keys=client_keys(s.key, s.edge_key))
    counters = edge_reader(s)
    if s.go:  # a load run: start with the other devices
        from covspec.tools.replay import wait_for_go

        wait_for_go(Path(s.go), s.device)
    recorder = None
    if s.record:  # a load run's recording pass: every request's messages, for replaying devices
        from covspec.tools.replay import Recorder

        recorder = Recorder(device.client)
    arrivals = Arrivals(s.rate, seed=s.device)
    out = open(s.rows, "a")
    for item in items:
        reference: list[int] | None = None
        for label in s.modes:
            mode, k = split_label(label)  # "vanilla_sd@8": a fixed window of 8
            window = k or s.window
            arrival = arrivals.wait()
            before = None if counters is None else counters.read()
            t_start = time.time()
            if recorder is not None:
                recorder.start()
            cpu0 = None if s.edge_pid is None else process_cpu_s(s.edge_pid)
            answer = device.answer(item.image, item.question, mode, params, s.max_new_tokens, window=window,
                                   options=mode_options(mode, s))
            cpu1 = None if cpu0 is None else process_cpu_s(s.edge_pid)
            t_end = time.time()
            after = None if counters is None else counters.read()
            if recorder is not None:
                recorder.save(Path(s.record), item.index, label, len(answer.ids))
            if mode == "target_only":
                reference = answer.ids
            n = max(len(answer.ids), 1)
            edge_ms = {} if before is None else {name: 1000 * (after[k] - before[k]) for name, k in
                                                 (("edge_busy_ms", "busy_s"), ("edge_cpu_ms", "cpu_s"))
                                                 if k in before and k in after}
            row = {"link": s.link, "mode": label, "index": item.index, "qtype": item.qtype,
                   "tokens": len(answer.ids), "ttft_s": answer.ttft_s, "latency_s": answer.latency_s,
                   "per_token_s": answer.latency_s / n, "queue_s": t_start - arrival,
                   "response_s": t_end - arrival,
                   "decode_tps": answer.decode_tokens_per_s, "bytes_up": answer.bytes_up,
                   "bytes_down": answer.bytes_down, "up_per_token": answer.bytes_up / n,
                   "down_per_token": answer.bytes_down / n, "decode_up_per_token": answer.decode_bytes_up / n,
                   "rounds": len(answer.rounds), "kept": answer.kept, "streamed_rest": answer.streamed_rest,
                   "edge_drafted": answer.edge_drafted or mode == "edge_sd",
                   "device_profile": s.device_profile,
                   "joined_at": None if answer.joined is None else answer.joined.at_token,
                   "device_prefill_s": None if answer.joined is None else answer.joined.prefill_s,
                   "join_segments": None if answer.joined is None else answer.joined.segments,
                   "edge_cpu_ms": None if cpu1 is None else 1000 * (cpu1 - cpu0),
                   "branch_hits": _rate([r.branch_hit for r in answer.rounds if r.branch_hit is not None]),
                   "mean_accepted": answer.mean_accepted, "acceptance": answer.acceptance_rate,
                   "score": item.score(answer.text),
                   "matches_target": None if reference is None or mode == "draft_only" else answer.ids == reference,
                   "accepted_per_round": [r.accepted for r in answer.rounds],
                   "ahead_rounds": sum(r.ahead for r in answer.rounds),
                   "rejected_rounds": sum(r.accepted < r.drafted for r in answer.rounds), "ids": answer.ids,
                   "device": s.device, "t_start": t_start, "t_end": t_end,
                   **edge_ms}  # the edge's own busy and CPU counts (STATS or --metrics), when read
            if s.show_answers:
                row["text"] = answer.text
            out.write(json.dumps(row) + "\n")
            out.flush()
            same = {None: "", True: "  same as target", False: "  DIFFERS from target"}[row["matches_target"]]
            print(f"[{s.link}] #{item.index} {label:20s} {len(answer.ids):3d} tokens "
                  f"{answer.latency_s * 1000:7.0f} ms  up {row['up_per_token']:8.0f} B/token{same}", flush=True)
            if s.show_answers:
                print(f"    {answer.text}", flush=True)
    out.close()
    device.close()
    return 0


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m covspec.tools.worker SETTINGS.json (written by covspec bench)", file=sys.stderr)
        return 2
    from covspec import logs

    logs.setup()
    settings = WorkerSettings.load(argv[0])
    if settings.replay_file:
        from covspec.tools.replay import run_replay_worker

        return run_replay_worker(settings)
    return run_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
