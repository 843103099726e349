"""Where pruning pays at real size: the draft's vision tower, selection, prefill and decode step against
the share of visual tokens kept, for three draft layouts with published shapes (random weights: the
time does not depend on them), side by side in one run.

    python -m benchmarks.prune_realsize --reps 8 --steps 4 --threads 1 --out results/prune-realsize

Drafts (eager PyTorch on the CPU, fp32; what matters here is how the cost splits between the tower and
the text model, which eager shows per token):

- "llava-clip336-qwen2-0.5b": LLaVA-1.5's vision side (CLIP ViT-L/14-336: 24 layers x 1024, 16 heads,
  336 px in 14 px patches, 576 visual tokens; features of the second-to-last layer, a 2-layer GELU
  projector) in front of Qwen2-0.5B's text model (24 layers x 896, 14 heads / 2 KV heads,
  intermediate 4864, vocab 151936, tied): the LLaVA-OneVision-0.5B layout with a CLIP tower (the
  published OneVision-0.5B reads 729 tokens a tile from SigLIP-so400m at 384 px, a larger tower).
  Lower resolution: 168 px (144 tokens), CLIP's position embeddings interpolated.
- "smolvlm-256m": SmolVLM-256M-Instruct (benchmarks/realsize_models.py): SigLIP-base at 512 px in
  16 px patches (1024 patches, 12 layers x 768), pixel shuffle x4 -> 64 tokens, SmolLM2-135M's
  text model. ONE tile (image splitting off, the device exporter's layout); SmolVLM's processor
  splits a large image into up to 4x4 tiles of 512 px plus the global one, each tile one tower
  pass and 64 tokens, so both parts grow together with the tile count. Lower resolution: 256 px
  through the same tower (256 patches, 16 tokens; SigLIP's NaViT-style position buckets take it).
- "qwen2.5-vl-0.5b": Qwen2.5-VL's vision tower (the one every Qwen2.5-VL size shares: 32 blocks x
  1280, 16 heads, window attention with full attention in blocks 7/15/23/31, 2x2 patch merger) at
  448x448 px (1024 patches -> 256 tokens), in front of Qwen2.5-0.5B's text model (24 x 896, 14 / 2
  heads, intermediate 4864, vocab 151936, tied; M-RoPE sections [8, 12, 12], the 3B's [16, 24, 24]
  halved for the 64-wide heads; Qwen2.5-VL itself has no 0.5B: a draft of this layout). The tower is built 8 blocks deep (blocks 0-7: seven windowed, one full, the published
  tower's mix) and its time scaled to 32 blocks: the 8 blocks' own time (timed by hooks on the first
  and last block) times 4, plus the patch embedding and merger once. Lower resolution: 224 px (256
  patches, 64 tokens).

Per repetition (one warm-up round not counted): the tower at the target's resolution and at the lower
one; then, the variants taking turns in an order that rotates every repetition, for each keep share:
selection (`score_and_select`, covspec's default method, on the device's numpy path), the prefill of
the kept tokens and the question, and `--steps` decode steps after it; and "half side": the prefill of
every token of the lower-resolution image. Reported (medians): vision ms, select ms, prefill ms, step
ms, total = vision + select + prefill (the device's time until its draft can start), the tower's share
of the total, and what each share saves against keep 1.0. Writes OUT/prune_realsize.json (rows),
OUT/table.md (tables and the command) and OUT/prune_realsize.png (total vs keep share).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.realsize_models import IDEFICS3_SPECIALS, QWEN_SPECIALS, make_tokenizer
from covspec.demo.task import make_item
from covspec.models.common import VisualTokens
from covspec.models.draft import DraftModel, as_draft
from covspec.pruning import keep_count, score_and_select

PROMPT = "what is the color of the shape in this image ?"
KEEPS = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1)  # 0.9: the covspec mode's default (covspec/modes.py)
LOW = "half side"  # the variant: every token of the lower-resolution image
SHAPE_NAMES = ("llava-clip336-qwen2-0.5b", "smolvlm-256m", "qwen2.5-vl-0.5b")
QWEN2_05B_TEXT = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                  "intermediate_size": 4864, "vocab_size": 151936}
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 512}


@dataclass
class Built:
    """A draft ready to time: its numpy view, the image at the target's and the lower resolution, and
    the vision blocks whose time is scaled to the published depth."""

    name: str
    draft: DraftModel
    full: dict[str, Any]  # preprocessed at the target's resolution
    low: dict[str, Any]  # preprocessed at the lower resolution
    encode_low: Callable[[dict[str, Any]], VisualTokens]
    blocks: torch.nn.ModuleList
    depth: int  # the published tower's blocks (len(blocks) when built whole)
    side: int
    low_side: int
    parameters: int


@dataclass
class Row:
    shape: str
    variant: str  # "keep" or LOW
    keep: float
    side: int  # input image side, px
    tokens: int  # visual tokens of the image
    kept: int
    positions: int  # prefill length (kept tokens + prompt)
    vision_ms: float  # the tower + projector (scaled to the published depth)
    select_ms: float
    prefill_ms: float
    step_ms: float  # one decode step after the prefill
    total_ms: float  # vision + select + prefill
    vision_share: float  # vision / total
    saved_ms: float  # keep 1.0's total minus this total
    saved_pct: float
    vision_measured_ms: float  # the tower as built (= vision_ms unless scaled)


def test_image(side: int) -> Image.Image:
    """The demo's first held-out image (72 px) resized to side x side: content does not change timing."""
    return make_item("heldout", 0, 0, "describe").image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@contextmanager
