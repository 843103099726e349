"""The device runtime without torch: a virtual environment with the project's device install only
(`pip install covspec[device]`: no torch, no transformers) runs `covspec`'s device side on an
exported bundle, the .pte through the native ExecuTorch shim and the ONNX programs through ONNX
Runtime, against a real edge; every answer equals target_only's and neither library was imported.

Slow: it builds a virtual environment (pip, from PyPI or its cache) and exports a bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtimes import RunningEdge, png
from tiny_models import build_llava

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["what is the color of the circle ?", "describe this image .", "how many shape are there ?",
           "where is the square ?"]
N_ANSWERS = 20

# Runs in the device-only environment: answers every request in covspec and target_only on each backend
DRIVER = """
import json, sys
from covspec.bundles.adapter import BundleAdapter
from covspec.device_runtime.client import DeviceRuntime
from covspec.sampling import SamplingParams

bundle, edge, backends, requests = sys.argv[1], sys.argv[2], sys.argv[3].split(","), json.loads(sys.argv[4])
out = {}
for backend in backends:
    device = DeviceRuntime(BundleAdapter(bundle, backend=backend), edge, timeout_s=30)
    for mode in ("target_only", "covspec"):
        out[f"{backend}/{mode}"] = [device.answer(bytes.fromhex(img), prompt, mode, SamplingParams(), max_new_tokens=24).ids
                                    for img, prompt in requests]
    device.close()
out["modules"] = sorted(m for m in ("torch", "transformers", "torchao", "executorch") if m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """A virtual environment with covspec[device] only (pip's cache makes a second build quick)."""
    venv = tmp_path_factory.mktemp("device-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{ROOT}[device]"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        pytest.skip(f"pip could not install covspec[device] (no PyPI?): {pip.stderr.strip()[-300:]}")
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert not names & {"torch", "transformers", "executorch"}, f"the device install pulled in {names}"
    return venv


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    from covspec.export.device_bundle import build_device_bundle

    root = tmp_path_factory.mktemp("torch-free")
    target = build_llava(root / "target", seed=0)
    draft = build_llava(root / "draft", seed=1)
    return target, build_device_bundle(draft, root / "device", quant="none", formats=("pte", "onnx"), max_len=160)


def native_library() -> Path | None:
    from covspec.device_runtime.et_native import library_path

    path = library_path()
    return path if path.is_file() else None


@pytest.mark.slow
def test_device_without_torch_answers_as_target_only(device_venv: Path, exported: tuple[Path, Path]) -> None:
    target, bundle = exported
    backends = ["onnx"]
    env = dict(os.environ, PYTHONPATH="")
    library = native_library()
    if library is not None:
        backends.insert(0, "executorch")
        env["COVSPEC_ET_NATIVE"] = str(library)
    requests = [(png(i).hex(), PROMPTS[i % len(PROMPTS)]) for i in range(N_ANSWERS)]
    edge = RunningEdge(target)
    try:
        run = subprocess.run([str(device_venv / "bin" / "python"), "-c", DRIVER, str(bundle), edge.endpoint,
                              ",".join(backends), json.dumps(requests)],
                             capture_output=True, text=True, timeout=900, env=env, cwd="/")
    finally:
        edge.close()
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["modules"] == [], f"the torch-free device imported {out['modules']}"
    for backend in backends:
        reference = out[f"{backend}/target_only"]
        assert len(reference) == N_ANSWERS and all(reference)
        assert out[f"{backend}/covspec"] == reference, f"{backend}: covspec differs from target_only"
    if library is None:
        pytest.skip("the native ExecuTorch shim is not built (python -m covspec.device_runtime.et_native build): "
                    "only the ONNX bundle was checked")
