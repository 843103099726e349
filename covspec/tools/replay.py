"""What the load bench's devices share with the orchestrator: the go file that starts them together,
and recording a real device's requests (`Recorder`) and replaying them as a load generator
(`run_replay_worker`), checking that the edge answers as it did (see covspec/tools/load.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import msgpack
import numpy as np


class ReplaySettings(Protocol):
    """What a replaying worker reads of its settings (covspec.tools.worker.WorkerSettings)."""

    modes: tuple[str, ...]
    replay_file: str | None
    start: int
    prompts: int
    edge: str
    go: str | None
    device: int
    rows: str
    link: str


def wait_for_go(go: Path, device: int, timeout_s: float = 600.0) -> None:
    """Worker side: says it is ready (go.ready.<device>), then waits for the go file."""
    Path(f"{go}.ready.{device}").touch()
    deadline = time.monotonic() + timeout_s
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no go signal ({go}) within {timeout_s:.0f} s")
        time.sleep(0.01)


def release(go: Path, n: int, procs: list[subprocess.Popen], timeout_s: float = 600.0) -> None:
    """Orchestrator side: once all n workers are ready, writes the go file."""
    deadline = time.monotonic() + timeout_s
    while sum(Path(f"{go}.ready.{i}").exists() for i in range(n)) < n:
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            raise RuntimeError("a device worker failed before starting (see its log)")
        time.sleep(0.05)
    go.touch()


class Arrivals:
    """When a device's next request arrives. Closed loop (`rate` None): now, once the previous answer is
    in. Open loop: at `rate` requests/s, Poisson (exponential gaps, seeded), however long the answers
    take; `wait` sleeps until the next arrival and returns it (time.time()), so that a request that
    starts late (its device still busy) counts its queueing in `response_s`."""

    def __init__(self, rate: float | None, seed: int = 0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"arrival rate must be above 0, got {rate}")
        self.rate = rate
        self.rng = np.random.default_rng(seed)
        self.next: float | None = None

    def wait(self) -> float:
        now = time.time()
        if self.rate is None:
            return now
        self.next = (now if self.next is None else self.next) + float(self.rng.exponential(1.0 / self.rate))
        if self.next > now:
            time.sleep(self.next - now)
        return self.next


class Recorder:
    """Records what a device's Client sends (every request but HELLO), a summary of each reply, and
    the device's own time before each request (drafting, pruning, prefill: from its previous reply,
    or from the request's start), so that a replaying device keeps the recorded pace. Windows in
    flight are kept as they were: each request records how many replies had come before it was sent,
    and whether its own reply was ever awaited (a window sent ahead and dropped is not)."""

    def __init__(self, client) -> None:
        self.sent: list = []
        self.think_s: list[float] = []
        self.replies_before: list[int] = []
        self.awaited: set[int] = set()  # seqs whose reply the device read
        self.replies: list = []
        self.last = time.perf_counter()
        send, recv = client.send, client.recv

        def recording_send(msg):
            self.think_s.append(time.perf_counter() - self.last)
            self.replies_before.append(len(self.replies))
            sent = send(msg)
            self.sent.append(sent)
            self.last = time.perf_counter()
            return sent

        def recording_recv(seq: int, timeout_s: float | None = None):
            from covspec.transport.channel import RemoteError

            self.awaited.add(seq)
            try:
                reply = recv(seq, timeout_s)
            except RemoteError as err:
                self.replies.append(["ERROR", int(err.code)])
                raise
            finally:
                self.last = time.perf_counter()
            if reply is not None:
                self.replies.append(reply_summary(reply))
            return reply

        client.send, client.recv = recording_send, recording_recv

    def start(self) -> None:
        """A new request starts now (its first message's think time counts from here)."""
        self.last = time.perf_counter()

    def save(self, path: Path, index: int, mode: str, tokens: int) -> None:
        """Appends the request to a msgpack stream: its messages as wire frames, never pickle."""
        from covspec.transport import protocol as wire

        kept = [i for i, m in enumerate(self.sent) if not isinstance(m, wire.Hello)]
        with open(path, "ab") as f:
            f.write(msgpack.packb({"index": index, "mode": mode, "tokens": tokens,
                                   "requests": [wire.encode(self.sent[i]) for i in kept],
                                   "think_s": [self.think_s[i] for i in kept],
                                   "replies_before": [self.replies_before[i] for i in kept],
                                   "awaited": [self.sent[i].seq in self.awaited for i in kept],
                                   "replies": self.replies}, use_bin_type=True))
        self.sent, self.think_s, self.replies_before, self.replies = [], [], [], []
        self.awaited = set()


def reply_summary(reply) -> list:
    """What a replayed reply must equal: the verdict, the tokens, whether done."""
    from covspec.transport import protocol as wire

    if isinstance(reply, wire.Result):
        return ["RESULT", reply.accepted, reply.token, reply.done]
    if isinstance(reply, wire.Opened):
        return ["OPENED", reply.token, reply.done]
    if isinstance(reply, wire.Streamed):
        return ["STREAMED", [int(t) for t in reply.tokens], reply.done]
    return [reply.TYPE]


def load_records(path: Path) -> list[dict]:
    from covspec.transport import protocol as wire

    with open(path, "rb") as f:
        records = list(msgpack.Unpacker(f, raw=False))
    for record in records:
        record["requests"] = [wire.decode(frames) for frames in record["requests"]]
    return records


def replay(client, record: dict) -> dict:
    """Sends one recorded request's messages under a fresh session id, each once as many replies have
    come as had come in the recording (so windows sent ahead go out ahead again) and after the
    device's recorded think time; its timings, and whether the replies equal the recorded ones
    (replies the recording never read, to windows it sent ahead and saw dropped, are not read)."""
    from covspec.transport import protocol as wire
    from covspec.transport.channel import RemoteError

    sid = int.from_bytes(np.random.default_rng().bytes(7), "little") or 1
    replies: list[tuple] = []
    waiting: deque[wire.Message] = deque()  # sent, reply still to read
    ttft = None
    t_start = time.time()

    def read_reply() -> None:  # every reply to the oldest request still waiting (all of a STREAM's chunks)
        nonlocal ttft
        sent = waiting.popleft()
        while True:
            try:
                reply = client.recv(sent.seq)
            except RemoteError as err:
                replies.append(["ERROR", int(err.code)])
                return
            if reply is None:
                raise RuntimeError(f"no reply to {sent.TYPE} within the timeout")
            replies.append(reply_summary(reply))
            if ttft is None and isinstance(reply, wire.Opened):
                ttft = time.time() - t_start
            if not isinstance(reply, wire.Streamed) or reply.done:
                return

    for msg, think, before, awaited in zip(record["requests"], record["think_s"], record["replies_before"],
                                           record["awaited"], strict=True):
        while len(replies) < before and waiting:
            read_reply()
        time.sleep(think)  # the device's own work before this message, as recorded
        sent = client.send(replace(msg, sid=sid) if msg.sid else msg)
        if awaited:
            waiting.append(sent)
    while waiting:
        read_reply()
    t_end = time.time()
    latency, tokens = t_end - t_start, record["tokens"]
    ttft = latency if ttft is None else ttft
    return {"tokens": tokens, "ttft_s": ttft, "latency_s": latency, "t_start": t_start, "t_end": t_end,
            "decode_tps": (tokens - 1) / (latency - ttft) if latency > ttft and tokens > 1 else float("nan"),
            "replay_matches": replies == record["replies"]}


def run_replay_worker(s: ReplaySettings) -> int:
    """A load-generating device: replays its share of the recorded requests in its one mode."""
    from covspec.transport.channel import Client

    (mode,) = s.modes
    mine = [r for r in load_records(Path(s.replay_file))
            if r["mode"] == mode and s.start <= r["index"] < s.start + s.prompts]
    from covspec.tools.edge_probe import client_keys

    client = Client(s.edge, timeout_s=120.0, retries=0, keys=client_keys(s.key, s.edge_key))
    wait_for_go(Path(s.go), s.device)
    arrivals = Arrivals(s.rate, seed=s.device)
    with open(s.rows, "a") as out:
        for record in mine:
            arrival = arrivals.wait()
            row = {"link": s.link, "mode": mode, "index": record["index"], "device": s.device,
                   **replay(client, record)}
            row.update(queue_s=row["t_start"] - arrival, response_s=row["t_end"] - arrival,
                       per_token_s=row["latency_s"] / max(row["tokens"], 1))
            out.write(json.dumps(row) + "\n")
            out.flush()
    client.close()
    return 0
