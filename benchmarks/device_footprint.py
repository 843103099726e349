"""What a device costs, per runtime, side by side (issue 20): install size, peak memory, start-up,
draft step and covspec's decode speed, in one run:

    python -m benchmarks.device_footprint --out results/device-footprint [--prompts 16]

Four device variants, each a process of its own (one thread), against one edge serving the demo target
(1 thread) through link emulators (loopback, wifi), all started with covspec/tools/procs.py:

    hf-torch     the Hugging Face draft checkpoint on PyTorch                   (main venv)
    pte-pybind   the demo int8 bundle's model.pte, ExecuTorch's Python bindings (main venv, torch imported first)
    pte-native   the same model.pte through the native shim (libcovspec_et.so)   (device-only venv, no torch)
    onnx         the same bundle's ONNX programs on ONNX Runtime                (device-only venv, no torch)

The device-only venv (`pip install covspec[device]`) is built under runs/device-footprint/ once, with
the wheels pip resolves for it (their size is the download). Each device process reports its start-up
(the parent's time.time() at spawn to its own right before the first answer: imports, draft load,
connect), single-token draft forwards (as the drafter steps), covspec answers on held-out "describe"
prompts, then its peak RSS (ru_maxrss) and which of torch / transformers / executorch it imported.
The shared 2-core machine drifts, so the variants take turns: start-ups round-robin per repetition,
draft steps per batch of 10, answers per prompt and link.

Writes footprint.json, footprint.md (the table, the command, a reading) and footprint.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve()
MARK = "@@footprint "  # the child's replies on stdout (the native runtimes log there too)
WATCHED_MODULES = ("torch", "transformers", "executorch")
LINKS = ("loopback", "wifi")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    venv: str  # "main" or "device"
    draft: str  # "hf", "pte" or "onnx"
    torch_first: bool = False  # import torch before the draft loads (the previous runtime)


VARIANTS = (
    Variant("hf-torch", "HF checkpoint on PyTorch", "main", "hf", torch_first=True),
    Variant("pte-pybind", ".pte, ExecuTorch Python bindings (torch)", "main", "pte", torch_first=True),
    Variant("pte-native", ".pte, native shim (torch-free)", "device", "pte"),
    Variant("onnx", "ONNX Runtime (torch-free)", "device", "onnx"),
)


@dataclass
class VariantResult:
    name: str
    label: str
    install_mb: float = float("nan")  # the venv's site-packages (+ the native shim and its libraries)
    draft_mb: float = float("nan")  # the draft on disk: checkpoint folder, model.pte, or the ONNX programs
    startup_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    answers: list[dict] = field(default_factory=list)  # link, index, tokens, ttft_s, latency_s, decode_tps, ids
    maxrss_mb: float = float("nan")
    threads: int | None = None
    modules: list[str] = field(default_factory=list)


# --- sizes ---------------------------------------------------------------------------------------
def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (symlinks not followed, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if os.path.islink(os.path.join(folder, name)) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def mb(n_bytes: int) -> float:
    return n_bytes / 1e6


def site_packages(venv: Path) -> Path:
    found = sorted((venv / "lib").glob("python3*/site-packages"))
    if not found:
        raise FileNotFoundError(f"no lib/python3*/site-packages under {venv}")
    return found[0]


def native_runtime_files(library: Path) -> list[Path]:
    """The shim and the ExecuTorch libraries it links (what flashing ships beside it)."""
    out = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    libs = [Path(line.split("=>")[1].split("(")[0].strip()) for line in out.splitlines()
            if "=>" in line and "executorch" in line and "/" in line.split("=>")[1]]
    return [library, *libs]


# --- the device process --------------------------------------------------------------------------
def child_main(argv: list[str]) -> int:
    """A device process: loads its draft, connects to both links, reports ready, then obeys commands
    (one JSON line each on stdin) until `finish`."""
    p = argparse.ArgumentParser()
    p.add_argument("--draft", required=True, choices=("hf", "pte", "onnx"))
    p.add_argument("--path", required=True)
    p.add_argument("--torch-first", action="store_true")
    p.add_argument("--edges", required=True, help="LINK=ENDPOINT,... (the first is connected before ready)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--window", type=int, default=4)
    a = p.parse_args(argv)
    if a.torch_first:
        import torch

        torch.set_num_threads(1)
    from covspec.bundles.backend import load_draft
    from covspec.device_runtime.client import DeviceRuntime

    if a.draft == "hf":
        draft = load_draft(model=a.path)
    else:
        draft = load_draft(bundle=a.path, backend="executorch" if a.draft == "pte" else "onnx", threads=1)
    edges = dict(item.split("=", 1) for item in a.edges.split(","))
    names = list(edges)
    devices = {names[0]: DeviceRuntime(draft, edges[names[0]], timeout_s=120.0)}
    t_ready = time.time()  # right before the first answer could be asked
    for name in names[1:]:
        devices[name] = DeviceRuntime(draft, edges[name], timeout_s=120.0)
    _reply({"ready": t_ready})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "answer":
            _reply(_answer(devices[cmd["link"]], cmd["index"], a.max_new_tokens, a.window))
        elif cmd["cmd"] == "steps":
            _reply({"step_s": _steps(devices[names[0]].draft, cmd["n"])})
        elif cmd["cmd"] == "finish":
            import resource

            for device in devices.values():
                device.close()
            status = Path("/proc/self/status").read_text()
            threads = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("Threads:")), None)
            _reply({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "threads": threads,
                    "modules": [m for m in WATCHED_MODULES if m in sys.modules]})
            return 0
    return 1


def _reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _item(index: int):
    from covspec.demo.task import make_item

    return make_item("heldout", index, 0, qtype="describe")  # as the bench asks --question-type describe


def _answer(device, index: int, max_new_tokens: int, window: int) -> dict:
    from covspec.images import png_bytes
    from covspec.sampling import SamplingParams

    item = _item(index)
    answer = device.answer(png_bytes(item.image), item.question, "covspec", SamplingParams(), max_new_tokens,
                           window=window)
    return {"index": index, "tokens": len(answer.ids), "ttft_s": answer.ttft_s, "latency_s": answer.latency_s,
            "decode_tps": answer.decode_tokens_per_s, "ids": answer.ids}


def _steps(draft, n: int) -> list[float]:
    """n single-token draft forwards after a prefill of held-out scene 0, as the drafter feeds them
    (greedy, one token at a time); the seconds of each forward."""
    import numpy as np

    item = _item(0)
    visual = draft.encode_image(draft.preprocess(item.image))
    logits, state = draft.prefill(visual, draft.check_prompt(item.question))
    times = []
    for _ in range(n):
        token = np.asarray([int(np.argmax(logits))], dtype=np.int64)
        t0 = time.perf_counter()
        logits = draft.forward(state, token)[-1]
        times.append(time.perf_counter() - t0)
    return times


# --- the parent ----------------------------------------------------------------------------------
class DeviceProcess:
    """One device variant's process, spoken to over its stdin / stdout."""

    def __init__(self, python: Path, args: list[str], env: dict[str, str], log: Path):
        code = f"import runpy, sys; sys.argv[0] = 'device_footprint'; runpy.run_path({str(THIS_FILE)!r}, run_name='child')"
        self.t_spawn = time.time()
        self.proc = subprocess.Popen([str(python), "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, env=env, cwd="/")
        ready = self.read()
        self.startup_s = ready["ready"] - self.t_spawn

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"device process {self.proc.args[-1]} ended (exit {self.proc.wait()}); see its log")

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def finish(self) -> dict:
        out = self.ask({"cmd": "finish"})
        self.proc.wait(timeout=60)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def ensure_bundle(bundle: Path, draft: Path, target: Path) -> None:
    """The demo int8 device bundle, exported as scripts/demo.sh does when absent."""
    if (bundle / "model.pte").is_file() and (bundle / "decoder.onnx").is_file():
        return
    subprocess.run([sys.executable, "-m", "covspec.cli", "export", "--draft", str(draft), "--target", str(target),
                    "--out", str(bundle.parent), "--quant", "int8", "--reuse"], check=True)


def ensure_device_venv(venv: Path, wheels: Path, rebuild: bool) -> None:
    """A venv with `pip install covspec[device]` of this tree, and the wheels that install is made of."""
    if rebuild or not (venv / "bin" / "python").exists():
        subprocess.run(["rm", "-rf", str(venv)], check=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{ROOT}[device]"], check=True)
    if rebuild or not wheels.is_dir() or not any(wheels.glob("*.whl")):
        subprocess.run(["rm", "-rf", str(wheels)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), f"{ROOT}[device]"], check=True)


def rotated(items: list, k: int) -> list:
    k %= max(len(items), 1)
    return items[k:] + items[:k]


def spawn(variant: Variant, pythons: dict[str, Path], paths: dict[str, str], edges: str, env: dict[str, str],
          log: Path) -> DeviceProcess:
    args = ["--draft", variant.draft, "--path", paths[variant.draft], "--edges", edges]
    return DeviceProcess(pythons[variant.venv], args + (["--torch-first"] if variant.torch_first else []), env, log)


def measure(args: argparse.Namespace, out: Path) -> dict:
    from covspec import demo
    from covspec.device_runtime.et_native import LIBRARY_ENV, library_path
    from covspec.tools.procs import free_port, one_thread_env, start_edge, start_link, stop_edge, stop_link

    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    target, draft = demo.default_target_path(), demo.default_draft_path()
    bundle = Path(args.bundle).resolve()
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)
    ensure_bundle(bundle, Path(draft), Path(target))
    venv, wheels = cache / "venv", cache / "wheels"
    ensure_device_venv(venv, wheels, args.rebuild_venv)
    library = library_path()
    if not library.is_file():
        raise SystemExit(f"the native shim {library} is not built: python -m covspec.device_runtime.et_native build")
    main_venv = Path(sys.prefix)
    pythons = {"main": main_venv / "bin" / "python", "device": venv / "bin" / "python"}
    installs = {"main": mb(tree_bytes(site_packages(main_venv))), "device": mb(tree_bytes(site_packages(venv)))}
    native_files = native_runtime_files(library)
    sizes = {"main_venv_mb": installs["main"], "device_venv_mb": installs["device"],
             "device_wheels_mb": mb(sum(w.stat().st_size for w in wheels.glob("*.whl"))),
             "device_wheels": sorted(w.name for w in wheels.glob("*.whl")),
             "native_shim_mb": mb(sum(f.stat().st_size for f in native_files)),
             "native_files": [str(f) for f in native_files],
             "bundle_mb": mb(tree_bytes(bundle)), "pte_mb": mb((bundle / "model.pte").stat().st_size),
             "onnx_mb": mb(sum(f.stat().st_size for f in bundle.glob("*.onnx*"))),
             "hf_draft_mb": mb(tree_bytes(Path(draft)))}
    paths = {"hf": str(Path(draft).resolve()), "pte": str(bundle), "onnx": str(bundle)}
    env = {**one_thread_env(), LIBRARY_ENV: str(library), "PYTHONPATH": ""}
    variants = [v for v in VARIANTS if v.name in args.variants.split(",")]
    draft_mb = {"hf": sizes["hf_draft_mb"], "pte": sizes["pte_mb"], "onnx": sizes["onnx_mb"]}
    results = {v.name: VariantResult(v.name, v.label, draft_mb=draft_mb[v.draft],
                                     install_mb=installs[v.venv] + (sizes["native_shim_mb"] if v.name == "pte-native"
                                                                    else 0.0))
               for v in variants}

    edge_port = free_port()
    edge = start_edge(target, f"tcp://127.0.0.1:{edge_port}", logs / "edge.log", threads=1)
    links, procs = [], {}
    try:
        endpoints = []
        for name in LINKS:
            link, endpoint = start_link(name, edge_port)
            links.append(link)
            endpoints.append(f"{name}={endpoint}")
        edges = ",".join(endpoints)
        for rep in range(args.startups):  # start-ups, round-robin; the last repetition's processes stay
            for v in rotated(variants, rep):
                print(f"start-up {rep + 1}/{args.startups}: {v.name}", flush=True)
                proc = spawn(v, pythons, paths, edges, env, logs / f"device-{v.name}.log")
                results[v.name].startup_s.append(proc.startup_s)
                if rep < args.startups - 1:
                    proc.finish()
                else:
                    procs[v.name] = proc
        for rep in range(args.step_batches):
            for v in rotated(variants, rep):
                results[v.name].step_s += procs[v.name].ask({"cmd": "steps", "n": 10})["step_s"]
        for i in range(args.prompts):
            index = args.start + i
            for link in LINKS:
                for v in rotated(variants, i):
                    row = procs[v.name].ask({"cmd": "answer", "link": link, "index": index})
                    results[v.name].answers.append({"link": link, **row})
            print(f"prompt {i + 1}/{args.prompts} answered by every variant on {', '.join(LINKS)}", flush=True)
        for name, proc in procs.items():
            done = proc.finish()
            results[name].maxrss_mb = done["maxrss_kb"] / 1024
            results[name].threads = done["threads"]
            results[name].modules = done["modules"]
    finally:
        for proc in procs.values():
            proc.kill()
        for link in links:
            stop_link(link)
        stop_edge(edge)
    return {"command": args.command_line, "prompts": args.prompts, "start": args.start, "links": list(LINKS),
            "max_new_tokens": 48, "sizes": sizes, "bundle": str(bundle), "draft": str(draft), "target": str(target),
            "variants": [asdict(r) for r in results.values()]}


