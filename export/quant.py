"""Quantization schemes of a device bundle, one name each, applied the way each format wants it:

- "none": fp32.
- "int8": 8-bit dynamic quantization of the Linear layers (int8 activations per token, computed at
  run time; int8 weights per output channel). ExecuTorch: torchao's
  Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0)), lowered to XNNPACK's dynamically
  quantized linear. ONNX: onnxruntime.quantization.quantize_dynamic (QInt8 weights).
- "int4": 8-bit dynamic activations, 4-bit weights in groups of 32 (XNNPACK's "8da4w"); Linear layers
  whose input width is not a multiple of the group size stay fp32. ONNX: MatMulNBits (4-bit,
  block 32) via onnxruntime's MatMulNBitsQuantizer.
Quantized schemes also store the input embedding table as int8 rows with per-row scales
(`Int8Embedding`; torchao's embedding quantization does not lower, see `EMBEDDINGS_NOTE`), which a
tied output projection reads as well (`Int8TiedHead`, weight-only: fp32 activations), and turn
the vision tower's patch convolution into an equivalent Linear (`PatchLinear`) so that it is
quantized with the other Linear layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SCHEMES = ("none", "int8", "int4")
INT4_GROUP = 32
EMBEDDINGS_NOTE = ("input embeddings: int8 rows with per-row fp32 scales (Int8Embedding, gather + multiply); "
                   "torchao's IntxWeightOnlyConfig on nn.Embedding lowers to torchao::dequantize_affine, "
                   "which has no ExecuTorch out-variant kernel in executorch 1.5.1")


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


def quantize_onnx_file(src: Path, dst: Path, scheme: str, external_data: bool = False) -> None:
    """Writes the quantized ONNX model of `src` to `dst` (scheme "int8" or "int4"); `external_data`:
    `src` keeps its weights in an external-data file (a model over 2 GB), and so may `dst`."""
    check_scheme(scheme)
    if scheme == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=external_data)
        return
    if scheme == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=INT4_GROUP, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data)
        return
    raise ValueError("quantize_onnx_file needs a quantized scheme")


class PatchLinear(torch.nn.Module):
    """A patchifying Conv2d (stride == kernel, no padding) as a Linear over flattened patches, so that
    Linear quantization reaches the vision tower's patch embedding. [B, C, H, W] -> [B, out, H/p, W/p]."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        out, cin, p, q_ = conv.weight.shape
        if (p, q_) != tuple(conv.stride) or p != q_ or any(conv.padding if isinstance(conv.padding, tuple) else ()):
            raise ValueError("PatchLinear needs a square Conv2d with stride == kernel and no padding")
        self.patch, self.cin = p, cin
        self.linear = torch.nn.Linear(cin * p * p, out, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(out, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    @property
    def weight(self) -> torch.Tensor:  # HF embeddings read patch_embedding.weight.dtype
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h', w', C, p, p]
        out = self.linear(patches.reshape(b, (h // p) * (w // p), c * p * p))  # [B, P, out]
        return out.transpose(1, 2).reshape(b, -1, h // p, w // p)


class Int8Embedding(torch.nn.Module):
    """An embedding table stored as int8 rows with one fp32 scale per row (symmetric):
    ids [..] -> [.., d] = qweight[ids] * scale[ids]. Plain gather + multiply, so ExecuTorch's portable
    kernels and ONNX Runtime both run it."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        weight = embedding.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [V]
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids][..., None]


UNTIE_HEAD_ABOVE = 1 << 24  # V * d: a tied output head larger than this gets an int8 table of its own


def prepare_for_quantization(tower: torch.nn.Module, decoder: torch.nn.Module,
                             untie_above: int = UNTIE_HEAD_ABOVE) -> None:
    """Module swaps a quantized bundle makes on its own copy of the model: the vision tower's patch
    Conv2d becomes a PatchLinear, the decoder's input embedding an Int8Embedding. A tied output head
    reads the same int8 rows (`Int8TiedHead`, weight-only) while the table is small; a large one
    (V * d above `untie_above`: Qwen2.5-VL's 151936 x 2048) becomes a Linear of its own, quantized with
    the other Linear layers, because the weight-only head dequantizes the whole table on every step (at
    Qwen's 3B width that made the int8 ONNX step 1.83x eager's): it costs a second int8 copy of the table."""
    embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    conv = getattr(embeddings, "patch_embedding", None)
    if isinstance(conv, torch.nn.Conv2d):
        try:
            embeddings.patch_embedding = PatchLinear(conv)
        except ValueError:
            pass  # an unusual patch embedding stays a (fp32) convolution
    embed = getattr(decoder, "embed_tokens", None)
    if isinstance(embed, torch.nn.Embedding):
        head = getattr(decoder, "lm_head", None)
        tied = isinstance(head, torch.nn.Linear) and head.weight.data_ptr() == embed.weight.data_ptr()
        decoder.embed_tokens = Int8Embedding(embed)
        if tied and embed.weight.numel() > untie_above:  # its own Linear: XNNPACK's / ORT's int8 GEMM
            decoder.lm_head = untied_head(head)
        elif tied:  # the output projection reads the same int8 rows: no second copy of the table
            decoder.lm_head = Int8TiedHead(decoder.embed_tokens)


def untied_head(head: torch.nn.Linear) -> torch.nn.Linear:
    """A copy of a tied output projection with a weight of its own."""
    out = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    out.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if head.bias is not None:
        out.bias = torch.nn.Parameter(head.bias.detach().clone(), requires_grad=False)
    return out


class Int8TiedHead(torch.nn.Module):
    """A tied output projection over an Int8Embedding's rows: x [.., d] -> logits [.., V] =
    x @ (qweight * scale)^T in fp32. Weight-only int8 (the activations stay fp32: the logits greedy
    decoding compares get no activation rounding), and the table is stored once for both ends."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.qweight.float() * self.embedding.scale[:, None]  # [V, d]
        return torch.matmul(x, weight.t())
