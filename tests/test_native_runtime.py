"""The torch-free native ExecuTorch runtime (device_runtime/et_native.py over native/et_shim.cpp): it
builds against the executorch wheel, runs a small XNNPACK program in a process without torch with the
same outputs as ExecuTorch's Python bindings, and refuses a missing library or a broken program with
an error naming the file and the fix, never an abort."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covspec.device_runtime import et_native
from covspec.device_runtime.et_native import NativeProgram, NativeProgramError, NativeRuntimeError

CHILD = """
import json, sys
import numpy as np
from covspec.device_runtime.et_native import NativeProgram
program = NativeProgram(sys.argv[1], sys.argv[2])
inputs = np.load(sys.argv[3])
outputs = program.run_method("forward", [inputs["x"], inputs["ids"]])
np.savez(sys.argv[4], *outputs)
print(json.dumps({"torch": [m for m in sys.modules if m == "torch" or m.startswith("torch.")],
                  "methods": sorted(program.method_names)}))
"""


def _have_toolchain() -> str | None:
    if shutil.which("g++") is None:
        return "no g++ on this machine: the native runtime cannot be built (apt-get install g++)"
    try:
        et_native.executorch_root()
    except NativeRuntimeError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    reason = _have_toolchain()
    if reason:
        pytest.skip(reason)
    return et_native.build(tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """A tiny float + int64 program lowered to XNNPACK (exported here, with torch, in the test process)."""
    torch = pytest.importorskip("torch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.embed = torch.nn.Linear(8, 5), torch.nn.Embedding(11, 8)

        def forward(self, x, ids):
            return torch.tanh(self.linear(x + self.embed(ids))), ids * 3 + 1

    torch.manual_seed(0)
    example = (torch.randn(3, 8), torch.tensor([1, 4, 9]))
    exported = torch.export.export(Tiny().eval(), example)
    lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path_factory.mktemp("pte") / "tiny.pte"
    path.write_bytes(lowered.buffer)
    return path


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((3, 8)).astype(np.float32), "ids": np.array([2, 0, 10], dtype=np.int64)}


def test_outputs_without_torch_equal_the_python_bindings(library, program, tmp_path):
    inputs = _inputs()
    np.savez(tmp_path / "in.npz", **inputs)
    done = subprocess.run([sys.executable, "-c", CHILD, str(program), str(library), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"torch": [], "methods": ["forward"]}
    native = np.load(tmp_path / "out.npz")
    native = [native[f"arr_{i}"] for i in range(len(native.files))]

    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(program).load_method("forward")
    expected = [t.numpy() for t in method.execute([torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["ids"])])]
    assert [a.dtype for a in native] == [np.float32, np.int64]
    assert [a.shape for a in native] == [e.shape for e in expected] == [(3, 5), (3,)]
    np.testing.assert_array_equal(native[0], expected[0])
    np.testing.assert_array_equal(native[1], inputs["ids"] * 3 + 1)


def test_a_missing_library_names_the_file_and_the_build_command(program, tmp_path):
    missing = tmp_path / "nowhere" / "libcovspec_et.so"
    with pytest.raises(NativeRuntimeError) as err:
        NativeProgram(program, missing)
    assert str(missing) in str(err.value) and "python -m covspec.device_runtime.et_native build" in str(err.value)
    not_ours = tmp_path / "libcovspec_et.so"
    not_ours.write_bytes(b"not a shared library")
    with pytest.raises(NativeRuntimeError, match="cannot be loaded.*rebuild it"):
        NativeProgram(program, not_ours)


def _corruptions(good: bytes) -> dict[str, bytes]:
    _, program_size, segment_base, segment_size = struct.unpack_from("<IQQQ", good, 12)
    assert good[8:12] == b"eh00" and segment_size > 0, "the XNNPACK program keeps its delegate in a segment"
    rng = np.random.default_rng(0)
    out = {"not a program": bytes(rng.integers(0, 256, 600, dtype=np.uint8)), "truncated": good[:len(good) // 2]}
    flatbuffer = bytearray(good)
    flatbuffer[200:1200] = bytes(1000)
    out["flatbuffer zeroed"] = bytes(flatbuffer)
    segment = bytearray(good)
    for i in rng.integers(segment_base, segment_base + segment_size, 40):
        segment[i] ^= 0xFF
    out["delegate segment flipped"] = bytes(segment)
    return out


def test_broken_programs_are_refused_naming_the_file(library, program, tmp_path):
    for name, blob in _corruptions(program.read_bytes()).items():
        path = tmp_path / f"{name.replace(' ', '_')}.pte"
        path.write_bytes(blob)
        with pytest.raises(NativeProgramError) as err:
            NativeProgram(path, library)
        text = str(err.value)
        assert str(path) in text and "covspec export" in text, (name, text)
    with pytest.raises(NativeProgramError, match="no such program file"):
        NativeProgram(tmp_path / "absent.pte", library)
    assert NativeProgram(program, library).run_method("forward", list(_inputs().values()))[1].tolist() == [7, 1, 31]


def test_a_program_that_kills_the_probe_is_an_error_not_a_crash(library, program, monkeypatch):
    """What the caller sees when loading would abort the runtime: the child died, this process did not."""

    def died(*args, **kwargs):
        return subprocess.CompletedProcess(args, -6, "", "terminate called ...")

    monkeypatch.setattr(et_native.subprocess, "run", died)
    with pytest.raises(NativeProgramError, match=r"died loading it \(signal 6\).*covspec export") as err:
        NativeProgram(program, library)
    assert str(program) in str(err.value)


def test_wrong_method_and_dtype_are_clear(library, program):
    native = NativeProgram(program, library, probe=False)
    with pytest.raises(NativeProgramError, match="no method 'decode'.*forward"):
        native.run_method("decode", [])
    with pytest.raises(TypeError, match="complex128"):
        native.run_method("forward", [np.zeros((3, 8), dtype=np.complex128), np.zeros(3, dtype=np.int64)])
    with pytest.raises(NativeProgramError, match="method forward failed"):
        native.run_method("forward", [np.zeros((3, 8), dtype=np.float32)])  # one input missing
