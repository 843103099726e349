"""Runners for a bundle's two programs on one backend: ExecuTorch (`executorch.runtime`, XNNPACK) or
ONNX Runtime. Both take and return torch tensors:

    vision(pixels [1, 3, H, W]) -> [embeds [N, d], activity [N], (attention [N])]
    decoder(ids [1, k], image_embeds [1, k, d], is_image [1, k], input_pos [k], slots [k],
            cache [L, 2, kvH, S, hd]) -> (logits [1, k, V], cache [L, 2, kvH, S, hd])
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

BACKENDS = {"executorch": "pte", "onnx": "onnx", "tensorrt": "tensorrt"}  # backend -> manifest program format


class Programs(Protocol):
    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]: ...

    def decoder(self, ids: torch.Tensor, image_embeds: torch.Tensor, is_image: torch.Tensor,
                input_pos: torch.Tensor, slots: torch.Tensor,
                cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def set_executorch_threads(threads: int) -> None:
    """Sizes ExecuTorch's (process-wide) XNNPACK threadpool. On a small shared CPU, fewer threads than
    cores avoids spinning workers that make every step many times slower."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))


class ExecuTorchPrograms:
    def __init__(self, vision: Path, decoder: Path, threads: int | None = None):
        from executorch.runtime import Runtime

        if threads:
            set_executorch_threads(threads)
        runtime = Runtime.get()
        self._vision = runtime.load_program(vision).load_method("forward")
        self._decoder = runtime.load_program(decoder).load_method("forward")

    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone() for t in self._vision.execute([pixels.float().contiguous()])]

    def decoder(self, ids, image_embeds, is_image, input_pos, slots, cache):
        out = self._decoder.execute([ids, image_embeds, is_image, input_pos, slots, cache])
        # outputs may live in the method's planned memory, reused by the next call: own them
        return out[0].clone(), out[1].clone()


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPrograms:
    def __init__(self, vision: Path, decoder: Path, threads: int | None = None):
        self._vision = ort_session(vision, threads)
        self._decoder = ort_session(decoder, threads)
        self._vision_input = self._vision.get_inputs()[0].name

    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        out = self._vision.run(None, {self._vision_input: pixels.float().numpy()})
        return [torch.from_numpy(np.asarray(t)) for t in out]

    def decoder(self, ids, image_embeds, is_image, input_pos, slots, cache):
        feeds = {"ids": ids.numpy(), "image_embeds": image_embeds.numpy(), "is_image": is_image.numpy(),
                 "input_pos": input_pos.numpy(), "slots": slots.numpy(), "cache": cache.numpy()}
        logits, new_cache = self._decoder.run(None, feeds)
        return torch.from_numpy(logits), torch.from_numpy(new_cache)


class TensorRTPrograms(OnnxPrograms):
    """The edge's TensorRT backend: vision on ONNX Runtime, the decoder as the serialized engine on
    CUDA (export/tensorrt_engine.py). Never run on these machines: TensorRT is out of their reach."""

    def __init__(self, vision: Path, decoder: Path, threads: int | None = None):
        from covspec.export.tensorrt_engine import TensorRTDecoder

        self._vision = ort_session(vision, threads)
        self._vision_input = self._vision.get_inputs()[0].name
        self._engine = TensorRTDecoder(decoder)

    def decoder(self, ids, image_embeds, is_image, input_pos, slots, cache):
        logits, new_cache = self._engine(ids, image_embeds, is_image, input_pos, slots, cache)
        return logits.cpu(), new_cache.cpu()


def open_programs(backend: str, vision: Path, decoder: Path, threads: int | None = None) -> Programs:
    if backend == "executorch":
        return ExecuTorchPrograms(vision, decoder, threads)
    if backend == "onnx":
        return OnnxPrograms(vision, decoder, threads)
    if backend == "tensorrt":
        return TensorRTPrograms(vision, decoder, threads)
    raise ValueError(f"unknown backend {backend!r} (backends: {', '.join(BACKENDS)})")
