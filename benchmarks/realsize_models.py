"""Random-weight drafts with the shapes of published checkpoints, saved as Hugging Face folders
(config.json, model.safetensors, a word-level tokenizer with the family's special tokens), so that the
exporter and the adapters load them like the real ones. No hub access: the published configs'
numbers are written here.

- "smolvlm-256m": SmolVLM-256M-Instruct (Idefics3). Text: Llama, 30 layers x 576, 9 heads / 3 KV
  heads, intermediate 1536, vocab 49280, rope_theta 100000, untied output head (the published
  checkpoint's 256.5M parameters count it). Vision: SigLIP 12 layers x 768, 12 heads, intermediate
  3072, 512 px images in 16 px patches (1024 patches), pixel shuffle x4 -> 64 visual tokens.
- "qwen2.5-vl-3b-width": a Qwen2.5-VL draft at the 3B's width. Text: hidden 2048, 16 heads / 2 KV
  heads, intermediate 11008, vocab 151936, tied embeddings, M-RoPE sections [16, 24, 24],
  rope_theta 1e6; `text_layers` of them (the 3B has 36). Vision: the 3B's tower (depth 32, hidden
  1280, 16 heads, intermediate 3420, out_hidden 2048, patch 14, merge 2, window 112, full attention
  in blocks 7, 15, 23, 31), `vision_layers` blocks deep (full-attention blocks past the depth drop).

    build_checkpoint("smolvlm-256m", Path("/tmp/realsize/smolvlm/checkpoint"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SMOLVLM = "smolvlm-256m"
QWEN = "qwen2.5-vl-3b-width"
SHAPES = (SMOLVLM, QWEN)
QWEN_FULL_ATTENTION = (7, 15, 23, 31)

WORDS = ("what is the color of shape in this image ? a red green blue circle square triangle left right "
         "top bottom how many are there describe one two three yes no , . user assistant system "
         "you helpful User Assistant : You are").split()
IDEFICS3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                     "<global-img>", "<image>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


@dataclass(frozen=True)
class Shape:
    """Which published shape, and how deep its text model and vision tower are built."""

    name: str
    text_layers: int
    vision_layers: int

    @property
    def tag(self) -> str:
        return f"{self.name}-t{self.text_layers}-v{self.vision_layers}"


def published_shape(name: str) -> Shape:
    """The published depths (the Qwen draft's text depth is the 3B's; a bench sets its own)."""
    if name == SMOLVLM:
        return Shape(name, 30, 12)
    if name == QWEN:
        return Shape(name, 36, 32)
    raise ValueError(f"unknown shape {name!r} (shapes: {', '.join(SHAPES)})")


def make_tokenizer(folder: Path, specials: list[str], bos: str | None, eos: str, pad: str) -> Any:
    """A word-level tokenizer (unk, specials, then WORDS), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in ["<unk>", *specials, *WORDS]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   pad_token=pad, additional_special_tokens=[t for t in specials
                                                                             if t not in (bos, eos, pad)])
    fast.save_pretrained(str(folder))
    return fast


def smolvlm_config(tok: Any, shape: Shape) -> Any:
    from transformers import Idefics3Config

    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": shape.vision_layers,
              "num_attention_heads": 12, "image_size": 512, "patch_size": 16}
    text = {"model_type": "llama", "vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": shape.text_layers, "num_attention_heads": 9, "num_key_value_heads": 3,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "tie_word_embeddings": False,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return Idefics3Config(vision_config=vision, text_config=text, scale_factor=4, tie_word_embeddings=False,
                          image_token_id=tok.convert_tokens_to_ids("<image>"))


def qwen_full_attention(depth: int) -> list[int]:
    """The 3B's full-attention blocks below `depth` (the last block when none is)."""
    return [i for i in QWEN_FULL_ATTENTION if i < depth] or [depth - 1]


def qwen_config(tok: Any, shape: Shape) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
            "num_hidden_layers": shape.text_layers, "num_attention_heads": 16, "num_key_value_heads": 2,
            "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None}
    vision = {"depth": shape.vision_layers, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
              "out_hidden_size": 2048, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
              "window_size": 112, "fullatt_block_indexes": qwen_full_attention(shape.vision_layers),
              "hidden_act": "silu", "in_channels": 3}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def build_config(shape: Shape, folder: Path) -> Any:
    """Writes the tokenizer (and the preprocessor config) into `folder`; returns the model config."""
    folder.mkdir(parents=True, exist_ok=True)
    if shape.name == SMOLVLM:
        tok = make_tokenizer(folder, IDEFICS3_SPECIALS, bos="<|im_start|>", eos="<end_of_utterance>",
                             pad="<|endoftext|>")
        # image splitting off: one global 512 px image (the exporter's fixed input)
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "do_image_splitting": False, "size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 1}))
        return smolvlm_config(tok, shape)
    if shape.name == QWEN:
        return qwen_config(make_tokenizer(folder, QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
                           shape)
    raise ValueError(f"unknown shape {shape.name!r} (shapes: {', '.join(SHAPES)})")


def build_checkpoint(shape: Shape, folder: Path, seed: int = 0) -> Path:
    """A randomly initialised fp32 checkpoint of `shape` in `folder` (kept when already complete)."""
    import transformers

    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    config = build_config(shape, folder)
    cls = {SMOLVLM: "Idefics3ForConditionalGeneration", QWEN: "Qwen2_5_VLForConditionalGeneration"}[shape.name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    eos = config.get_text_config().eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.save_pretrained(str(folder))
    return folder


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied table counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
