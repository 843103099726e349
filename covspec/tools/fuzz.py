"""Property-based fuzzing of the wire protocol: the decoder alone, then a running edge.

    covspec fuzz [--decoder 25000] [--edge 25000] [--model PATH] [--out results/fuzz] [--seed 0]

Hostile frame lists come from a seeded generator: valid messages of every kind, mutated (bytes
flipped, frames cut, dropped, duplicated or added, header fields given hostile values, array specs
that lie about shape or dtype), plus random bytes and well-formed messages sent in the wrong state
of a live session. The properties:

- decoder: every input either decodes to a message that re-encodes, or raises `ProtocolError` with
  an error code and a message; nothing else, never;
- edge (a real `covspec edge serve` process over a ZeroMQ socket): every message gets a reply
  within the timeout, every reply is a well-formed message, the process stays up, a normal request
  afterwards gets the same greedy answer as before the fuzz, and its resident memory after the fuzz
  is within 10% of before.

A message that broke a property is written to the report (and was turned into a regression test).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from covspec.transport import protocol as wire

HOSTILE_VALUES: tuple[Any, ...] = (
    "x", "", "A" * 5000, -1, 0, 2**31, 2**63, 2**64 - 1, -(2**63), 1.5, float("nan"), float("inf"), None, True,
    b"\x00\xff", [], [[[]]], {}, {"a": {"b": []}}, [1, 2, 3],
)


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    from covspec.images import png_bytes as encode_png

    return encode_png(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)))


def seed_messages(sid: int, image: bytes) -> list[wire.Message]:
    """One or more valid requests and replies of every kind, addressed to session `sid`."""
    i32, f32 = np.int32, np.float32
    return [
        wire.Hello(fingerprint="sha256:0", family="llava", model="fuzz"),
        wire.Welcome(sid=0, seq=1, fingerprint="sha256:0", family="llava", model="t", vocab_size=100,
                     max_message_bytes=1 << 20, max_image_bytes=1 << 20, max_window=16, max_new_tokens=64,
                     idle_timeout_s=5.0),
        wire.Open(sid=sid + 1, seq=1, image=image, prompt="what is it ?", mode="vanilla_sd", max_new_tokens=8),
        wire.Open(sid=sid + 2, seq=1, image=image, prompt="what is it ?", mode="covspec", kept=np.array([0, 3], i32),
                  prefix=np.array([5], i32), temperature=0.7, top_k=5, top_p=0.9, seed=1, max_new_tokens=8),
        wire.Opened(sid=sid, seq=1, token=4, timings={"prefill_ms": 1.0}),
        wire.Verify(sid=sid, seq=2, round=0, tokens=np.array([5, 6, 7], i32)),
        wire.Verify(sid=sid, seq=3, round=1, pos=3, root=5, tokens=np.array([5, 6], i32), q=np.array([0.5, 0.9], f32)),
        wire.Verify(sid=sid, seq=4, round=2, tokens=np.array([5], i32),
                    dists=np.full((1, 100), 0.01, f32)),
        wire.Result(sid=sid, seq=2, round=0, accepted=1, token=9, cand_ids=np.array([9, 3], i32),
                    cand_probs=np.array([0.6, 0.4], f32)),
        wire.Stream(sid=sid, seq=5, chunk=4),
        wire.Streamed(sid=sid, seq=5, index=0, tokens=np.array([1, 2], i32), done=True),
        wire.Close(sid=sid, seq=6),
        wire.Closed(sid=sid, seq=6),
        wire.Ping(seq=7, t=1.0),
        wire.Pong(seq=7, t=1.0),
        wire.Stats(seq=8),
        wire.StatsReply(seq=8, counters={"requests": 1}),
        wire.Info(seq=10),
        wire.InfoReply(seq=10, version="covspec-edge 0.1.0", protocol=1, fingerprint="sha256:0", family="llava",
                       model="t", vocab_size=100, draft="d"),
        wire.Error(sid=sid, seq=9, code=wire.ErrorCode.BAD_STATE, message="x"),
    ]


# --- mutations: each takes the frames of a valid message and returns hostile frames -------------

def _flip_bytes(frames: list[bytes], rng: random.Random) -> list[bytes]:
    out = [bytearray(f) for f in frames]
    for _ in range(rng.randint(1, 4)):
        f = out[rng.randrange(len(out))]
        if f:
            f[rng.randrange(len(f))] = rng.randrange(256)
    return [bytes(f) for f in out]


def _cut_frame(frames: list[bytes], rng: random.Random) -> list[bytes]:
    k = rng.randrange(len(frames))
    return frames[:k] + [frames[k][: rng.randrange(len(frames[k]) + 1)]] + frames[k + 1:]


def _drop_or_add_frames(frames: list[bytes], rng: random.Random) -> list[bytes]:
    choice = rng.randrange(3)
    if choice == 0:
        return frames[: rng.randrange(len(frames))] or [b""]
    if choice == 1:
        k = rng.randrange(len(frames))
        return frames[:k + 1] + [frames[k]] + frames[k + 1:]
    return frames + [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randint(1, 8))]


def _header(frames: list[bytes]) -> dict | None:
    """The msgpack header of `frames`, if an earlier mutation left one."""
    try:
        header = msgpack.unpackb(frames[0], strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises many kinds on garbage
        return None
    return header if isinstance(header, dict) else None


def _hostile_field(frames: list[bytes], rng: random.Random) -> list[bytes]:
    header = _header(frames)
    if header is None:
        return _flip_bytes(frames, rng)
    key = rng.choice([*header.keys(), "extra", "v", "type"])
    if rng.random() < 0.2:
        header.pop(key, None)
    else:
        header[key] = rng.choice(HOSTILE_VALUES)
    return [msgpack.packb(header), *frames[1:]]


def _lying_array_spec(frames: list[bytes], rng: random.Random) -> list[bytes]:
    header = _header(frames)
    bins = header.get("bin") if header is not None else None
    if not bins or not isinstance(bins, list) or not all(isinstance(b, list) and len(b) == 3 for b in bins):
        return _hostile_field(frames, rng)
    k = rng.randrange(len(bins))
    name, dtype, shape = bins[k]
    shape = shape if isinstance(shape, list) else [1]
    what = rng.randrange(4)
    if what == 0:
        shape = [rng.choice([0, 1, 3, 2**31 - 1, 2**40])] + list(shape[1:])
    elif what == 1:
        dtype = rng.choice(["<f8", ">i4", "|u1", "object", "<U4", "nope", ""])
    elif what == 2:
        shape = [rng.randrange(1, 50) for _ in range(rng.randint(0, 4))]
    else:
        name = rng.choice(["tokens", "q", "dists", "image", "kept", "nope", ""])
    bins = [*bins[:k], [name, dtype, shape], *bins[k + 1:]]
    return [msgpack.packb({**header, "bin": bins}), *frames[1:]]


def _random_frames(frames: list[bytes], rng: random.Random) -> list[bytes]:
    if rng.random() < 0.5:
        return [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randint(1, 4))]
    v = wire.PROTOCOL_VERSION
    value = rng.choice([*HOSTILE_VALUES, {"v": v}, {"v": v, "type": "VERIFY"}, [v, "VERIFY"]])
    return [msgpack.packb(value)]


MUTATIONS = (_flip_bytes, _cut_frame, _drop_or_add_frames, _hostile_field, _lying_array_spec, _random_frames)


def hostile_frames(rng: random.Random, seeds: list[wire.Message]) -> tuple[str, list[bytes]]:
    """(mutation name, frames): one valid message of `seeds`, mutated one to three times."""
    frames = wire.encode(rng.choice(seeds))
    names = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutation = rng.choice(MUTATIONS)
        frames = mutation(frames, rng) if frames else [b""]
        names.append(mutation.__name__.lstrip("_"))
    return "+".join(names), frames


def wrong_state_messages(rng: random.Random, sid: int, vocab: int) -> list[wire.Message]:
    """Well-formed requests that are wrong for session `sid` as it stands (or for any session)."""
    i32 = np.int32
    round_ = rng.choice([0, 5, 10**6])
    return [
        wire.Verify(sid=sid, seq=rng.randrange(1, 10**6), round=round_, tokens=np.array([1, 2], i32)),
        wire.Verify(sid=sid, seq=1, round=0, tokens=np.array([vocab + rng.randrange(10**6)], i32)),
        wire.Verify(sid=sid, seq=1, round=0, tokens=np.array([1], i32), q=np.array([0.5], np.float32)),
        wire.Verify(sid=sid + 1 + rng.randrange(10**9), seq=1, round=0, tokens=np.array([1], i32)),
        wire.Stream(sid=sid + 1 + rng.randrange(10**9), seq=1, chunk=rng.randint(1, 1000)),
        wire.Close(sid=sid + 1 + rng.randrange(10**9), seq=1),
        wire.Hello(fingerprint="sha256:" + "0" * 64, family=rng.choice(["llava", "qwen2_5_vl", "x"]), model="m"),
        wire.Open(sid=0, seq=1, image=b"\x89PNG\r\n\x1a\n" + rng.randbytes(40), prompt="q ?", mode="vanilla_sd"),
        wire.Open(sid=sid + 7, seq=1, image=rng.randbytes(64), prompt="", mode=rng.choice(["covspec", "nope"])),
        wire.Result(sid=sid, seq=1, round=0, accepted=0, token=1),
    ]


# --- the decoder ---------------------------------------------------------------------------------

@dataclass
class DecoderReport:
    messages: int = 0
    decoded: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # ProtocolError code -> count
    by_mutation: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)  # inputs that broke the property
    seconds: float = 0.0


def check_decode(frames: Any) -> tuple[str, str | None]:
    """(outcome, problem): outcome is "decoded" or the ProtocolError's code name; problem is None
    when `frames` satisfies the decoder's property, else what went wrong."""
    try:
        msg = wire.decode(frames)
    except wire.ProtocolError as err:
        if not isinstance(err.code, wire.ErrorCode) or not err.message:
            return "broken", f"ProtocolError without a code or message: {err!r}"
        return err.code.name, None
    except Exception as err:  # noqa: BLE001 - this is exactly what the fuzz looks for
        return "crashed", f"{type(err).__name__}: {err}"
    try:
        wire.encode(msg)
    except Exception as err:  # noqa: BLE001
        return "crashed", f"decoded {msg.TYPE} does not re-encode: {type(err).__name__}: {err}"
    return "decoded", None


