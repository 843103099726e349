"""ExecuTorch programs run through our C shim (device_runtime/native/et_shim.cpp) with ctypes: no torch
in the process. The shim links only the C++ runtime the executorch wheel ships (libexecutorch,
the optimized kernels, the XNNPACK backend, its threadpool), none of which depends on libtorch, plus
our reference float32 kernels for the two LLM custom ops the bundle's decoders call
(native/llama_kernels.cpp: llama::update_cache, llama::custom_sdpa), which the wheel ships only inside
a libtorch-linked library. A method whose kernels are still missing is listed in `unavailable` and
refused by name; the program's other methods run.

    build(out_dir=None) -> Path                          compiles the shim (g++ against the wheel)
    NativeProgram(pte_path, library=None).run_method(name, [np.ndarray, ...]) -> [np.ndarray, ...]
    python -m covspec.device_runtime.et_native build     the install step

Why ctypes and a C shim, not pybind11 or nanobind: the shim is a dozen plain C functions over a handle,
so the binding needs no Python headers and no per-Python-version build (one .so serves every
interpreter), ctypes ships with Python, and the same `extern "C"` surface is what a Kotlin (JNI) or
C++ device app calls, so the Python tests exercise the very entry points a native client uses.

A program is checked before the shim sees it: the ExecuTorch header (covspec.bundles.checks), then a
probe load in a child process (`probe_in_child`; `probe=True` is the default), then the load here with
the flatbuffer verifier on and every method loaded. A file that would abort the runtime thus aborts the child, and the caller gets a
NativeProgramError naming the file and the fix instead of losing its process.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from covspec.bundles.checks import REEXPORT_FIX, ProgramFileError, check_pte_file
from covspec.errors import CovspecError

HERE = Path(__file__).resolve().parent / "native"
SOURCES = (HERE / "et_shim.cpp", HERE / "llama_kernels.cpp")
LIBRARY_NAME = "libcovspec_et.so"
DEFAULT_LIBRARY = HERE / "build" / LIBRARY_NAME
LIBRARY_ENV = "COVSPEC_ET_NATIVE"  # overrides where the shim is looked for
BUILD_FIX = "build it with `python -m covspec.device_runtime.et_native build` (needs g++ and the executorch wheel)"
ABI_VERSION = 4
ET_LIBS = ("executorch", "executorch_kernels_optimized", "executorch_backend_xnnpack", "executorch_threadpool")

# numpy dtype <-> ExecuTorch ScalarType code (c10 numbering)
DTYPES: dict[np.dtype, int] = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
          np.dtype(np.int64): 4, np.dtype(np.float16): 5, np.dtype(np.float32): 6, np.dtype(np.float64): 7,
          np.dtype(np.bool_): 11}
CODES = {code: dtype for dtype, code in DTYPES.items()}


class NativeRuntimeError(CovspecError):
    """The native shim is missing, cannot be built, or cannot be loaded; the message says the fix."""


class NativeProgramError(ProgramFileError):
    """A program the native runtime cannot load or run; the message names the file."""


def executorch_root() -> Path:
    """The installed executorch wheel's folder (found without importing it: that would import torch)."""
    for entry in sys.path:
        candidate = Path(entry or ".") / "executorch"
        if (candidate / "include" / "executorch").is_dir() and (candidate / "lib").is_dir():
            return candidate
    raise NativeRuntimeError("no executorch wheel with its C++ runtime (executorch/include, executorch/lib) on "
                             "sys.path: pip install executorch==1.5.1")


def compile_command(out: Path, root: Path | None = None) -> list[str]:
    """The g++ command that builds the shim into `out` against the wheel at `root`."""
    root = root or executorch_root()
    include = root / "include"
    return ["g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-w", *(str(src) for src in SOURCES), "-o", str(out),
            f"-I{include}", f"-I{include / 'executorch/runtime/core/portable_type/c10'}",
            "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED",
            f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-Wl,--no-as-needed",
            *(f"-l{lib}" for lib in ET_LIBS)]


def build(out_dir: str | Path | None = None) -> Path:
    """Compiles the shim (the install step on a machine with g++); returns the library's path."""
    out = Path(out_dir) / LIBRARY_NAME if out_dir is not None else DEFAULT_LIBRARY
    out.parent.mkdir(parents=True, exist_ok=True)
    command = compile_command(out)
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NativeRuntimeError("g++ not found: install a C++ compiler (apt-get install g++) to build the "
                                 "native ExecuTorch runtime") from None
    if done.returncode != 0:
        raise NativeRuntimeError(f"building {out} failed:\n{done.stderr.strip()[-2000:]}")
    return out


def library_path(library: str | Path | None = None) -> Path:
    return Path(library or os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY)


