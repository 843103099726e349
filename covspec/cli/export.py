"""`covspec export`: the device bundle (ExecuTorch .pte + ONNX, quantized) and the edge bundle."""

from __future__ import annotations

import argparse

from covspec.cli.options import add_command
from covspec.errors import CovspecError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "export", "device bundle (ExecuTorch .pte + ONNX, quantized) and edge bundle")
    p.add_argument("--draft", required=True, help="draft checkpoint folder")
    p.add_argument("--target", required=True, help="target checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (device/ and edge/ are written in it)")
    p.add_argument("--quant", default="int8", choices=["none", "int8", "int4"],
                   help="device bundle quantization: none (fp32), int8 (dynamic, Linear layers), int4 "
                        "(8-bit activations, 4-bit weights in groups of 32)")
    p.add_argument("--formats", default="pte,onnx", help="device formats, comma-separated: pte, onnx")
    p.add_argument("--edge-backend", default="auto", choices=["auto", "tensorrt", "onnx", "pytorch"],
                   help="what the edge bundle runs the target on (auto: TensorRT if it and an NVIDIA GPU are "
                        "present, else the PyTorch checkpoint)")
    p.add_argument("--max-len", type=int, default=None, help="static KV-cache length (default: from the config)")
    p.add_argument("--calibration", default=None,
                   help="calibration profile JSON to record in the manifest (default: none)")
    p.add_argument("--reuse", action="store_true",
                   help="keep an intact export already in --out that is newer than both checkpoints")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covspec import api

    formats = tuple(f for f in args.formats.split(",") if f)
    unknown = set(formats) - {"pte", "onnx"}
    if unknown or not formats:
        raise CovspecError(f"--formats {args.formats!r}: choose pte, onnx or both (pte,onnx)")
    device_dir, edge_dir = api.export(args.draft, args.target, args.out, quant=args.quant, formats=formats,
                                      edge_backend=args.edge_backend, max_len=args.max_len,
                                      calibration=args.calibration, reuse=args.reuse)
    print(f"device bundle: {device_dir}\nedge bundle:   {edge_dir}")
    return 0
