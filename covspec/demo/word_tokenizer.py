"""The demo pair's tokenizer: word-level, built with `tokenizers`, saved as a PreTrainedTokenizerFast."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from covspec.demo.task import vocabulary

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIALS = (PAD, BOS, EOS, UNK, IMAGE)
TEMPLATE_WORDS = ("USER", "ASSISTANT", ":")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Specials first (pad 0, bos 1, eos 2, unk 3, <image> 4), then the template and task words."""
    words = list(SPECIALS) + [w for w in TEMPLATE_WORDS] + [w for w in vocabulary() if w not in TEMPLATE_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=512,
        clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    special_map = folder / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(json.dumps({
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
            "additional_special_tokens": [IMAGE]}, indent=2) + "\n")
