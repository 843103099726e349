"""One model's exported programs, written in a bundle folder with the model's description for the
manifest: for ExecuTorch ONE `model.pte` in ExecuTorch's multimodal layout (export/multimodal.py:
vision_encoder, token_embedding, text_decoder, covspec_decoder over one in-program KV cache, and the
runners' metadata methods); for ONNX `vision.onnx` and `decoder.onnx` (the static cache an input and
an output). Shared by the device bundle (the draft) and the edge bundle's ONNX option (the target)."""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from covspec.bundles.families import rules_for
from covspec.errors import CovspecError
from covspec.export import quant as q
from covspec.export.cached_decoder import CachedDecoder
from covspec.export.family_graphs import (
    EXPORTABLE_FAMILIES,
    prompt_entry,
    vision_example,
    vision_extra,
    vision_graph,
    vision_outputs,
)
from covspec.export.graphs import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    VISION_INPUTS,
    StaticDecoderGraph,
    decoder_dynamic_shapes,
    decoder_example,
    decoder_shape,
)
from covspec.export.multimodal import LAYOUT, METHODS, method_programs, runner_metadata
from covspec.models.base import CachedDecoderAdapter, VLMAdapter

FORMATS = ("pte", "onnx")
PTE_FILE = "model.pte"
# files copied from the checkpoint folder when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "preprocessor_config.json", "generation_config.json")
Step = Callable[[str], None]


class ExportUnsupported(CovspecError):
    """A model family or format this export cannot produce: the message names the cause and the fallback."""


# why each known family is not exported yet, and what to run instead
FAMILY_LIMITS = {
    "idefics3": "exported as a device bundle (the draft), but an ONNX edge bundle runs LLaVA targets only",
    "qwen2_5_vl": "exported as a device bundle (the draft, one fixed grid), but an ONNX edge bundle runs LLaVA "
                  "targets only",
}
FALLBACK = "ship the Hugging Face checkpoint and run it with the PyTorch adapter (covspec.models.load_adapter)"


def check_exportable(adapter: VLMAdapter, families: tuple[str, ...] = EXPORTABLE_FAMILIES) -> CachedDecoderAdapter:
    """The adapter, when its family exports (`families`: those the caller can use)."""
    if adapter.family not in families or not isinstance(adapter, CachedDecoderAdapter):
        reason = FAMILY_LIMITS.get(adapter.family, "no exporter for this family")
        raise ExportUnsupported(f"{adapter.family}: cannot export to pte/onnx ({reason}); fallback: {FALLBACK}")
    return adapter


def operator_named(err: BaseException) -> str | None:
    """The operator an export error names, when it names one."""
    found = re.search(r"\b(aten[.:]{1,2}[\w.]+|torchao::[\w.]+|quantized_decomposed::[\w.]+|onnx::\w+)", str(err))
    return found.group(1) if found else None


def describe_model(adapter: CachedDecoderAdapter, max_len: int | None, max_chunk: int) -> dict[str, Any]:
    shape = decoder_shape(adapter, max_len)
    vision = vision_graph(adapter)
    pixels = vision_example(adapter)
    n_tokens = int(vision(pixels)[0].shape[0])
    info = {
        "family": adapter.family,
        "model_type": adapter.model.config.model_type,
        "text_model_type": adapter.text_config.model_type,
        "tokenizer_fingerprint": adapter.fingerprint(),
        "vocab_size": adapter.vocab_size,
        "eos_token_ids": sorted(adapter.eos_token_ids),
        "prompt": prompt_entry(adapter),
        "vision": {"pixels": list(pixels.shape), "tokens": n_tokens, "hidden": shape.hidden,
                   "outputs": vision_outputs(vision), **vision_extra(vision)},
        "decoder": {**asdict(shape), "cache": list(shape.cache_shape), "max_chunk": min(max_chunk, shape.max_len),
                    "inputs": DECODER_INPUTS, "outputs": DECODER_OUTPUTS},
    }
    # what the bundle cannot do that the checkpoint does (the device prints it once when it loads it)
    return {**info, "limits": rules_for(info).default_limits()}


def _graphs(adapter: CachedDecoderAdapter, info: dict[str, Any], scheme: str,
            for_pte: bool) -> tuple[torch.nn.Module, StaticDecoderGraph]:
    """Fresh graphs; quantized schemes work on a copy of the model, with the patch convolution as a
    Linear and int8 embedding rows (both formats), and torchao-quantized Linear layers (ExecuTorch)."""
    model = adapter if scheme == "none" else copy.deepcopy(adapter)
    shape = decoder_shape(model, info["decoder"]["max_len"])
    vision, decoder = vision_graph(model).eval(), StaticDecoderGraph(model, shape).eval()
    if scheme != "none":
        q.prepare_for_quantization(getattr(vision, "tower", vision), decoder)
        if for_pte:
            q.quantize_module(vision, scheme)
            q.quantize_module(decoder, scheme)
    return vision, decoder


