"""`covspec bench`: end-to-end runs with the edge, the link emulator and the device as separate
processes, as a user would deploy them, over held-out demo prompts, per mode and link profile.

    edge  : `covspec edge serve` (1 thread)              <- tcp ->  link emulator (`covspec link`)
    device: `python -m covspec.tools.worker worker-LINK.json` (1 thread) <- tcp ->  link emulator

The device worker (covspec/tools/worker.py) gets its settings as one JSON file in the output folder
and writes one JSON row per request (answer ids, time to first token, latency, decode tokens/s,
bytes up/down counted on its socket, rounds, accepted lengths, score on the task); this process
gathers the rows, the emulator's own byte counts, and writes results.jsonl,
results.csv and summary.md (with the command that made them) into the output folder, and prints a
short table (latency, tokens/s, speed-up over target_only, bytes up per token, same answers).
`--bundle DIR --backend executorch|onnx`: the devices run the exported draft instead of the checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from covspec.errors import CovspecError
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

QUESTION_TYPES = ("describe", "mixed", "color", "shape", "count", "position", "existence", "relation")
ROW_FIELDS = ("link", "mode", "index", "qtype", "tokens", "ttft_s", "latency_s", "decode_tps", "bytes_up",
              "bytes_down", "up_per_token", "down_per_token", "decode_up_per_token", "rounds", "mean_accepted",
              "acceptance", "branch_hits", "kept", "streamed_rest", "score", "matches_target")


# --- the orchestrator ----------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> Path:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # output to a file or a pipe: room for the whole table
        console = Console(width=120)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "results.jsonl"
    rows_file.unlink(missing_ok=True)
    env = one_thread_env()
    edge_port = free_port()
    edge_endpoint = f"tcp://127.0.0.1:{edge_port}"
    edge = start_edge(args.target, edge_endpoint, out / "edge.log", "--device", args.edge_device,
                      "--dtype", args.edge_dtype, *edge_draft_options(args))
    link_stats: dict[str, dict] = {}
    try:
        for link_name in args.links.split(","):
            stats_file = out / f"link-{link_name}.json"
            link, link_endpoint = start_link(link_name, edge_port, stats_file)
            try:
                draft = (f"{args.bundle} on {'ExecuTorch' if args.backend == 'executorch' else 'ONNX Runtime'}"
                         if args.bundle else f"{args.draft} on PyTorch")
                console.print(f"[bold]link {link_name}[/]: {args.prompts} prompts x modes {','.join(args.modes)}, "
                              f"draft {draft}, edge {args.target}")
                settings = WorkerSettings.from_bench(args, edge=link_endpoint, link=link_name, rows=str(rows_file),
                                                     edge_pid=edge.pid)
                run_worker(settings.save(out / f"worker-{link_name}.json"), env, out / f"worker-{link_name}.log",
                           verbose=getattr(args, "verbose", False))
            finally:
                stop_link(link)
            if stats_file.exists():
                link_stats[link_name] = json.loads(stats_file.read_text())
    finally:
        stop_edge(edge)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    write_results(out, rows, link_stats, command=args.command_line)
    console.print(short_table(summarise(rows)))
    console.print(f"full table: {out / 'summary.md'}\nplots: {out / 'tokens_per_s.png'}, "
                  f"{out / 'bytes_per_token.png'}, {out / 'accepted_length.png'}")
    return out


def short_table(summary: list[dict]):
    """The figures a first look wants, per link and mode: latency, decode tokens/s, speed-up over
    target_only on the same link (its latency over this mode's), bytes up per token, same answers."""
    from rich.table import Table

    table = Table(title="covspec bench: means per request (speed-up: target_only's latency over the mode's)")
    for name in ("link", "mode", "latency ms", "decode tok/s", "speed-up", "up B/token", "same as target"):
        table.add_column(name, justify="left" if name in ("link", "mode") else "right", no_wrap=True)
    for s in summary:
        speedup = "" if np.isnan(s["speedup"]) else f"{s['speedup']:.2f}x"
        table.add_row(s["link"], s["mode"], f"{s['latency_ms']:.0f}", f"{s['decode_tps']:.1f}", speedup,
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


def _mean(values: list) -> float:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(np.mean(clean)) if clean else float("nan")


def token_acceptance(rows: list[dict]) -> float:
    """Per-token acceptance over the rows' rounds: accepted / (accepted + rejections), each round showing
    its accepted tokens and, unless accepted whole, one rejection (the tokens after it were never
    judged). Unlike accepted / drafted it does not fall as windows get longer."""
    rows = [r for r in rows if r.get("rejected_rounds") is not None and r["rounds"]]
    accepted = sum(r["mean_accepted"] * r["rounds"] for r in rows)
    judged = accepted + sum(r["rejected_rounds"] for r in rows)
    return accepted / judged if judged else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["link"], row["mode"])].append(row)
    summary = []
    for (link, mode), group in groups.items():
        tokens = sum(r["tokens"] for r in group)
        matches = [r["matches_target"] for r in group if r["matches_target"] is not None]
        summary.append({
            "link": link, "mode": mode, "requests": len(group),
            "decode_tps": _mean([r["decode_tps"] for r in group]),
            "ttft_ms": 1000 * _mean([r["ttft_s"] for r in group]),
            "ttft_p90_ms": 1000 * float(np.percentile([r["ttft_s"] for r in group], 90)),
            "latency_ms": 1000 * _mean([r["latency_s"] for r in group]),
            "up_per_token": sum(r["bytes_up"] for r in group) / max(tokens, 1),
            "down_per_token": sum(r["bytes_down"] for r in group) / max(tokens, 1),
            "decode_up_per_token": sum(r.get("decode_up_per_token", 0) * r["tokens"] for r in group) / max(tokens, 1),
            "branch_hits": _mean([r.get("branch_hits") for r in group]),
            "mean_accepted": _mean([r["mean_accepted"] for r in group]),
            "acceptance": _mean([r["acceptance"] for r in group]),
            "token_acceptance": token_acceptance(group),
            "score": _mean([r["score"] for r in group]),
            "same_as_target": f"{sum(matches)}/{len(matches)}" if matches else "",
            "edge_cpu_ms": _mean([r.get("edge_cpu_ms") for r in group]),
            "edge_drafted": _mean([r.get("edge_drafted") for r in group]),
        })
    reference = {s["link"]: s["latency_ms"] for s in summary if s["mode"] == "target_only"}
    for s in summary:  # end-to-end: target_only's mean latency on the link over this mode's
        base = reference.get(s["link"], float("nan"))
        s["speedup"] = base / s["latency_ms"] if s["latency_ms"] > 0 else float("nan")
    return summary


