"""The torch-free native ExecuTorch runtime (device_runtime/et_native.py over native/et_shim.cpp): it
builds against the executorch wheel, runs a small XNNPACK program in a process without torch with the
same outputs as ExecuTorch's Python bindings, and refuses a missing library or a broken program with
an error naming the file and the fix, never an abort."""

from __future__ import annotations

import json
import re
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
pte, library, given, plan, out, kernels = sys.argv[1:7]
program = NativeProgram(pte, library, llama_kernels=kernels == "kernels")
inputs = np.load(given)
outputs = {}
for step, (method, names) in enumerate(json.loads(plan)):
    for j, value in enumerate(program.run_method(method, [inputs[n] for n in names])):
        outputs[f"{step}_{j}"] = value
np.savez(out, **outputs)
refusals = {}
for method in sorted(program.unavailable):
    try:
        program.run_method(method, [])
    except Exception as err:
        refusals[method] = str(err)
print(json.dumps({"torch": [m for m in sys.modules if m == "torch" or m.startswith("torch.")],
                  "methods": sorted(program.method_names), "unavailable": sorted(program.unavailable),
                  "refusals": refusals}))
"""


def run_without_torch(pte: Path, library: Path, inputs: dict[str, np.ndarray], plan: list[tuple[str, list[str]]],
                      tmp: Path, llama_kernels: bool = True) -> tuple[dict, list[list[np.ndarray]]]:
    """Runs `plan` (method, input names) through the shim in a child process; (its report, outputs per step)."""
    np.savez(tmp / "in.npz", **inputs)
    done = subprocess.run([sys.executable, "-c", CHILD, str(pte), str(library), str(tmp / "in.npz"), json.dumps(plan),
                           str(tmp / "out.npz"), "kernels" if llama_kernels else "none"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp / "out.npz")
    steps = [[got[f"{i}_{j}"] for j in range(sum(k.startswith(f"{i}_") for k in got.files))] for i in range(len(plan))]
    return json.loads(done.stdout.strip().splitlines()[-1]), steps


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
    report, (native,) = run_without_torch(program, library, inputs, [("forward", ["x", "ids"])], tmp_path)
    assert report == {"torch": [], "methods": ["forward"], "unavailable": [], "refusals": {}}

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


@pytest.fixture(scope="module")
def attention_program(tmp_path_factory) -> Path:
    """A tiny attention step over an in-program KV cache through llama::update_cache / llama::custom_sdpa
    (8 heads over 2 KV heads), as the bundle's decoders call them, exported with ExecuTorch's custom ops."""
    torch = pytest.importorskip("torch")
    from executorch.exir import to_edge_transform_and_lower

    from covspec.export.cached_decoder import load_custom_ops

    load_custom_ops()
    max_len, kv_heads, head_dim = 16, 2, 8

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("k_cache", torch.zeros(1, max_len, kv_heads, head_dim))
            self.register_buffer("v_cache", torch.zeros(1, max_len, kv_heads, head_dim))

        def forward(self, q, k, v, start):
            pos = start[0].item()
            torch._check_is_size(pos)
            torch._check(pos + q.shape[1] <= max_len)
            torch.ops.llama.update_cache(k, self.k_cache, pos)
            torch.ops.llama.update_cache(v, self.v_cache, pos)
            return torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, pos, None, 0, True, 0.3) * 2

    n = torch.export.Dim("n", min=1, max=max_len)
    example = (torch.randn(1, 3, 8, head_dim), torch.randn(1, 3, kv_heads, head_dim),
               torch.randn(1, 3, kv_heads, head_dim), torch.tensor([0]))
    exported = torch.export.export(Step(), example, dynamic_shapes=({1: n}, {1: n}, {1: n}, None))
    path = tmp_path_factory.mktemp("attn") / "attention.pte"
    path.write_bytes(to_edge_transform_and_lower(exported).to_executorch().buffer)
    return path


def test_reference_llama_kernels_equal_executorchs(library, attention_program, tmp_path):
    """Three steps (prefill 5 at slot 0, 2 more at 5, a rollback writing 3 at slot 4): the shim's
    reference kernels in a torch-free child against ExecuTorch's own custom ops in this process."""
    import torch
    from executorch.runtime import Runtime

    rng = np.random.default_rng(3)
    inputs, plan = {}, []
    for step, (start, k) in enumerate(((0, 5), (5, 2), (4, 3))):
        for name, heads in (("q", 8), ("k", 2), ("v", 2)):
            inputs[f"{name}{step}"] = rng.standard_normal((1, k, heads, 8)).astype(np.float32)
        inputs[f"start{step}"] = np.array([start], dtype=np.int64)
        plan.append(("forward", [f"q{step}", f"k{step}", f"v{step}", f"start{step}"]))
    report, native = run_without_torch(attention_program, library, inputs, plan, tmp_path)
    assert report["torch"] == [] and report["unavailable"] == [], report
    method = Runtime.get().load_program(attention_program).load_method("forward")
    for (_, names), (got,) in zip(plan, native, strict=True):
        (want,) = method.execute([torch.from_numpy(inputs[n]) for n in names])
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    plain, _ = run_without_torch(attention_program, library, inputs, plan[:0], tmp_path, llama_kernels=False)
    assert plain["unavailable"] == ["forward"]
    assert re.search(r"llama::\w+\.out.*link the kernels", plain["refusals"]["forward"]), plain["refusals"]


