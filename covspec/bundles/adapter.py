"""`BundleAdapter`: the VLMAdapter interface on an exported device bundle, so the device runtime runs
the draft without the Hugging Face model (only the tokenizer is loaded, as PreTrainedTokenizerFast).
Every exportable family runs (llava, idefics3, qwen2_5_vl): what differs per family (preprocessing to
the exported size, the prompt around the image tokens, RoPE or M-RoPE positions) is in
covspec/bundles/families.py; what a family cannot do in its bundle (the manifest's "limits") is logged
once when the bundle is loaded.

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
import torch
from PIL import Image

from covspec.bundles.bundle import Bundle, BundleError, load_bundle
from covspec.bundles.families import RULES, FamilyRules, rules_for
from covspec.bundles.programs import BACKENDS, open_programs
from covspec.errors import PromptError
from covspec.models.base import (
    DecodeState,
    VisualTokens,
    VLMAdapter,
    encode_text,
    read_json_file,
    select_kept,
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


class BundleAdapter(VLMAdapter):
    """A draft from a device bundle of any exportable family, on backend "executorch" (default) or "onnx"."""

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
        self.tokenizer = self._load_tokenizer()
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
        announce_limits(self.path, self.rules)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> BundleAdapter:
        return cls(path)

    def _load_tokenizer(self) -> Any:
        from transformers import PreTrainedTokenizerFast

        if not (self.tokenizer_dir / "tokenizer.json").is_file():
            raise BundleError(f"bundle {self.path}: no tokenizer.json")
        return PreTrainedTokenizerFast.from_pretrained(str(self.tokenizer_dir), local_files_only=True)

    # --- what the HF adapter reads from its model ----------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.bundle.manifest["vocab_size"])

    @property
    def eos_token_ids(self) -> set[int]:
        return {int(i) for i in self.bundle.manifest.get("eos_token_ids", [])}

    # --- images ----------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The vision program's input, of its exported shape (any image is resized to it as the family's
        processor would): [1, 3, S, S], or Qwen2.5-VL's patches [rows * cols, C * t * p * p]."""
        return {"pixel_values": torch.from_numpy(self.rules.pixels(image))}

    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        out = self.programs.vision(pixels["pixel_values"])
        embeds, activity = out[0], out[1]  # [N, d], [N]
        attention = out[2] if len(out) > 2 else None
        return VisualTokens(embeds=embeds, activity=activity, attention=attention,
                            grid=self.rules.grid(int(embeds.shape[0])))

    # --- text ------------------------------------------------------------------------------------
    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        if self._embeddings is None:
            entry = self.bundle.manifest.get("embeddings")
            if not entry:
                raise BundleError(f"bundle {self.path}: no embedding table (needed for the pruner's query)")
            self._embeddings = np.load(self.path / entry["file"])
        ids = encode_text(self.tokenizer, self.check_prompt(prompt))
        return torch.from_numpy(self._embeddings[ids].astype(np.float32))  # [T, d]

    def prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        return self.rules.prompt(self.tokenizer, self.check_prompt(prompt), n_image_tokens)[0]

    def new_state(self) -> DecodeState:
        return DecodeState(cache=self.programs.new_cache(), length=0)

    def fork_state(self, state: DecodeState) -> DecodeState:
        return DecodeState(cache=self.programs.fork(state), length=state.length, extra=dict(state.extra))

    def prefill(self, visual: VisualTokens, prompt: str,
                kept: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        kept = select_kept(visual, kept)
        n_kept = int(kept.numel())
        ids_list, image_start = self.rules.prompt(self.tokenizer, self.check_prompt(prompt), n_kept)
        ids = torch.tensor(ids_list, dtype=torch.long)  # [T]
        if ids.numel() >= self.max_len:
            raise PromptError(f"the prompt takes {ids.numel()} tokens with the image, over the bundle's "
                              f"{self.max_len} cache positions")
        is_image = torch.zeros(ids.numel(), dtype=torch.bool)  # [T]
        is_image[image_start:image_start + n_kept] = True
        image_embeds = torch.zeros(ids.numel(), self.hidden)
        image_embeds[is_image] = visual.embeds[kept].float()
        # every token keeps its unpruned position ([T], or M-RoPE [3, T]); decoding continues past them
        positions, extra = self.rules.prefill_positions(int(ids.numel()), image_start, kept.numpy(), visual.count,
                                                        visual.grid)
        state = self.new_state()
        state.extra.update(extra)
        logits = self._run(state, ids, image_embeds, is_image, torch.from_numpy(positions))
        return logits[-1], state

    def forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            return torch.empty(0, self.vocab_size)
        k = int(ids.numel())
        positions = torch.from_numpy(self.rules.step_positions(state.length, state.extra, k))  # [k] or [3, k]
        return self._run(state, ids, torch.zeros(k, self.hidden), torch.zeros(k, dtype=torch.bool), positions)

    def _run(self, state: DecodeState, ids: torch.Tensor, image_embeds: torch.Tensor,
             is_image: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Appends ids [T] (image_embeds [T, d] where is_image [T]) at RoPE positions [T] (M-RoPE:
        [3, T]) to the state, in cache slots length..length+T-1; logits [T, V]."""
        total = int(ids.numel())
        if state.length + total > self.max_len:
            raise PromptError(f"the sequence would take {state.length + total} positions, over the bundle's "
                              f"{self.max_len} cache positions")
        chunks = []
        for start in range(0, total, self.max_chunk):
            end = min(start + self.max_chunk, total)
            logits = self.programs.decoder(state, ids[None, start:end].contiguous(),
                                           image_embeds[None, start:end].contiguous(),
                                           is_image[None, start:end].contiguous(),
                                           positions[..., start:end].contiguous(), state.length)
            state.length += end - start
            chunks.append(logits[0])  # [k, V]
        return torch.cat(chunks).float()

    def truncate(self, state: DecodeState, length: int) -> None:
        if not 0 <= length <= state.length:
            raise ValueError(f"cannot truncate a state of {state.length} positions to {length}")
        state.length = length  # slots from `length` on are overwritten by the next forward

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
