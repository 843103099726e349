"""`covspec bench --devices 1,2,4,8`: N device processes against one edge, per mode.

    edge   : `covspec edge serve --threads 1 --batch-wait-ms W --schedule S --slo SLO` (its own process, scheduling
             its rounds by the bench's own --slo)
    devices: N x `python -m covspec.tools.worker SETTINGS.json` (1 thread each), straight to the edge, or each
             through the `--load-link` emulator profile

The devices load their draft, then start together (a go file) and each asks `--prompts` held-out
prompts of its own in the mode. Real devices run the draft on the same machine as the edge: on a
small machine they compete with it for the cores. With `--replay` the devices are load generators,
as servers are load-tested: one real device first answers every device's prompts in every mode
(a recording pass, recorded.msgpack: each request's messages and the edge's replies), then each device
replays its requests' messages (OPEN, the drafted VERIFY windows, STREAM, CLOSE) under a fresh
session id, waiting for every reply as the device did and, before each message, for the time the
recording device spent on its own work before sending it (drafting, pruning, prefill), with no draft
running; the edge does all of its real work, and each replayed request checks that the edge's
replies equal the recorded ones (`replay_matches`). The runs go count by count, every mode of a count
back to back (compared modes share the machine's same minutes). Reported per (mode, N): goodput at
the SLO first (answers/s within `--slo`, covspec/tools/goodput.py; against edge_sd with a paired
interval; devices served at SLO per mode), aggregate decode tokens/s (all tokens over the span from
the first request's start to the last one's end), per-device tokens/s (a device's tokens over its
own span; mean and min), request latency p50/p99 (one request = one answer), the edge's batched
passes in that run (STATS) and its peak RSS. Files: load.jsonl (one row per request), load.json
and load.md (the summary and the command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from covspec.tools.goodput import Slo, devices_served, goodput, paired_ratio, parse_slo, pooled_ratio, tpot_s
from covspec.tools.procs import process_cpu_s
from covspec.tools.replay import release
from covspec.tools.worker import WorkerSettings


def edge_peak_rss_mb(pid: int) -> float | None:
    """The edge process's peak resident set (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def edge_stats(endpoint: str) -> dict[str, float]:
    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client

    with Client(endpoint, timeout_s=30.0, retries=1) as client:
        return dict(client.request(wire.Stats()).counters)


def load_label(n: int, rate: float | None) -> str:
    """The rows' link label of a load run: "4dev" (closed loop) or "4dev@2/s" (open loop, 2 answers/s in all)."""
    return f"{n}dev" if rate is None else f"{n}dev@{rate:g}/s"


