"""TensorRT engine for the edge target, built from the target's decoder ONNX with TensorRT's Python API
(ONNX parser, fp16 builder config, one optimization profile covering window sizes 1..max_chunk).

NOT RUN HERE: TensorRT's libraries come only from NVIDIA's own package index (PyPI's tensorrt-cu12-libs
are stubs that download from there) and these machines cannot reach it. Everything around this module
(the ONNX it consumes, backend selection, the manifest) is tested; the engine build itself is skipped
with `tensorrt_unavailable()`'s reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def tensorrt_unavailable() -> str | None:
    """None when an engine can be built here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT not installed (NVIDIA's package index is unreachable from here)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no NVIDIA GPU visible to torch.cuda"
    except ImportError:
        return "torch missing"
    return None


def build_engine(onnx_path: Path, engine_path: Path, decoder: dict[str, Any], fp16: bool = True,
                 opt_window: int = 4, workspace_gb: float = 2.0) -> Path:
    """Parses `onnx_path` (the static-cache decoder), builds a serialized engine with an optimization
    profile k in [1, max_chunk] (opt `opt_window`) for the token inputs, and writes `engine_path`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    hidden, max_k = int(decoder["hidden"]), int(decoder["max_chunk"])
    opt = min(opt_window, max_k)
    profile = builder.create_optimization_profile()
    profile.set_shape("ids", (1, 1), (1, opt), (1, max_k))
    profile.set_shape("image_embeds", (1, 1, hidden), (1, opt, hidden), (1, max_k, hidden))
    profile.set_shape("is_image", (1, 1), (1, opt), (1, max_k))
    profile.set_shape("input_pos", (1,), (opt,), (max_k,))
    profile.set_shape("slots", (1,), (opt,), (max_k,))
    cache = tuple(decoder["cache"])
    profile.set_shape("cache", cache, cache, cache)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name}")
    engine_path.write_bytes(bytes(serialized))
    return engine_path


class TensorRTDecoder:
    """Runs the engine: the same call as the ONNX decoder (ids, image_embeds, is_image, input_pos,
    slots, cache) -> (logits [1, k, V], cache), on CUDA tensors through torch."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt

        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()

    def __call__(self, *inputs: Any) -> tuple[Any, Any]:
        import torch

        names = ["ids", "image_embeds", "is_image", "input_pos", "slots", "cache"]
        tensors = {n: torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).cuda().contiguous()
                   for n, x in zip(names, inputs, strict=True)}
        for name, tensor in tensors.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in ("logits", "cache_out"):
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outputs["logits"], outputs["cache_out"]
