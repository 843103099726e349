"""Runners for a bundle's programs on one backend, taking and returning torch tensors:

    vision(pixels [1, 3, H, W]) -> [embeds [N, d], activity [N], (attention [N])]
    decoder(state, ids [1, k], image_embeds [1, k, d], is_image [1, k], input_pos [k], start)
        -> logits [1, k, V]: the k tokens take cache slots start..start+k-1 of the state's cache
    fork(state) -> the cache value of an independent copy of the state

- ExecuTorch (`model.pte`, ExecuTorch's multimodal layout, export/multimodal.py): the KV cache lives
  inside the program, shared by its methods. One state at a time is resident there (its
  `state.cache` is None); running another state first moves the resident one's cache out
  (`read_cache`) and the other's in (`write_cache`), so forked draft branches stay independent and
  a single sequence never copies its cache.
- ONNX Runtime / TensorRT (`vision.onnx`, `decoder.onnx`/engine): the cache [L, 2, kvH, S, hd] is
  an input and an output; `state.cache` holds it.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from covspec.bundles.checks import load_pte_methods, onnx_session

BACKENDS = {"executorch": "pte", "onnx": "onnx", "tensorrt": "tensorrt"}  # backend -> manifest program format
FRESH = torch.empty(0)  # the cache of a state with nothing to restore (stale slots are never read)


class Programs(Protocol):
    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]: ...

    def new_cache(self) -> torch.Tensor: ...

    def decoder(self, state: Any, ids: torch.Tensor, image_embeds: torch.Tensor, is_image: torch.Tensor,
                input_pos: torch.Tensor, start: int) -> torch.Tensor: ...

    def fork(self, state: Any) -> torch.Tensor: ...


def set_executorch_threads(threads: int) -> None:
    """Sizes ExecuTorch's (process-wide) XNNPACK threadpool, before any program is loaded (resizing it
    under loaded XNNPACK methods crashes). On a small shared CPU, fewer threads than cores avoids
    spinning workers that make every step many times slower."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))


class ExecuTorchPrograms:
    def __init__(self, model: Path, threads: int | None = None):
        from covspec.export.cached_decoder import load_custom_ops

        load_custom_ops()  # the llama:: kernels (update_cache, custom_sdpa) the decoder methods call
        if threads:
            set_executorch_threads(threads)
        methods = load_pte_methods(model, ("vision_encoder", "covspec_decoder", "read_cache", "write_cache"))
        self._vision, self._decoder = methods["vision_encoder"], methods["covspec_decoder"]
        self._read, self._write = methods["read_cache"], methods["write_cache"]
        self._resident: weakref.ref | None = None

    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        embeds, *rest = self._vision.execute([pixels.float().contiguous()])
        return [embeds[0].clone(), *(t.clone() for t in rest)]

    def new_cache(self) -> torch.Tensor:
        return FRESH

    def _make_resident(self, state: Any) -> None:
        resident = self._resident() if self._resident is not None else None
        if resident is state:
            return
        if resident is not None and resident.cache is None:  # its cache lives in the program: keep a copy
            resident.cache = self._read.execute([])[0].clone()
        if state.cache is None:
            raise RuntimeError("a decode state whose cache was lost (it was resident in another program)")
        if state.cache.numel():
            self._write.execute([state.cache])
        state.cache = None
        self._resident = weakref.ref(state)

    def decoder(self, state, ids, image_embeds, is_image, input_pos, start):
        self._make_resident(state)
        out = self._decoder.execute([ids.contiguous(), image_embeds.contiguous(), is_image.contiguous(),
                                     input_pos.contiguous(), torch.tensor([start])])
        return out[0].clone()  # outputs may live in the method's planned memory: own them

    def fork(self, state: Any) -> torch.Tensor:
        if state.cache is None:  # resident: snapshot the program's cache
            return self._read.execute([])[0].clone()
        return state.cache  # never modified in place: the copy can share it


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return onnx_session(path, options)


class OnnxPrograms:
    """Explicit cache: state.cache [L, 2, kvH, S, hd] in, a new one out (never modified in place)."""

    def __init__(self, vision: Path, decoder: Path, cache_shape: list[int], threads: int | None = None):
        self._vision = ort_session(vision, threads)
        self._decoder = ort_session(decoder, threads)
        self._vision_input = self._vision.get_inputs()[0].name
        self.cache_shape = tuple(cache_shape)

    def vision(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        out = self._vision.run(None, {self._vision_input: pixels.float().numpy()})
        return [torch.from_numpy(np.asarray(t)) for t in out]

    def new_cache(self) -> torch.Tensor:
        return torch.zeros(self.cache_shape, dtype=torch.float32)

    def decoder(self, state, ids, image_embeds, is_image, input_pos, start):
        slots = torch.arange(start, start + ids.shape[1])
        logits, state.cache = self._run(ids, image_embeds, is_image, input_pos, slots, state.cache)
        return logits

    def _run(self, ids, image_embeds, is_image, input_pos, slots, cache):
        feeds = {"ids": ids.numpy(), "image_embeds": image_embeds.numpy(), "is_image": is_image.numpy(),
                 "input_pos": input_pos.numpy(), "slots": slots.numpy(), "cache": cache.numpy()}
        logits, new_cache = self._decoder.run(None, feeds)
        return torch.from_numpy(logits), torch.from_numpy(new_cache)

    def fork(self, state: Any) -> torch.Tensor:
        return state.cache


class TensorRTPrograms(OnnxPrograms):
    """The edge's TensorRT backend: vision on ONNX Runtime, the decoder as the serialized engine on
    CUDA (export/tensorrt_engine.py). Never run on these machines: TensorRT is out of their reach."""

    def __init__(self, vision: Path, decoder: Path, cache_shape: list[int], threads: int | None = None):
        from covspec.export.tensorrt_engine import TensorRTDecoder

        self._vision = ort_session(vision, threads)
        self._vision_input = self._vision.get_inputs()[0].name
        self._engine = TensorRTDecoder(decoder)
        self.cache_shape = tuple(cache_shape)

    def _run(self, ids, image_embeds, is_image, input_pos, slots, cache):
        logits, new_cache = self._engine(ids, image_embeds, is_image, input_pos, slots, cache)
        return logits.cpu(), new_cache.cpu()


def open_programs(backend: str, bundle: Any, threads: int | None = None) -> Programs:
    """The programs of `bundle` (a covspec.bundles.bundle.Bundle) on `backend`."""
    if backend == "executorch":
        return ExecuTorchPrograms(bundle.program("pte", "model"), threads)
    cache = bundle.manifest["decoder"]["cache"]
    fmt = BACKENDS.get(backend)
    if backend == "onnx":
        return OnnxPrograms(bundle.program(fmt, "vision"), bundle.program(fmt, "decoder"), cache, threads)
    if backend == "tensorrt":
        return TensorRTPrograms(bundle.program(fmt, "vision"), bundle.program(fmt, "decoder"), cache, threads)
    raise ValueError(f"unknown backend {backend!r} (backends: {', '.join(BACKENDS)})")