# --- figures -------------------------------------------------------------------------------------
def _nanmean(values: list[float]) -> float:
    clean = [v for v in values if v is not None and v == v]
    return sum(clean) / len(clean) if clean else float("nan")


def _median(values: list[float]) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def summarise(variant: dict, links: list[str], reference: dict | None = None) -> dict:
    """One table row: install MB, RSS MB, median start-up s, median step ms, and per link the mean
    decode tokens/s (the bench's: (tokens - 1) / (latency - TTFT), averaged over requests) and mean
    latency ms; answers identical to `reference`'s (the first variant)."""
    row = {"name": variant["name"], "label": variant["label"], "install_mb": variant["install_mb"],
           "draft_mb": variant["draft_mb"],
           "rss_mb": variant["maxrss_mb"], "startup_s": _median(variant["startup_s"]),
           "step_ms": 1000 * _median(variant["step_s"]), "modules": variant["modules"], "threads": variant["threads"]}
    for link in links:
        answers = [a for a in variant["answers"] if a["link"] == link]
        row[f"{link}_tps"] = _nanmean([a["decode_tps"] for a in answers])
        row[f"{link}_latency_ms"] = 1000 * _nanmean([a["latency_s"] for a in answers])
    if reference is not None:
        ref = {(a["link"], a["index"]): a["ids"] for a in reference["answers"]}
        same = [ref.get((a["link"], a["index"])) == a["ids"] for a in variant["answers"]]
        row["same_answers"] = f"{sum(same)}/{len(same)}"
    return row


