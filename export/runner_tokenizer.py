"""The tokenizer file ExecuTorch's C++ LLM runners read (`MultimodalRunner`, Android `LlmModule`).

Their HF tokenizer reader takes `tokenizer.json` with a BPE model and the `Split` / `ByteLevel`
pre-tokenizers only. A word-level vocabulary (the demo's: WordLevel + Whitespace) is written as the
same vocabulary in BPE form with no merges: every word token becomes its byte-level spelling with a
leading space (`Ġword`), pieces come from `Split`s on spaces (removed) and punctuation (isolated) followed by
`ByteLevel(add_prefix_space)`, and a piece found whole in the vocabulary is one token (BPE's
whole-piece lookup; `ignore_merges`), so in-vocabulary text gets the same ids as the original and
decoding prints the words separated by spaces; an out-of-vocabulary word is one <unk> (fuse_unk), as
in WordLevel, unless it begins with a one-letter word of the vocabulary. Ids are unchanged; special tokens stay added tokens.
A checkpoint whose tokenizer.json already has a BPE model is copied as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUNNER_TOKENIZER = "runner_tokenizer.json"
SPACES, PUNCTUATION = r"\s+", r"\p{P}"


def byte_level(text: str) -> str:
    """`text` in the byte-level alphabet of GPT-2 style BPE (space -> Ġ)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return "".join(piece for piece, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text))


def bpe_from_word_level(spec: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer.json dict of a WordLevel tokenizer, as BPE with no merges (same ids)."""
    model = spec["model"]
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    vocab = {(tok if tok in specials else byte_level(" " + tok)): i for tok, i in model["vocab"].items()}
    return {**{k: v for k, v in spec.items() if k not in ("model", "pre_tokenizer", "decoder")},
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPACES}, "behavior": "Removed", "invert": False},
                {"type": "Split", "pattern": {"Regex": PUNCTUATION}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": model.get("unk_token"),
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": False, "ignore_merges": True, "vocab": vocab, "merges": []}}


def write_runner_tokenizer(source: Path, out: Path) -> dict[str, Any]:
    """Writes out/RUNNER_TOKENIZER from source/tokenizer.json; returns the manifest entry."""
    spec = json.loads((source / "tokenizer.json").read_text())
    kind = spec.get("model", {}).get("type")
    if kind == "WordLevel":
        spec, how = bpe_from_word_level(spec), "WordLevel vocabulary as BPE without merges (same ids)"
    elif kind == "BPE":
        how = "copied (already BPE)"
    else:
        return {"file": None, "why": f"no runner tokenizer for a {kind} model (the C++ runner reads BPE only)"}
    (out / RUNNER_TOKENIZER).write_text(json.dumps(spec, ensure_ascii=False))
    return {"file": RUNNER_TOKENIZER, "from": kind, "how": how}
