"""The edge on a GPU, measured in one run (scripts/gpu_check.sh; at most --budget-s seconds):

1. a random target with the text shapes of Qwen2.5-VL-7B (28 layers x 3584, 28 heads / 4 KV heads,
   MLP 18944, vocab 152064; a 1-block vision tower, unused) in --dtype on --device;
2. verify time per window of 1..16 tokens after a --context-token prompt, for 1 session and for 8
   batched sessions: the DynamicCache paths the edge runs by default (adapter.forward; the packed
   batched pass), the static bucketed path eager, with CUDA graphs, and with torch.compile
   (reduce-overhead); each time the logits included, back on the CPU in float32, as the edge uses them;
3. target-only decode tokens/s (1 session, and 8 sessions batched);
4. the demo pair's greedy answers in float32 and bfloat16 on --device (how many differ);
5. the demo pair end to end with the edge in this process on --device in --dtype, default and on the
   static path with CUDA graphs: covspec vs target_only over loopback (latency, tokens/s, equal answers);
6. the same with `covspec bench` (the edge a process of its own): covspec vs target_only over loopback and wifi.

Before any timing, every path's logits are compared with the eager DynamicCache pass (`adapter.forward`)
on the same windows: the static bucketed path eager, with CUDA graphs, and under torch.compile (max
absolute difference, greedy agreement); a path off by more than --parity-atol, or whose greedy tokens
differ at more than --parity-disagree of the positions, fails the run. The run exits 1 when any path
failed (an error, a parity failure, covspec's answers not target_only's, a bench that failed), naming
them; the report is written either way.

`--cpu-smoke` shrinks everything (2 layers x 64, 2 reps, 1 prompt) to check the script end to end on
a CPU in seconds; `--shape small` is the CPU figures' shape. Rows go to OUT/verify.json, tables to
OUT/summary.md, the verify times as a plot to OUT/verify_ms.png (with matplotlib), the command to
OUT/command.txt.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from covspec.edge_runtime.batching import commit, run_batch
from covspec.edge_runtime.static_verify import StaticVerifier, eager_pass
from covspec.models.base import PrefillInputs
from covspec.models.placement import resolve_device, resolve_dtype

# text model shapes: (layers, hidden, heads, kv heads, MLP, vocab, M-RoPE sections of head_dim / 2)
SHAPES = {"qwen7b": (28, 3584, 28, 4, 18944, 152064, [16, 24, 24]),
          "small": (4, 512, 8, 2, 1408, 8192, [8, 12, 12]),
          "smoke": (2, 64, 4, 2, 128, 1000, [2, 3, 3])}
WINDOWS = tuple(range(1, 17))  # window lengths measured (root + drafts)
BATCH = 8


@dataclass
class Clock:
    """The run's deadline; `left()` seconds remain."""

    budget_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


def build_target(shape: str, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Qwen2.5-VL adapter of `shape` on device in dtype (no tokenizer)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from covspec.models.qwen2_5_vl import Qwen25VLAdapter

    layers, hidden, heads, kv, mlp, vocab, sections = SHAPES[shape]
    text = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "default", "mrope_section": sections, "rope_theta": 1e6}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden,
              "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 4,
                              video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(dtype=dtype).eval()
    return Qwen25VLAdapter(model, tokenizer=None)


