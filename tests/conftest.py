"""Test-wide settings: one torch thread (the tiny models gain nothing from more, and the CI machine
has two cores that tests running subprocesses share), and the session's exports, made once and shared
by every test that runs an exported bundle or the native runtime (and kept between runs in a cache
folder keyed by what made them: the model's files, the exporter's and the shim's sources, the
versions of torch and executorch; COVSPEC_TEST_CACHE=off exports afresh)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("COVSPEC_TEST_CACHE", Path.home() / ".cache" / "covspec" / "test-exports"))
DONE = ".complete"


def _digest(parts: Iterable[object], files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    for path in sorted(files):
        h.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".cpp", ".h")]


def cached(kind: str, parts: Iterable[object], files: Iterable[Path], make: Callable[[Path], Path],
           scratch: Path) -> Path:
    """make(folder) -> what it wrote, made once per key: from the cache folder when it holds it, else
    made in `scratch` and copied there (atomically: a rename) for the next run."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        executorch = version("executorch")
    except PackageNotFoundError:
        executorch = None
    key = _digest([kind, torch.__version__, executorch, *parts], files)
    if os.environ.get("COVSPEC_TEST_CACHE") == "off":
        return make(scratch / kind)
    entry = CACHE / f"{kind}-{key}"
    if (entry / DONE).is_file():
        return entry / "out"
    made = make(scratch / kind)
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=CACHE))
        shutil.copytree(made, staging / "out") if made.is_dir() else (
            (staging / "out").mkdir(), shutil.copy2(made, staging / "out" / made.name))
        (staging / DONE).write_text(key)
        try:
            staging.rename(entry)
        except OSError:  # another session cached it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        return made
    return made


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo draft's device bundle (fp32: .pte and ONNX, as `covspec export --quant none` writes it)."""
    from covspec.demo import default_draft_path
    from covspec.export.device_bundle import build_device_bundle

    draft = default_draft_path()
    return cached("demo-device-fp32", ["pte,onnx", 160], [*_sources("export", "covspec/models"), *draft.iterdir()],
                  lambda out: build_device_bundle(draft, out, quant="none", formats=("pte", "onnx"), max_len=160),
                  tmp_path_factory.mktemp("demo-bundle"))


@pytest.fixture(scope="session")
def native_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The native ExecuTorch shim (device_runtime/native), built against the executorch wheel; skips
    naming the reason where it cannot be built (no g++, no wheel with its C++ runtime)."""
    from covspec.device_runtime import et_native

    if shutil.which("g++") is None:
        pytest.skip("no g++ on this machine: the native runtime cannot be built (apt-get install g++)")
    try:
        et_native.executorch_root()
    except et_native.NativeRuntimeError as err:
        pytest.skip(str(err))
    folder = cached("native-shim", [str(et_native.executorch_root())], et_native.SOURCES, lambda out: et_native.build(out).parent,
                    tmp_path_factory.mktemp("native"))
    return folder / et_native.LIBRARY_NAME


_FAMILY_EXPORTS: dict[str, tuple[Path, Path]] = {}


def tiny_family_export(family: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny checkpoint, its fp32 device bundle: .pte and ONNX, 96 positions) of a family, exported once per
    session (and cached between runs) for every test file that needs it (tests/export/test_bundle_families.py,
    tests/export/test_runner_families.py)."""
    if family not in _FAMILY_EXPORTS:
        import tiny_models

        from covspec.export.device_bundle import build_device_bundle

        builders = {"llava": tiny_models.build_llava, "idefics3": tiny_models.build_idefics3,
                    "qwen2_5_vl": tiny_models.build_qwen2_5_vl}
        root = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny = builders[family](root / family)
        bundle = cached(f"tiny-{family}-fp32", ["pte,onnx", 96], [*_sources("export", "covspec/models"),
                                                                  *tiny.iterdir()],
                        lambda out: build_device_bundle(tiny, out, quant="none", formats=("pte", "onnx"), max_len=96),
                        root)
        _FAMILY_EXPORTS[family] = (tiny, bundle)
    return _FAMILY_EXPORTS[family]