def write_results(out: Path, rows: list[dict], link_stats: dict[str, dict], command: str) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "links": link_stats}, indent=1))
    lines = ["# covspec bench", "", f"Command: `{command}`", "",
             "Per link and mode, means over requests. Bytes are counted on the device's socket (payload of every "
             "frame); tokens/s is decode rate after the first token; `same as target` counts answers identical "
             "token for token to target_only's on the same prompt.", "",
             "| link | mode | requests | decode tok/s | TTFT ms | latency ms | speed-up | up B/tok | decode up B/tok | "
             "down B/tok | mean accepted | acceptance | per-token acceptance | branch hits | task score | same as target | "
             "edge CPU ms/answer | edge drafted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['link']} | {s['mode']} | {s['requests']} | {s['decode_tps']:.1f} | {s['ttft_ms']:.0f} | "
                     f"{s['latency_ms']:.0f} | {s['speedup']:.2f} | {s['up_per_token']:.0f} | {s['decode_up_per_token']:.1f} | "
                     f"{s['down_per_token']:.0f} | {s['mean_accepted']:.2f} | {s['acceptance']:.2f} | "
                     f"{s['token_acceptance']:.3f} | "
                     f"{s['branch_hits']:.2f} | {s['score']:.3f} | {s['same_as_target']} | "
                     f"{s['edge_cpu_ms']:.0f} | {s['edge_drafted']:.2f} |")
    lines += ["", "`up B/tok` includes the OPEN message (the image); `decode up B/tok` counts only what is sent "
              "after it (the drafted windows), where the verification schemes differ. `acceptance` is accepted / "
              "drafted per request (it falls as windows get longer); `per-token acceptance` is accepted / (accepted "
              "+ rejections) over all rounds, the rate a drafted token is accepted given those before it were.", "",
              "Plots: tokens_per_s.png, bytes_per_token.png, accepted_length.png."]
    if link_stats:
        lines += ["", "Link emulator's own byte counts (both directions, all modes):", ""]
        for name, stats in link_stats.items():
            lines.append(f"- {name}: up {stats.get('bytes_up')} B, down {stats.get('bytes_down')} B")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot_results(out, rows, summary)


