"""`covspec calibrate`: measures, on the machines at hand, what the runtimes tune themselves with.

    covspec calibrate --edge tcp://HOST:PORT (--draft PATH | --bundle DIR) [--backends eager,executorch,onnx]
                      [--items 24] [--out calibration.json]

- the draft's decode step per backend (interleaved rounds, best median: see backends.step_ms);
- the edge's own verify time for windows of 1..16 tokens, from real VERIFY rounds on a real session,
  and its streaming time per token (target-only);
- the link: PING round trip, and upload/download bandwidth from PING/PONG filler;
- acceptance by margin bin: greedy vanilla_sd requests on the demo task's calibration split ("val"),
  each drafted token's margin binned with whether the edge accepted it.
The result is a `CalibrationProfile` (profile.py) that `covspec device run --profile` and export read.
"""

from __future__ import annotations

import datetime
import socket
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np

from covspec.calibration.backends import step_ms
from covspec.calibration.profile import CalibrationProfile
from covspec.device_runtime.client import DeviceRuntime
from covspec.errors import CovspecError
from covspec.models.base import VLMAdapter
from covspec.modes import Mode
from covspec.policy import MARGIN_BINS, margin_bin
from covspec.sampling import SamplingParams
from covspec.transport import protocol as wire
from covspec.transport.channel import Client


def measure_link(client: Client, pings: int = 21, filler: int = wire.MAX_ECHO_BYTES) -> tuple[float, float, float]:
    """(rtt ms, up Mbit/s, down Mbit/s) over the device's own connection to the edge."""
    def timed(msg: wire.Ping) -> float:
        t0 = time.perf_counter()
        reply = client.request(msg)
        if not isinstance(reply, wire.Pong):
            raise CovspecError(f"calibrate: the edge answered PING with {reply.TYPE}")
        return time.perf_counter() - t0

    rtts = [timed(wire.Ping(t=0.0)) for _ in range(pings)][1:]
    rtt = statistics.median(rtts)
    up = statistics.median(timed(wire.Ping(t=0.0, pad=bytes(filler))) for _ in range(5))
    down = statistics.median(timed(wire.Ping(t=0.0, echo=filler)) for _ in range(5))
    mbit = filler * 8 / 1e6
    # the transfer time is what the filler adds to a bare ping; a floor of 1 us keeps loopback finite
    return 1000 * rtt, mbit / max(up - rtt, 1e-6), mbit / max(down - rtt, 1e-6)


def _open(client: Client, image: bytes, prompt: str, mode: str, max_new_tokens: int) -> tuple[int, wire.Opened]:
    sid = int.from_bytes(np.random.default_rng().bytes(6), "little") | 1
    opened = client.request(wire.Open(sid=sid, image=image, prompt=prompt, mode=mode, max_new_tokens=max_new_tokens))
    if not isinstance(opened, wire.Opened):
        raise CovspecError(f"calibrate: the edge answered OPEN with {opened.TYPE}")
    return sid, opened


def measure_verify(client: Client, image: bytes, prompt: str, ks: Iterable[int] = range(1, 17),
                   repeats: int = 3, max_new_tokens: int = 160) -> dict[int, float]:
    """The edge's own verify time (median ms) per window size, from VERIFY rounds of a greedy
    session; a window repeats the last committed token, so most are rejected early and the
    session moves on slowly (a finished session is replaced by a new one)."""
    times: dict[int, list[float]] = {k: [] for k in ks}
    sid, opened = _open(client, image, prompt, "vanilla_sd", max_new_tokens)
    token, round_ = opened.token, 0
    for _ in range(repeats):
        for k in times:
            result = client.request(wire.Verify(sid=sid, round=round_, tokens=np.full(k, token, np.int32)))
            if not isinstance(result, wire.Result):
                raise CovspecError(f"calibrate: the edge answered VERIFY with {result.TYPE}")
            times[k].append(1000 * result.timings.get("verify_s", float("nan")))
            round_ += 1
            if result.token is not None:
                token = result.token
            if result.done:
                client.request(wire.Close(sid=sid))
                sid, opened = _open(client, image, prompt, "vanilla_sd", max_new_tokens)
                token, round_ = opened.token, 0
    client.request(wire.Close(sid=sid))
    return {k: statistics.median(v) for k, v in times.items()}