def interpolated_positions(tower: torch.nn.Module) -> Iterator[None]:
    """CLIP's tower called with interpolate_pos_encoding=True (an image other than its size)."""
    forward = tower.forward
    tower.forward = lambda *a, **k: forward(*a, interpolate_pos_encoding=True, **k)
    try:
        yield
    finally:
        del tower.forward


def build_llava(tiny: bool, folder: Path) -> Built:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from covspec.demo.word_tokenizer import IMAGE, build_tokenizer
    from covspec.models.llava import LlavaAdapter
    from covspec.models.llava_inputs import ClipPreprocessor

    tokenizer = build_tokenizer()
    side, low, patch = (56, 28, 14) if tiny else (336, 168, 14)
    vision = ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
              if tiny else {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                            "num_attention_heads": 16, "projection_dim": 768})
    text = TINY_TEXT if tiny else QWEN2_05B_TEXT
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": side, "patch_size": patch,
                       "hidden_act": "quick_gelu", **vision},
        text_config={"model_type": "qwen2", "max_position_embeddings": 32768, "rope_theta": 1e6,
                     "tie_word_embeddings": True, **text},
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=(side // patch) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    adapter = LlavaAdapter(model, tokenizer)
    tower = model.model.vision_tower

    def encode_low(pixels: dict[str, Any]) -> VisualTokens:
        with interpolated_positions(tower):
            return as_draft(adapter).encode_image(pixels)

    low_pixels = {"pixel_values": torch.from_numpy(ClipPreprocessor(None, low)(test_image(low)))}
    layers = adapter._encoder_layers()
    return Built("llava-clip336-qwen2-0.5b", as_draft(adapter), adapter.preprocess(test_image(side)), low_pixels,
                 encode_low, layers, len(layers), side, low, parameter_count(model))


def build_smolvlm(tiny: bool, folder: Path) -> Built:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from covspec.models.idefics3 import Idefics3Adapter, Idefics3Preprocessor

    tok = make_tokenizer(folder / "smolvlm", IDEFICS3_SPECIALS, bos="<|im_start|>", eos="<end_of_utterance>",
                         pad="<|endoftext|>")
    side, low, patch, scale = (64, 32, 8, 2) if tiny else (512, 256, 16, 4)
    vision = ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
              if tiny else {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_attention_heads": 12})
    text = ({**TINY_TEXT, "num_key_value_heads": 2} if tiny else
            {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49280})
    config = Idefics3Config(
        vision_config={"image_size": side, "patch_size": patch, **vision},
        text_config={"model_type": "llama", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                     "tie_word_embeddings": False, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, **text},
        scale_factor=scale, tie_word_embeddings=False, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    settings = {"do_image_splitting": False, "size": {"longest_edge": side}, "max_image_size": {"longest_edge": side},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 1}
    adapter = Idefics3Adapter(model, tok, None, settings)
    draft = as_draft(adapter)
    low_settings = {**settings, "size": {"longest_edge": low}, "max_image_size": {"longest_edge": low}}
    layers = model.model.vision_model.encoder.layers
    return Built("smolvlm-256m", draft, adapter.preprocess(test_image(side)),
                 Idefics3Preprocessor(low_settings, low)(test_image(low)), draft.encode_image, layers, len(layers),
                 side, low, parameter_count(model))


def build_qwen(tiny: bool, folder: Path) -> Built:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from covspec.models.qwen2_5_vl import Qwen25VLAdapter

    tok = make_tokenizer(folder / "qwen", QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    side, low = (112, 56) if tiny else (448, 224)
    built_depth, depth = (2, 4) if tiny else (8, 32)
    vision = ({"hidden_size": 32, "intermediate_size": 64, "num_heads": 2} if tiny else
              {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16})
    text = TINY_TEXT if tiny else QWEN2_05B_TEXT
    config = Qwen2_5_VLConfig(
        text_config={"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3] if tiny
                                         else [8, 12, 12], "rope_theta": 1000000.0},
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None,
                     **text},
        vision_config={"depth": built_depth, "out_hidden_size": text["hidden_size"], "patch_size": 14,
                       "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                       "fullatt_block_indexes": [built_depth - 1], "hidden_act": "silu", "in_channels": 3, **vision},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    adapter = Qwen25VLAdapter(model, tok, None, None)
    draft = as_draft(adapter)
    return Built("qwen2.5-vl-0.5b", draft, adapter.preprocess(test_image(side)), adapter.preprocess(test_image(low)),
                 draft.encode_image, model.model.visual.blocks, depth, side, low, parameter_count(model))


BUILDERS: dict[str, Callable[[bool, Path], Built]] = dict(zip(SHAPE_NAMES, (build_llava, build_smolvlm, build_qwen),
                                                              strict=True))


def timed_vision(encode: Callable[[dict[str, Any]], VisualTokens], pixels: dict[str, Any],
                 blocks: torch.nn.ModuleList) -> tuple[VisualTokens, float, float]:
    """The visual tokens, the whole call's seconds and the seconds from the first block's start to
    the last block's end."""
    marks: dict[str, float] = {}

    def started(*_: Any) -> None:  # hooks return None: the blocks' inputs and outputs stay as they are
        marks.setdefault("start", time.perf_counter())

    def ended(*_: Any) -> None:
        marks["end"] = time.perf_counter()

    first = blocks[0].register_forward_pre_hook(started)
    last = blocks[-1].register_forward_hook(ended)
    try:
        t0 = time.perf_counter()
        visual = encode(pixels)
        t1 = time.perf_counter()
    finally:
        first.remove()
        last.remove()
    return visual, t1 - t0, marks["end"] - marks["start"]


def run_variant(draft: DraftModel, visual: VisualTokens, query: np.ndarray, keep: float,
                steps: int) -> tuple[float, float, list[float], int, int]:
    """Selection seconds, prefill seconds, each step's seconds, tokens kept, prefill positions."""
    t0 = time.perf_counter()
    kept = score_and_select(visual, query, keep) if keep < 1.0 else None
    t1 = time.perf_counter()
    logits, state = draft.prefill(visual, PROMPT, kept=kept)
    t2 = time.perf_counter()
    positions = state.length
    step_times = []
    token = int(np.argmax(logits))
    for _ in range(steps):
        s0 = time.perf_counter()
        logits = draft.forward(state, np.array([token], dtype=np.int64))
        step_times.append(time.perf_counter() - s0)
        token = int(np.argmax(logits[-1]))
    n = int(np.asarray(visual.embeds).shape[0])
    return t1 - t0, t2 - t1, step_times, (n if kept is None else len(kept)), positions


def measure(built: Built, keeps: list[float], reps: int, steps: int) -> list[Row]:
    """Every keep share and the half-side image, taking turns within each repetition (the first of
    reps + 1 rounds warms up)."""
    draft = built.draft
    query = draft.prompt_embeddings(PROMPT)
    scale = built.depth / len(built.blocks)
    variants: list[tuple[str, float]] = [("keep", k) for k in keeps] + [(LOW, 1.0)]
    times: dict[tuple[str, float], dict[str, list[float]]] = {v: {"select": [], "prefill": [], "step": []}
                                                             for v in variants}
    vision: dict[str, list[float]] = {"full": [], "low": [], "full_measured": [], "low_measured": []}
    counts: dict[tuple[str, float], tuple[int, int, int]] = {}
    for rep in range(reps + 1):
        seen = {}
        for res, encode, pixels in (("full", draft.encode_image, built.full), ("low", built.encode_low, built.low)):
            visual, seconds, in_blocks = timed_vision(encode, pixels, built.blocks)
            seen[res] = visual
            if rep:
                vision[res].append(seconds + (scale - 1) * in_blocks)
                vision[res + "_measured"].append(seconds)
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            visual = seen["low" if variant[0] == LOW else "full"]
            select, prefill, step_times, kept, positions = run_variant(draft, visual, query, variant[1], steps)
            counts[variant] = (int(np.asarray(visual.embeds).shape[0]), kept, positions)
            if rep:
                times[variant]["select"].append(select)
                times[variant]["prefill"].append(prefill)
                times[variant]["step"].extend(step_times)
    return make_rows(built, variants, times, vision, counts)


def ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs) if xs else 0.0


def make_rows(built: Built, variants: list[tuple[str, float]], times: dict[tuple[str, float], dict[str, list[float]]],
              vision: dict[str, list[float]], counts: dict[tuple[str, float], tuple[int, int, int]]) -> list[Row]:
    rows = []
    for variant in variants:
        res = "low" if variant[0] == LOW else "full"
        t = times[variant]
        v, select, prefill = ms(vision[res]), ms(t["select"]), ms(t["prefill"])
        total = v + select + prefill
        tokens, kept, positions = counts[variant]
        rows.append(Row(built.name, variant[0], variant[1], built.low_side if res == "low" else built.side, tokens,
                        kept, positions, v, select, prefill, ms(t["step"]), total, v / total, 0.0, 0.0,
                        ms(vision[res + "_measured"])))
    base = next(r for r in rows if r.variant == "keep" and r.keep >= 1.0)
    for r in rows:
        r.saved_ms = base.total_ms - r.total_ms
        r.saved_pct = 100 * r.saved_ms / base.total_ms
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| draft | variant | image px | kept / tokens | prefill positions | vision ms | select ms | prefill ms "
             "| step ms | vision + select + prefill ms | vision share | saved ms | saved % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        variant = f"keep {r.keep:.2f}" if r.variant == "keep" else f"{LOW}, all tokens"
        lines.append(f"| {r.shape} | {variant} | {r.side} | {r.kept} / {r.tokens} | {r.positions} | {r.vision_ms:.0f} "
                     f"| {r.select_ms:.1f} | {r.prefill_ms:.0f} | {r.step_ms:.1f} | {r.total_ms:.0f} "
                     f"| {100 * r.vision_share:.0f}% | {r.saved_ms:+.0f} | {r.saved_pct:+.1f}% |")
    return "\n".join(lines)


def plot_rows(rows: list[Row], path: Path) -> None:
    """Total device time to the first draft against the share kept, one line per draft; the tower's
    part dashed, the half-side image a star (at the share of tokens it has)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rel) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(dict.fromkeys(r.shape for r in rows)):
        colour = f"C{i}"
        mine = [r for r in rows if r.shape == name and r.variant == "keep"]
        low = next(r for r in rows if r.shape == name and r.variant == LOW)
        full = next(r for r in mine if r.keep >= 1.0).total_ms
        x = [r.keep for r in mine]
        ax.plot(x, [r.total_ms / 1000 for r in mine], marker="o", color=colour, label=f"{name}: total")
        ax.plot(x, [r.vision_ms / 1000 for r in mine], linestyle="--", color=colour, label=f"{name}: vision tower")
        ax.plot([low.tokens / mine[0].tokens], [low.total_ms / 1000], marker="*",
                markersize=13, color=colour, linestyle="none")
        rel.plot(x, [r.total_ms / full for r in mine], marker="o", color=colour, label=name)
        rel.plot([low.tokens / mine[0].tokens], [low.total_ms / full], marker="*", markersize=13, color=colour,
                 linestyle="none")
    ax.set_xlabel("share of visual tokens kept")
    ax.set_ylabel("vision + select + prefill, s (one CPU thread)")
    ax.set_title("device time to first draft (dashed: vision tower; star: half-side image)", fontsize=9)
    ax.legend(fontsize=7)
    rel.axhline(1.0, color="grey", linestyle=":")
    rel.set_xlabel("share of visual tokens kept (star: half-side image)")
    rel.set_ylabel("total / total at keep 1.0")
    rel.set_ylim(0, 1.05)
    rel.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPE_NAMES), choices=SHAPE_NAMES)
    parser.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS),
                        help="shares of the visual tokens kept (1.0 is always measured)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions, after one warm-up round")
    parser.add_argument("--steps", type=int, default=4, help="decode steps after each prefill")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same layouts (tests)")
    parser.add_argument("--out", required=True, help="folder for prune_realsize.json, table.md, prune_realsize.png")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        parser.error("--reps and --steps must be at least 1")
    for k in args.keeps:
        keep_count(k, 100)  # validates the share
    keeps = sorted(set(args.keeps) | {1.0}, reverse=True)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.prune_realsize " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows: list[Row] = []
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            start = time.perf_counter()
            built = BUILDERS[name](args.tiny, Path(tmp))
            rows += measure(built, keeps, args.reps, args.steps)
            notes.append(f"{name}: {built.parameters / 1e6:.1f}M parameters as built, tower {len(built.blocks)} of "
                         f"{built.depth} blocks; {time.perf_counter() - start:.0f} s")
            print(f"[prune_realsize] {notes[-1]}", file=sys.stderr, flush=True)
            del built
    table = format_table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "threads": args.threads, "reps": args.reps, "steps": args.steps, "prompt": PROMPT,
            "notes": notes}
    (out / "prune_realsize.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    (out / "table.md").write_text(f"Command: `{command}`\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    plot_rows(rows, out / "prune_realsize.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