def load_library(library: str | Path | None = None) -> ctypes.CDLL:
    """The shim as a ctypes library with its signatures set; NativeRuntimeError naming the file and
    the fix when it is missing or is not our shim."""
    path = library_path(library)
    if not path.is_file():
        raise NativeRuntimeError(f"{path}: no native ExecuTorch runtime library; {BUILD_FIX}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeRuntimeError(f"{path}: cannot be loaded ({err}); rebuild it: {BUILD_FIX}") from None
    if not hasattr(lib, "et_abi_version") or lib.et_abi_version() != ABI_VERSION:
        raise NativeRuntimeError(f"{path}: not the covspec ExecuTorch shim of ABI {ABI_VERSION}; {BUILD_FIX}")
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, sz, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.c_char_p
    signatures = {
        "et_load": ([s, s, sz], p), "et_method_count": ([p], i), "et_method_name": ([p, i], s),
        "et_method_status": ([p, i], i), "et_register_llama_kernels": ([], i),
        "et_run": ([p, s, i, ctypes.POINTER(i), ctypes.POINTER(i), ctypes.POINTER(i64), ctypes.POINTER(p), s, sz], i),
        "et_output_kind": ([p, i], i), "et_output_dtype": ([p, i], i),
        "et_output_shape": ([p, i, ctypes.POINTER(i64), i], i), "et_output_copy": ([p, i, p, sz], i),
        "et_outputs_info": ([p, ctypes.POINTER(i), ctypes.POINTER(i), ctypes.POINTER(i), ctypes.POINTER(i64), i, i], i),
        "et_output_int": ([p, i], i64), "et_output_double": ([p, i], ctypes.c_double), "et_free": ([p], None),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result


def probe_in_child(path: Path, library: Path, llama_kernels: bool = True) -> list[str]:
    """Loads `path` in a child process first: a file that aborts the runtime aborts the child only.
    Returns the kernels the child's runtime reported missing (ExecuTorch logs them by name)."""
    command = [sys.executable, "-P", "-m", "covspec.device_runtime.et_native", "probe", str(path), str(library)]
    done = subprocess.run(command + ([] if llama_kernels else ["--no-llama-kernels"]), capture_output=True, text=True,
                          check=False, timeout=300)
    if done.returncode == 0:
        return sorted(set(MISSING_KERNEL.findall(done.stderr)))
    if done.returncode == PROBE_REFUSED:  # the child's NativeProgramError, as it is
        raise NativeProgramError(done.stderr.strip().splitlines()[-1])
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
    raise NativeProgramError(f"{path}: the native ExecuTorch runtime died loading it ({how}); the file is corrupt "
                             f"or not a program of this kind ({REEXPORT_FIX})")


MISSING_KERNEL = re.compile(r"kernel '([^']+)' not found")
OPERATOR_MISSING = 20  # ExecuTorch's Error::OperatorMissing
KERNELS_FIX = ("link the kernels into the shim (the executorch wheel ships its llama:: custom ops only inside "
               "libcustom_ops_aot_lib.so, which links libtorch; the shim's own reference llama::update_cache and "
               "llama::custom_sdpa are registered unless llama_kernels=False)")
PROBE_REFUSED = 3
_ERR_BYTES = 1024
MAX_IO, MAX_DIMS = 64, 16  # inputs or outputs of one method; dimensions of one tensor


class _Buffers:
    """The ctypes arrays a run passes, made once per program (building them per call cost more than the run)."""

    def __init__(self) -> None:
        self.dtypes, self.ndims = (ctypes.c_int * MAX_IO)(), (ctypes.c_int * MAX_IO)()
        self.sizes = (ctypes.c_int64 * (MAX_IO * MAX_DIMS))()
        self.data = (ctypes.c_void_p * MAX_IO)()
        self.err = ctypes.create_string_buffer(_ERR_BYTES)
        self.kinds, self.out_dtypes, self.out_ndims = ((ctypes.c_int * MAX_IO)() for _ in range(3))
        self.shapes = (ctypes.c_int64 * (MAX_IO * MAX_DIMS))()


class NativeProgram:
    """One .pte loaded by the shim. `run_method(name, inputs)` takes and returns numpy arrays (outputs
    are copies: the program's own buffers are reused by the next run)."""

    def __init__(self, path: str | Path, library: str | Path | None = None, probe: bool = True,
                 llama_kernels: bool | None = None) -> None:
        """`llama_kernels`: register the shim's reference llama::update_cache / llama::custom_sdpa kernels
        (native/llama_kernels.cpp) where none are registered, so that the bundle's decoders run. Default:
        only in a process without torch, because ExecuTorch aborts the process when its own custom ops
        (executorch.extension.llm.custom_ops, which need torch) are loaded after ours: one registry."""
        if llama_kernels is None:
            llama_kernels = "torch" not in sys.modules
        self.path = Path(path)
        if not self.path.is_file():
            raise NativeProgramError(f"{self.path}: no such program file; export it with `covspec export`")
        lib_path = library_path(library)
        self._lib = load_library(lib_path)
        try:
            check_pte_file(self.path)
        except ProgramFileError as err:
            raise NativeProgramError(str(err)) from None
        if llama_kernels and self._lib.et_register_llama_kernels() < 0:
            raise NativeRuntimeError(f"{lib_path}: registering the llama:: kernels failed")
        self.missing_kernels = probe_in_child(self.path, lib_path, llama_kernels) if probe else []
        message = ctypes.create_string_buffer(_ERR_BYTES)
        self._handle = self._lib.et_load(str(self.path).encode(), message, _ERR_BYTES)
        if not self._handle:
            raise NativeProgramError(f"{self.path}: {message.value.decode(errors='replace')}; the file is corrupt or "
                                     f"not a program of this kind ({REEXPORT_FIX})")
        self._io = _Buffers()
        count = self._lib.et_method_count(self._handle)
        names = [self._lib.et_method_name(self._handle, i).decode() for i in range(count)]
        self.method_names = frozenset(names)
        # methods that did not load for want of a kernel (the others are refused at load): name -> why
        self.unavailable = {name: "a kernel this runtime lacks" for i, name in enumerate(names)
                            if self._lib.et_method_status(self._handle, i) == OPERATOR_MISSING}

    def run_method(self, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if name not in self.method_names:
            raise NativeProgramError(f"{self.path}: no method {name!r} (methods: {sorted(self.method_names)})")
        if name in self.unavailable:
            kernels = f" ({', '.join(self.missing_kernels)} missing)" if self.missing_kernels else ""
            raise NativeProgramError(f"{self.path}: method {name} needs kernels this runtime lacks{kernels}; "
                                     f"{KERNELS_FIX}")
        n = len(inputs)
        if n > MAX_IO:
            raise ValueError(f"{name}: {n} inputs, the native runtime takes at most {MAX_IO}")
        io, at = self._io, 0
        arrays = []  # kept alive during the call
        for i, given in enumerate(inputs):
            a = np.ascontiguousarray(given)
            code = DTYPES.get(a.dtype)
            if code is None:
                raise TypeError(f"{name} input {i}: dtype {a.dtype} is not one the native runtime takes "
                                f"({', '.join(str(d) for d in DTYPES)})")
            io.dtypes[i], io.ndims[i], io.data[i] = code, a.ndim, a.__array_interface__["data"][0]
            io.sizes[at:at + a.ndim] = list(a.shape)
            at += a.ndim
            arrays.append(a)
        count = self._lib.et_run(self._handle, name.encode(), n, io.dtypes, io.ndims, io.sizes, io.data, io.err, _ERR_BYTES)
        if count < 0:
            raise NativeProgramError(f"{self.path}: {io.err.value.decode(errors='replace')}")
        return self._outputs()

    def _outputs(self) -> list[np.ndarray]:
        """Copies of the last run's outputs (two C calls for the metadata and one copy per tensor)."""
        lib, h, io = self._lib, self._handle, self._io
        count = lib.et_outputs_info(h, io.kinds, io.out_dtypes, io.out_ndims, io.shapes, MAX_IO, MAX_DIMS)
        if count < 0:
            raise NativeProgramError(f"{self.path}: over {MAX_IO} outputs or {MAX_DIMS} dimensions")
        outputs = []
        for i in range(count):
            kind = io.kinds[i]
            if kind in (1, 3):
                outputs.append(np.asarray(lib.et_output_int(h, i), dtype=np.int64 if kind == 1 else np.bool_))
                continue
            if kind == 2:
                outputs.append(np.asarray(lib.et_output_double(h, i), dtype=np.float64))
                continue
            dtype = CODES.get(io.out_dtypes[i]) if kind == 0 else None
            if dtype is None:
                raise NativeProgramError(f"{self.path}: output {i} is not a tensor of a dtype numpy takes, nor a scalar")
            out = np.empty(tuple(io.shapes[i * MAX_DIMS:i * MAX_DIMS + io.out_ndims[i]]), dtype=dtype)
            if lib.et_output_copy(h, i, out.__array_interface__["data"][0], out.nbytes) != 0:
                raise NativeProgramError(f"{self.path}: output {i}: size mismatch copying it out")
            outputs.append(out)
        return outputs

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.et_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


def main(argv: list[str]) -> int:
    """`build [OUT_DIR]`: compiles the shim; `probe PTE LIBRARY`: loads a program (the child of `probe`)."""
    if argv[:1] == ["build"]:
        try:
            print(build(argv[1] if len(argv) > 1 else None))
        except NativeRuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["probe"] and len(argv) in (3, 4):
        try:
            NativeProgram(argv[1], argv[2], probe=False, llama_kernels=argv[3:] != ["--no-llama-kernels"]).close()
        except (NativeProgramError, NativeRuntimeError) as err:
            print(str(err).replace("\n", " "), file=sys.stderr)
            return PROBE_REFUSED
        return 0
    print("usage: python -m covspec.device_runtime.et_native build [OUT_DIR] | probe PTE LIBRARY", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
