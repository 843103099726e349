"""A heavier draft for load runs: the target's first N decoder layers with its embeddings, vision side
and head (an early-exit copy), so its step costs about N / L of the target's (the demo target has 14
layers: 3 or 4 give the "draft step about a quarter of the target's" point of the load bench). It shares
the target's tokenizer, so an edge can run it beside the target (`covspec edge serve --draft`).

    python -m benchmarks.layer_draft --layers 3 --out runs/draft-3layers
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def layer_draft(target: Path, layers: int, out: Path) -> Path:
    """Writes the first `layers` decoder layers of the checkpoint `target` (config and weights) to `out`."""
    config = json.loads((target / "config.json").read_text())
    text = config.get("text_config", config)
    total = text["num_hidden_layers"]
    if not 1 <= layers <= total:
        raise ValueError(f"--layers must lie in [1, {total}], got {layers}")
    out.mkdir(parents=True, exist_ok=True)
    for item in target.iterdir():
        if item.is_file() and item.name not in ("config.json", "model.safetensors"):
            shutil.copy2(item, out / item.name)
    text["num_hidden_layers"] = layers
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:layers]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = load_file(target / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if not _deeper(name, layers)}
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _deeper(name: str, layers: int) -> bool:
    """Whether a weight belongs to a decoder layer at index `layers` or beyond."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit() and "language_model" in name:
            return int(parts[i + 1]) >= layers
    return False


def main(argv: list[str] | None = None) -> int:
    from covspec import demo

    p = argparse.ArgumentParser(prog="python -m benchmarks.layer_draft", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target checkpoint folder (default: the demo target)")
    p.add_argument("--layers", type=int, default=3, help="decoder layers kept (default: 3)")
    p.add_argument("--out", required=True, help="folder for the draft checkpoint")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    target = Path(args.target) if args.target else demo.default_target_path()
    print(layer_draft(target, args.layers, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
