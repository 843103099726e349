"""`covspec bench`: end-to-end runs with the edge, the link emulator and the device as separate
processes, as a user would deploy them, per mode and link profile.

    edge  : `covspec edge serve` (1 thread), the bench's own on --target; or with --edge tcp://HOST:PORT
            one already running (a GPU server), asked first what it serves (INFO: a draft that does not
            tokenize like its target, or edge_sd on an edge without a draft, refused before any answer)
    link  : `covspec link --profile P` in front of the edge for each of --links ("direct": none)
    device: `python -m covspec.tools.worker worker-LINK.json` (1 thread)

The prompts: the demo's held-out ones, or the user's (`--prompts-file`, covspec/tools/prompts.py: JSON
Lines of image + prompt + optional reference, or a folder of images with --question), every image
checked before anything runs. The device worker (covspec/tools/worker.py) gets its settings as one JSON
file in the output folder and writes one JSON row per request (answer ids, time to first token, latency,
per-token latency, decode tokens/s, bytes up/down counted on its socket, rounds, accepted lengths, task
score, the edge's busy and CPU time for the answer from its counters); this process gathers the rows and
writes results.jsonl / results.csv (a row per request), summary.jsonl / summary.csv / summary.md (per
link and mode: TTFT, latency and per-token latency at p50 / p90 / p99 and the mean, with the command
that made them), the edge's side (verify batches, busy share, CPU per answer: STATS, or its Prometheus
endpoint with --edge-metrics) and plots (latency CDFs among them), and prints a short table.
`--devices N` is a load run instead (covspec/tools/load.py), `covspec bench merge DIR...` merges runs.
Its settings: BenchConfig (covspec/tools/bench_config.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from covspec.errors import CovspecError
from covspec.tools.bench_config import add_arguments  # noqa: F401 - the CLI builds `covspec bench` with it
from covspec.tools.figures import _f, _mean, mean_ci95, percentiles, plot_cdfs, write_table
from covspec.tools.procs import (
    edge_draft_options,
    free_port,
    one_thread_env,
    start_edge,
    start_link,
    stop_edge,
    stop_link,
)
from covspec.tools.worker import WorkerSettings

ROW_FIELDS = ("link", "mode", "index", "qtype", "tokens", "ttft_s", "latency_s", "per_token_s", "queue_s",
              "response_s", "decode_tps", "bytes_up",
              "bytes_down", "up_per_token", "down_per_token", "decode_up_per_token", "rounds", "mean_accepted",
              "acceptance", "branch_hits", "kept", "streamed_rest", "score", "matches_target", "edge_busy_ms",
              "edge_cpu_ms", "device", "t_start", "t_end")


# --- the orchestrator ----------------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> None:
    """Every check that can fail before anything runs, in seconds: flags that go together, the user's
    prompts (each image opened), the remote edge reached and asked what it serves (a draft that does
    not fit it refused). Fills in the defaults that depend on other flags."""
    from covspec import demo
    from covspec.tools.bench_config import LOCAL_LINKS, REMOTE_LINKS
    from covspec.tools.edge_probe import ask_info, check_edge_fits, client_keys, scrape_metrics
    from covspec.tools.prompts import load_prompts

    out = Path(args.out)
    if args.edge:
        from covspec.transport.channel import check_endpoint

        check_endpoint(args.edge, "--edge")
        if args.target:
            raise CovspecError(f"--target serves an edge of the bench's own; with --edge the edge at {args.edge} "
                               "serves its target already (give one or the other)")
    elif args.key or args.edge_key:
        raise CovspecError("--key and --edge-key go with --edge (the bench's own edge runs without authentication)")
    keys = client_keys(args.key, args.edge_key)
    args.rates = parse_rates(args.rate)
    if args.rate and not args.devices:
        raise CovspecError("--rate goes with --devices N (an open-loop load run)")
    from covspec.tools.goodput import parse_slo

    try:
        args.slo_parsed = parse_slo(getattr(args, "slo", None) or "")
    except ValueError as e:
        raise CovspecError(str(e)) from None
    sessions = getattr(args, "edge_draft_sessions", None)
    if sessions is not None and (args.edge or sessions < 0):
        raise CovspecError("--edge-draft-sessions N (N at least 0) sets the bench's own edge; a running edge (--edge) "
                           "has its own `covspec edge serve --draft-sessions`")
    if getattr(args, "answers", None) is not None and (not args.devices or args.answers < 1):
        raise CovspecError("--answers N goes with --devices, N at least 1 (answers per device count in all)")
    args.checked_prompts = None
    if args.prompts_file:
        prompts = load_prompts(args.prompts_file, args.question)
        out.mkdir(parents=True, exist_ok=True)
        args.checked_prompts = str((out / "prompts.json").resolve())
        Path(args.checked_prompts).write_text(json.dumps([asdict(p) for p in prompts], indent=1) + "\n")
        args.prompts = args.prompts or len(prompts)
    elif args.question:
        raise CovspecError("--question goes with --prompts-file FOLDER (a folder of images, each asked the question)")
    args.prompts = args.prompts or 10
    args.draft = args.draft or str(demo.default_draft_path())
    if args.bundle:
        from covspec.bundles.backend import bundle_backend

        args.backend = bundle_backend(args.bundle, args.backend)
    args.links = args.links or (REMOTE_LINKS if args.edge else LOCAL_LINKS)
    args.edge_info = None
    if args.edge:  # reached, and serving a target this draft fits, before the first answer
        args.edge_info = check_edge_fits(args.edge, ask_info(args.edge, keys), args.draft, args.bundle, args.modes)
        print(args.edge_info, flush=True)
    else:
        args.target = args.target or str(demo.default_target_path())
    if args.edge_metrics:
        scrape_metrics(args.edge_metrics)


def parse_rates(text: str | None) -> list[float | None]:
    """`--rate 0.5,1,2`: the open-loop arrival rates (answers/s), each a run; [None]: closed loop."""
    if not text:
        return [None]
    try:
        rates = [float(r) for r in str(text).split(",") if r]
    except ValueError:
        raise CovspecError(f"--rate {text}: comma-separated answers per second, e.g. 0.5,1,2") from None
    if not rates or any(not r > 0 for r in rates):
        raise CovspecError(f"--rate {text}: each rate must be above 0 answers per second")
    return rates


def run_bench(args: argparse.Namespace) -> Path:
    from rich.console import Console

    from covspec.tools.edge_probe import EdgeCounters, client_keys, edge_side

    console = Console()
    if not console.is_terminal:  # output to a file or a pipe: room for the whole table
        console = Console(width=120)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "results.jsonl"
    rows_file.unlink(missing_ok=True)
    env = one_thread_env()
    keys = client_keys(args.key, args.edge_key)
    edge = None
    if args.edge:  # a running edge: the bench starts none of its own
        edge_endpoint = upstream = args.edge
    else:
        edge_port = free_port()
        edge_endpoint, upstream = f"tcp://127.0.0.1:{edge_port}", edge_port
        edge = start_edge(args.target, edge_endpoint, out / "edge.log", "--device", args.edge_device,
                          "--dtype", args.edge_dtype, *edge_draft_options(args))
    counters = EdgeCounters(edge_endpoint, args.edge_metrics, args.key, args.edge_key)
    link_stats: dict[str, dict] = {}
    edge_runs: dict[str, dict] = {}
    try:
        for link_name in args.links.split(","):
            stats_file = out / f"link-{link_name}.json"
            link, link_endpoint = (None, edge_endpoint) if link_name == "direct" else \
                start_link(link_name, upstream, stats_file, keys)
            try:
                draft = (f"{args.bundle} on {'ExecuTorch' if args.backend == 'executorch' else 'ONNX Runtime'}"
                         if args.bundle else f"{args.draft} on PyTorch")
                asked = f"prompts of {args.prompts_file}" if args.prompts_file else "held-out demo prompts"
                console.print(f"[bold]link {link_name}[/]: {args.prompts} {asked} x modes {','.join(args.modes)}, "
                              f"draft {draft}, edge {args.edge or args.target}")
                settings = WorkerSettings.from_bench(args, edge=link_endpoint, link=link_name, rows=str(rows_file),
                                                     edge_pid=None if edge is None else edge.pid, edge_side=True,
                                                     edge_metrics=args.edge_metrics)
                before, t0 = counters.read(), time.time()
                run_worker(settings.save(out / f"worker-{link_name}.json"), env, out / f"worker-{link_name}.log",
                           verbose=getattr(args, "verbose", False))
                answers = sum(1 for line in rows_file.read_text().splitlines() if f'"link": "{link_name}"' in line)
                edge_runs[link_name] = edge_side(before, counters.read(), answers, time.time() - t0)
            finally:
                if link is not None:
                    stop_link(link)
            if stats_file.exists():
                link_stats[link_name] = json.loads(stats_file.read_text())
    finally:
        if edge is not None:
            stop_edge(edge)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    write_results(out, rows, link_stats, command=args.command_line, edge_runs=edge_runs,
                  edge=args.edge_info or f"the bench's own edge serving {args.target}")
    console.print(short_table(summarise(rows)))
    console.print(f"full table: {out / 'summary.md'}\nplots: {out / 'latency_cdf.png'}, {out / 'tokens_per_s.png'}, "
                  f"{out / 'bytes_per_token.png'}, {out / 'accepted_length.png'}")
    return out


def short_table(summary: list[dict]):
    """The figures a first look wants, per link and mode: request latency p50 / p99, time to first
    token p50, decode tokens/s, speed-up over target_only on the same link (its mean latency over this
    mode's), bytes up per token, answers the same as target_only's. n: requests."""
    from rich.table import Table

    table = Table(title="covspec bench: per request (speed-up: target_only's mean latency over the mode's)")
    for name in ("link", "mode", "n", "lat p50 ms", "lat p99 ms", "TTFT p50", "tok/s", "speed-up", "up B/tok",
                 "same"):
        table.add_column(name, justify="left" if name in ("link", "mode") else "right", no_wrap=True)
    for s in summary:
        speedup = "" if np.isnan(s["speedup"]) else f"{s['speedup']:.2f}x"
        table.add_row(s["link"], s["mode"], str(s["requests"]), f"{s['latency_ms_p50']:.0f}",
                      f"{s['latency_ms_p99']:.0f}", f"{s['ttft_ms_p50']:.0f}", f"{s['decode_tps']:.1f}", speedup,
                      f"{s['up_per_token']:.0f}", s["same_as_target"])
    return table


NATIVE_LOG = re.compile(r"^\[[\w.]+:\d+\] ")  # the C++ runtimes' own log lines ("[cpuinfo_utils.cpp:71] ...")


def run_worker(command: list[str], env: dict[str, str], log: Path, verbose: bool = False) -> None:
    """Runs a device worker, its rows and answers shown as they come; the native runtimes' log lines
    (ExecuTorch's CPU probing) go only to `log` unless `verbose`."""
    with open(log, "w") as saved, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True) as worker:
        for line in worker.stdout:
            saved.write(line)
            if verbose or not NATIVE_LOG.match(line):
                sys.stdout.write(line)
                sys.stdout.flush()
    if worker.returncode:
        raise CovspecError(f"a device worker failed (exit {worker.returncode}); its output: {log}")


def token_acceptance(rows: list[dict]) -> float:
    """Per-token acceptance over the rows' rounds: accepted / (accepted + rejections), each round showing
    its accepted tokens and, unless accepted whole, one rejection (the tokens after it were never
    judged). Unlike accepted / drafted it does not fall as windows get longer."""
    rows = [r for r in rows if r.get("rejected_rounds") is not None and r["rounds"]]
    accepted = sum(r["mean_accepted"] * r["rounds"] for r in rows)
    judged = accepted + sum(r["rejected_rounds"] for r in rows)
    return accepted / judged if judged else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Per link and mode: TTFT, request latency and per-token latency (latency / tokens) at p50 / p90 /
    p99 and their means (ms), decode tokens/s, bytes per token, acceptance, same answers as
    target_only, the task score (with its 95% interval) and the edge's busy and CPU time per answer."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["link"], row["mode"])].append(row)
    summary = []
    for (link, mode), group in groups.items():
        tokens = sum(r["tokens"] for r in group)
        matches = [r["matches_target"] for r in group if r["matches_target"] is not None]
        summary.append({
            "link": link, "mode": mode, "requests": len(group), "tokens": tokens,
            **percentiles([r["ttft_s"] for r in group], "ttft_ms"),
            **percentiles([r["latency_s"] for r in group], "latency_ms"),
            **percentiles([r.get("per_token_s", r["latency_s"] / max(r["tokens"], 1)) for r in group], "per_token_ms"),
            "decode_tps": _mean([r["decode_tps"] for r in group]),
            "up_per_token": sum(r["bytes_up"] for r in group) / max(tokens, 1),
            "down_per_token": sum(r["bytes_down"] for r in group) / max(tokens, 1),
            "decode_up_per_token": sum(r.get("decode_up_per_token", 0) * r["tokens"] for r in group) / max(tokens, 1),
            "branch_hits": _mean([r.get("branch_hits") for r in group]),
            "mean_accepted": _mean([r["mean_accepted"] for r in group]),
            "acceptance": _mean([r["acceptance"] for r in group]),
            "token_acceptance": token_acceptance(group),
            "score": _mean([r["score"] for r in group]), "score_ci95": mean_ci95([r["score"] for r in group]),
            "same_as_target": f"{sum(matches)}/{len(matches)}" if matches else "",
            "identical": sum(matches) if matches else None,
            "edge_cpu_ms": _mean([r.get("edge_cpu_ms") for r in group]),
            "edge_busy_ms": _mean([r.get("edge_busy_ms") for r in group]),
            "edge_drafted": _mean([r.get("edge_drafted") for r in group]),
        })
        summary[-1]["ttft_ms"], summary[-1]["latency_ms"] = summary[-1]["ttft_ms_mean"], summary[-1]["latency_ms_mean"]
    reference = {s["link"]: s["latency_ms"] for s in summary if s["mode"] == "target_only"}
    for s in summary:  # end-to-end: target_only's mean latency on the link over this mode's
        base = reference.get(s["link"], float("nan"))
        s["speedup"] = base / s["latency_ms"] if s["latency_ms"] > 0 else float("nan")
    return summary


SUMMARY_FIELDS = ("link", "mode", "requests", "tokens", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "ttft_ms_mean",
                  "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean", "per_token_ms_p50",
                  "per_token_ms_p90", "per_token_ms_p99", "per_token_ms_mean", "decode_tps", "speedup",
                  "up_per_token", "down_per_token", "decode_up_per_token", "mean_accepted", "acceptance",
                  "token_acceptance", "branch_hits", "identical", "same_as_target", "score", "score_ci95",
                  "edge_busy_ms", "edge_cpu_ms", "edge_drafted")


def write_results(out: Path, rows: list[dict], link_stats: dict[str, dict], command: str,
                  edge_runs: dict[str, dict] | None = None, edge: str = "") -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    write_table(out, "summary", summary, SUMMARY_FIELDS)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "links": link_stats, "edge": edge,
                                                  "edge_side": edge_runs or {}}, indent=1))
    lines = ["# covspec bench", "", f"Command: `{command}`", "", *([f"Edge: {edge}.", ""] if edge else []),
             "Per link and mode, over its requests (n): time to first token (TTFT), request latency and per-token "
             "latency (latency / answer tokens) at p50 / p90 / p99 and the mean, in ms. Bytes are counted on the "
             "device's socket (payload of every frame); tokens/s is decode rate after the first token; `same as "
             "target` counts answers identical token for token to target_only's on the same prompt.", "",
             "| link | mode | n | TTFT p50 / p90 / p99 / mean | latency p50 / p90 / p99 / mean | per-token p50 / p90 / "
             "p99 / mean | decode tok/s | speed-up | up B/tok | decode up B/tok | down B/tok | mean accepted | "
             "acceptance | per-token acceptance | same as target | task score (95% CI) | edge busy ms/answer | "
             "edge CPU ms/answer | edge drafted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ttft, lat, tok = ((" / ".join(_f(s[f"{name}_{k}"], d) for k in ("p50", "p90", "p99", "mean")))
                          for name, d in (("ttft_ms", 0), ("latency_ms", 0), ("per_token_ms", 1)))
        score = "" if np.isnan(s["score"]) else f"{s['score']:.3f}" + (
            "" if np.isnan(s["score_ci95"]) else f" ± {s['score_ci95']:.3f}")
        lines.append(f"| {s['link']} | {s['mode']} | {s['requests']} | {ttft} | {lat} | {tok} | "
                     f"{_f(s['decode_tps'], 1)} | {_f(s['speedup'], 2)} | {s['up_per_token']:.0f} | "
                     f"{s['decode_up_per_token']:.1f} | {s['down_per_token']:.0f} | {_f(s['mean_accepted'], 2)} | "
                     f"{_f(s['acceptance'], 2)} | {_f(s['token_acceptance'], 3)} | {s['same_as_target']} | {score} | "
                     f"{_f(s['edge_busy_ms'], 1)} | {_f(s['edge_cpu_ms'], 1)} | {_f(s['edge_drafted'], 2)} |")
    lines += ["", "`up B/tok` includes the OPEN message (the image); `decode up B/tok` counts only what is sent "
              "after it (the drafted windows), where the verification schemes differ. `acceptance` is accepted / "
              "drafted per request (it falls as windows get longer); `per-token acceptance` is accepted / (accepted "
              "+ rejections) over all rounds, the rate a drafted token is accepted given those before it were. "
              "`task score`: the demo task's score, or with a prompts file's references the answer's token F1 "
              "against the reference. `edge busy` / `edge CPU`: the edge's own counters (STATS, or --edge-metrics) "
              "read before and after each answer.", "",
              "Rows: results.jsonl / results.csv (one per request); summary.jsonl / summary.csv (this table). "
              "Plots: latency_cdf.png, tokens_per_s.png, latency.png, bytes_per_token.png, accepted_length.png."]
    if edge_runs:
        lines += ["", "The edge's side, per link (its counters before and after the link's run, all modes):", "",
                  "| link | verify batches | windows per batch | busy share | busy ms/answer | CPU ms/answer |",
                  "|---|---|---|---|---|---|"]
        for name, e in edge_runs.items():
            lines.append(f"| {name} | {e['edge_batches']} | {e['windows_per_batch']:.2f} | {_f(e['edge_busy'], 2)} | "
                         f"{_f(e['edge_busy_ms_per_answer'], 1)} | {_f(e['edge_cpu_ms_per_answer'], 1)} |")
    if link_stats:
        lines += ["", "Link emulator's own byte counts (both directions, all modes):", ""]
        for name, stats in link_stats.items():
            lines.append(f"- {name}: up {stats.get('bytes_up')} B, down {stats.get('bytes_down')} B")
    (out / "summary.md").write_text("\n".join(line for line in lines) + "\n")
    plot_results(out, rows, summary)