def stream_target_only(client: Client, image: bytes, prompt: str, max_new_tokens: int) -> tuple[list[int], float]:
    """One target-only request on a fresh session: (the answer's tokens, the edge's streaming time
    in seconds after the first token)."""
    sid, opened = _open(client, image, prompt, Mode.TARGET_ONLY, max_new_tokens)
    tokens, elapsed = [opened.token], 0.0
    if not opened.done:
        seq = client.send(wire.Stream(sid=sid, chunk=max_new_tokens)).seq
        while True:
            part = client.recv(seq)
            if not isinstance(part, wire.Streamed):
                raise CovspecError(f"the edge answered STREAM with {part}")
            tokens += [int(t) for t in part.tokens]
            elapsed = part.timings.get("elapsed_s", elapsed)
            if part.done:
                break
    client.request(wire.Close(sid=sid))
    return tokens, elapsed


def measure_target_step(client: Client, image: bytes, prompt: str, max_new_tokens: int = 48) -> float | None:
    """The edge streaming alone (target-only), ms per token; None if the answer ended at once."""
    tokens, elapsed = stream_target_only(client, image, prompt, max_new_tokens)
    streamed = len(tokens) - 1
    return 1000 * elapsed / streamed if streamed else None


def measure_acceptance(device: DeviceRuntime, requests: list[tuple[bytes, str]], window: int = 8,
                       max_new_tokens: int = 64, progress: Callable[[int], None] | None = None
                       ) -> tuple[list[int], list[int]]:
    """(accepted, judged) drafted tokens per margin bin over greedy vanilla_sd requests. Per round,
    the accepted tokens and the first rejected one are judged; tokens after it never were."""
    accepted = [0] * (len(MARGIN_BINS) - 1)
    judged = [0] * (len(MARGIN_BINS) - 1)
    for image, prompt in requests:
        answer = device.answer(image, prompt, "vanilla_sd", SamplingParams(), max_new_tokens, window=window)
        for r in answer.rounds:
            for i, m in enumerate((r.margins or [])[: r.accepted + (r.accepted < r.drafted)]):
                judged[margin_bin(m)] += 1
                accepted[margin_bin(m)] += i < r.accepted
        if progress:
            progress(1)
    return accepted, judged


def verify_line(verify_ms: dict[int, float]) -> tuple[float, float]:
    ks = np.array(list(verify_ms), dtype=float)
    ts = np.array(list(verify_ms.values()), dtype=float)
    v1, v0 = np.polyfit(ks, ts, 1) if len(ks) > 1 else (0.0, float(ts[0]))
    return float(v0), float(v1)


def calibrate(edge: str, drafts: dict[str, VLMAdapter], requests: list[tuple[bytes, str]], split: str,
              keys=None, progress: Callable[[str, int, int], None] | None = None) -> CalibrationProfile:
    """Everything `covspec calibrate` measures, with `drafts` {backend label: adapter} (the first one
    runs the acceptance requests) and `requests` [(image bytes, prompt)] from the calibration split."""
    from covspec.images import load_image

    notes: dict[str, str] = {}
    first = next(iter(drafts.values()))
    device = DeviceRuntime(first, edge, timeout_s=60.0, retries=1, keys=keys)
    try:
        client = device.client
        image, prompt = requests[0]
        rtt_ms, up, down = measure_link(client)
        if progress:
            progress("link", 1, 1)
        verify_ms = measure_verify(client, image, prompt)
        if progress:
            progress("edge verify", 1, 1)
        target_step = measure_target_step(client, image, prompt)
        tick = (lambda k: progress("acceptance", k, len(requests))) if progress else None
        accepted, judged = measure_acceptance(device, requests, progress=tick)
    finally:
        device.close()
    pil = load_image(image)
    steps = step_ms(list(drafts.values()), pil, prompt)
    notes["draft_step_ms"] = "interleaved rounds, best median of a one-token cached forward"
    notes["quantization"] = "int8 is dynamic (activation ranges at run time): nothing of this profile is baked in"
    total = sum(judged)
    return CalibrationProfile(
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), host=socket.gethostname(),
        edge=edge, draft_step_ms=dict(zip(drafts, steps, strict=True)), verify_ms=verify_ms,
        verify_line_ms=verify_line(verify_ms), target_step_ms=target_step, rtt_ms=rtt_ms, up_mbit=up, down_mbit=down,
        margin_bins=list(MARGIN_BINS), bin_acceptance=[a / j if j else None for a, j in zip(accepted, judged, strict=True)],
        bin_judged=judged, acceptance=sum(accepted) / total if total else 0.0, split=split, items=len(requests),
        notes=notes)
