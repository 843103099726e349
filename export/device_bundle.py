"""The device bundle: the draft's vision graph and static-cache decoder as ExecuTorch and/or ONNX
programs (quantized per `quant`), its tokenizer and preprocessor config, and manifest.json.

    device/
      manifest.json
      model.pte                     (ExecuTorch multimodal layout, XNNPACK delegate: export/multimodal.py)
      vision.onnx  decoder.onnx     (ONNX Runtime)
      embeddings.f16.npy            (input embedding table, for the pruner's query)
      tokenizer.json tokenizer_config.json ... preprocessor_config.json
      runner_tokenizer.json         (the tokenizer as ExecuTorch's C++ runners read it: BPE, same ids)
      decoder.genai.onnx genai_config.json  (the text decoder as onnxruntime-genai loads it, with onnx)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from covspec.bundles.manifest import write_manifest
from covspec.export import quant as q
from covspec.export.runner_tokenizer import write_runner_tokenizer
from covspec.export.write_programs import (
    Step,
    check_exportable,
    copy_tokenizer,
    describe_model,
    write_programs,
)
from covspec.models import load_adapter
from covspec.models.base import CachedDecoderAdapter

DEFAULT_MAX_CHUNK = 64
EMBEDDINGS_FILE = "embeddings.f16.npy"


def write_embeddings(adapter: CachedDecoderAdapter, out: Path) -> dict[str, Any]:
    """The input embedding table [V, d] as float16 .npy: the pruner's query embeddings
    (adapter.prompt_embeddings) on the device without the decoder."""
    table = adapter.model.get_input_embeddings().weight.detach().float().numpy().astype(np.float16)
    np.save(out / EMBEDDINGS_FILE, table)
    return {"file": EMBEDDINGS_FILE, "dtype": "float16", "shape": list(table.shape)}


def write_genai(adapter: CachedDecoderAdapter, out: Path, info: dict[str, Any], unsupported: dict[str, Any],
                step: Step) -> dict[str, Any] | None:
    """The text decoder in onnxruntime-genai's convention (export/genai.py), fp32; a failure is recorded."""
    from covspec.export.genai import write_genai_decoder
    from covspec.export.graphs import decoder_shape

    step("decoder.genai.onnx + genai_config.json (onnxruntime-genai, fp32)")
    try:
        return write_genai_decoder(adapter, decoder_shape(adapter, info["decoder"]["max_len"]), out)
    except Exception as err:  # reported, never hidden
        unsupported["genai"] = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
        return None


def build_device_bundle(draft: Path, out: Path, quant: str = "int8", formats: tuple[str, ...] = ("pte", "onnx"),
                        max_len: int | None = None, max_chunk: int = DEFAULT_MAX_CHUNK,
                        calibration: dict[str, Any] | None = None, step: Step = lambda _: None) -> Path:
    """Exports the draft checkpoint folder `draft` into the folder `out` (replaced if present)."""
    q.check_scheme(quant)
    step(f"loading draft {draft}")
    adapter = check_exportable(load_adapter(draft))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    info = describe_model(adapter, max_len, max_chunk)
    programs, unsupported = write_programs(adapter, out, info, quant, tuple(formats), step)
    if not programs:
        raise RuntimeError(f"device bundle {out}: no format could be exported ({unsupported})")
    if "onnx" in programs:
        programs["onnx"]["genai"] = write_genai(adapter, out, info, unsupported, step)
    tokenizer_files = copy_tokenizer(Path(draft), out)
    runner_tokenizer = write_runner_tokenizer(Path(draft), out) if "tokenizer.json" in tokenizer_files else None
    embeddings = write_embeddings(adapter, out)
    step("manifest")
    write_manifest(out, {"kind": "device", "source": Path(draft).name, **info, "quant": q.describe(quant),
                         "programs": programs, "embeddings": embeddings, "unsupported": unsupported, "tokenizer_files": tokenizer_files,
                         "runner_tokenizer": runner_tokenizer,
                         "calibration": calibration})
    return out