def plot_results(out: Path, rows: list[dict], summary: list[dict]) -> None:
    """tokens/s by link and mode, bytes per token by mode, accepted length over one request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys(s["link"] for s in summary))
    modes = list(dict.fromkeys(s["mode"] for s in summary))
    by = {(s["link"], s["mode"]): s for s in summary}
    plot_cdfs(out / "latency_cdf.png", {f"link {link}": {m: [1000 * r["latency_s"] for r in rows
                                                            if r["link"] == link and r["mode"] == m] for m in modes}
                                        for link in links}, "request latency, ms", "Request latency by mode (CDF)")
    bars_by_link(out / "tokens_per_s.png", by, links, modes, "decode_tps", "decode tokens/s per request",
                 "Decode throughput by link profile and mode")
    bars_by_link(out / "latency.png", by, links, modes, "latency_ms", "request latency, ms (mean)",
                 "Latency by link profile and mode")

    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(modes), 4))
    spec = [m for m in modes if m not in ("draft_only",)]
    values = [_mean([by[(link, m)]["decode_up_per_token"] for link in links if (link, m) in by]) for m in spec]
    ax.bar(spec, [max(v, 1e-3) for v in values])
    ax.set_yscale("log")
    ax.set_ylabel("bytes up per generated token (after OPEN)")
    ax.set_title("Upload per token by mode")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "bytes_per_token.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in modes:
        longest = max((r for r in rows if r["mode"] == mode and r.get("accepted_per_round")),
                      key=lambda r: len(r["accepted_per_round"]), default=None)
        if longest is not None:
            ax.plot(longest["accepted_per_round"], marker=".", label=f"{mode} ({longest['link']} #{longest['index']})")
    ax.set_xlabel("round")
    ax.set_ylabel("accepted drafted tokens")
    ax.set_title("Accepted length over a request")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accepted_length.png", dpi=120)
    plt.close(fig)


def bars_by_link(path: Path, by: dict[tuple[str, str], dict], links: list[str], modes: list[str], field: str,
                 ylabel: str, title: str) -> None:
    """A grouped bar chart of one summary field: a group per link, a bar per mode."""
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(links) * max(1, len(modes) / 3), 4))
    for i, mode in enumerate(modes):
        ax.bar([x + i * width for x in range(len(links))],
               [by[(link, mode)][field] if (link, mode) in by else 0 for link in links], width, label=mode)
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(links))], links)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_merge(args: argparse.Namespace) -> Path:
    """`covspec bench merge DIR... --out OUT`: the rows of several runs (one per machine, each running a
    share of the devices against one edge) as one: results.jsonl rows into one bench summary,
    load.jsonl rows into one load summary per (mode, devices, rate) label; devices renamed DIR#:N."""
    from covspec.tools.load import merge_load

    if not args.dirs:
        raise CovspecError("merge: give the output folders to merge (covspec bench merge DIR... --out OUT)")
    out = Path(args.out)
    bench_rows, load_rows = [], []
    for number, folder in enumerate(Path(d) for d in args.dirs):
        found = [folder / name for name in ("results.jsonl", "load.jsonl") if (folder / name).is_file()]
        if not found:
            raise CovspecError(f"merge: {folder} has no results.jsonl or load.jsonl (a covspec bench --out folder)")
        for path in found:
            for line_number, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise CovspecError(f"merge: {path}:{line_number} is not a JSON row") from None
                row["device"] = f"{number}:{row.get('device', 0)}"
                (bench_rows if path.name == "results.jsonl" else load_rows).append(row)
    out.mkdir(parents=True, exist_ok=True)
    if bench_rows:
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_rows))
        write_results(out, bench_rows, {}, command=args.command_line, edge=f"merged from {', '.join(args.dirs)}")
        print(f"{len(bench_rows)} bench rows: {out / 'summary.md'}")
    if load_rows:
        merge_load(out, load_rows, args.command_line)
        print(f"{len(load_rows)} load rows: {out / 'load.md'}")
    return out


def run(args: argparse.Namespace) -> int:
    """`covspec bench`'s handler (args from add_arguments or a BenchConfig, and command_line)."""
    if getattr(args, "action", None) == "merge":
        run_merge(args)
        return 0
    if getattr(args, "dirs", None):
        raise CovspecError(f"unexpected arguments {' '.join(args.dirs)} (only `covspec bench merge DIR...` takes folders)")
    prepare(args)
    if args.devices:
        from covspec.tools.load import run_load

        run_load(args)
        return 0
    run_bench(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m covspec.tools.bench ARGS`: `covspec bench ARGS` with a parser of its own."""
    import shlex

    parser = argparse.ArgumentParser(prog="covspec bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["covspec", "bench", *argv])
    try:
        return run(args)
    except CovspecError as err:
        print(f"covspec bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
