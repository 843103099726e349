"""`BundleAdapter`: a `DraftModel` (covspec/models/draft.py: numpy in and out) on an exported device
bundle, so the device runtime runs the draft without torch or transformers: the programs on
ExecuTorch (our native shim) or ONNX Runtime, the tokenizer on the `tokenizers` library.
Every exportable family runs (llava, idefics3, qwen2_5_vl): what differs per family (preprocessing to
the exported size, the prompt around the image tokens, RoPE or M-RoPE positions) is in
covspec/bundles/families.py; what a family cannot do in its bundle (the manifest's "limits") is logged
once per bundle, when its first image is preprocessed (at load it would be lost: the CLI silences stderr
while the programs load, for ExecuTorch's native chatter).

A decode state's `length` is how many cache slots are valid; its cache is what the backend keeps
(covspec/bundles/programs.py: ExecuTorch's in-program cache, resident for one state at a time; ONNX's
explicit cache tensor [L, 2, kvH, S, hd]). forward(ids[k]) writes slots length..length+k-1 in chunks
of at most `max_chunk`; truncate only moves `length` back (later writes overwrite the stale slots,
which no query sees first). As in the Hugging Face adapter, a pruned prefill keeps every token's
unpruned RoPE position, and decoding continues at slot + `position_offset` (the number of visual
tokens left out), or for Qwen2.5-VL at slot + `rope_delta` on the three M-RoPE rows. fork_state gives
an independent branch (the backend copies the cache out).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from covspec.bundles.bundle import Bundle, BundleError, load_bundle
from covspec.bundles.families import RULES, FamilyRules, rules_for
from covspec.bundles.programs import BACKENDS, open_programs
from covspec.bundles.tokenizer import BundleTokenizer
from covspec.errors import PromptError
from covspec.models.common import (
    DecodeState,
    VisualTokens,
    check_prompt,
    encode_text,
    read_json_file,
    tokenizer_fingerprint,
)

log = logging.getLogger("covspec.bundles")
_announced: set[str] = set()  # bundles whose limits were logged (once per bundle per process)


def announce_limits(folder: Path, rules: FamilyRules) -> None:
    """One line, once per bundle: what the family cannot do in this bundle."""
    key = str(Path(folder).resolve())
    if rules.limits and key not in _announced:
        _announced.add(key)
        log.info("bundle %s (%s): %s", folder, rules.name, "; ".join(rules.limits))


class BundleAdapter:
    """A draft from a device bundle of any exportable family, on backend "executorch" (default) or "onnx"."""

    numpy_io = True  # a DraftModel as it is
    family = "bundle"  # the bundle's own family: self.rules.name
    model_types = tuple(RULES)

    def __init__(self, bundle: Bundle | str | Path, backend: str = "executorch", threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (backends: {', '.join(BACKENDS)})")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        m = self.bundle.manifest
        if m.get("family") not in RULES:
            raise BundleError(f"bundle {self.bundle.folder}: family {m.get('family')!r} has no bundle runtime "
                              f"(families: {', '.join(RULES)}); run its checkpoint with --model instead")
        self.model = None  # no torch model: the programs below stand in for it
        self.path = self.bundle.folder
        self.backend = backend
        self.tokenizer_dir = self.path / m.get("tokenizer_dir", ".")  # tokenizer + preprocessor config
        self.tokenizer = BundleTokenizer(self.tokenizer_dir)
        if tokenizer_fingerprint(self.tokenizer) != m["tokenizer_fingerprint"]:
            raise BundleError(f"bundle {self.path}: tokenizer.json does not match the manifest's tokenizer "
                              "fingerprint (the tokenizer files belong to another model)")
        self.programs = open_programs(backend, self.bundle, threads)
        self.decoder_info = m["decoder"]
        self.max_len = int(self.decoder_info["max_len"])
        self.max_chunk = int(self.decoder_info["max_chunk"])
        self.hidden = int(self.decoder_info["hidden"])
        self.image_token_id = int(m["prompt"]["image_token_id"])
        self.rules = rules_for(m, read_json_file(self.tokenizer_dir / "preprocessor_config.json"))
        self.family = self.rules.name
        self._embeddings: np.ndarray | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> BundleAdapter:
        return cls(path)

    # --- what the HF adapter reads from its model ----------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.bundle.manifest["vocab_size"])

    @property
    def eos_token_ids(self) -> set[int]:
        return {int(i) for i in self.bundle.manifest.get("eos_token_ids", [])}

    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    @staticmethod
    def check_prompt(prompt: str) -> str:
        return check_prompt(prompt)

    # --- images ----------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> dict[str, np.ndarray]:
        """The vision program's input, of its exported shape (any image is resized to it as the family's
        processor would): [1, 3, S, S], or Qwen2.5-VL's patches [rows * cols, C * t * p * p]."""
        announce_limits(self.path, self.rules)
        return {"pixel_values": self.rules.pixels(image)}

    def encode_image(self, pixels: dict[str, np.ndarray]) -> VisualTokens:
        out = self.programs.vision(pixels["pixel_values"])
        embeds, activity = out[0], out[1]  # [N, d], [N]
        attention = out[2] if len(out) > 2 else None
        return VisualTokens(embeds=embeds, activity=activity, attention=attention,
                            grid=self.rules.grid(int(embeds.shape[0])))

    # --- text ------------------------------------------------------------------------------------
    def prompt_embeddings(self, prompt: str) -> np.ndarray:
        if self._embeddings is None:
            entry = self.bundle.manifest.get("embeddings")
            if not entry:
                raise BundleError(f"bundle {self.path}: no embedding table (needed for the pruner's query)")
            self._embeddings = np.load(self.path / entry["file"])
        ids = encode_text(self.tokenizer, self.check_prompt(prompt))
        return self._embeddings[ids].astype(np.float32)  # [T, d]

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        return self.rules.prompt(self.tokenizer, self.check_prompt(prompt), n_image_tokens)[0]

    def new_state(self) -> DecodeState:
        return DecodeState(cache=self.programs.new_cache(), length=0)

    def fork_state(self, state: DecodeState) -> DecodeState:
        return DecodeState(cache=self.programs.fork(state), length=state.length, extra=dict(state.extra))

    def prefill(self, visual: VisualTokens, prompt: str,
                kept: np.ndarray | None = None) -> tuple[np.ndarray, DecodeState]:
        kept = kept_indices(visual.count, kept)
        n_kept = len(kept)
        ids_list, image_start = self.rules.prompt(self.tokenizer, self.check_prompt(prompt), n_kept)
        ids = np.asarray(ids_list, dtype=np.int64)  # [T]
        t = len(ids)
        if t >= self.max_len:
            raise PromptError(f"the prompt takes {t} tokens with the image, over the bundle's "
                              f"{self.max_len} cache positions")
        is_image = np.zeros(t, dtype=np.bool_)  # [T]
        is_image[image_start:image_start + n_kept] = True
        image_embeds = np.zeros((t, self.hidden), dtype=np.float32)  # [T, d]
        image_embeds[is_image] = np.asarray(visual.embeds, dtype=np.float32)[kept]
        # every token keeps its unpruned position ([T], or M-RoPE [3, T]); decoding continues past them
        positions, extra = self.rules.prefill_positions(t, image_start, kept, visual.count, visual.grid)
        state = self.new_state()
        state.extra.update(extra)
        logits = self._run(state, ids, image_embeds, is_image, positions)
        return logits[-1], state

    def forward(self, state: DecodeState, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        k = len(ids)
        if k == 0:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        positions = self.rules.step_positions(state.length, state.extra, k)  # [k] or [3, k]
        return self._run(state, ids, np.zeros((k, self.hidden), dtype=np.float32), np.zeros(k, dtype=np.bool_),
                         positions)

    def _run(self, state: DecodeState, ids: np.ndarray, image_embeds: np.ndarray,
             is_image: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Appends ids [T] (image_embeds [T, d] where is_image [T]) at RoPE positions [T] (M-RoPE:
        [3, T]) to the state, in cache slots length..length+T-1; logits [T, V] float32."""
        total = len(ids)
        if state.length + total > self.max_len:
            raise PromptError(f"the sequence would take {state.length + total} positions, over the bundle's "
                              f"{self.max_len} cache positions")
        chunks = []
        for start in range(0, total, self.max_chunk):
            end = min(start + self.max_chunk, total)
            c = np.ascontiguousarray
            logits = self.programs.decoder(state, c(ids[None, start:end]), c(image_embeds[None, start:end]),
                                           c(is_image[None, start:end]), c(positions[..., start:end]), state.length)
            state.length += end - start
            chunks.append(logits[0])  # [k, V]
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def truncate(self, state: DecodeState, length: int) -> None:
        if not 0 <= length <= state.length:
            raise ValueError(f"cannot truncate a state of {state.length} positions to {length}")
        state.length = length  # slots from `length` on are overwritten by the next forward

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def kept_indices(n: int, kept: np.ndarray | None) -> np.ndarray:
    """Validated kept indices (sorted, unique, in [0, n)) as int64 [k]; all n when `kept` is None."""
    if kept is None:
        return np.arange(n, dtype=np.int64)
    kept = np.asarray(kept, dtype=np.int64).ravel()
    if kept.size and (kept.min() < 0 or kept.max() >= n):
        raise ValueError(f"kept indices must lie in [0, {n}), got [{kept.min()}, {kept.max()}]")
    if kept.size > 1 and not (np.diff(kept) > 0).all():
        raise ValueError("kept indices must be sorted and unique")
    return kept