def fuzz_decoder(n: int, seed: int, progress=None) -> DecoderReport:
    rng = random.Random(f"{seed}:decoder")
    seeds = seed_messages(4242, png_bytes(seed))
    report = DecoderReport()
    refused: Counter = Counter()
    by_mutation: Counter = Counter()
    started = time.perf_counter()
    for i in range(n):
        name, frames = hostile_frames(rng, seeds)
        by_mutation[name.split("+")[0]] += 1
        outcome, problem = check_decode(frames)
        report.messages += 1
        if problem is not None:
            report.failures.append({"index": i, "mutation": name, "problem": problem,
                                    "frames": [f.hex() for f in frames]})
        elif outcome == "decoded":
            report.decoded += 1
        else:
            refused[outcome] += 1
        if progress:
            progress(1)
    report.refused, report.by_mutation = dict(refused), dict(by_mutation)
    report.seconds = time.perf_counter() - started
    return report


# --- a running edge --------------------------------------------------------------------------------

@dataclass
class EdgeReport:
    messages: int = 0
    replies: int = 0
    unanswered: int = 0
    replies_by_type: dict[str, int] = field(default_factory=dict)
    malformed_replies: list[dict] = field(default_factory=list)
    answer_before: list[int] = field(default_factory=list)
    answer_after: list[int] = field(default_factory=list)
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    edge_alive: bool = False
    seconds: float = 0.0

    @property
    def rss_growth(self) -> float:
        return self.rss_after_mib / self.rss_before_mib - 1.0 if self.rss_before_mib else float("nan")

    @property
    def passed(self) -> bool:
        return (self.edge_alive and not self.unanswered and not self.malformed_replies
                and self.answer_before == self.answer_after and abs(self.rss_growth) <= 0.10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def greedy_answer(endpoint: str, image: bytes) -> list[int]:
    """A normal target-only request on a fresh session: the tokens the edge streams."""
    from covspec.calibration.measure import stream_target_only
    from covspec.transport.channel import Client

    with Client(endpoint, timeout_s=60.0, retries=0) as client:
        return stream_target_only(client, image, "describe the image .", max_new_tokens=24)[0]


def fuzz_edge(endpoint: str, pid: int, n: int, seed: int, image: bytes, vocab: int,
              timeout_s: float = 10.0, progress=None) -> EdgeReport:
    import zmq

    rng = random.Random(f"{seed}:edge")
    report = EdgeReport()
    report.answer_before = greedy_answer(endpoint, image)
    report.rss_before_mib = rss_mib(pid)
    by_type: Counter = Counter()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    started = time.perf_counter()
    sid = 0
    for i in range(n):
        if i % 500 == 0:  # a fresh live session now and then, so that messages reach the session logic
            sid = 5000 + i
            seeds = seed_messages(sid, image)
            sock.send_multipart(wire.encode(wire.Open(sid=sid, seq=1, image=image, prompt="what is it ?",
                                                      mode="vanilla_sd", max_new_tokens=8)))
            if sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                sock.recv_multipart()
        if rng.random() < 0.2:
            frames = wire.encode(rng.choice(wrong_state_messages(rng, sid, vocab)))
        else:
            frames = hostile_frames(rng, seeds)[1]
        sock.send_multipart(frames)
        report.messages += 1
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            report.unanswered += 1
            if len(report.malformed_replies) < 20:
                report.malformed_replies.append({"index": i, "problem": "no reply",
                                                 "frames": [f.hex()[:400] for f in frames]})
        while sock.poll(0, zmq.POLLIN):  # a STREAM may bring several replies
            reply = sock.recv_multipart()
            report.replies += 1
            try:
                by_type[wire.decode(reply).TYPE] += 1
            except wire.ProtocolError as err:
                report.malformed_replies.append({"index": i, "problem": err.message})
        if progress:
            progress(1)
    report.seconds = time.perf_counter() - started
    sock.close(0)
    report.replies_by_type = dict(by_type)
    report.answer_after = greedy_answer(endpoint, image)
    report.rss_after_mib = rss_mib(pid)
    report.edge_alive = True
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder", type=int, default=25000, help="messages for the decoder alone")
    parser.add_argument("--edge", type=int, default=25000, help="messages for the running edge")
    parser.add_argument("--model", type=Path, default=None, help="target checkpoint (default: the demo target)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the message generator")
    parser.add_argument("--idle-timeout", type=float, default=5.0, help="the edge's session idle timeout, seconds")
    parser.add_argument("--out", type=Path, default=Path("results/fuzz"), help="folder for fuzz.json and the edge's log")


def run(args: argparse.Namespace) -> int:
    """`covspec fuzz`'s handler (args from add_arguments, and command_line from the CLI): 0 if passed."""
    from rich.console import Console
    from rich.progress import Progress

    from covspec.demo import default_target_path
    from covspec.tools.procs import free_port, start_edge, stop_edge

    console = Console()
    model = args.model or default_target_path()
    args.out.mkdir(parents=True, exist_ok=True)
    with Progress(console=console) as bar:
        task = bar.add_task("decoder", total=args.decoder)
        decoder = fuzz_decoder(args.decoder, args.seed, progress=lambda k: bar.advance(task, k))
    console.print(f"decoder: {decoder.messages} messages in {decoder.seconds:.1f} s, {decoder.decoded} decoded, "
                  f"refused {decoder.refused}, {len(decoder.failures)} failures")

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    edge = start_edge(model, endpoint, args.out / "edge.log", "--idle-timeout", str(args.idle_timeout))
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        vocab = getattr(config, "text_config", config).vocab_size
        with Progress(console=console) as bar:
            task = bar.add_task("edge", total=args.edge)
            report = fuzz_edge(endpoint, edge.pid, args.edge, args.seed, png_bytes(args.seed, 72), vocab,
                               progress=lambda k: bar.advance(task, k))
        report.edge_alive = edge.poll() is None
    finally:
        stop_edge(edge)
    console.print(f"edge: {report.messages} messages in {report.seconds:.1f} s, {report.replies} replies "
                  f"{report.replies_by_type}, {report.unanswered} unanswered, "
                  f"{len(report.malformed_replies)} malformed; RSS {report.rss_before_mib:.1f} -> "
                  f"{report.rss_after_mib:.1f} MiB ({100 * report.rss_growth:+.1f}%); same answer after: "
                  f"{report.answer_before == report.answer_after}")
    result = {"command": args.command_line, "decoder": asdict(decoder),
              "edge": {**asdict(report), "rss_growth": report.rss_growth, "passed": report.passed},
              "total_messages": decoder.messages + report.messages}
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    ok = not decoder.failures and report.passed
    console.print(("[green]passed" if ok else "[red]FAILED") + f": {result['total_messages']} messages in all; "
                  f"report in {args.out / 'fuzz.json'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """`covspec fuzz ARGS` (the one CLI parser)."""
    from covspec.cli import main as cli_main

    return cli_main(["fuzz", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