def prompts_for(args: argparse.Namespace, n: int) -> int:
    """Prompts each of N devices asks: --prompts, or ceil(--answers / N) where answers per count are given."""
    answers = getattr(args, "answers", None)
    return args.prompts if answers is None else -(-answers // n)


def worker_settings(args: argparse.Namespace, endpoint: str, mode: str, n: int, device: int,
                    rows: Path, go: Path, rate: float | None = None) -> WorkerSettings:
    """Device `device` of `n` in `mode`: its own prompts (`prompts_for`), after those of the devices before
    it; open loop, a 1/n share of the arrivals (n Poisson streams at rate/n make one at `rate`)."""
    prompts = prompts_for(args, n)
    return WorkerSettings.from_bench(
        args, edge=endpoint, link=load_label(n, rate), modes=(mode,), start=args.start + device * prompts, prompts=prompts,
        rows=str(rows), device=device, go=str(go), rate=None if rate is None else rate / n,
        replay_file=str(recording(Path(args.out), n, getattr(args, "edge_draft_sessions", None))) if args.replay else None)


def offered(n: int, sessions: int | None = None) -> bool:
    """Whether the edge offers to draft for N devices: at most `sessions` unfinished sessions (the bench's
    --edge-draft-sessions; default `EdgeSettings.draft_sessions`, edge_runtime.drafting)."""
    from covspec.edge_runtime.settings import EdgeSettings

    return n <= (EdgeSettings().draft_sessions if sessions is None else sessions)


def recording(out: Path, n: int, sessions: int | None = None) -> Path:
    """The recorded run N devices replay: while the edge offers to draft for them (`offered`) covspec may
    hand drafting over; past that the edge declines, so those replay a recording whose device drafted
    every window itself."""
    return out / ("recorded.msgpack" if offered(n, sessions) else "recorded-loaded.msgpack")


def run_devices(args: argparse.Namespace, out: Path, endpoint: str, mode: str, n: int,
                rate: float | None = None) -> list[dict]:
    """N device workers in `mode`, started together (open loop at `rate` answers/s in all); their rows."""
    from covspec.tools.procs import one_thread_env

    tag = f"{mode.replace('@', '-')}-{n}" + ("" if rate is None else f"-r{rate:g}")
    go = out / f"go-{tag}"
    files = [out / f"rows-{tag}-{i}.jsonl" for i in range(n)]
    for path in [go, *files, *(Path(f"{go}.ready.{i}") for i in range(n))]:
        path.unlink(missing_ok=True)
    log = open(out / f"devices-{tag}.log", "w")
    commands = [worker_settings(args, endpoint, mode, n, i, files[i], go, rate).save(out / f"worker-{tag}-{i}.json")
                for i in range(n)]
    procs = [subprocess.Popen(command, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT)
             for command in commands]
    try:
        release(go, n, procs)
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a device worker failed (see {log.name})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        log.close()
        for path in [go, *(Path(f"{go}.ready.{i}") for i in range(n))]:  # the start signal, spent
            path.unlink(missing_ok=True)
    rows = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    for row in rows:  # the SLO's per-answer figures, beside the row's own
        row.setdefault("tpot_s", tpot_s(row))
    return rows


def summarise_load(rows: list[dict], mode: str, n: int, batches: dict[str, float], rss_mb: float | None,
                   edge_cpu_s: float | None = None, rate: float | None = None, edge: dict | None = None,
                   slo: Slo | None = None) -> dict:
    """`edge_cpu_s`: the CPU time the edge process used while these requests ran. Per request, it is
    what one answer costs the edge; over the span, how busy the edge was (1.0: a one-thread edge
    saturated, and the aggregate cannot grow with more devices). `edge`: the edge's side from its own
    counters (edge_probe.edge_side: busy share, busy and CPU ms per answer), which take precedence.
    Open loop (`rate`): `response` is the latency a user sees, from the request's arrival, queueing
    at a busy device included; closed loop it equals the request latency."""
    from covspec.tools.figures import percentiles

    tokens = sum(r["tokens"] for r in rows)
    span = max(r["t_end"] for r in rows) - min(r["t_start"] for r in rows)
    per_device = []
    for device in sorted({r["device"] for r in rows}, key=str):
        mine = [r for r in rows if r["device"] == device]
        own = max(r["t_end"] for r in mine) - min(r["t_start"] for r in mine)
        per_device.append(sum(r["tokens"] for r in mine) / max(own, 1e-9))
    latency = np.array([r["latency_s"] for r in rows]) * 1000
    windows = batches.get("batched_windows", 0)
    summary = {"mode": mode, "devices": n, "rate": rate, "requests": len(rows), "tokens": tokens,
               **goodput(rows, slo or parse_slo("")),
               "answers_per_s": len(rows) / max(span, 1e-9),
               "aggregate_tps": tokens / max(span, 1e-9), "device_tps_mean": float(np.mean(per_device)),
               "device_tps_min": float(np.min(per_device)), "latency_p50_ms": float(np.percentile(latency, 50)),
               "latency_p99_ms": float(np.percentile(latency, 99)),
               **percentiles([r["latency_s"] for r in rows], "latency_ms"),  # latency_p50_ms/_p99_ms: as before
               **percentiles([r.get("ttft_s") for r in rows], "ttft_ms"),
               **percentiles([r.get("per_token_s", r["latency_s"] / max(r["tokens"], 1)) for r in rows], "per_token_ms"),
               **percentiles([r.get("response_s", r["latency_s"]) for r in rows], "response_ms"),
               "edge_batches": int(batches.get("batches", 0)),
               "windows_per_batch": windows / batches["batches"] if batches.get("batches") else 0.0,
               "edge_peak_rss_mb": rss_mb,
               "edge_cpu_ms_per_request": None if edge_cpu_s is None else 1000 * edge_cpu_s / max(len(rows), 1),
               "edge_busy": None if edge_cpu_s is None else edge_cpu_s / max(span, 1e-9),
               "edge_busy_ms_per_request": None,
               "replay_matches": None if "replay_matches" not in rows[0] else sum(r["replay_matches"] for r in rows)}
    if edge:  # the edge's own counts: a remote edge's (no /proc here), or the local one's STATS
        summary.update({k: v for k, v in (("edge_batches", edge["edge_batches"]),
                                          ("windows_per_batch", edge["windows_per_batch"]),
                                          ("edge_busy", edge["edge_busy"]),
                                          ("edge_busy_ms_per_request", edge["edge_busy_ms_per_answer"]),
                                          ("edge_cpu_ms_per_request", edge["edge_cpu_ms_per_answer"]))
                        if v is not None})
    return summary


LOAD_FIELDS = ("mode", "devices", "rate", "requests", "tokens", "goodput", "slo_share", "slo_ttft_ms_p99",
               "slo_tpot_ms_p99", "at_slo", "goodput_vs_edge_sd", "goodput_vs_edge_sd_low", "goodput_vs_edge_sd_high",
               "goodput_vs_covspec_no_placement", "goodput_vs_covspec_no_placement_low", "goodput_vs_covspec_no_placement_high",
               "answers_per_s", "aggregate_tps", "device_tps_mean",
               "device_tps_min", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "latency_ms_p50", "latency_ms_p90",
               "latency_ms_p99", "latency_ms_mean", "per_token_ms_p50", "per_token_ms_p90", "per_token_ms_p99",
               "response_ms_p50", "response_ms_p90", "response_ms_p99", "edge_batches", "windows_per_batch",
               "edge_busy", "edge_busy_ms_per_request", "edge_cpu_ms_per_request", "edge_peak_rss_mb", "replay_matches")


def run_rows(rows: list[dict], s: dict) -> list[dict]:
    """The rows of summary entry `s`: its mode, device count, rate and repeat."""
    label = load_label(s["devices"], s.get("rate"))
    return [r for r in rows if r["mode"] == s["mode"] and r["link"] == label and r.get("repeat", 0) == s.get("repeat", 0)]


def compare_goodput(summary: list[dict], rows: list[dict], slo: Slo, against: str = "edge_sd") -> None:
    """Each run's goodput over `against`'s run of the same devices, rate and repeat, with its 95% paired
    interval (goodput.paired_ratio), as goodput_vs_AGAINST[_low/_high]."""
    base = {(s["devices"], s.get("rate"), s.get("repeat", 0)): s for s in summary if s["mode"] == against}
    for s in summary:
        other = base.get((s["devices"], s.get("rate"), s.get("repeat", 0)))
        ratio = (float("nan"),) * 3 if other is None or s is other else paired_ratio(
            run_rows(rows, s), run_rows(rows, other), slo)
        s[f"goodput_vs_{against}"], s[f"goodput_vs_{against}_low"], s[f"goodput_vs_{against}_high"] = ratio


def goodput_lines(summary: list[dict], slo: Slo, rows: list[dict] | None = None) -> list[str]:
    """load.md's headline: devices served at the SLO per mode (one line each), and goodput per run."""
    from covspec.tools.figures import _f

    lines = [f"## Goodput at SLO (ttft={slo.ttft_ms:g} ms, tpot={slo.tpot_ms:g} ms: `--slo {slo}`)", "",
             "An answer meets the SLO when its time to first token (from arrival) and its time per output token "
             "after the first are both within it; goodput is the answers per second that do (over the run's span); "
             "a run is at SLO when its p99 TTFT and p99 TPOT are. `vs edge_sd`: goodput over edge_sd's at the same "
             "devices and repeat, 95% paired bootstrap interval over the prompts (covspec/tools/goodput.py).", ""]
    for mode, n in devices_served(summary).items():
        lines.append(f"- devices served at SLO by one edge, {mode}: {n}")
    against = ["edge_sd"] + (["covspec_no_placement"] if any("goodput_vs_covspec_no_placement" in s for s in summary) else [])

    def versus(s: dict, other: str) -> str:
        ratio = s.get(f"goodput_vs_{other}", float("nan"))
        return "" if ratio != ratio else (f"{ratio:.2f} [{_f(s[f'goodput_vs_{other}_low'], 2)}, "
                                          f"{_f(s[f'goodput_vs_{other}_high'], 2)}]")

    lines += ["", "| mode | devices | rate /s | repeat | goodput answers/s | answers/s | met SLO | p99 TTFT ms | "
              "p99 TPOT ms | at SLO | " + " | ".join(f"vs {other} [95%]" for other in against) + " |",
              "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(against)]
    for s in summary:
        lines.append(f"| {s['mode']} | {s['devices']} | {'' if s.get('rate') is None else format(s['rate'], 'g')} | "
                     f"{s.get('repeat', 0)} | {s['goodput']:.2f} | {s['answers_per_s']:.2f} | {s['slo_met']}/{s['requests']} | "
                     f"{s['slo_ttft_ms_p99']:.0f} | {s['slo_tpot_ms_p99']:.1f} | {'yes' if s['at_slo'] else 'no'} | "
                     + " | ".join(versus(s, other) for other in against) + " |")
    return lines + [""] + pooled_lines(summary, rows or [], slo, against)


def pooled_lines(summary: list[dict], rows: list[dict], slo: Slo, against: list[str]) -> list[str]:
    """load.md's table of the repeats pooled: each mode over each of `against` at a device count run more
    than once (goodput.pooled_ratio: the repeats ran their modes in alternating order)."""
    from covspec.tools.figures import _f

    repeated = sorted({(s["devices"], s.get("rate")) for s in summary if s.get("repeat", 0) > 0},
                      key=lambda k: (k[0], k[1] or 0))
    if not repeated or not rows:
        return []
    lines = ["Repeats pooled (the modes of a count's repeats ran in alternating order, so that a drift of the "
             "machine's speed cancels out): each mode's answers met per second of answer time over the other's, "
             "prompts paired within their repeat, 95% bootstrap interval (goodput.pooled_ratio).", "",
             "| mode | devices | rate /s | repeats | " + " | ".join(f"vs {o}, pooled [95%]" for o in against) + " |",
             "|---|---|---|---|" + "---|" * len(against)]
    for mode in dict.fromkeys(s["mode"] for s in summary):
        for n, rate in repeated:
            runs = [s for s in summary if s["mode"] == mode and s["devices"] == n and s.get("rate") == rate]
            mine = [r for s in runs for r in run_rows(rows, s)]
            cells = []
            for other in against:
                theirs = [r for s in summary if s["mode"] == other and s["devices"] == n and s.get("rate") == rate
                          for r in run_rows(rows, s)]
                ratio = (float("nan"),) * 3 if other == mode else pooled_ratio(mine, theirs, slo)
                cells.append("" if ratio[0] != ratio[0] else f"{ratio[0]:.2f} [{_f(ratio[1], 2)}, {_f(ratio[2], 2)}]")
            lines.append(f"| {mode} | {n} | {'' if rate is None else format(rate, 'g')} | {len(runs)} | "
                         + " | ".join(cells) + " |")
    return lines + [""]


def write_load(out: Path, summary: list[dict], args: argparse.Namespace, rows: list[dict] | None = None) -> None:
    from covspec.tools.figures import _f, write_table

    slo = getattr(args, "slo_parsed", None) or parse_slo(getattr(args, "slo", None) or "")
    if rows:
        compare_goodput(summary, rows, slo)
        if any(s["mode"] == "covspec_no_placement" for s in summary):  # the other side covspec must not lose to
            compare_goodput(summary, rows, slo, "covspec_no_placement")

    (out / "load.json").write_text(json.dumps({"summary": summary, "command": args.command_line, "slo": str(slo),
                                               "devices_served_at_slo": devices_served(summary),
                                               "edge": getattr(args, "edge_info", None)}, indent=1))
    write_table(out, "load-summary", summary, LOAD_FIELDS)
    remote = getattr(args, "edge", None)
    schedule = getattr(args, "edge_schedule", "slo")
    edge = (f"Edge: {args.edge_info or remote}, already running (the bench started none). " if remote else
            f"Edge: the bench's own, {args.edge_threads} thread{'s' if args.edge_threads > 1 else ''}, batch_wait_ms "
            f"{args.batch_wait_ms}, schedule {schedule} "
            f"({'its rounds by the SLO below' if schedule == 'slo' else 'its rounds in arrival order'}). ")
    lines = ["# covspec bench --devices", "", f"Command: `{args.command_line}`", "",
             edge + "Devices: "
             + ("load generators replaying the messages of a recorded real run, each message after the time the "
                "recording device spent on its own work before it (no draft running); `replayed equal` counts "
                "requests whose edge replies equal the recorded ones. "
                if args.replay else "separate processes running the real draft (1 thread each) on this "
                "machine. ")
             + (f"Link: each device's connection through the `{args.load_link}` emulator (recording included). "
                if args.load_link != "loopback" else "Link: none, straight to the edge. ")
             + "A request is one answer; tokens/s counts every answer token (aggregate: over the span of all "
             "requests; per device: over its own). Closed loop (no rate): each device asks its next prompt once "
             "it has its answer. Open loop (rate R/s): requests arrive at R per second in all (Poisson), however "
             "long the answers take; `response` counts from the arrival, the wait for a busy device included. "
             "Latencies in ms, p50 / p90 / p99.", "", *goodput_lines(summary, slo, rows), "## Latency and throughput", "",
             "| mode | devices | rate /s | requests | answers/s | aggregate tok/s | per-device tok/s (mean / min) | "
             "TTFT p50 / p99 | latency p50 / p90 / p99 | per-token p50 / p99 | response p50 / p90 / p99 | "
             "edge batches | windows per batch | edge busy | edge busy ms/answer | edge CPU ms/answer | "
             "edge peak RSS MiB | replayed equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        equal = "" if s["replay_matches"] is None else f"{s['replay_matches']}/{s['requests']}"
        lines.append(f"| {s['mode']} | {s['devices']} | {'' if s.get('rate') is None else f'{s[chr(114) + chr(97) + chr(116) + chr(101)]:g}'} | "
                     f"{s['requests']} | {s['answers_per_s']:.2f} | {s['aggregate_tps']:.1f} | "
                     f"{s['device_tps_mean']:.1f} / {s['device_tps_min']:.1f} | "
                     f"{_f(s['ttft_ms_p50'])} / {_f(s['ttft_ms_p99'])} | {s['latency_p50_ms']:.0f} / "
                     f"{_f(s['latency_ms_p90'])} / {s['latency_p99_ms']:.0f} | {_f(s['per_token_ms_p50'], 1)} / "
                     f"{_f(s['per_token_ms_p99'], 1)} | {_f(s['response_ms_p50'])} / {_f(s['response_ms_p90'])} / "
                     f"{_f(s['response_ms_p99'])} | {s['edge_batches']} | {s['windows_per_batch']:.2f} | "
                     f"{_f(s.get('edge_busy'), 2)} | {_f(s.get('edge_busy_ms_per_request'), 1)} | "
                     f"{_f(s.get('edge_cpu_ms_per_request'), 1)} | {_f(s['edge_peak_rss_mb'])} | {equal} |")
    lines += ["", "Rows: load.jsonl (one per request); load-summary.jsonl / load-summary.csv (this table). Plots: "
              "goodput.png (goodput at the SLO against devices), aggregate_tps.png, latency_cdf.png (request latency per mode, a line per devices and rate)" +
              (", response_cdf.png (from arrival, open loop)" if any(s.get("rate") for s in summary) else "") + "."]
    (out / "load.md").write_text("\n".join(lines) + "\n")
    plot_load(out, summary, rows or [])


def plot_load(out: Path, summary: list[dict], rows: list[dict]) -> None:
    """aggregate_tps.png: aggregate tokens/s by number of devices, a line per mode (closed loop, or the
    first rate); latency_cdf.png (and response_cdf.png, open loop): a panel per mode, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covspec.tools.figures import plot_cdfs

    plot_goodput(out, summary)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(s["mode"] for s in summary):
        first_rate = next(s.get("rate") for s in summary if s["mode"] == mode)
        points = sorted((s["devices"], s["aggregate_tps"]) for s in summary
                        if s["mode"] == mode and s.get("rate") == first_rate)
        ax.plot([n for n, _ in points], [t for _, t in points], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Aggregate throughput by number of devices")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "aggregate_tps.png", dpi=120)
    plt.close(fig)
    if not rows:
        return
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    labels = list(dict.fromkeys(r["link"] for r in rows))
    for field, name, title in (("latency_s", "latency_cdf.png", "Request latency under load (CDF)"),
                               ("response_s", "response_cdf.png", "Response time from arrival, open loop (CDF)")):
        if field == "response_s" and not any("@" in label for label in labels):
            continue
        plot_cdfs(out / name, {mode: {label: [1000 * r.get(field, r["latency_s"]) for r in rows
                                              if r["mode"] == mode and r["link"] == label] for label in labels}
                               for mode in modes}, f"{field.removesuffix('_s').replace('_', ' ')}, ms", title)


def plot_goodput(out: Path, summary: list[dict]) -> None:
    """goodput.png: goodput at the SLO against offered load (devices, closed loop; or rate, open loop),
    a line per mode through the mean of its repeats, each repeat a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    open_loop = all(s.get("rate") is not None for s in summary)
    load = (lambda s: s["rate"]) if open_loop else (lambda s: s["devices"])  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(s["mode"] for s in summary):
        runs = [s for s in summary if s["mode"] == mode and (open_loop or s.get("rate") is None)]
        points = sorted({load(s) for s in runs})
        means = [float(np.mean([s["goodput"] for s in runs if load(s) == x])) for x in points]
        line, = ax.plot(points, means, marker="o", label=mode)
        ax.scatter([load(s) for s in runs], [s["goodput"] for s in runs], s=10, color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("offered load: " + ("answers/s (open loop)" if open_loop else "devices (closed loop)"))
    ax.set_ylabel("goodput: answers/s meeting the SLO")
    ax.set_title("Goodput at the SLO against offered load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "goodput.png", dpi=120)
    plt.close(fig)


def record(args: argparse.Namespace, out: Path, endpoint: str, devices: int, prompts: int | None = None) -> None:
    """The recording pass: one real device answers the prompts of `devices` devices in every mode (past
    what the edge offers to draft for, as on a loaded edge: no hand-over of drafting)."""
    from covspec.tools.procs import one_thread_env

    sessions = getattr(args, "edge_draft_sessions", None)
    recorded = recording(out, devices, sessions)
    recorded.unlink(missing_ok=True)
    rows = out / f"{recorded.stem}.jsonl"
    rows.unlink(missing_ok=True)
    settings = WorkerSettings.from_bench(args, edge=endpoint, link="recording", prompts=prompts or devices * args.prompts,
                                         rows=str(rows), record=str(recorded), hand_over=offered(devices, sessions))
    command = settings.save(out / f"worker-{recorded.stem}.json")
    with open(out / f"{recorded.stem}.log", "w") as log:
        subprocess.run(command, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT, check=True)


def run_load(args: argparse.Namespace) -> Path:
    """Per mode, device count and rate: N devices against the edge (the bench's own, or a running one
    at --edge), the edge's counters read before and after."""
    from covspec.tools.edge_probe import EdgeCounters, client_keys, edge_side
    from covspec.tools.procs import (
        edge_draft_options,
        free_port,
        start_edge,
        start_link,
        stop_edge,
        stop_link,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo = getattr(args, "slo_parsed", None) or parse_slo(getattr(args, "slo", None) or "")
    counts = [int(n) for n in str(args.devices).split(",")]
    rates = getattr(args, "rates", None) or [None]
    edge = None
    if getattr(args, "edge", None):  # a running edge: the bench starts none
        endpoint = upstream = args.edge
    else:
        edge_port = free_port()
        endpoint, upstream = f"tcp://127.0.0.1:{edge_port}", edge_port
        edge = start_edge(args.target, endpoint, out / "edge.log", "--max-sessions-per-device", "64",
                          "--batch-wait-ms", str(args.batch_wait_ms), "--device", getattr(args, "edge_device", "cpu"),
                          "--dtype", getattr(args, "edge_dtype", "float32"), *edge_draft_options(args),
                          "--schedule", getattr(args, "edge_schedule", "slo"), "--slo", str(slo),
                          *(() if getattr(args, "edge_draft_sessions", None) is None else
                            ("--draft-sessions", str(args.edge_draft_sessions))),
                          threads=args.edge_threads)
    counters = EdgeCounters(endpoint, getattr(args, "edge_metrics", None), getattr(args, "key", None),
                            getattr(args, "edge_key", None))
    summary, all_rows = [], []
    link = None
    try:
        devices_endpoint = endpoint  # loopback: the devices talk to the edge straight
        if args.load_link != "loopback":  # each device's connection through the emulated link
            link, devices_endpoint = start_link(args.load_link, upstream,
                                                keys=client_keys(getattr(args, "key", None), getattr(args, "edge_key", None)))
        if args.replay:  # one recording for devices the edge drafts for, one for devices on a loaded edge
            sessions = getattr(args, "edge_draft_sessions", None)
            for group in ([n for n in counts if offered(n, sessions)], [n for n in counts if not offered(n, sessions)]):
                if group:
                    record(args, out, devices_endpoint, max(group), max(n * prompts_for(args, n) for n in group))
        # count-major, the modes of one count back to back: runs compared in pairs (goodput vs edge_sd) share
        # the same minutes of a machine whose other load drifts; a count's repeats alternate the order of the
        # modes (a-b, then b-a), so that a drift cancels out of the repeats pooled (pooled_ratio)
        for i, n in enumerate(counts):
            for rate in rates:
                for mode in args.modes if counts[:i].count(n) % 2 == 0 else args.modes[::-1]:
                    before, cpu_before = counters.read(), None if edge is None else process_cpu_s(edge.pid)
                    rows = run_devices(args, out, devices_endpoint, mode, n, rate)
                    repeat = sum(s["mode"] == mode and s["devices"] == n and s["rate"] == rate for s in summary)
                    for row in rows:
                        row["repeat"] = repeat
                    cpu_after, after = None if edge is None else process_cpu_s(edge.pid), counters.read()
                    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("batches", "batched_windows")}
                    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
                    span = max(r["t_end"] for r in rows) - min(r["t_start"] for r in rows)
                    summary.append(summarise_load(rows, mode, n, delta, None if edge is None else edge_peak_rss_mb(edge.pid),
                                                  cpu, rate, edge_side(before, after, len(rows), span), slo))
                    summary[-1]["repeat"] = repeat
                    all_rows += rows
                    s = summary[-1]
                    print(f"{mode:14s} {n:3d} devices{'' if rate is None else f' at {rate:g}/s'}: "
                          f"{s['aggregate_tps']:7.1f} tok/s in all, latency p50 {s['latency_p50_ms']:.0f} ms, p99 "
                          f"{s['latency_p99_ms']:.0f} ms, {s['edge_batches']} batches, goodput {s['goodput']:.2f} "
                          f"answers/s at SLO ({s['slo_met']}/{s['requests']})", flush=True)
    finally:
        if link is not None:
            stop_link(link)
        if edge is not None:
            stop_edge(edge)
    order = {mode: i for i, mode in enumerate(args.modes)}  # the tables by mode, as before
    summary.sort(key=lambda s: order[s["mode"]])
    all_rows.sort(key=lambda r: order[r["mode"]])
    (out / "load.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    write_load(out, summary, args, all_rows)
    print((out / "load.md").read_text())
    return out


def merge_load(out: Path, rows: list[dict], command: str) -> None:
    """`covspec bench merge`'s load part: rows of several machines' load runs (device ids made unique by
    the caller) summarised per (mode, label); the edge's counters were each machine's own, so not here."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["link"]), []).append(row)
    summary = []
    for (mode, label), group in groups.items():
        rate = float(label.split("@")[1].removesuffix("/s")) if "@" in label else None
        devices = len({r["device"] for r in group})
        summary.append(summarise_load(group, mode, devices, {}, None, None, None if rate is None else rate * (
            devices / int(label.split("dev")[0]) if label.split("dev")[0].isdigit() else 1)))
    args = argparse.Namespace(command_line=command, edge="merged rows", edge_info="several machines' runs merged",
                              replay="replay_matches" in rows[0], load_link="loopback")
    (out / "load.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_load(out, summary, args, rows)
