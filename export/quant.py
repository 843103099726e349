"""Quantization schemes of a device bundle, one name each, applied the way each format wants it:

- "none": fp32.
- "int8": 8-bit dynamic quantization of the Linear layers (int8 activations per token, computed at
  run time; int8 weights per output channel). ExecuTorch: torchao's
  Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0)), lowered to XNNPACK's dynamically
  quantized linear. ONNX: onnxruntime.quantization.quantize_dynamic (QInt8 weights).
- "int4": 8-bit dynamic activations, 4-bit weights in groups of 32 (XNNPACK's "8da4w"); Linear layers
  whose input width is not a multiple of the group size stay fp32. ONNX: MatMulNBits (4-bit,
  block 32) via onnxruntime's MatMulNBitsQuantizer.
Embedding tables stay fp32 in every scheme (see `EMBEDDINGS_NOTE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SCHEMES = ("none", "int8", "int4")
INT4_GROUP = 32
EMBEDDINGS_NOTE = ("embedding tables stay fp32: torchao's IntxWeightOnlyConfig on nn.Embedding lowers to "
                   "torchao::dequantize_affine, which has no ExecuTorch out-variant kernel in executorch 1.5.1")


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (schemes: {', '.join(SCHEMES)})")
    return scheme


def describe(scheme: str) -> dict[str, Any]:
    """The manifest's `quant` entry."""
    check_scheme(scheme)
    if scheme == "none":
        return {"scheme": "none", "dtype": "fp32"}
    if scheme == "int8":
        return {"scheme": "int8", "pte": "torchao Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0)) on Linear",
                "onnx": "onnxruntime quantize_dynamic QInt8 (per-channel) on MatMul/Gemm",
                "embeddings": EMBEDDINGS_NOTE}
    return {"scheme": "int4", "pte": f"torchao Int8DynamicActivationIntxWeightConfig(int4, PerGroup({INT4_GROUP})) "
            "on Linear (8da4w)", "onnx": f"onnxruntime MatMulNBitsQuantizer (4 bit, block {INT4_GROUP})",
            "embeddings": EMBEDDINGS_NOTE}


def quantize_module(module: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """Quantizes `module`'s Linear layers in place for ExecuTorch (torchao) and returns it."""
    check_scheme(scheme)
    if scheme == "none":
        return module
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    if scheme == "int8":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        quantize_(module, config)
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                       weight_granularity=PerGroup(INT4_GROUP))
        quantize_(module, config, filter_fn=lambda m, _: isinstance(m, torch.nn.Linear)
                  and m.in_features % INT4_GROUP == 0)
    return module


def quantize_onnx_file(src: Path, dst: Path, scheme: str) -> None:
    """Writes the quantized ONNX model of `src` to `dst` (scheme "int8" or "int4")."""
    check_scheme(scheme)
    if scheme == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        return
    if scheme == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=INT4_GROUP, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
        return
    raise ValueError("quantize_onnx_file needs a quantized scheme")
