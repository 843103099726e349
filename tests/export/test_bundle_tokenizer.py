"""The torch-free device's tokenizer (covspec.bundles.tokenizer.BundleTokenizer, the `tokenizers` library
on tokenizer.json) gives what transformers' PreTrainedTokenizerFast gives on the same files: ids, text,
special tokens and the vocabulary fingerprint the edge checks at HELLO."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
from transformers import PreTrainedTokenizerFast

from covspec.bundles.bundle import BundleError
from covspec.bundles.tokenizer import BundleTokenizer
from covspec.models.common import tokenizer_fingerprint

TEXTS = ["what is the color of the circle ?", "describe this image .", "how many shape are there ?", ""]


@pytest.mark.parametrize("build", [tiny_models.build_llava, tiny_models.build_idefics3, tiny_models.build_qwen2_5_vl],
                         ids=["llava", "idefics3", "qwen2_5_vl"])
def test_bundle_tokenizer_equals_transformers(build, tmp_path: Path) -> None:
    folder = build(tmp_path / "model")
    ours, theirs = BundleTokenizer(folder), PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(theirs)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert len(ours) == len(theirs) and sorted(ours.all_special_tokens) == sorted(theirs.all_special_tokens)
    for text in TEXTS:
        for specials in (True, False):
            ids = theirs.encode(text, add_special_tokens=specials)
            assert ours.encode(text, add_special_tokens=specials) == ids
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_a_broken_tokenizer_file_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no tokenizer.json"):
        BundleTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read"):
        BundleTokenizer(tmp_path)
