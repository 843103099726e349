"""Tiny randomly initialised checkpoints of each real architecture, built from configs and saved
as Hugging Face folders (config.json, model.safetensors, tokenizer.json, tokenizer_config.json),
so that tests drive the same loading path as real checkpoints. Each model is well under 1M params.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = ("what is the color of shape in this image ? a red green blue circle square triangle left right "
         "top bottom how many are there describe one two three yes no , . user assistant system "
         "you helpful").split()


def make_tokenizer(folder: Path, specials: list[str], bos: str | None = None, eos: str | None = None,
                   unk: str = "<unk>", pad: str | None = None, add_bos: bool = False,
                   extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level `tokenizers` tokenizer (specials first, then words), saved with save_pretrained."""
    vocab: dict[str, int] = {}
    for token in [unk, *specials, *WORDS, *extra_words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=pad, additional_special_tokens=[t for t in specials
                                                                             if t not in (bos, eos, pad)])
    fast.save_pretrained(str(folder))
    return fast


def _save(model: torch.nn.Module, folder: Path) -> None:
    model.save_pretrained(str(folder))


def build_llava(folder: Path, seed: int = 0, siglip_qwen2: bool = False) -> Path:
    """CLIP tower (28px, 7px patches: 16 patch tokens, CLS dropped) + MLP projector + Llama with tied
    embeddings; or, with siglip_qwen2, a SigLIP tower (all 16 tokens kept) + Qwen2 text model."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, ["<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                         add_bos=not siglip_qwen2, extra_words=("USER", "ASSISTANT", ":"))
    vision_cls = SiglipVisionConfig if siglip_qwen2 else CLIPVisionConfig
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=28, patch_size=7)
    text_cls = Qwen2Config if siglip_qwen2 else LlamaConfig
    text = text_cls(vocab_size=len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, tie_word_embeddings=not siglip_qwen2, initializer_range=0.2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1 if siglip_qwen2 else -2,
                         vision_feature_select_strategy="full" if siglip_qwen2 else "default",
                         image_seq_length=16, tie_word_embeddings=not siglip_qwen2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    _save(model, folder)
    return folder


def build_llama(folder: Path) -> Path:
    """A plain text-only LlamaForCausalLM checkpoint (another family)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, ["<s>", "</s>"], bos="<s>", eos="</s>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    _save(LlamaForCausalLM(config), folder)
    return folder


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def build_qwen2_5_vl(folder: Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Qwen2.5-VL: 2-block vision tower (window attention in block 0, full in block 1), 2x2 patch
    merger, 2-layer text model with M-RoPE sections [1, 1, 2] (head_dim 8). `vocab_size` widens the
    embedding table and logits to a real model's (151936 for Qwen2.5-VL-3B)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>",
                         extra_words=("You", "are", "helpful"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {"vocab_size": vocab_size or len(tok) + 6, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
              "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 56,
              "fullatt_block_indexes": [1]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    _save(model, folder)
    return folder


IDEFICS3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                     "<global-img>", "<image>"]


def build_idefics3(folder: Path, seed: int = 0) -> Path:
    """Idefics3 (SmolVLM): 48px images in 8px patches (36 patches), pixel shuffle x2 -> 9 visual
    tokens, 2-layer Llama text model. The preprocessor first resizes the longest edge to 96."""
    import json

    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, IDEFICS3_SPECIALS, bos="<|im_start|>", eos="<end_of_utterance>",
                         pad="<|endoftext|>", extra_words=("User", "Assistant", ":"))
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 48, "patch_size": 8}
    text = {"model_type": "llama", "vocab_size": len(tok) + 4, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "initializer_range": 0.2}
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    _save(model, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_image_splitting": False, "size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 48},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 1}))
    return folder
