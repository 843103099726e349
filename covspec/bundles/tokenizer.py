"""The bundle's tokenizer without transformers: the `tokenizers` library on tokenizer.json, with the
few PreTrainedTokenizerFast methods the runtime calls (encode, decode, get_vocab, bos/eos ids,
convert_ids_to_tokens, len, all_special_tokens). Special tokens and decoding options come from tokenizer_config.json /
special_tokens_map.json as transformers reads them, so ids, text and the vocabulary fingerprint are
the same as with transformers (a test holds them equal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from covspec.bundles.bundle import BundleError


class BundleTokenizer:
    def __init__(self, folder: Path):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise BundleError(f"bundle {folder}: no tokenizer.json")
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises plain Exceptions on a broken file
            raise BundleError(f"bundle {folder}: tokenizer.json cannot be read ({err}); re-export the bundle") from err
        config = {**_json(folder / "special_tokens_map.json"), **_json(folder / "tokenizer_config.json")}
        self.bos_token_id = self._special_id(config.get("bos_token"))
        self.eos_token_id = self._special_id(config.get("eos_token"))
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    def _special_id(self, token: Any) -> int | None:
        if isinstance(token, dict):  # {"content": "<s>", ...}
            token = token.get("content")
        return None if token is None else self.backend.token_to_id(str(token))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