def plot_results(out: Path, rows: list[dict], summary: list[dict]) -> None:
    """tokens/s by link and mode, bytes per token by mode, accepted length over one request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(dict.fromkeys(s["link"] for s in summary))
    modes = list(dict.fromkeys(s["mode"] for s in summary))
    by = {(s["link"], s["mode"]): s for s in summary}
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    from covspec.cli.common import add_sampling_args
    from covspec.modes import MODES, mode_labels
    from covspec.transport.link import PROFILES

    p.add_argument("--target", default=None,
                   help="target checkpoint, or an edge bundle (covspec export's OUT/edge) (default: the demo target)")
    p.add_argument("--draft", default=None, help="draft checkpoint (default: the demo draft)")
    p.add_argument("--bundle", default=None,
                   help="the devices run this exported device bundle (covspec export's OUT/device) instead of "
                        "--draft (default: none, the draft checkpoint on PyTorch)")
    p.add_argument("--backend", default="auto", choices=("auto", "executorch", "onnx"),
                   help="what runs --bundle on the devices (auto: ExecuTorch when the bundle has its .pte, "
                        "else ONNX Runtime)")
    p.add_argument("--show-answers", action="store_true", help="print every answer's text under its row")
    p.add_argument("--modes", type=mode_labels, default=mode_labels("target_only,vanilla_sd,covspec,draft_only"),
                   metavar="MODE[@K],...",
                   help=f"comma-separated, target_only first (the reference answer): {', '.join(MODES)}; MODE@K "
                        "sets a fixed window K (e.g. vanilla_sd@8) (default: target_only,vanilla_sd,covspec,draft_only)")
    p.add_argument("--links", default="loopback,4g", help=f"link profiles, comma-separated: {', '.join(PROFILES)}")
    p.add_argument("--prompts", type=int, default=10, help="held-out demo prompts per link")
    p.add_argument("--start", type=int, default=0, help="index of the first held-out prompt")
    p.add_argument("--question-type", default="describe", choices=QUESTION_TYPES,
                   help="ask every scene this kind of question: describe gives long answers, so decode tokens/s "
                        "means something; mixed: the task's mix, mostly one-word answers")
    p.add_argument("--window", type=int, default=4, help="drafted tokens per verification (modes without @K)")
    p.add_argument("--keep", type=float, default=None,
                   help="share of visual tokens the pruning covspec modes keep (default: the mode's own)")
    p.add_argument("--merge", action="store_true",
                   help="pruning modes merge the dropped tokens into the kept ones (a draft trained so)")
    add_sampling_args(p, max_new_tokens=48)
    p.add_argument("--out", default="runs/bench",
                   help="output folder: rows, summary, plots, the workers' settings and the processes' logs")
    p.add_argument("--devices", default=None,
                   help="a load run instead: comma-separated device counts (e.g. 1,2,4,8), each that many device "
                        "processes against one edge (no link emulator), every device asking --prompts prompts in "
                        "each mode; per-device and aggregate tokens/s, p50/p99 request latency, the edge's batches "
                        "and peak RSS (see covspec/tools/load.py) (default: none, the link bench)")
    p.add_argument("--device-profile", default=None, metavar="NAME",
                   help="the devices run the draft at a named device's pace (device_runtime/profiles.json), a "
                        "labelled emulation named in every row (default: this machine's own pace)")
    p.add_argument("--edge-device", default="cpu", help="the edge's --device (cpu, cuda, cuda:N)")
    p.add_argument("--edge-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the edge's --dtype")
    p.add_argument("--edge-draft", default=None,
                   help="the draft the edge runs beside its target for edge_sd and covspec's placement ('none': "
                        "no draft on the edge) (default: --draft, when a mode drafts there)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="the edge's batch_wait_ms (0: no batching)")
    p.add_argument("--edge-threads", type=int, default=1,
                   help="with --devices: the edge's torch threads (1: devices running the draft on this machine "
                        "need the other core; with --replay the devices hardly use one, so the edge may take 2)")
    p.add_argument("--load-link", default="loopback",
                   help="with --devices: the link profile every device connection goes through (loopback: "
                        "straight to the edge)")
    p.add_argument("--replay", action="store_true",
                   help="with --devices: one real device first answers every device's prompts (recording its "
                        "messages), then the N devices replay those messages (load generators: no draft runs "
                        "on them, so they leave the cores to the edge)")


def run(args: argparse.Namespace) -> int:
    """`covspec bench`'s handler (args from add_arguments, and command_line from the CLI)."""
    from covspec import demo

    args.target = args.target or str(demo.default_target_path())
    args.draft = args.draft or str(demo.default_draft_path())
    if args.bundle:
        from covspec.bundles.backend import bundle_backend

        args.backend = bundle_backend(args.bundle, args.backend)
    if args.devices:
        from covspec.tools.load import run_load

        run_load(args)
        return 0
    run_bench(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`covspec bench ARGS` (the one CLI parser)."""
    from covspec.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
