"""Runners for a bundle's programs on one backend, taking and returning numpy arrays (torch-free):

    vision(pixels [1, 3, H, W]) -> [embeds [N, d], activity [N], (attention [N])]
    decoder(state, ids [1, k], image_embeds [1, k, d], is_image [1, k], input_pos [k], start)
        -> logits [1, k, V]: the k tokens take cache slots start..start+k-1 of the state's cache
    fork(state) -> the cache value of an independent copy of the state

- ExecuTorch (`model.pte`, ExecuTorch's multimodal layout, export/multimodal.py), run by our native
  shim over ExecuTorch's C++ runtime (covspec.device_runtime.et_native) in a process without torch,
  by ExecuTorch's Python bindings (which link libtorch) in one with it: one kernel registry per
  process, and the bindings' custom ops abort a process where the shim registered its own. The KV cache lives
  inside the program, shared by its methods. One state at a time is resident there (its
  `state.cache` is None); running another state first moves the resident one's cache out
  (`read_cache`) and the other's in (`write_cache`), so forked draft branches stay independent and
  a single sequence never copies its cache.
- ONNX Runtime / TensorRT (`vision.onnx`, `decoder.onnx`/engine): the cache [L, 2, kvH, S, hd] is
  an input and an output; `state.cache` holds it.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from covspec.bundles.checks import load_pte_methods, onnx_session

BACKENDS = {"executorch": "pte", "onnx": "onnx", "tensorrt": "tensorrt"}  # backend -> manifest program format
FRESH = np.empty(0, dtype=np.float32)  # the cache of a state with nothing to restore (stale slots are never read)
PTE_METHODS = ("vision_encoder", "covspec_decoder", "read_cache", "write_cache")


class Programs(Protocol):
    def vision(self, pixels: np.ndarray) -> list[np.ndarray]: ...

    def new_cache(self) -> np.ndarray: ...

    def decoder(self, state: Any, ids: np.ndarray, image_embeds: np.ndarray, is_image: np.ndarray,
                input_pos: np.ndarray, start: int) -> np.ndarray: ...

    def fork(self, state: Any) -> np.ndarray: ...


def set_executorch_threads(threads: int) -> None:
    """Sizes ExecuTorch's (process-wide) XNNPACK threadpool, before any program is loaded (resizing it
    under loaded XNNPACK methods crashes). On a small shared CPU, fewer threads than cores avoids
    spinning workers that make every step many times slower."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))


class NativeMethods:
    """model.pte's methods through the native shim (no torch): method(name)(inputs) -> outputs."""

    def __init__(self, model: Path, threads: int | None = None):
        from covspec.device_runtime.et_native import NativeProgram

        self.program = NativeProgram(model)  # threads: the shim keeps ExecuTorch's default threadpool

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.program.run_method(name, inputs)  # copies: the program's buffers are reused


class BindingMethods:
    """model.pte's methods through ExecuTorch's Python bindings (in a process that has torch)."""

    def __init__(self, model: Path, threads: int | None = None):
        import torch

        from covspec.export.cached_decoder import load_custom_ops

        load_custom_ops()  # the llama:: kernels (update_cache, custom_sdpa) the decoder methods call
        if threads:
            set_executorch_threads(threads)
        self._torch = torch
        self.methods = load_pte_methods(model, PTE_METHODS)

    def run(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = self.methods[name].execute([self._torch.from_numpy(np.ascontiguousarray(a)) for a in inputs])
        return [t.numpy().copy() for t in out]  # outputs may live in the method's planned memory: own them


class ExecuTorchPrograms:
    def __init__(self, model: Path, threads: int | None = None):
        self.methods = BindingMethods(model, threads) if "torch" in sys.modules else NativeMethods(model, threads)
        self._resident: weakref.ref | None = None

    def vision(self, pixels: np.ndarray) -> list[np.ndarray]:
        embeds, *rest = self.methods.run("vision_encoder", [np.asarray(pixels, dtype=np.float32)])
        return [embeds[0], *rest]

    def new_cache(self) -> np.ndarray:
        return FRESH

    def _make_resident(self, state: Any) -> None:
        resident = self._resident() if self._resident is not None else None
        if resident is state:
            return
        if resident is not None and resident.cache is None:  # its cache lives in the program: keep a copy
            resident.cache = self.methods.run("read_cache", [])[0]
        if state.cache is None:
            raise RuntimeError("a decode state whose cache was lost (it was resident in another program)")
        if state.cache.size:
            self.methods.run("write_cache", [state.cache])
        state.cache = None
        self._resident = weakref.ref(state)

    def decoder(self, state, ids, image_embeds, is_image, input_pos, start):
        self._make_resident(state)
        return self.methods.run("covspec_decoder", [ids, image_embeds, is_image, input_pos,
                                                    np.asarray([start], dtype=np.int64)])[0]

    def fork(self, state: Any) -> np.ndarray:
        if state.cache is None:  # resident: snapshot the program's cache
            return self.methods.run("read_cache", [])[0]
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

    def vision(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(t) for t in self._vision.run(None, {self._vision_input: np.asarray(pixels, np.float32)})]

    def new_cache(self) -> np.ndarray:
        return np.zeros(self.cache_shape, dtype=np.float32)

    def decoder(self, state, ids, image_embeds, is_image, input_pos, start):
        slots = np.arange(start, start + ids.shape[1], dtype=np.int64)
        logits, state.cache = self._run(ids, image_embeds, is_image, input_pos, slots, state.cache)
        return logits

    def _run(self, ids, image_embeds, is_image, input_pos, slots, cache):
        feeds = {"ids": ids, "image_embeds": image_embeds, "is_image": is_image, "input_pos": input_pos,
                 "slots": slots, "cache": cache}
        logits, new_cache = self._decoder.run(None, feeds)
        return logits, new_cache

    def fork(self, state: Any) -> np.ndarray:
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
        import torch

        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (ids, image_embeds, is_image, input_pos, slots, cache)]
        logits, new_cache = self._engine(*tensors)
        return logits.cpu().numpy(), new_cache.cpu().numpy()


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