def prefilled(adapter, length: int, seed: int = 0):
    """A DecodeState after `length` random prompt tokens (M-RoPE positions 0..length-1 on every axis)."""
    ids = torch.randint(0, adapter.vocab_size - 8, (length,), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(length).view(1, 1, length).expand(3, 1, length)
    with torch.inference_mode():
        return adapter.start(PrefillInputs(adapter.embed(ids), positions, {"rope_delta": 0}))[1]


def interleaved_ms(runs: dict, reps: int, sync, failed: dict[str, str], warmup: int = 2) -> dict[str, list[float]]:
    """name -> ms of each of `reps` timed calls of runs[name](), the paths taking turns within each rep,
    so that a machine's changing load weighs on all of them alike. A path that raises is left out, its
    error kept in `failed`."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(warmup + reps):
        for name, fn in runs.items():
            if name in failed:
                continue
            try:
                sync()
                start = time.perf_counter()
                fn()
                sync()
            except Exception as err:  # reported in the rows; the other paths are still measured
                failed[name] = f"{type(err).__name__}: {err}"[:300]
                continue
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: t for name, t in times.items() if name not in failed}


def timing(times: list[float]) -> dict[str, float]:
    return {"ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3)}


def compiled_pass(backend: str = "inductor"):
    """eager_pass under torch.compile: inductor in reduce-overhead mode (CUDA graphs of the compiled
    kernels), or another backend (e.g. "aot_eager": dynamo's tracing and guards without code generation)."""
    options = {"mode": "reduce-overhead"} if backend == "inductor" else {}
    return torch.compile(eager_pass, backend=backend, dynamic=False, **options)


def verify_paths(adapter, states: list, args, compiled: bool = False) -> dict:
    """path -> a function(windows) running one verify of these windows on `states`, caches unchanged,
    returning the logits [n_i, V] of each window: the DynamicCache path, the static bucketed path eager
    and (on CUDA) with CUDA graphs; with `compiled`, only the static path under torch.compile."""
    variants = {"static_eager": {}}
    if adapter.device.type == "cuda":
        variants["static_graphs"] = {"cuda_graphs": True}
    paths = {}
    if compiled:
        variants = {"static_compile": {"runner": compiled_pass(getattr(args, "compile_backend", "inductor"))}}
    else:
        def dynamic(windows):
            if len(windows) == 1:
                logits = adapter.forward(states[0], windows[0])
                adapter.truncate(states[0], states[0].length - windows[0].numel())
                return [logits]
            return run_batch(adapter, states, windows)

        paths["dynamic"] = dynamic
    for name, options in variants.items():
        verifier = StaticVerifier.create(adapter, slots=len(states), max_len=args.context + 64,
                                         cuda_graphs=options.get("cuda_graphs", False))
        verifier.runner = options.get("runner")
        if verifier.runner is not None:  # the cache is mutated in place: static for cudagraph trees, as HF's StaticCache
            for tensor in verifier.pool.keys + verifier.pool.values:
                torch._dynamo.mark_static_address(tensor)
        static = [verifier.open(s) for s in states]
        paths[name] = lambda windows, v=verifier, st=static: v.verify(st, windows)
    return paths


def measure_verify(adapter, sessions: int, clock: Clock, args, sync, compiled: bool = False,
                   windows: tuple[int, ...] | None = None, margin_s: float = 0.0) -> list[dict]:
    """Rows {sessions, path, window, ms (median), min_ms}: verify time per window length, every path
    (`verify_paths`) in turns; a window is skipped when less than reserve_s + margin_s is left."""
    states = [prefilled(adapter, args.context, seed=i) for i in range(sessions)]
    paths = verify_paths(adapter, states, args, compiled)
    rows, failed = [], {}
    for n in windows or args.windows:
        base = {"sessions": sessions, "window": n}
        if clock.left() < args.reserve_s + margin_s:
            rows += [{**base, "path": path, "skipped": "out of time"} for path in paths]
            continue
        ids = [torch.arange(5, 5 + n) for _ in states]
        times = interleaved_ms({path: (lambda run=run, ids=ids: run(ids)) for path, run in paths.items()}, args.reps, sync, failed)
        rows += [{**base, "path": path, **timing(times[path])} if path in times
                 else {**base, "path": path, "error": failed[path]} for path in paths]
    print(f"verify {sessions} session(s): done ({clock.left():.0f} s left)", flush=True)
    return rows


def parity(adapter, sessions: int, args, compiled: bool = False, windows: tuple[int, ...] = (1, 5, 16)) -> list[dict]:
    """Rows {sessions, path, window, max_abs_diff, greedy_agreement, ok}: each path's logits on the same
    windows (after the same prompts) against the eager DynamicCache pass, one session at a time
    (adapter.forward), in float32."""
    states = [prefilled(adapter, args.context, seed=i) for i in range(sessions)]
    paths = verify_paths(adapter, states, args, compiled)
    paths.pop("dynamic", None)
    rows = []
    for n in windows:
        ids = [torch.arange(5 + i, 5 + i + n) for i in range(sessions)]
        with torch.inference_mode():
            want = []
            for state, window in zip(states, ids, strict=True):
                want.append(adapter.forward(state, window).float().cpu())
                adapter.truncate(state, state.length - n)
        for path, run in paths.items():
            row = {"sessions": sessions, "path": path, "window": n}
            try:
                with torch.inference_mode():
                    got = [g.float().cpu() for g in run(ids)]
            except Exception as err:  # the row says why; the run fails on it
                rows.append({**row, "error": f"{type(err).__name__}: {err}"[:300], "ok": False})
                continue
            diff = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
            agree = float(torch.cat([(g.argmax(-1) == w.argmax(-1)).float() for g, w in zip(got, want, strict=True)]).mean())
            ok = diff <= args.parity_atol and agree >= 1.0 - args.parity_disagree
            rows.append({**row, "max_abs_diff": round(diff, 6), "greedy_agreement": round(agree, 4), "ok": ok})
    print(f"parity {sessions} session(s): " + ", ".join(f"{r['path']}@{r['window']}: "
                                                       f"{r.get('max_abs_diff', r.get('error'))}" for r in rows), flush=True)
    return rows


def failures(report: dict) -> list[str]:
    """What failed in the run: errored paths, parity failures, covspec answers that are not target_only's,
    a bench that failed."""
    out = [f"verify {r['path']} x{r['sessions']} window {r['window']}: {r['error']}"
           for r in report["verify"] if "error" in r]
    out += [f"decode {r['path']} x{r['sessions']}: {r['error']}" for r in report["decode"] if "error" in r]
    out += [f"parity {r['path']} x{r['sessions']} window {r['window']}: " + (
            r["error"] if "error" in r else f"max |diff| {r['max_abs_diff']} (> {report['parity_atol']}) or greedy "
            f"agreement {r['greedy_agreement']}") for r in report.get("parity", []) if not r["ok"]]
    out += [f"edge {e['settings'] or 'default'}: covspec equals target_only on {e['covspec_equals_target_only']} of "
            f"{e['prompts']}" for e in report.get("edges", []) if e["covspec_equals_target_only"] != e["prompts"]]
    out += [f"bench: {b.get('error') or 'exit status ' + str(b.get('rc'))}" for b in report.get("bench", [])
            if b.get("error") or b.get("rc")]
    return out


def plot(report: dict, out: Path) -> Path | None:
    """OUT/verify_ms.png: verify ms per window length, each path and session count (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, sessions in zip(axes, (1, BATCH), strict=True):
        rows = [r for r in report["verify"] if r["sessions"] == sessions and "ms" in r]
        for path in dict.fromkeys(r["path"] for r in rows):
            points = [(r["window"], r["ms"]) for r in rows if r["path"] == path]
            ax.plot(*zip(*points, strict=True), marker="o", label=path)
        ax.set(title=f"{sessions} session(s)", xlabel="window (tokens)", ylabel="verify ms (median)")
        ax.legend()
    fig.suptitle(f"gpu_check: {report['shape']} target, {report['dtype']} on {report['device_name']}")
    fig.tight_layout()
    fig.savefig(out / "verify_ms.png", dpi=100)
    plt.close(fig)
    return out / "verify_ms.png"


def measure_decode(adapter, sessions: int, args, sync) -> list[dict]:
    """Rows {sessions, path, tokens_per_s}: target-only decoding, one token per pass per session."""
    steps = args.decode_steps
    states = [prefilled(adapter, args.context, seed=i) for i in range(sessions)]
    dyn = [copy.deepcopy(s) for s in states]
    token = [torch.tensor([7])] * sessions

    def dynamic():
        if sessions == 1:
            adapter.forward(dyn[0], token[0])
        else:
            for state, window in zip(dyn, run_batch(adapter, dyn, token), strict=True):
                commit(state, window, 1)

    runs = {"dynamic": dynamic}
    for name, graphs in (("static_eager", False), ("static_graphs", True)):
        if graphs and adapter.device.type != "cuda":
            continue
        verifier = StaticVerifier.create(adapter, slots=sessions, max_len=args.context + steps + 64, cuda_graphs=graphs)
        static = [verifier.open(s) for s in states]

        def step(v=verifier, st=static):
            v.verify(st, token)
            for s in st:
                v.commit(s, 1)

        runs[name] = step
    failed: dict[str, str] = {}
    times = interleaved_ms(runs, steps, sync, failed)
    return [{"sessions": sessions, "path": name, "tokens_per_s": round(sessions * 1000 / statistics.median(times[name]), 2),
             "best_tokens_per_s": round(sessions * 1000 / min(times[name]), 2)} if name in times
            else {"sessions": sessions, "path": name, "error": failed[name]} for name in runs]


def demo_dtype_answers(device: str, prompts: int, max_new_tokens: int = 48) -> dict:
    """The demo target's greedy answers to held-out prompts in float32 and bfloat16 on `device`: how many differ."""
    from covspec.demo import default_target_path
    from covspec.demo.task import sample_split
    from covspec.edge_runtime.target import load_target
    from covspec.generation import generate

    answers = {}
    for dtype in ("float32", "bfloat16"):
        adapter, _ = load_target(default_target_path(), device=device, dtype=dtype)
        answers[dtype] = [generate(adapter, item.image, item.question, max_new_tokens=max_new_tokens).ids
                          for item in sample_split("heldout", prompts, seed=0)]
    differ = [i for i, (a, b) in enumerate(zip(answers["float32"], answers["bfloat16"], strict=True)) if a != b]
    return {"prompts": prompts, "differ": len(differ), "differing_items": differ}


def edge_in_process(args, prompts: int, **settings) -> dict:
    """The demo pair end to end over loopback with the edge in this process on --device in --dtype
    (`settings`: the static path, CUDA graphs): target_only and covspec on held-out describe prompts, mean
    latency and decode tokens/s per mode, and how many covspec answers equal target_only's."""
    import threading

    from covspec.demo import default_draft_path, default_target_path
    from covspec.demo.task import make_item
    from covspec.device_runtime.client import DeviceRuntime
    from covspec.edge_runtime.server import EdgeServer, EdgeSettings
    from covspec.edge_runtime.target import load_target
    from covspec.images import png_bytes
    from covspec.models import load_adapter
    from covspec.sampling import SamplingParams

    target, _ = load_target(default_target_path(), device=args.device, dtype=args.dtype)
    server = EdgeServer(target, EdgeSettings(bind="tcp://127.0.0.1:*", device=args.device, dtype=args.dtype, **settings))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.serve_once(timeout_s=0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    device = DeviceRuntime(load_adapter(default_draft_path()), server.endpoint, timeout_s=60)
    answers: dict[str, list] = {"target_only": [], "covspec": []}
    try:
        for item in (make_item("heldout", i, 0, qtype="describe") for i in range(prompts)):  # long answers, as bench's
            for mode, found in answers.items():
                found.append(device.answer(png_bytes(item.image), item.question, mode, SamplingParams(), max_new_tokens=48))
    finally:
        device.close()
        stop.set()
        thread.join()
        server.close()
    same = sum(a.ids == b.ids for a, b in zip(answers["covspec"], answers["target_only"], strict=True))
    return {"settings": settings, "prompts": prompts, "covspec_equals_target_only": same,
            **{f"{mode}_latency_ms": round(1000 * statistics.mean(a.latency_s for a in found), 1) for mode, found in answers.items()},
            **{f"{mode}_tokens_per_s": round(statistics.mean(a.decode_tokens_per_s for a in found), 1)
               for mode, found in answers.items()}}


def run_bench(args, out: Path, clock: Clock) -> list[dict]:
    """`covspec bench` with the edge on --device in --dtype: covspec vs target_only over loopback and wifi."""
    command = [sys.executable, "-m", "covspec.cli", "bench", "--modes", "target_only,covspec", "--links", args.links,
               "--prompts", str(args.bench_prompts), "--edge-device", args.device, "--edge-dtype", args.dtype,
               "--out", str(out / f"bench-{args.dtype}")]
    timeout = max(30.0, clock.left() - 5)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        return [{"command": " ".join(command[2:]), "rc": done.returncode, "stdout_tail": done.stdout[-3000:],
                 "stderr_tail": done.stderr[-1500:]}]
    except subprocess.TimeoutExpired:
        return [{"command": " ".join(command[2:]), "error": f"timed out after {timeout:.0f} s"}]


def summary(report: dict) -> str:
    """The report as markdown tables: verify ms per window length, decode tokens/s, dtype answers, bench."""
    lines = [f"# gpu_check: {report['shape']} target, {report['dtype']} on {report['device_name']}", "",
             f"`{report['command']}`", "", f"torch {report['torch']}, {report['threads']} threads, context "
             f"{report['context']} tokens; ms: median / min of {report['reps']} runs, the paths taking turns; "
             "logits included (float32, to the CPU)", ""]
    windows = report["windows"]
    for sessions in (1, BATCH):
        rows = [r for r in report["verify"] if r["sessions"] == sessions]
        if not rows:
            continue
        lines += [f"## verify ms per window, {sessions} session(s)", "",
                  "| path | " + " | ".join(map(str, windows)) + " |", "|---" * (len(windows) + 1) + "|"]
        for path in dict.fromkeys(r["path"] for r in rows):
            cells = {r["window"]: (f"{r['ms']:.2f} / {r['min_ms']:.2f}" if "ms" in r
                                   else r.get("error", r.get("skipped", ""))[:24])
                     for r in rows if r["path"] == path}
            lines.append(f"| {path} | " + " | ".join(cells.get(n, "") for n in windows) + " |")
        lines.append("")
    lines += ["## target-only decode tokens/s (all sessions together)", "", "| sessions | path | tokens/s (median) | best |",
              "|---|---|---|---|"]
    lines += [f"| {r['sessions']} | {r['path']} | {r.get('tokens_per_s', r.get('error', ''))} | {r.get('best_tokens_per_s', '')} |"
              for r in report["decode"]]
    if report.get("dtype_answers"):
        d = report["dtype_answers"]
        lines += ["", f"## demo pair: float32 vs bfloat16 greedy answers on {report['device']}", "",
                  f"{d['differ']} of {d['prompts']} answers differ (items {d['differing_items']})"]
    if report.get("edges"):
        lines += ["", f"## demo pair, edge in process on {report['device']} ({report['dtype']}), loopback", "",
                  "| edge | prompts | covspec = target_only | target_only ms | covspec ms | target_only tok/s | covspec tok/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {'static, CUDA graphs' if e['settings'].get('cuda_graphs') else 'static' if e['settings'] else 'default'} | {e['prompts']} | "
                  f"{e['covspec_equals_target_only']} | {e['target_only_latency_ms']} | {e['covspec_latency_ms']} | "
                  f"{e['target_only_tokens_per_s']} | {e['covspec_tokens_per_s']} |" for e in report["edges"]]
    if report.get("parity"):
        lines += ["", "## logits of each path vs the eager DynamicCache pass (float32)", "",
                  "| sessions | path | window | max abs diff | greedy agreement | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['sessions']} | {r['path']} | {r['window']} | {r.get('max_abs_diff', r.get('error', ''))} | "
                  f"{r.get('greedy_agreement', '')} | {'yes' if r['ok'] else 'NO'} |" for r in report["parity"]]
    if report.get("failures"):
        lines += ["", "## FAILED", ""] + [f"- {f}" for f in report["failures"]]
    for bench in report.get("bench", []):
        lines += ["", "## end to end", "", f"`covspec {bench['command']}`", "", "```",
                  bench.get("stdout_tail", bench.get("error", "")), "```"]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"), help="the target's dtype")
    p.add_argument("--shape", default="qwen7b", choices=list(SHAPES), help="the random target's text shapes")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the windows")
    p.add_argument("--windows", type=lambda text: tuple(int(n) for n in text.split(",")), default=WINDOWS,
                   help="window lengths to time, comma-separated (default: 1..16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reps", type=int, default=10, help="timed runs per measurement (median)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed tokens of target-only decoding")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time at most")
    p.add_argument("--reserve-s", type=float, default=180.0, help="time kept for the demo pair (answers, edges, bench)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (reduce-overhead)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend (inductor: reduce-overhead mode; aot_eager: tracing without codegen)")
    p.add_argument("--parity-atol", type=float, default=None,
                   help="max |logit difference| of a path to the eager pass (default: 1e-3 in float32, 0.25 otherwise)")
    p.add_argument("--parity-disagree", type=float, default=None,
                   help="share of positions whose greedy token may differ from the eager pass's "
                        "(default: 0 in float32, 0.05 otherwise: bf16 kernels reorder sums)")
    p.add_argument("--links", default="loopback,wifi", help="the bench's links")
    p.add_argument("--bench-prompts", type=int, default=8, help="held-out prompts per link in the bench")
    p.add_argument("--dtype-prompts", type=int, default=20, help="held-out prompts for float32 vs bfloat16 answers")
    p.add_argument("--no-demo", dest="demo", action="store_false", help="skip the demo pair (answers and bench)")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the bench (keep the dtype answers)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a check of the script on the CPU in seconds: smoke shape, 2 reps, 1 bench prompt over loopback")
    p.add_argument("--out", default="results/gpu", help="output folder")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.shape, args.reps, args.decode_steps, args.context = "cpu", "smoke", 2, 4, 32
        args.windows = (1, 5, 16)
        args.compile, args.links, args.bench_prompts, args.dtype_prompts = False, "loopback", 1, 2
    wide = args.dtype != "float32"
    args.parity_atol = args.parity_atol if args.parity_atol is not None else (0.25 if wide else 1e-3)
    args.parity_disagree = args.parity_disagree if args.parity_disagree is not None else (0.05 if wide else 0.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    clock = Clock(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m covspec.tools.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "command.txt").write_text(command + "\n")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    report = {"command": command, "shape": args.shape, "dtype": args.dtype, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "context": args.context, "reps": args.reps, "windows": list(args.windows),
              "threads": torch.get_num_threads(), "verify": [], "decode": [], "parity": [],
              "parity_atol": args.parity_atol}
    adapter = build_target(args.shape, device, dtype)
    print(f"target {args.shape} built ({sum(p.numel() for p in adapter.model.parameters()) / 1e9:.2f} B params), "
          f"{clock.left():.0f} s left", flush=True)
    for sessions in (1, BATCH):
        report["parity"] += parity(adapter, sessions, args)
    if args.compile and device.type == "cuda":
        report["parity"] += parity(adapter, 1, args, compiled=True)
    for sessions in (1, BATCH):
        report["verify"] += measure_verify(adapter, sessions, clock, args, sync)
    for sessions in (1, BATCH):
        report["decode"] += measure_decode(adapter, sessions, args, sync)
    if args.compile and device.type == "cuda":  # last: each new shape compiles for a minute or so
        report["verify"] += measure_verify(adapter, 1, clock, args, sync, compiled=True, windows=(1, 8, 16), margin_s=90)
    del adapter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    (out / "verify.json").write_text(json.dumps(report, indent=1))
    if args.demo:
        report["dtype_answers"] = demo_dtype_answers(str(device), args.dtype_prompts)
        static = {"cuda_graphs": True} if device.type == "cuda" else {"static_cache": True}
        report["edges"] = [edge_in_process(args, args.bench_prompts, **settings) for settings in ({}, static)]
        report["bench"] = run_bench(args, out, clock) if args.bench else []
    report["failures"] = failures(report)
    (out / "verify.json").write_text(json.dumps(report, indent=1))
    (out / "summary.md").write_text(summary(report))
    plot(report, out)
    print(summary(report), flush=True)
    if report["failures"]:
        print(f"gpu_check: FAILED ({len(report['failures'])}): " + "; ".join(report["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
