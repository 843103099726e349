"""The draft's per-token decode step on every export, side by side in one run, one thread each.

    python -m benchmarks.export_bench --draft covspec/demo/weights/draft --out results/export-layout

Exports the draft (fp32 and int8) as today's device bundle (model.pte in ExecuTorch's multimodal
layout, vision.onnx + decoder.onnx) and as the previous layout's ExecuTorch programs (vision.pte +
decoder.pte, the static cache an explicit input and output, written by one-hot matmuls), then, after
one image + prompt prefill, times one decode step (one token at a fixed position, rolled back after
each step) for:

- eager fp32 (the Hugging Face model through LlavaAdapter);
- pte new layout through BundleAdapter (`covspec_decoder`, cache inside the program), and its raw
  methods: `covspec_decoder` and the runners' `token_embedding` + `text_decoder`;
- pte previous layout, raw `forward` with the cache passed in and out (what the old adapter ran);
- onnx through BundleAdapter (cache in and out).

Variants take turns within each repetition (the machine's drift hits them alike); medians reported,
with each bundle's size. Writes OUT/steps.json and OUT/steps.md (with this command).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covspec.models.draft import as_draft

PROMPT = "what is the color of the shape ?"


def folder_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def export_all(draft: Path, out: Path, schemes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Device bundles (new layout) and previous-layout .pte pairs, per scheme."""
    from covspec.export.device_bundle import build_device_bundle
    from covspec.export.graphs import decoder_dynamic_shapes, decoder_example, decoder_shape
    from covspec.export.write_programs import _graphs, describe_model, lower_pte
    from covspec.models import load_adapter

    made: dict[str, dict[str, Any]] = {}
    for scheme in schemes:
        bundle = out / f"device-{scheme}"
        if not (bundle / "manifest.json").is_file():
            build_device_bundle(draft, bundle, quant=scheme, formats=("pte", "onnx"), step=print)
        old = out / f"previous-{scheme}"
        if not (old / "decoder.pte").is_file():
            old.mkdir(parents=True, exist_ok=True)
            adapter = load_adapter(draft)
            info = describe_model(adapter, None, 64)
            vision, decoder = _graphs(adapter, info, scheme, for_pte=True)
            lower_pte(vision, (torch.zeros(*info["vision"]["pixels"]),), old / "vision.pte")
            shape = decoder_shape(adapter, info["decoder"]["max_len"])
            lower_pte(decoder, decoder_example(shape), old / "decoder.pte", decoder_dynamic_shapes(64))
        made[scheme] = {"bundle": bundle, "previous": old}
    return made


def time_steps(steps: dict[str, Callable[[], Any]], repeats: int, per_round: int) -> dict[str, float]:
    """Median ms per call of each step; the steps take turns within each repetition."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        for _ in range(20):
            fn()
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - start) / per_round * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def adapter_step(adapter: Any, image: Any) -> Callable[[], Any]:
    """One decode step at a fixed position through the adapter (forward one token, roll back)."""
    adapter = as_draft(adapter)  # numpy in and out, as the device runs it
    visual = adapter.encode_image(adapter.preprocess(image))
    _, state = adapter.prefill(visual, PROMPT)
    token = np.asarray([5], dtype=np.int64)

    def step() -> Any:
        logits = adapter.forward(state, token)
        adapter.truncate(state, state.length - 1)
        return logits

    return step


def raw_steps(model_pte: Path, old_decoder: Path, info: dict[str, Any], position: int) -> dict[str, Callable[[], Any]]:
    from covspec.bundles.checks import load_pte_methods

    m = load_pte_methods(model_pte, ("covspec_decoder", "token_embedding", "text_decoder"))
    old = load_pte_methods(old_decoder, ("forward",))["forward"]
    hidden = int(info["decoder"]["hidden"])
    ids, embeds, is_image = torch.tensor([[5]]), torch.zeros(1, 1, hidden), torch.zeros(1, 1, dtype=torch.bool)
    pos, start = torch.tensor([position]), torch.tensor([position])
    cache = [torch.zeros(info["decoder"]["cache"])]

    def previous() -> Any:
        out = old.execute([ids, embeds, is_image, pos, pos, cache[0]])
        logits, cache[0] = out[0].clone(), out[1].clone()
        return logits

    return {"covspec_decoder": lambda: m["covspec_decoder"].execute([ids, embeds, is_image, pos, start])[0].clone(),
            "token_embedding+text_decoder": lambda: m["text_decoder"].execute(
                [m["token_embedding"].execute([ids])[0], pos])[0].clone(),
            "previous decoder.pte (cache in/out)": previous}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draft", type=Path, default=Path("covspec/demo/weights/draft"))
    parser.add_argument("--out", type=Path, default=Path("results/export-layout"))
    parser.add_argument("--work", type=Path, default=Path("runs/export-bench"), help="where the bundles go")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=100)
    args = parser.parse_args(argv)

    from PIL import Image

    from covspec.bundles.adapter import BundleAdapter
    from covspec.bundles.programs import set_executorch_threads
    from covspec.models import load_adapter

    torch.set_num_threads(1)
    set_executorch_threads(1)  # before any program is loaded
    made = export_all(args.draft, args.work, ("none", "int8"))
    image = Image.new("RGB", (72, 72), (200, 30, 30))
    eager = load_adapter(args.draft)
    steps: dict[str, Callable[[], Any]] = {"eager fp32": adapter_step(eager, image)}
    sizes: dict[str, int] = {"eager fp32": folder_size([args.draft / "model.safetensors"])}
    for scheme, label in (("none", "fp32"), ("int8", "int8")):
        bundle, old = made[scheme]["bundle"], made[scheme]["previous"]
        pte, onnx = BundleAdapter(bundle, "executorch", threads=1), BundleAdapter(bundle, "onnx", threads=1)
        steps[f"pte {label} adapter"] = adapter_step(pte, image)
        steps[f"onnx {label} adapter"] = adapter_step(onnx, image)
        position = 40
        for name, fn in raw_steps(bundle / "model.pte", old / "decoder.pte", pte.bundle.manifest, position).items():
            steps[f"pte {label} raw {name}"] = fn
        sizes[f"pte {label} model.pte"] = folder_size([bundle / "model.pte"])
        sizes[f"pte {label} previous vision.pte+decoder.pte"] = folder_size([old / "vision.pte", old / "decoder.pte"])
        sizes[f"onnx {label} vision.onnx+decoder.onnx"] = folder_size([bundle / "vision.onnx", bundle / "decoder.onnx"])
    medians = time_steps(steps, args.repeats, args.per_round)
    command = "python -m benchmarks.export_bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "steps.json").write_text(json.dumps({"command": command, "step_ms": medians, "bytes": sizes}, indent=1))
    lines = [f"# Draft decode step per token, one thread ({args.draft})", "", f"Command: `{command}`", "",
             "| variant | ms per token step (median) |", "|---|---|",
             *(f"| {name} | {ms:.3f} |" for name, ms in medians.items()), "",
             "| program files | bytes |", "|---|---|", *(f"| {name} | {n:,} |" for name, n in sizes.items())]
    (args.out / "steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
