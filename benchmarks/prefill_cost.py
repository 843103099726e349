"""What pruning saves the draft's prefill, selection included, side by side in one run.

    python -m benchmarks.prefill_cost --draft covspec/demo/weights/draft          # a checkpoint
    python -m benchmarks.prefill_cost --bundle runs/export/device --backend onnx  # the exported programs
    python -m benchmarks.prefill_cost --shape qwen2-0.5b --tokens 576             # a realistic shape

For each keep ratio the same image is encoded, pruned (`score_and_select`, plus `merge_pruned` with
--merge) and prefilled through the LLaVA adapter the device runs; the ratios take turns within each
repetition, so the machine's drift hits them alike. Reported per ratio (medians): the selection, the
prefill, their sum against the unpruned prefill, and the image encoding (the vision tower sees every
patch whatever is kept, so pruning cannot save it).

--bundle runs an exported device bundle (`covspec export`) through the adapter `covspec device run
--bundle` uses, on ExecuTorch or ONNX Runtime: what a device's prefill costs once deployed. Its
decoder prefills in chunks of at most the bundle's `max_chunk` tokens (one program call each).

--shape builds a randomly initialised LLaVA (CLIP tower of one small layer, since its cost is the
same for every ratio; Llama text model of the named shape): prefill time does not depend on the
weights, only on the shapes, so this shows the cost structure of a real draft on this machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from covspec.demo.task import DESCRIBE_PROMPT, make_item
from covspec.demo.word_tokenizer import IMAGE, build_tokenizer
from covspec.models import load_adapter
from covspec.models.base import VLMAdapter
from covspec.models.draft import DraftModel, as_draft
from covspec.models.llava import LlavaAdapter
from covspec.pruning import keep_count, merged_visual, score_and_select

# text-model shapes (hidden, layers, heads, kv heads, intermediate) of real small VLM language models
SHAPES = {
    "qwen2-0.5b": (896, 24, 14, 2, 4864),  # LLaVA-OneVision-0.5B / Qwen2-VL-2B's smaller sibling
    "smollm2-135m": (576, 30, 9, 3, 1536),  # SmolVLM-256M's text model
}


@dataclass
class CostRow:
    ratio: float
    kept: int
    select_ms: float  # scoring + selection (+ merging)
    prefill_ms: float  # the text model's prefill over the kept tokens and the prompt
    total_ms: float  # select + prefill
    saved_ms: float  # unpruned prefill minus total (> 0: pruning pays)
    encode_ms: float  # vision tower + projector over every patch (not changed by pruning)


def random_llava(shape: str, tokens: int) -> LlavaAdapter:
    """A randomly initialised LLaVA whose image gives `tokens` visual tokens (a square number)."""
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise ValueError(f"--tokens must be a square number (a grid of patches), got {tokens}")
    hidden, layers, heads, kv_heads, intermediate = SHAPES[shape]
    tokenizer = build_tokenizer()
    patch = 14
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": side * patch,
                       "patch_size": patch},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": hidden,
                     "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                     "intermediate_size": intermediate, "max_position_embeddings": 4096},
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=tokens,
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    return LlavaAdapter(LlavaForConditionalGeneration(config).eval(), tokenizer)


def measure(adapter: DraftModel, ratios: list[float], reps: int, merge: bool) -> list[CostRow]:
    item = make_item("heldout", 0, 0, "describe")
    pixels = adapter.preprocess(item.image)
    query = adapter.prompt_embeddings(DESCRIBE_PROMPT)
    ratios = sorted(set(ratios) | {1.0})
    times: dict[float, dict[str, list[float]]] = {r: {"select": [], "prefill": [], "encode": []} for r in ratios}
    counts: dict[float, int] = {}
    for rep in range(reps + 1):  # the first round warms up and is not counted
        for ratio in ratios:
            t0 = time.perf_counter()
            visual = adapter.encode_image(pixels)
            t1 = time.perf_counter()
            kept = None
            if ratio < 1.0:
                kept = score_and_select(visual, query, ratio)
                if merge:
                    visual = merged_visual(visual, kept)
            t2 = time.perf_counter()
            adapter.prefill(visual, DESCRIBE_PROMPT, kept=kept)
            t3 = time.perf_counter()
            counts[ratio] = keep_count(ratio, visual.count)
            if rep:
                times[ratio]["encode"].append(t1 - t0)
                times[ratio]["select"].append(t2 - t1)
                times[ratio]["prefill"].append(t3 - t2)

    def ms(xs: list[float]) -> float:
        return 1000 * statistics.median(xs)

    full = ms(times[1.0]["prefill"])
    rows = []
    for ratio in ratios:
        select, prefill = ms(times[ratio]["select"]), ms(times[ratio]["prefill"])
        rows.append(CostRow(ratio, counts[ratio], select, prefill, select + prefill, full - select - prefill,
                            ms(times[ratio]["encode"])))
    return rows


def format_rows(rows: list[CostRow]) -> str:
    lines = ["| keep | kept | select ms | prefill ms | select + prefill ms | saved vs unpruned ms | encode ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.ratio:.2f} | {r.kept} | {r.select_ms:.3f} | {r.prefill_ms:.3f} | {r.total_ms:.3f} | "
                     f"{r.saved_ms:+.3f} | {r.encode_ms:.3f} |")
    return "\n".join(lines)


def plot_rows(runs: dict[str, list[CostRow]], path: Path) -> None:
    """Select + prefill time relative to the unpruned prefill, against the share kept, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs.items():
        full = next(r.prefill_ms for r in rows if r.ratio >= 1.0)
        ax.plot([r.ratio for r in rows], [r.total_ms / full for r in rows], marker="o", label=name)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("share of visual tokens kept")
    ax.set_ylabel("(selection + prefill) / unpruned prefill")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from covspec.cli.options import HelpFormatter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--draft", help="a draft checkpoint folder")
    source.add_argument("--bundle", help="an exported device bundle folder (run on --backend)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="a randomly initialised LLaVA of this text shape")
    parser.add_argument("--tokens", type=int, default=576, help="visual tokens of the --shape model's image")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75],
                        help="shares of the visual tokens kept (1.0, unpruned, is always measured too)")
    parser.add_argument("--backend", default="executorch", choices=["executorch", "onnx"], help="runtime for --bundle")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per ratio, after one warm-up round")
    parser.add_argument("--merge", action="store_true", help="merge the dropped tokens into the kept ones")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="also write the rows (and a .txt with the command, a .png plot)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    for r in args.ratios:
        keep_count(r, 100)  # validates the ratio
    torch.set_num_threads(args.threads)
    if args.bundle:
        from covspec.bundles.adapter import BundleAdapter

        adapter: VLMAdapter = BundleAdapter(args.bundle, backend=args.backend, threads=args.threads)
    else:
        adapter = load_adapter(args.draft) if args.draft else random_llava(args.shape, args.tokens)
    rows = measure(as_draft(adapter), args.ratios, args.reps, args.merge)
    table = format_rows(rows)
    print(table)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        command = "python -m benchmarks.prefill_cost " + shlex.join(argv if argv is not None else sys.argv[1:])
        out.with_suffix(".txt").write_text(f"Command: {command}\n\n{table}\n")
        name = args.draft or (f"{args.bundle} ({args.backend})" if args.bundle else f"{args.shape}, {args.tokens} tokens")
        plot_rows({name: rows}, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