BUNDLE_PLAN = [("vision_encoder", ["pixels"]), ("token_embedding", ["ids"]), ("get_vocab_size", []),
               ("get_max_seq_len", []), ("get_eos_ids", []), ("write_cache", ["cache"]), ("read_cache", []),
               # prefill 6 tokens (one an image embedding), 3 more, then roll back one and write 2 at slot 8
               ("covspec_decoder", ["ids_a", "embeds_a", "image_a", "pos_a", "start_a"]),
               ("covspec_decoder", ["ids_b", "embeds_b", "image_b", "pos_b", "start_b"]),
               ("covspec_decoder", ["ids_c", "embeds_c", "image_c", "pos_c", "start_c"]),
               ("text_decoder", ["embeds_b", "pos_b"])]
DECODERS = ("covspec_decoder", "text_decoder")


def _bundle_inputs(bindings, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shape = lambda name, i: list(bindings.load_method(name).metadata.input_tensor_meta(i).sizes())  # noqa: E731
    d = shape("covspec_decoder", 1)[-1]
    inputs = {"pixels": rng.standard_normal(shape("vision_encoder", 0)).astype(np.float32),
              "ids": rng.integers(0, 40, (1, 5)).astype(np.int64),
              "cache": rng.standard_normal(shape("write_cache", 0)).astype(np.float32)}
    for step, (start, k) in zip("abc", ((0, 6), (6, 3), (8, 2)), strict=True):
        inputs |= {f"ids_{step}": rng.integers(0, 40, (1, k)).astype(np.int64),
                   f"embeds_{step}": rng.standard_normal((1, k, d)).astype(np.float32),
                   f"image_{step}": np.arange(k)[None, :] == 1,
                   f"pos_{step}": np.arange(start, start + k, dtype=np.int64),
                   f"start_{step}": np.array([start], dtype=np.int64)}
    return inputs


def compare_bundle_methods(model: Path, library: Path, tmp: Path) -> dict:
    """The device bundle's model.pte in a torch-free child against the Python bindings (with ExecuTorch's
    own llama:: custom ops) on the same inputs, every method including the decoders over the shared KV
    cache (the shim's reference llama:: kernels); without those kernels the decoders are refused naming
    the missing ones and the rest still runs."""
    import torch
    from executorch.runtime import Runtime

    from covspec.export.cached_decoder import load_custom_ops

    load_custom_ops()
    bindings = Runtime.get().load_program(model)
    inputs = _bundle_inputs(bindings, np.random.default_rng(0))
    report, native = run_without_torch(model, library, inputs, BUNDLE_PLAN, tmp)
    assert report["torch"] == [] and report["unavailable"] == [], report
    methods = {name: bindings.load_method(name) for name, _ in BUNDLE_PLAN}
    worst = 0.0
    for (method, names), got in zip(BUNDLE_PLAN, native, strict=True):
        want = [np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t)
                for t in methods[method].execute([torch.from_numpy(inputs[n]) for n in names])]
        assert len(got) == len(want), method
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape, (method, a.shape, b.shape)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=method)
            if method in DECODERS:
                worst = max(worst, float(np.abs(a - b).max()))
                assert (a.argmax(-1) == b.argmax(-1)).all(), method
    np.testing.assert_array_equal(native[6][0], inputs["cache"])  # read_cache gives back what write_cache wrote
    plain, _ = run_without_torch(model, library, inputs, BUNDLE_PLAN[:7], tmp, llama_kernels=False)
    assert plain["unavailable"] == sorted(DECODERS), plain
    for method in DECODERS:
        assert re.search(r"llama::custom_sdpa.*update_cache.*link the kernels", plain["refusals"][method])
    return {**report, "max_abs_logit_diff": worst}


@pytest.mark.slow
def test_the_demo_bundle_methods_without_torch(library, tmp_path):
    """Exports the demo pair's int8 device bundle (minutes), then compare_bundle_methods."""
    from covspec.demo import default_draft_path, default_target_path
    from covspec.export import build_bundles

    device, _ = build_bundles(default_draft_path(), default_target_path(), tmp_path / "ex", quant="int8",
                              formats=("pte",), edge_backend="pytorch", quiet=True)
    compare_bundle_methods(device / "model.pte", library, tmp_path)
