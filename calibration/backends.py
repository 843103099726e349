"""Draft backends side by side: for the eager checkpoint and each exported device bundle (format x
quant), size on disk, per-token decode step time, greedy token agreement with eager and, on the demo
task, held-out accuracy. Step times are interleaved across backends (see decode_step_ms), so that
load on the machine hits them alike; compare them only within one run.

    rows = compare_backends(draft, {"pte int8": (bundle_dir, "executorch"), ...}, items)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covspec.generation import generate
from covspec.models.base import VLMAdapter
from covspec.models.draft import as_draft


@dataclass
class BackendRow:
    label: str
    backend: str  # "eager", "executorch", "onnx"
    quant: str
    size_bytes: int  # the files that backend loads (weights / programs)
    step_ms: float  # one-token forward with the cache, median of the best round
    agree: int  # generated tokens equal to eager's at the same position
    tokens: int
    accuracy: float | None = None  # demo held-out score, where the items carry answers

    @property
    def agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": self.agreement}


def program_bytes(bundle: Path, fmt: str) -> int:
    from covspec.bundles.bundle import load_bundle

    manifest = load_bundle(bundle, checksum=False).manifest
    parts = {name for name in manifest["programs"][fmt].values()  # model.pte, or vision + decoder
             if isinstance(name, str) and name in manifest["files"]}
    return sum(manifest["files"][name]["size"] for name in parts)


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


@torch.inference_mode()
def step_ms(adapters: list[VLMAdapter], image: Image.Image, prompt: str, steps: int = 30,
            rounds: int = 5) -> list[float]:
    best = [float("inf")] * len(adapters)
    adapters = [as_draft(a) for a in adapters]  # numpy in and out, as the device runs them
    for _ in range(rounds):
        for k, adapter in enumerate(adapters):
            logits, state = adapter.prefill(adapter.encode_image(adapter.preprocess(image)), prompt)
            token = np.asarray([int(logits.argmax())], dtype=np.int64)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                adapter.forward(state, token)
                times.append(time.perf_counter() - t0)
            best[k] = min(best[k], statistics.median(times[3:]))
    return [1000 * t for t in best]


def compare_backends(draft: Path, bundles: dict[str, tuple[Path, str]], items: list[Any],
                     max_new_tokens: int = 48, score: Any = None, threads: int | None = 1) -> list[BackendRow]:
    """items: objects with .image and .question (and .answer for `score(item, text) -> float`).
    `threads`: intra-op threads for every backend alike (torch, ExecuTorch's threadpool, ONNX Runtime);
    None leaves each backend's default."""
    from covspec.bundles.adapter import BundleAdapter
    from covspec.models import load_adapter

    if threads:
        torch.set_num_threads(threads)
    eager = load_adapter(draft)
    adapters: list[VLMAdapter] = [eager]
    rows = [BackendRow("eager fp32", "eager", "none", checkpoint_bytes(draft), 0.0, 0, 0)]
    for label, (folder, backend) in bundles.items():
        adapter = BundleAdapter(folder, backend=backend, threads=threads)
        adapters.append(adapter)
        quant = adapter.bundle.manifest["quant"]["scheme"]
        fmt = "pte" if backend == "executorch" else "onnx"
        rows.append(BackendRow(label, backend, quant, program_bytes(Path(folder), fmt), 0.0, 0, 0))
    reference = [generate(eager, item.image, item.question, max_new_tokens=max_new_tokens).ids for item in items]
    for row, adapter in zip(rows, adapters, strict=True):
        scores = []
        for item, ref in zip(items, reference, strict=True):
            out = generate(adapter, item.image, item.question, max_new_tokens=max_new_tokens)
            row.tokens += max(len(ref), len(out.ids))
            row.agree += sum(a == b for a, b in zip(ref, out.ids, strict=False))
            if score is not None:
                scores.append(score(item, out.text))
        row.accuracy = sum(scores) / len(scores) if scores else None
    for row, ms in zip(rows, step_ms(adapters, items[0].image, items[0].question), strict=True):
        row.step_ms = ms
    return rows


def render(rows: list[BackendRow]) -> Any:
    from rich.table import Table

    table = Table(title="draft backends")
    for column in ("backend", "quant", "size", "x smaller", "step ms", "token agreement", "accuracy"):
        table.add_column(column, justify="left" if column in ("backend", "quant") else "right")
    base = rows[0].size_bytes
    for row in rows:
        table.add_row(row.label, row.quant, f"{row.size_bytes / 1e6:.2f} MB", f"{base / row.size_bytes:.2f}",
                      f"{row.step_ms:.2f}", f"{row.agree}/{row.tokens} ({100 * row.agreement:.1f}%)",
                      "-" if row.accuracy is None else f"{row.accuracy:.3f}")
    return table


def main(argv: list[str] | None = None) -> int:
    """python -m covspec.calibration.backends --draft PATH --bundle "pte fp32=DIR:executorch" ... --out DIR"""
    import argparse
    import json
    import shlex
    import sys

    from rich.console import Console

    from covspec.demo.evaluate import score_answer
    from covspec.demo.task import sample_split

    parser = argparse.ArgumentParser(prog="python -m covspec.calibration.backends",
                                     description="draft backends side by side on the demo task's held-out prompts")
    parser.add_argument("--draft", type=Path, required=True, help="the eager draft checkpoint")
    parser.add_argument("--bundle", action="append", default=[],
                        help='"LABEL=DIR:BACKEND", e.g. "pte int8=out/device:executorch" (repeatable)')
    parser.add_argument("--items", type=int, default=50, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("results/export"))
    args = parser.parse_args(argv)
    bundles = {}
    for spec in args.bundle:
        label, _, rest = spec.partition("=")
        folder, _, backend = rest.rpartition(":")
        if not label or not folder or backend not in ("executorch", "onnx"):
            parser.error(f'--bundle {spec!r}: expected "LABEL=DIR:executorch" or "LABEL=DIR:onnx"')
        bundles[label] = (Path(folder), backend)
    items = list(sample_split("heldout", args.items, seed=0))
    rows = compare_backends(args.draft, bundles, items, max_new_tokens=args.max_new_tokens, score=score_answer)
    console = Console(record=True, width=120)
    console.print(render(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m covspec.calibration.backends " + shlex.join(argv if argv is not None else sys.argv[1:])
    (args.out / "backends.json").write_text(json.dumps({"command": command, "items": len(items),
                                                        "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    lines = [f"# Draft backends on {len(items)} held-out prompts", "", f"Command: `{command}`", "",
             "| backend | quant | size | x smaller | step ms | token agreement with eager | accuracy |",
             "|---|---|---|---|---|---|---|"]
    base = rows[0].size_bytes
    for r in rows:
        lines.append(f"| {r.label} | {r.quant} | {r.size_bytes / 1e6:.3f} MB | {base / r.size_bytes:.2f} | "
                     f"{r.step_ms:.3f} | {r.agree}/{r.tokens} ({100 * r.agreement:.1f}%) | "
                     f"{'-' if r.accuracy is None else f'{r.accuracy:.3f}'} |")
    (args.out / "backends.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