def _pte_graphs(adapter: CachedDecoderAdapter, info: dict[str, Any],
                scheme: str) -> tuple[torch.nn.Module, CachedDecoder]:
    """The vision graph and the cached decoder of the .pte, quantized as `_graphs` does for ExecuTorch."""
    model = adapter if scheme == "none" else copy.deepcopy(adapter)
    vision = vision_graph(model).eval()
    core = CachedDecoder(model, decoder_shape(model, info["decoder"]["max_len"])).eval()
    if scheme != "none":
        q.prepare_for_quantization(getattr(vision, "tower", vision), core)
        q.quantize_module(vision, scheme)
        q.quantize_module(core, scheme)
    return vision, core


def write_pte(adapter: CachedDecoderAdapter, out: Path, info: dict[str, Any], scheme: str) -> dict[str, Any]:
    """Writes out/model.pte (the multimodal layout); returns the manifest's programs["pte"] entry."""
    from covspec.export.lower import to_multimethod_pte

    vision, core = _pte_graphs(adapter, info, scheme)
    pixels = torch.zeros(*info["vision"]["pixels"])
    programs = method_programs(vision, core, pixels, info["decoder"]["max_chunk"])
    constants = runner_metadata(core.shape, adapter.tokenizer.bos_token_id, info["eos_token_ids"])
    lowering = to_multimethod_pte(programs, constants, out / PTE_FILE)
    return {"model": PTE_FILE, "layout": LAYOUT, "runtime": "executorch", "delegate": "XnnpackBackend",
            "methods": list(METHODS), "constants": constants, "lowering": lowering}


def write_programs(adapter: CachedDecoderAdapter, out: Path, info: dict[str, Any], scheme: str,
                   formats: tuple[str, ...], step: Step) -> tuple[dict[str, Any], dict[str, Any]]:
    """Writes vision.<fmt> and decoder.<fmt> for each format. Returns (programs, unsupported):
    programs[fmt] = {"vision": file, "decoder": file, ...}; unsupported[fmt] = what failed and the fallback."""
    programs: dict[str, Any] = {}
    unsupported: dict[str, Any] = {}
    shape = decoder_shape(adapter, info["decoder"]["max_len"])
    max_chunk = info["decoder"]["max_chunk"]
    pixels = torch.zeros(*info["vision"]["pixels"])
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
        try:
            if fmt == "pte":
                step(f"{PTE_FILE} ({scheme}, ExecuTorch multimodal layout, KV cache {shape.max_len}, k<={max_chunk})")
                programs["pte"] = write_pte(adapter, out, info, scheme)
            else:
                vision, decoder = _graphs(adapter, info, scheme, for_pte=False)
                step(f"vision.onnx ({scheme})")
                write_onnx(vision, (pixels,), out / "vision.onnx", VISION_INPUTS, vision_outputs(vision), None, scheme)
                step(f"decoder.onnx ({scheme}, static cache {shape.max_len}, k<={max_chunk})")
                write_onnx(decoder, decoder_example(shape), out / "decoder.onnx", DECODER_INPUTS, DECODER_OUTPUTS,
                           decoder_dynamic_shapes(max_chunk, shape), scheme)
                programs["onnx"] = {"vision": "vision.onnx", "decoder": "decoder.onnx", "runtime": "onnxruntime"}
        except ExportUnsupported:
            raise
        except Exception as err:  # an exporter failure is reported per format, never hidden
            for name in (f"vision.{fmt}", f"decoder.{fmt}", *((PTE_FILE,) if fmt == "pte" else ())):
                (out / name).unlink(missing_ok=True)
            unsupported[fmt] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                                "operator": operator_named(err), "fallback": FALLBACK}
            step(f"[red]{fmt}: export failed ({unsupported[fmt]['operator'] or type(err).__name__}); "
                 f"fallback: {FALLBACK}[/red]")
    return programs, unsupported


def lower_pte(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path,
              dynamic_shapes: Any = None) -> dict[str, Any]:
    from covspec.export.lower import to_pte

    return to_pte(module, example, path, dynamic_shapes)


def write_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: list[str],
               outputs: list[str], dynamic_shapes: Any, scheme: str) -> None:
    from covspec.export.lower import onnx_data_files, strip_onnx, to_onnx

    if scheme == "none":
        to_onnx(module, example, path, inputs, outputs, dynamic_shapes)
    else:
        fp32 = path.with_name(path.stem + ".fp32.onnx")
        data: list[Path] = []
        try:
            to_onnx(module, example, fp32, inputs, outputs, dynamic_shapes)  # over 2 GB: weights in a .data file
            data = onnx_data_files(fp32)
            q.quantize_onnx_file(fp32, path, scheme, external_data=bool(data))
        finally:
            for file in (fp32, *data):
                file.unlink(missing_ok=True)
    strip_onnx(path)


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied
