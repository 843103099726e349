"""The demo pair's architecture: stock `LlavaForConditionalGeneration` checkpoints (CLIP vision tower,
MLP projector, Llama text model with tied embeddings), and how they are written to disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from covspec.demo.task import CANVAS, PATCH
from covspec.demo.word_tokenizer import IMAGE, save_tokenizer
from covspec.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@dataclass(frozen=True)
class TextSize:
    layers: int
    hidden: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class VisionSize:
    layers: int = 2
    hidden: int = 64
    heads: int = 2
    intermediate: int = 128
    patch: int = PATCH  # pixels a side of one patch: (CANVAS / patch)^2 visual tokens

    @property
    def tokens(self) -> int:
        return (CANVAS // self.patch) ** 2


# decode cost of these tiny models is per-layer overhead, so the draft/target step ratio follows layers
TARGET_TEXT = TextSize(layers=14, hidden=128, heads=4, intermediate=512)
DRAFT_TEXT = TextSize(layers=1, hidden=128, heads=4, intermediate=512)
VISION = VisionSize()

PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": CANVAS},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": CANVAS, "width": CANVAS},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "do_convert_rgb": True,
}


def llava_config(text: TextSize, tokenizer: PreTrainedTokenizerFast, vision: VisionSize = VISION) -> LlavaConfig:
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vision.hidden,
        "intermediate_size": vision.intermediate,
        "num_hidden_layers": vision.layers,
        "num_attention_heads": vision.heads,
        "image_size": CANVAS,
        "patch_size": vision.patch,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
    }
    text_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": text.hidden,
        "intermediate_size": text.intermediate,
        "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads,
        "num_key_value_heads": text.heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=vision.tokens,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        tie_word_embeddings=True)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def new_model(text: TextSize, tokenizer: PreTrainedTokenizerFast, seed: int,
              vision: VisionSize = VISION) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(text, tokenizer, vision))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def grow_text_model(small: LlavaForConditionalGeneration, text: TextSize, tokenizer: PreTrainedTokenizerFast,
                    seed: int) -> LlavaForConditionalGeneration:
    """A deeper model computing exactly what `small` computes (Net2Net-style depth growth): every
    weight of `small` is copied, its text layers become the first layers, and each added layer starts
    as the identity (its attention output and MLP down projections zero, so it adds nothing to the
    residual stream) with its other weights freshly initialised; training then goes on from there."""
    big = new_model(text, tokenizer, seed)
    try:
        missing, unexpected = big.load_state_dict(small.state_dict(), strict=False)
    except RuntimeError as err:  # a shape differs
        raise ValueError(f"cannot grow: the models differ beyond depth ({str(err)[:300]})") from err
    n = small.config.text_config.num_hidden_layers
    if unexpected or any(".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < n for k in missing):
        raise ValueError(f"cannot grow: the models differ beyond depth ({unexpected[:3]} {missing[:3]})")
    with torch.no_grad():
        for layer in big.model.language_model.layers[n:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return big


def save_checkpoint(model: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerFast,
                    folder: str | Path, meta: dict) -> None:
    """A complete Hugging Face checkpoint: safetensors weights, config, tokenizer, preprocessor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    (folder / "covspec_demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def size_meta(text: TextSize, vision: VisionSize = VISION) -> dict:
    return {"text": asdict(text), "vision": asdict(vision)}
