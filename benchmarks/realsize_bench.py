"""The device export at real size: a random-weight draft of a published shape
(benchmarks/realsize_models.py), exported by the device exporter and timed, one thread each.

    python -m benchmarks.realsize_bench --shape smolvlm-256m --out results/export-realsize

Builds the checkpoint into WORK/<shape tag>/checkpoint, then exports, each in its own process (so one
export's peak memory is measured alone), model.pte (fp32 and int8: 8da8w, the default quantized
scheme) and vision.onnx + decoder.onnx (fp32 and int8) with the exporter's program writer
(covspec.export.write_programs.write_programs: the device bundle's programs, without the rest of the
bundle). Then, in ONE process, with one thread for torch, ExecuTorch's threadpool and ONNX Runtime,
the variants take turns within each repetition:

- "step": one decode step (one token at the fixed slot after the prompt, rolled back after each);
- "prefill": vision encoder + decoder prefill of one image + PROMPT (in chunks of max_chunk tokens,
  as the bundle runtime runs it); "prefill 25%": the same with the pruner (covspec, keeping 25% of
  the visual tokens) between the two.

Eager is the Hugging Face model through the family's adapter; pte and onnx are the raw programs
(model.pte's `vision_encoder` / `covspec_decoder` through executorch.runtime, onnxruntime sessions).
Preprocessing (PIL) is outside every timing. Writes OUT/<shape>.json and OUT/<shape>.md (medians,
bundle sizes, each export's time and peak memory, the operators left outside XNNPACK).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.realsize_models import QWEN, SHAPES, Shape, build_checkpoint, published_shape

PROMPT = "what is the color of the shape in this image ?"
KEEP = 0.25
MAX_CHUNK = 64  # the device bundle's default
VARIANTS = (("none", "pte"), ("int8", "pte"), ("none", "onnx"), ("int8", "onnx"))
LABELS = {"none": "fp32", "int8": "int8"}
INT8_BAR = 0.5  # an int8 program's step at most half eager fp32's


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def export_folder(work: Path, scheme: str, fmt: str) -> Path:
    return work / f"{fmt}-{scheme}"


def export_variant(checkpoint: Path, out: Path, scheme: str, fmt: str, max_len: int) -> dict[str, Any]:
    """One format at one scheme through the exporter's program writer; writes out/export.json."""
    from covspec.export.write_programs import check_exportable, describe_model, write_programs
    from covspec.models import load_adapter

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    adapter = check_exportable(load_adapter(checkpoint))
    info = describe_model(adapter, max_len, MAX_CHUNK)
    programs, unsupported = write_programs(adapter, out, info, scheme, (fmt,), lambda s: print(f"  {s}", flush=True))
    record = {"scheme": scheme, "format": fmt, "seconds": round(time.perf_counter() - start, 1),
              "peak_rss_mib": round(peak_rss_mib()), "info": info, "programs": programs, "unsupported": unsupported,
              "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != "export.json"}}
    (out / "export.json").write_text(json.dumps(record, indent=1))
    return record


def export_all(checkpoint: Path, work: Path, max_len: int,
               only_exported: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
    """Every variant's export (each in a fresh process; kept when already done). `only_exported`:
    those already done, none exported here."""
    made = {}
    for scheme, fmt in VARIANTS:
        folder = export_folder(work, scheme, fmt)
        if not (folder / "export.json").is_file():
            if only_exported:
                continue
            print(f"exporting {fmt} {scheme} -> {folder}", flush=True)
            subprocess.run([sys.executable, "-m", "benchmarks.realsize_bench", "--export-one", f"{scheme}:{fmt}",
                            "--checkpoint", str(checkpoint), "--work", str(folder), "--max-len", str(max_len)],
                           check=True)
        made[scheme, fmt] = json.loads((folder / "export.json").read_text())
        print(f"  {fmt} {scheme}: {made[scheme, fmt]['seconds']} s, peak {made[scheme, fmt]['peak_rss_mib']} MiB",
              flush=True)
    return made


class PteRunner:
    """model.pte's vision_encoder and covspec_decoder (cache inside the program)."""

    def __init__(self, path: Path):
        from covspec.bundles.checks import load_pte_methods
        from covspec.export.cached_decoder import load_custom_ops

        load_custom_ops()
        methods = load_pte_methods(path, ("vision_encoder", "covspec_decoder"))
        self._vision, self._decoder = methods["vision_encoder"], methods["covspec_decoder"]

    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        embeds, *rest = self._vision.execute([pixels.float().contiguous()])
        return [embeds[0].clone(), *(t.clone() for t in rest)]

    def decoder(self, ids: torch.Tensor, image_embeds: torch.Tensor, is_image: torch.Tensor,
                input_pos: torch.Tensor, start: int) -> torch.Tensor:
        out = self._decoder.execute([ids, image_embeds, is_image, input_pos, torch.tensor([start])])
        return out[0].clone()


class OnnxRunner:
    """vision.onnx and decoder.onnx; the static cache [L, 2, kvH, S, hd] an input and an output."""

    def __init__(self, folder: Path, cache_shape: list[int]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._vision = ort.InferenceSession(str(folder / "vision.onnx"), options, providers=["CPUExecutionProvider"])
        self._decoder = ort.InferenceSession(str(folder / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
        self._input = self._vision.get_inputs()[0].name
        self.cache = torch.zeros(cache_shape).numpy()

    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(t) for t in self._vision.run(None, {self._input: pixels.float().numpy()})]

    def decoder(self, ids: torch.Tensor, image_embeds: torch.Tensor, is_image: torch.Tensor,
                input_pos: torch.Tensor, start: int) -> torch.Tensor:
        feeds = {"ids": ids.numpy(), "image_embeds": image_embeds.numpy(), "is_image": is_image.numpy(),
                 "input_pos": input_pos.numpy(), "slots": torch.arange(start, start + ids.shape[1]).numpy(),
                 "cache": self.cache}
        logits, self.cache = self._decoder.run(None, feeds)
        return torch.from_numpy(logits)


def flat_positions(positions: torch.Tensor) -> torch.Tensor:
    """[1, k] -> [k]; M-RoPE [3, 1, k] -> [3, k]."""
    return (positions[:, 0] if positions.dim() == 3 else positions[0]).contiguous()


class ProgramVariant:
    """Prefill and decode step of one exported variant, with the eager adapter building the prompt
    (ids, visual-token mask, RoPE positions) as the bundle runtime's Python code does."""

    def __init__(self, runner: Any, eager: Any, pixels: torch.Tensor, query: torch.Tensor, grid: Any):
        self.runner, self.eager, self.pixels, self.query, self.grid = runner, eager, pixels, query, grid
        self.length, self.extra = 0, {}

    def prefill(self, keep: float | None) -> torch.Tensor:
        from covspec.models.base import VisualTokens
        from covspec.pruning import score_and_select

        embeds, activity, *attention = self.runner.vision(self.pixels)
        visual = VisualTokens(embeds=embeds, activity=activity, attention=attention[0] if attention else None,
                              grid=self.grid)
        kept = torch.arange(visual.count) if keep is None else torch.as_tensor(
            score_and_select(visual, self.query, keep, "covspec"))
        inputs = self.eager.prefill_inputs(visual, PROMPT, kept)  # its RoPE positions (and the family's extras)
        ids_list, first = self.eager.prompt_ids(PROMPT, int(kept.numel()))
        t, d = len(ids_list), embeds.shape[1]
        ids = torch.tensor([ids_list])
        is_image = torch.zeros(1, t, dtype=torch.bool)
        is_image[0, first:first + kept.numel()] = True
        image_embeds = torch.zeros(1, t, d)
        image_embeds[0, first:first + kept.numel()] = embeds[kept]
        positions = flat_positions(inputs.positions)
        for start in range(0, t, MAX_CHUNK):
            end = min(start + MAX_CHUNK, t)
            logits = self.runner.decoder(ids[:, start:end], image_embeds[:, start:end].contiguous(),
                                         is_image[:, start:end].contiguous(),
                                         positions[..., start:end].contiguous(), start)
        self.length, self.extra = t, dict(inputs.extra)
        return logits[0, -1]

    def step(self) -> Callable[[], Any]:
        """One token at the slot after the full prefill, rewritten every call (the rollback is free)."""
        from covspec.models.base import DecodeState

        self.prefill(None)
        length = self.length
        pos = flat_positions(self.eager._positions(DecodeState(cache=None, length=length, extra=self.extra), 1))
        ids, embeds, mask = torch.tensor([[5]]), torch.zeros(1, 1, self.query.shape[1]), torch.zeros(1, 1, dtype=torch.bool)
        return lambda: self.runner.decoder(ids, embeds, mask, pos, length)


class EagerVariant:
    def __init__(self, eager: Any, pixels: dict[str, torch.Tensor], query: torch.Tensor):
        self.eager, self.pixels, self.query = eager, pixels, query

    def prefill(self, keep: float | None) -> torch.Tensor:
        from covspec.pruning import score_and_select

        visual = self.eager.encode_image(self.pixels)
        kept = None if keep is None else torch.as_tensor(score_and_select(visual, self.query, keep, "covspec"))
        return self.eager.prefill(visual, PROMPT, kept)[0]

    def step(self) -> Callable[[], Any]:
        _, state = self.eager.prefill(self.eager.encode_image(self.pixels), PROMPT)
        token = torch.tensor([5])

        def step() -> Any:
            logits = self.eager.forward(state, token)
            self.eager.truncate(state, state.length - 1)
            return logits

        return step


def time_variants(variants: dict[str, Any], repeats: int, steps_per_round: int) -> dict[str, dict[str, float]]:
    """Median ms of each measure of each variant; within each repetition the variants take turns on
    every measure."""
    steps = {name: v.step() for name, v in variants.items()}
    measures: dict[str, dict[str, Callable[[], Any]]] = {
        "step": steps,
        "prefill": {name: (lambda v=v: v.prefill(None)) for name, v in variants.items()},
        f"prefill {int(KEEP * 100)}%": {name: (lambda v=v: v.prefill(KEEP)) for name, v in variants.items()},
    }
    for fns in measures.values():  # warm-up
        for fn in fns.values():
            fn()
    samples: dict[str, dict[str, list[float]]] = {m: {name: [] for name in variants} for m in measures}
    with torch.inference_mode():
        for rep in range(repeats):
            for measure, fns in measures.items():
                calls = steps_per_round if measure == "step" else 1
                for name, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    samples[measure][name].append((time.perf_counter() - start) / calls * 1e3)
            print(f"  repetition {rep + 1}/{repeats}: " + ", ".join(
                f"{name} {samples['step'][name][-1]:.1f}" for name in variants) + " ms/step", flush=True)
    return {m: {name: statistics.median(v) for name, v in by.items()} for m, by in samples.items()}


def sizes(checkpoint: Path, work: Path) -> dict[str, int]:
    out = {"eager fp32": sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))}
    for scheme, fmt in VARIANTS:
        folder = export_folder(work, scheme, fmt)
        if not (folder / "export.json").is_file():
            continue
        files = [p for p in folder.iterdir() if p.name != "export.json"]
        out[f"{fmt} {LABELS[scheme]}"] = sum(p.stat().st_size for p in files)
    return out


def run_bench(shape: Shape, work: Path, max_len: int, repeats: int, steps_per_round: int,
              only_exported: bool = False) -> dict[str, Any]:
    from PIL import Image

    from covspec.bundles.programs import set_executorch_threads
    from covspec.export.qwen_vision import QWEN_IMAGE_SIDE
    from covspec.models import load_adapter

    checkpoint = build_checkpoint(shape, work / "checkpoint")
    exports = export_all(checkpoint, work, max_len, only_exported)
    torch.set_num_threads(1)
    set_executorch_threads(1)  # before any program is loaded
    eager = load_adapter(checkpoint)
    side = QWEN_IMAGE_SIDE if shape.name == QWEN else 512  # the exported tower's fixed input
    pixels = eager.preprocess(Image.new("RGB", (side, side), (200, 30, 30)))
    with torch.inference_mode():
        query = eager.prompt_embeddings(PROMPT)
        grid = eager.encode_image(pixels).grid
    variants: dict[str, Any] = {"eager fp32": EagerVariant(eager, pixels, query)}
    for scheme, fmt in exports:
        if fmt not in exports[scheme, fmt]["programs"]:  # its export failed: reported, not timed
            continue
        folder = export_folder(work, scheme, fmt)
        cache = exports[scheme, fmt]["info"]["decoder"]["cache"]
        runner = PteRunner(folder / "model.pte") if fmt == "pte" else OnnxRunner(folder, cache)
        variants[f"{fmt} {LABELS[scheme]}"] = ProgramVariant(runner, eager, pixels["pixel_values"], query, grid)
    medians = time_variants(variants, repeats, steps_per_round)
    eager_step = medians["step"]["eager fp32"]
    bar = {name: {"step_ratio": medians["step"][name] / eager_step,
                  "holds": medians["step"][name] <= INT8_BAR * eager_step}
           for name in variants if "int8" in name}
    info = next(iter(exports.values()))["info"]
    return {"shape": {"name": shape.name, "text_layers": shape.text_layers, "vision_layers": shape.vision_layers,
                      "parameters": sum(p.numel() for p in {id(p): p for p in eager.model.parameters()}.values())},
            "prompt": PROMPT, "keep": KEEP, "max_len": max_len, "max_chunk": MAX_CHUNK,
            "visual_tokens": info["vision"]["tokens"], "pixels": info["vision"]["pixels"],
            "prompt_tokens": len(eager.prompt_ids(PROMPT, info["vision"]["tokens"])[0]),
            "ms": medians, "int8_bar": bar, "bytes": sizes(checkpoint, work),
            "exports": {f"{fmt} {LABELS[s]}": {"seconds": e["seconds"], "peak_rss_mib": e["peak_rss_mib"],
                                              "unsupported": e["unsupported"],
                                              "lowering": e["programs"].get("pte", {}).get("lowering")}
                        for (s, fmt), e in exports.items()},
            "not_exported": [f"{fmt} {LABELS[s]}" for s, fmt in VARIANTS if (s, fmt) not in exports],
            "bench_peak_rss_mib": round(peak_rss_mib()), "repeats": repeats, "steps_per_round": steps_per_round}


def markdown(result: dict[str, Any], command: str) -> str:
    s = result["shape"]
    ms = result["ms"]
    names = list(ms["step"])
    lines = [f"# Device export at real size: {s['name']} ({s['text_layers']} text layers, {s['vision_layers']} "
             f"vision layers, {s['parameters'] / 1e6:.1f}M parameters, random weights), one thread", "",
             f"Command: `{command}`", "",
             f"Prompt: {result['prompt_tokens']} tokens with {result['visual_tokens']} visual tokens "
             f"(pixels {result['pixels']}); pruned: {int(result['keep'] * 100)}% of the visual tokens kept; "
             f"KV cache {result['max_len']} slots, prefill chunks of {result['max_chunk']}. Medians of "
             f"{result['repeats']} repetitions, variants taking turns.", "",
             "| variant | step ms | vs eager | " + " | ".join(f"{m} ms" for m in list(ms)[1:]) + " | bytes |",
             "|---|---|---|" + "---|" * (len(ms) - 1) + "---|"]
    for name in names:  # variants whose export failed are listed under the table
        ratio = ms["step"][name] / ms["step"]["eager fp32"]
        lines.append(f"| {name} | {ms['step'][name]:.1f} | {ratio:.2f}x | "
                     + " | ".join(f"{ms[m][name]:.0f}" for m in list(ms)[1:]) + f" | {result['bytes'][name]:,} |")
    lines += ["", f"int8 step at most {INT8_BAR} x eager fp32: " + ", ".join(
        f"{name} {b['step_ratio']:.2f} ({'holds' if b['holds'] else 'does not hold'})"
        for name, b in result["int8_bar"].items()), "", "| export | seconds | peak RSS MiB |", "|---|---|---|",
        *(f"| {name} | {e['seconds']} | {e['peak_rss_mib']:,} |" for name, e in result["exports"].items()),
        "", f"Bench process peak RSS: {result['bench_peak_rss_mib']:,} MiB."]
    if result["not_exported"]:
        lines.append(f"\nNot exported by the time of this run (not timed): {', '.join(result['not_exported'])}.")
    for name, e in result["exports"].items():
        if e["lowering"]:
            lines.append(f"\n{name}: operators outside XNNPACK per method: " + "; ".join(
                f"{m}: {', '.join(v['portable_ops']) or '-'}" for m, v in e["lowering"].items()))
        if e["unsupported"]:
            lines.append(f"\n{name}: unsupported: {e['unsupported']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default=SHAPES[0])
    parser.add_argument("--text-layers", type=int, help="text layers (default: the published depth)")
    parser.add_argument("--vision-layers", type=int, help="vision layers (default: the published depth)")
    parser.add_argument("--out", type=Path, default=Path("results/export-realsize"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/realsize"), help="checkpoint and exports go here")
    parser.add_argument("--max-len", type=int, default=256, help="KV cache slots of the exported decoder")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--export-only", action="store_true", help="build and export, no timing")
    parser.add_argument("--only-exported", action="store_true", help="time the variants already exported only")
    parser.add_argument("--export-one", help=argparse.SUPPRESS)  # SCHEME:FORMAT, in a child process
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_one:
        scheme, fmt = args.export_one.split(":")
        export_variant(args.checkpoint, args.work, scheme, fmt, args.max_len)
        return
    published = published_shape(args.shape)
    shape = Shape(args.shape, args.text_layers or published.text_layers, args.vision_layers or published.vision_layers)
    work = args.work / shape.tag
    if args.export_only:
        export_all(build_checkpoint(shape, work / "checkpoint"), work, args.max_len)
        return
    result = run_bench(shape, work, args.max_len, args.repeats, args.steps_per_round, args.only_exported)
    command = "python -m benchmarks.realsize_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    stem = shape.name if shape == published or shape.name == QWEN else shape.tag
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result, command)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
