"""CoVSpec's Python API: the main jobs as plain functions, the ones the `covspec` CLI itself calls.

    import covspec

    device_dir, edge_dir = covspec.export("weights/draft", "weights/target", "runs/export", reuse=True)
    covspec.serve_edge(edge_dir, bind="tcp://127.0.0.1:5555")            # blocks; Ctrl-C stops it
    device = covspec.DeviceConfig("tcp://127.0.0.1:5555", bundle=device_dir, backend="onnx")
    answer = covspec.answer(device, "photo.png", "describe the image .", covspec.AnswerConfig(mode="covspec"))
    print(answer.text, covspec.answer_record(answer)["decode_tokens_per_s"])
    out = covspec.bench(links="loopback", modes=("target_only", "covspec"), prompts=4)

Each imports torch and the rest only when called, so `import covspec` stays quick.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covspec.bundles.backend import bundle_backend, load_draft
from covspec.device_runtime.config import AnswerConfig, DeviceConfig
from covspec.errors import CovspecError
from covspec.modes import Mode

if TYPE_CHECKING:
    from covspec.calibration.profile import CalibrationProfile
    from covspec.device_runtime.client import DeviceRuntime
    from covspec.device_runtime.records import Answer
    from covspec.edge_runtime.server import EdgeServer
    from covspec.edge_runtime.settings import EdgeSettings
    from covspec.models.base import VLMAdapter
    from covspec.transport.channel import ClientKeys

__all__ = ["AnswerConfig", "DeviceConfig", "answer", "answer_record", "bench", "bundle_backend", "check_bind", "check_edge", "draft_name", "export",
           "exported", "load_draft", "open_device", "serve_edge"]


# --- export ------------------------------------------------------------------------------------
def exported(draft: str | Path, target: str | Path, out: str | Path) -> bool:
    """Whether `out` holds an intact export (device and edge manifests, the device bundle's files
    checked) newer than every file of `draft` and `target`."""
    from covspec.bundles.bundle import BundleError, load_bundle

    out = Path(out)
    manifests = [out / "device" / "manifest.json", out / "edge" / "manifest.json"]
    if not all(m.is_file() for m in manifests):
        return False
    try:
        load_bundle(out / "device")
    except BundleError:
        return False
    made = min(m.stat().st_mtime for m in manifests)
    sources = [f for folder in (Path(draft), Path(target)) for f in folder.rglob("*") if f.is_file()]
    return all(f.stat().st_mtime <= made for f in sources)


def export(draft: str | Path, target: str | Path, out: str | Path, *, quant: str = "int8",
           formats: tuple[str, ...] = ("pte", "onnx"), edge_backend: str = "auto", max_len: int | None = None,
           calibration: str | Path | None = None, reuse: bool = False, quiet: bool = False) -> tuple[Path, Path]:
    """Exports the draft to a device bundle (ExecuTorch .pte and/or ONNX, `quant`: none, int8, int4)
    and the target to an edge bundle, into out/device and out/edge; returns both folders. `reuse`:
    keep an intact export already in `out` that is newer than both checkpoints (see `exported`)."""
    out = Path(out)
    if reuse and exported(draft, target, out):
        return out / "device", out / "edge"
    from covspec.export import build_bundles
    from covspec.export.write_programs import ExportUnsupported

    try:
        return build_bundles(draft, target, out, quant=quant, formats=formats, edge_backend=edge_backend,
                             max_len=max_len, calibration=calibration, quiet=quiet)
    except ExportUnsupported as err:
        raise CovspecError(f"export: {err}") from err


# --- the edge ----------------------------------------------------------------------------------
def serve_edge(model: str | Path, settings: EdgeSettings | None = None, *, threads: int = 1,
               metrics: str | None = None, stop_after_s: float | None = None,
               on_ready: Callable[[EdgeServer, str | None], None] | None = None,
               draft: str | Path | None = None) -> None:
    """Serves the target checkpoint (or edge bundle) `model` with `settings` (EdgeSettings: bind
    address, keys, limits, placement; default: tcp://127.0.0.1:5555 with no authentication) until
    interrupted, `stop_after_s`, or drained (`EdgeServer.drain()`, which `covspec edge serve` calls on
    SIGTERM). `metrics`: HOST:PORT for a Prometheus GET /metrics of the edge's counters, and the
    /healthz and /readyz probes (off by default). `on_ready(server, metrics address or None)` is called once it listens."""
    from covspec.edge_runtime.settings import EdgeSettings

    settings = settings or EdgeSettings()
    check_bind(settings.bind)  # a bad address or a port in use: said before the target loads, not after
    try:
        settings.check()
    except ValueError as err:
        raise CovspecError(f"edge settings: {err}") from err
    serving: list[EdgeServer] = []  # the server once it is up (the metrics read it)
    exporter = None
    if metrics:
        from covspec.edge_runtime.metrics import LOADING, MetricsServer

        exporter = MetricsServer(metrics, lambda: serving[0].stats() if serving else {},
                                 health=lambda: serving[0].health() if serving else LOADING)
    try:
        import torch

        from covspec.edge_runtime.server import EdgeServer
        from covspec.edge_runtime.target import load_target

        torch.set_num_threads(threads)
        target, loaded = load_target(model, threads=threads, device=settings.device, dtype=settings.dtype)
        logging.getLogger("covspec.edge").info("target: %s", loaded)
        draft_adapter = None
        draft = bundle_draft(model) if draft is None else (None if str(draft) == "none" else draft)
        if draft is not None:  # edge-side speculation (mode edge_sd; covspec devices may hand drafting over)
            draft_adapter, loaded = load_target(draft, threads=threads, device=settings.device, dtype=settings.dtype)
            logging.getLogger("covspec.edge").info("draft: %s", loaded)
        serving.append(EdgeServer(target, settings, name=Path(model).name, draft=draft_adapter))
        if on_ready is not None:
            on_ready(serving[0], None if exporter is None else exporter.address)
        serving[0].serve_forever(stop_after_s)
    finally:
        if exporter is not None:
            exporter.close()
        if serving:
            serving[0].close()


def check_bind(endpoint: str) -> None:
    """Raises EndpointError now when the edge could not bind `endpoint` (not an address, a port in
    use, a host that is not this machine's): binds a socket there and closes it again."""
    import zmq

    from covspec.transport.channel import bind, check_endpoint

    check_endpoint(endpoint, "bind address")
    if not endpoint.startswith("tcp://"):
        return
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        bind(sock, endpoint)
    finally:
        sock.close(linger=0)


def check_edge(edge: str, keys: ClientKeys | None = None, timeout_s: float = 10.0) -> float:
    """Whether the edge at `edge` answers a PING within `timeout_s` (seconds to reach it and to
    answer): its round trip in seconds, or PeerUnavailable (HandshakeRefused for a refused CURVE key),
    with progress logged while it waits. Needs neither torch nor a model: the CLI asks it first."""
    import time

    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client

    # the reply's wait outlasts the connection's, so an edge never reached is said as such
    with Client(edge, timeout_s=timeout_s + 2, retries=0, keys=keys, connect_timeout_s=timeout_s) as client:
        client.request(wire.Ping(t=0.0))
        sent = time.perf_counter()
        reply = client.request(wire.Ping(t=0.0))
        rtt = time.perf_counter() - sent
    if not isinstance(reply, wire.Pong):
        raise CovspecError(f"the edge at {edge} answered PING with {reply.TYPE}")
    return rtt


# --- the device --------------------------------------------------------------------------------
def bundle_draft(model: str | Path) -> Path | None:
    """The draft an edge bundle carries (covspec export puts the draft beside the target), else None."""
    from covspec.bundles.manifest import MANIFEST

    manifest = Path(model) / MANIFEST
    if not manifest.is_file():
        return None
    import json

    try:
        entry = json.loads(manifest.read_text()).get("draft")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # the target's load reports a broken manifest
    return Path(model) / entry if isinstance(entry, str) and (Path(model) / entry).is_dir() else None


def open_device(edge: str, draft: VLMAdapter, *, keys: ClientKeys | None = None, timeout_s: float = 30.0,
                retries: int = 2, profile: CalibrationProfile | None = None) -> DeviceRuntime:
    """A device connected to the edge at `edge` (HELLO answered): call .answer(...) on it, then .close().
    Raises PeerUnavailable (HandshakeRefused for a refused CURVE key) within about 10 s when the edge
    cannot be reached."""
    from covspec.device_runtime.client import DeviceRuntime, EdgeRefused

    try:
        return DeviceRuntime(draft, edge, timeout_s=timeout_s, retries=retries, keys=keys, profile=profile)
    except EdgeRefused as err:
        raise CovspecError(f"the edge at {edge}: {err}") from err


def answer(device: DeviceConfig, image: str | Path | bytes, prompt: str, ask: AnswerConfig | None = None, *,
           draft: VLMAdapter | None = None) -> Answer:
    """One answer to `prompt` about `image` (a file or its bytes) through the edge `device.edge`, as
    `ask` says (its mode, covspec/modes.py, sampling and length; default: AnswerConfig(), greedy
    covspec). The draft: `draft` (an adapter already loaded), else the device's `model` or `bundle`."""
    from covspec.device_runtime.client import EdgeRefused

    if isinstance(image, str | Path):
        from covspec.images import load_image

        load_image(image)  # unreadable, too large: an ImageError naming the file, before the edge sees it
        image = Path(image).read_bytes()
    ask = ask or AnswerConfig()
    draft = draft or load_draft(device.model, device.bundle, device.backend, device.threads)
    runtime = open_device(device.edge, draft, keys=device.keys, timeout_s=device.timeout_s, retries=device.retries,
                          profile=device.profile)
    try:
        return runtime.answer(image, prompt, ask.mode, ask.params, ask.max_new_tokens, window=ask.window,
                              options=ask.options)
    except EdgeRefused as err:
        raise CovspecError(f"the edge at {device.edge}: {err}") from err
    finally:
        runtime.close()


def _figure(value: float, digits: int = 3) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(value, digits)


def draft_name(draft: VLMAdapter) -> str:
    """Which draft runs, in words: "FOLDER on ExecuTorch|ONNX Runtime" or "FOLDER on PyTorch"."""
    backend = getattr(draft, "backend", None)
    runtime = {"executorch": "ExecuTorch", "onnx": "ONNX Runtime"}.get(backend, "PyTorch")
    return f"{draft.path} on {runtime}"


def answer_record(answer: Answer, draft: str = "", edge: str = "") -> dict[str, Any]:
    """An answer and its figures as one JSON-able dict (what `covspec device run --json` prints).
    `mean_accepted` of `mean_drafted` per round: windows are adaptive, so the drafted length varies."""
    n = len(answer.ids)
    drafted = sum(r.drafted for r in answer.rounds)
    accepted = sum(r.accepted for r in answer.rounds)
    rounds = len(answer.rounds)
    return {
        "text": answer.text, "ids": answer.ids, "mode": answer.mode, "draft": draft, "edge": edge,
        "tokens": n, "ttft_ms": _figure(answer.ttft_s * 1000, 1), "latency_ms": _figure(answer.latency_s * 1000, 1),
        "decode_tokens_per_s": _figure(answer.decode_tokens_per_s, 1),
        "bytes_up": answer.bytes_up, "bytes_down": answer.bytes_down,
        "up_per_token": _figure(answer.bytes_up / max(n, 1), 1),
        "down_per_token": _figure(answer.bytes_down / max(n, 1), 1),
        "rounds": rounds, "drafted": drafted, "accepted": accepted,
        "mean_drafted": _figure(drafted / rounds) if rounds else None,
        "mean_accepted": _figure(accepted / rounds) if rounds else None,
        "acceptance": _figure(answer.acceptance_rate),
        "kept_visual_tokens": answer.kept, "edge_streamed_rest": answer.streamed_rest,
        "edge_drafted_rest": answer.edge_drafted, "reopens": answer.reopens,
        "joined": None if answer.joined is None else {  # the edge started the answer while the draft prefilled
            "prefill_ms": _figure(None if answer.joined.prefill_s is None else answer.joined.prefill_s * 1000, 1),
            "at_token": answer.joined.at_token, "segments": answer.joined.segments,
            "at_ms": _figure(None if answer.joined.at_s is None else answer.joined.at_s * 1000, 1)},
    }


def describe_answer(record: dict[str, Any]) -> str:
    """answer_record's figures as one line for people."""
    figures = [f"{record['tokens']} tokens", f"first token {record['ttft_ms']:.0f} ms",
               f"latency {record['latency_ms']:.0f} ms"]
    if record["decode_tokens_per_s"] is not None:
        figures.append(f"decode {record['decode_tokens_per_s']:.1f} tokens/s")
    figures += [f"up {record['up_per_token']:.0f} B/token", f"down {record['down_per_token']:.0f} B/token"]
    mode = record["mode"]
    if mode == Mode.TARGET_ONLY:
        how = "the edge generated every token (target_only)"
    elif mode == Mode.EDGE_SD:
        how = "the edge drafted with its own draft and verified (edge_sd)"
    elif mode == Mode.DRAFT_ONLY:
        how = f"the draft alone ({record['draft']}), no edge"
    else:
        how = f"draft {record['draft']}, "
        if record["rounds"]:
            how += (f"{record['rounds']} rounds, mean accepted {record['mean_accepted']:.2f} of "
                    f"{record['mean_drafted']:.2f} drafted per round")
        else:
            how += "no verified rounds"
        if record.get("edge_drafted_rest"):
            how += ", then the edge drafted the rest itself (its drafting beat this device's over this link)"
        elif record["edge_streamed_rest"]:
            how += ", then the edge streamed the rest (speculation did not pay on this link)"
        joined = record.get("joined")
        if joined and joined["at_token"] is not None:
            how += (f"; the edge started the answer while the draft prefilled ({joined['prefill_ms']:.0f} ms), "
                    f"the device joining at token {joined['at_token']}")
    return "[" + ", ".join(figures) + "; " + how + "]"


# --- the bench ---------------------------------------------------------------------------------
def bench(**options: Any) -> Path:
    """`covspec bench` with `options` named as its flags (links="loopback,4g", modes=("target_only",
    "covspec"), prompts=4, bundle="runs/export/device", backend="onnx", out="runs/bench",
    edge="tcp://HOST:PORT", prompts_file="my/prompts.jsonl", ...); the others keep BenchConfig's
    defaults (covspec/tools/bench_config.py). Returns the output folder (summary.md, results.jsonl, plots)."""
    import argparse
    import shlex
    from dataclasses import asdict

    from covspec.tools import bench as bench_tool
    from covspec.tools.bench_config import BenchConfig

    try:
        config = BenchConfig(**options)
    except TypeError as err:
        raise TypeError(f"bench: {err}") from None
    args = argparse.Namespace(**asdict(config), action=None, dirs=[])
    args.command_line = "covspec.bench(" + ", ".join(f"{k}={shlex.quote(repr(v))}" for k, v in options.items()) + ")"
    bench_tool.run(args)
    return Path(args.out)