def table(rows: list[dict], links: list[str]) -> list[str]:
    """The markdown table of summarise's rows."""
    head = ["variant", "install MB", "draft MB", "peak RSS MB", "start-up s", "draft step ms"]
    for link in links:
        head += [f"{link} tok/s", f"{link} latency ms"]
    head += ["same answers", "imported", "threads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['install_mb']:.0f}", f"{r['draft_mb']:.2f}", f"{r['rss_mb']:.0f}", f"{r['startup_s']:.2f}",
                 f"{r['step_ms']:.2f}"]
        for link in links:
            cells += [f"{r[f'{link}_tps']:.0f}", f"{r[f'{link}_latency_ms']:.0f}"]
        cells += [r.get("same_answers", ""), ", ".join(r["modules"]) or "none",
                  "" if r["threads"] is None else str(r["threads"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reading(rows: list[dict], links: list[str]) -> list[str]:
    """Which variant wins what, from the figures."""
    def best(key: str, low: bool = True) -> dict:
        return (min if low else max)(rows, key=lambda r: r[key])

    lines = [f"- smallest install: {best('install_mb')['label']}; least memory: {best('rss_mb')['label']} "
             f"({best('rss_mb')['rss_mb']:.0f} MB vs {max(r['rss_mb'] for r in rows):.0f} MB at most)",
             f"- fastest start-up: {best('startup_s')['label']} ({best('startup_s')['startup_s']:.2f} s vs "
             f"{max(r['startup_s'] for r in rows):.2f} s at most)",
             f"- fastest draft step: {best('step_ms')['label']} ({best('step_ms')['step_ms']:.2f} ms vs "
             f"{max(r['step_ms'] for r in rows):.2f} ms at most)"]
    for link in links:
        top = best(f"{link}_tps", low=False)
        lines.append(f"- {link}: highest decode tokens/s {top['label']} ({top[f'{link}_tps']:.0f}; range "
                     f"{min(r[f'{link}_tps'] for r in rows):.0f}-{top[f'{link}_tps']:.0f}), lowest latency "
                     f"{best(f'{link}_latency_ms')['label']}")
    lines.append("- variants within a few percent of each other (the same .pte under both ExecuTorch runtimes) "
                 "can swap places from one run to the next on this shared machine; the size, memory and "
                 "start-up gaps are far larger than that noise")
    return lines


def write_report(data: dict, out: Path) -> list[dict]:
    variants = data["variants"]
    rows = [summarise(v, data["links"], variants[0]) for v in variants]
    sizes = data["sizes"]
    (out / "footprint.json").write_text(json.dumps({**data, "summary": rows}, indent=1) + "\n")
    lines = ["# Device footprint per runtime", "", f"Command: `{data['command']}`", "",
             f"{data['prompts']} held-out describe prompts (from #{data['start']}), covspec mode, greedy, "
             f"{data['max_new_tokens']} new tokens at most, per link; one edge (demo target, 1 thread) behind "
             "link emulators; each device variant a process of its own (1 thread asked). Start-up: median over "
             f"{len(variants[0]['startup_s'])} spawns (imports + draft load + connect, to right before the first "
             f"answer). Draft step: median of {len(variants[0]['step_s'])} single-token forwards. tok/s: the "
             "bench's decode tokens/s, (tokens - 1) / (latency - TTFT), mean over requests; latency: mean. "
             "Variants ran interleaved (start-ups round-robin per repetition, steps per batch of 10, answers "
             "per prompt and link, the order rotated each time) on a shared 2-core machine, so drift hits them "
             "alike; timings are still noisy.", "", *table(rows, data["links"]), "",
             f"Install: main venv (torch stack) {sizes['main_venv_mb']:.0f} MB of site-packages; device venv "
             f"(`pip install covspec[device]`) {sizes['device_venv_mb']:.0f} MB installed from "
             f"{sizes['device_wheels_mb']:.0f} MB of wheels ({len(sizes['device_wheels'])} wheels); the native shim "
             f"and the ExecuTorch libraries it links add {sizes['native_shim_mb']:.0f} MB (in the native variant's "
             "install figure). `draft MB`: what the variant loads (checkpoint folder, model.pte, ONNX programs). Bundle "
             f"{sizes['bundle_mb']:.1f} MB (model.pte {sizes['pte_mb']:.2f} MB, ONNX {sizes['onnx_mb']:.2f} MB); "
             f"the Hugging Face draft checkpoint {sizes['hf_draft_mb']:.1f} MB.", "",
             "`same answers`: answers identical token for token to the first variant's on the same prompt and "
             "link. `imported`: which of torch / transformers / executorch were in sys.modules at the end. "
             "`threads`: the process's threads at the end (/proc/self/status).", "", "Reading:", "",
             *reading(rows, data["links"]), "", "Chart: footprint.png."]
    (out / "footprint.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "footprint.png")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    names = [r["name"] for r in rows]
    for ax, key, title in zip(axes, ("rss_mb", "startup_s", "step_ms"),
                              ("peak RSS, MB", "start-up to first OPEN, s", "draft step per token, ms"), strict=True):
        ax.bar(names, [r[key] for r in rows], color=["#c44", "#c84", "#48c", "#4a8"][:len(rows)])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("Device variants: memory, start-up, draft step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/device-footprint")
    p.add_argument("--prompts", type=int, default=16, help="held-out describe prompts per link")
    p.add_argument("--start", type=int, default=0, help="index of the first held-out prompt")
    p.add_argument("--startups", type=int, default=3, help="spawns per variant for the start-up time")
    p.add_argument("--step-batches", type=int, default=5, help="batches of 10 single-token draft forwards")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    p.add_argument("--bundle", default="runs/demo-export/device",
                   help="the demo int8 device bundle (exported as scripts/demo.sh does when absent)")
    p.add_argument("--cache", default="runs/device-footprint", help="the device-only venv and its wheels")
    p.add_argument("--rebuild-venv", action="store_true", help="rebuild the device venv from this tree")
    args = p.parse_args(argv)
    args.command_line = "python -m benchmarks.device_footprint " + " ".join(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = measure(args, out)
    rows = write_report(data, out)
    print("\n".join(table(rows, data["links"])))
    print(f"written: {out / 'footprint.md'}, {out / 'footprint.json'}, {out / 'footprint.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "child":  # a device process (DeviceProcess runs this file so)
    sys.exit(child_main(sys.argv[1:]))
