"""The one small interface the rest of CoVSpec uses to talk to a vision-language model.

Each model family lives in its own module (llava.py, qwen2_5_vl.py, idefics3.py) and implements
`VLMAdapter`. Nothing outside `covspec/models/` knows which family it is driving.

The decode state is explicit: `prefill` returns a `DecodeState`, `forward` extends it by k
tokens and returns their logits in one pass, `truncate` rolls it back. That is all speculative
decoding needs: score a draft window, keep the accepted prefix, drop the rest.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from covspec.errors import ModelLoadError, PromptError
from covspec.models.common import (  # noqa: F401 (re-exported)
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DecodeState,
    VisualTokens,
    bos_prefix,
    center_crop,
    check_no_placeholder,
    check_prompt,
    encode_text,
    first_line,
    normalize,
    pil_resize,
    read_config,
    read_json_file,
    tokenizer_fingerprint,
)


@dataclass
class PrefillInputs:
    """What a prefill feeds the text model: the prompt's embeddings with the visual tokens in place,
    their positions and the family's DecodeState extras. Separate from running it, so that the
    edge can prefill several prompts in one pass (edge_runtime.batching.prefill_batch)."""

    embeds: torch.Tensor  # [T, d]
    positions: torch.Tensor  # [1, T], or [3, 1, T] for M-RoPE
    extra: dict[str, Any] = field(default_factory=dict)


class VLMAdapter(ABC):
    """A loaded VLM behind the interface the runtimes drive. Logits come back float32 on the CPU,
    whatever device and dtype the model runs in."""

    family: ClassVar[str]
    # the `model_type` values in config.json this adapter accepts
    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, model: torch.nn.Module, tokenizer: Any, path: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.path = path

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> VLMAdapter:
        """Loads a local Hugging Face folder of this family (never a hub download)."""

    # --- images ------------------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The family's image preprocessing: an RGB image to the tensors its vision tower takes."""

    @abstractmethod
    def encode_image(self, pixels: dict[str, torch.Tensor]) -> VisualTokens:
        """Vision tower + projector: visual tokens [N, d] in the text model's embedding space."""

    # --- text --------------------------------------------------------------------------------
    @abstractmethod
    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        """Input embeddings [T, d] of the prompt's own text tokens (the pruner's query)."""

    @abstractmethod
    def prefill(self, visual: VisualTokens, prompt: str,
                kept: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """Runs the chat-formatted prompt with the image's visual tokens (only `kept`, sorted
        indices into [0, N), when given). Returns the last position's logits [V] and the state."""

    @abstractmethod
    def forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        """Appends ids [k] to the state in one forward pass; returns their logits [k, V]."""

    @abstractmethod
    def truncate(self, state: DecodeState, length: int) -> None:
        """Rolls the state back so that it holds its first `length` positions."""

    def fork_state(self, state: DecodeState) -> DecodeState:
        """An independent copy of a state (a draft branch decodes on it without touching the original)."""
        return copy.deepcopy(state)

    # --- tokenizer ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Width of the logits (may exceed the tokenizer's size: padded embedding tables)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, list | tuple) else {int(ids)}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's vocabulary (token -> id), identical across a draft/target pair
        exactly when they tokenize alike."""
        return tokenizer_fingerprint(self.tokenizer)

    # --- shared checks -------------------------------------------------------------------
    @staticmethod
    def check_prompt(prompt: str) -> str:
        return check_prompt(prompt)


# ------------------------------------------------------------------------------------------------
# Shared by the families: loading, image preprocessing, prompt tokenization, cached decoding.
# ------------------------------------------------------------------------------------------------

def check_model_type(path: Path, config: dict[str, Any], adapter: type[VLMAdapter]) -> None:
    model_type = config.get("model_type")
    if model_type not in adapter.model_types:
        raise ModelLoadError(
            f"model folder {path}: model_type {model_type!r} is not a {adapter.family} checkpoint "
            f"(expected one of {', '.join(adapter.model_types)})")


def load_hf_model(model_cls: Any, path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """`model_cls.from_pretrained` from a local folder only; every failure (broken config, missing or
    mismatched weights) becomes a ModelLoadError naming the folder and the cause."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report would precede our one-line error
    try:
        model, info = model_cls.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                output_loading_info=True)
    except Exception as err:  # transformers raises many types here; all mean "this folder is broken"
        cause = f"{type(err).__name__}: {first_line(err)}"
        if "mismatched_sizes" in cause:
            cause = "the weights' shapes do not match the sizes in config.json"
        raise ModelLoadError(f"model folder {path}: cannot load {model_cls.__name__} ({cause})") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"model folder {path}: the weights lack {len(missing)} tensors of "
                             f"{model_cls.__name__} (e.g. {', '.join(sorted(missing)[:3])})")
    return model.to(device).eval()


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"model folder {path}: cannot load the tokenizer "
                             f"({type(err).__name__}: {first_line(err)})") from err


def select_kept(visual: VisualTokens, kept: torch.Tensor | None) -> torch.Tensor:
    """Validated kept indices (sorted, unique, in [0, N)); all N when `kept` is None."""
    n = visual.count
    if kept is None:
        return torch.arange(n)
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().cpu()
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n):
        raise ValueError(f"kept indices must lie in [0, {n}), got [{int(kept.min())}, {int(kept.max())}]")
    if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
        raise ValueError("kept indices must be sorted and unique")
    return kept


def received_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """Attention each position receives in a pre-norm ViT encoder layer (CLIP, SigLIP, Idefics3:
    `layer_norm1` then `self_attn` with q_proj/k_proj/num_heads), mean over heads and query
    positions. hidden [T, d] is the layer's input; returns [T]. Recomputed from the q/k projections
    (one [heads, T, T] product), so the tower itself can run with SDPA. None for other layer types."""
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "layer_norm1", None)
    heads = getattr(attn, "num_heads", None)
    if attn is None or norm is None or heads is None or not hasattr(attn, "q_proj"):
        return None
    x = norm(hidden)
    q = attn.q_proj(x).view(x.shape[0], heads, -1).transpose(0, 1).float()  # [h, T, dh]
    k = attn.k_proj(x).view(x.shape[0], heads, -1).transpose(0, 1).float()
    probs = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)  # [h, T, T]
    return probs.mean(dim=(0, 1))


class CachedDecoderAdapter(VLMAdapter):
    """The decode machinery every family shares: the text model run on inputs_embeds with a
    DynamicCache and explicit position ids, then the lm_head. A family supplies the prompt's
    sequence (prefill) and, where positions are not simply 0, 1, 2, ..., `_positions`."""

    hf_class: ClassVar[str]  # the transformers model class of the family's checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> CachedDecoderAdapter:
        import transformers

        folder = Path(path)
        check_model_type(folder, read_config(folder), cls)
        preprocessor = read_json_file(folder / "preprocessor_config.json")
        tokenizer = load_tokenizer(folder)
        model = load_hf_model(getattr(transformers, cls.hf_class), folder, dtype, device)
        return cls(model, tokenizer, folder, preprocessor)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> input embeddings [T, d]."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        prompt = self.check_prompt(prompt)
        with torch.inference_mode():
            return self.embed(torch.tensor(encode_text(self.tokenizer, prompt), dtype=torch.long))

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.text_config)

    def check_length(self, n: int) -> None:
        limit = getattr(self.text_config, "max_position_embeddings", None)
        if limit is not None and n >= limit:
            raise PromptError(f"the prompt takes {n} tokens with the image, over the model's {limit} positions")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def place(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Moves the model to this device and dtype (caches made afterwards follow it)."""
        self.model.to(device=device, dtype=dtype)

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, cache: Any, last_only: bool = False) -> torch.Tensor:
        """embeds [T, d] at positions ([1, T], or [3, 1, T] for M-RoPE) appended to cache -> logits [T, V]
        ([1, V] with last_only), float32 on the CPU whatever the model's device and dtype: verification
        and sampling read them there, the same code for every placement."""
        with torch.inference_mode():
            out = self.language_model(inputs_embeds=embeds[None].to(self.device, self.model.dtype),
                                      position_ids=positions.to(self.device),
                                      past_key_values=cache, use_cache=True)
            hidden = out.last_hidden_state[0]  # [T, d]
            return self.model.lm_head(hidden[-1:] if last_only else hidden).float().cpu()

    def prefill(self, visual: VisualTokens, prompt: str,
                kept: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        return self.start(self.prefill_inputs(visual, prompt, kept))

    @abstractmethod
    def prefill_inputs(self, visual: VisualTokens, prompt: str, kept: torch.Tensor | None = None) -> PrefillInputs:
        """The chat-formatted prompt with the image's visual tokens (only `kept`, sorted indices
        into [0, N), when given), ready for `start`."""

    def start(self, inputs: PrefillInputs) -> tuple[torch.Tensor, DecodeState]:
        """Prefills a fresh cache with the whole prompt: its last position's logits [V] and the state."""
        self.check_length(int(inputs.embeds.shape[0]))
        state = DecodeState(cache=self.new_cache(), length=0, extra=dict(inputs.extra))
        logits = self.run(inputs.embeds, inputs.positions, state.cache, last_only=True)
        state.length = int(inputs.embeds.shape[0])
        return logits[-1], state

    def _positions(self, state: DecodeState, k: int) -> torch.Tensor:
        """Positions of the next k tokens: [1, k] (after a pruned prefill, past the dropped tokens'
        positions too)."""
        start = state.length + state.extra.get("position_offset", 0)
        return torch.arange(start, start + k)[None]

    @staticmethod
    def pruned_inputs(embeds: torch.Tensor, image_start: int, kept: torch.Tensor, n_visual: int) -> PrefillInputs:
        """The inputs of a prompt whose visual tokens start at `image_start` and are the `kept`
        subset of `n_visual`: every token keeps the position it has in the unpruned prompt (kept
        visual tokens at image_start + index, the text after the image shifted past all n_visual),
        so a pruned prefill differs from the full one only by the tokens it leaves out. Decoding
        continues at the unpruned positions (`position_offset`)."""
        t = int(embeds.shape[0])
        n_kept = int(kept.numel())
        offset = n_visual - n_kept
        positions = torch.cat([torch.arange(image_start), image_start + kept.cpu(),
                               torch.arange(image_start + n_kept, t) + offset])  # [T]
        return PrefillInputs(embeds, positions[None], {"position_offset": offset})

    def forward(self, state: DecodeState, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        k = int(ids.numel())
        if k == 0:
            return torch.empty(0, self.vocab_size)
        with torch.inference_mode():
            logits = self.run(self.embed(ids), self._positions(state, k), state.cache)
        state.length += k
        return logits

    def truncate(self, state: DecodeState, length: int) -> None:
        if not 0 <= length <= state.length:
            raise ValueError(f"cannot truncate a state of {state.length} positions to {length}")
        if length < state.length:
            # transformers 5.x: crop(-n) removes the last n positions (a positive value is refused)
            state.cache.crop(length - state.length)
        state.length = length
