"""Checks of a program file before a runtime gets it, so that a corrupt file (even one whose manifest
entry matches it) gives a BundleError naming the file and the fix instead of a crash:

- `.pte`: the ExecuTorch header (magic "ET12", extended header "eh00" whose program and segment sizes
  fit the file); then loading with the flatbuffer verifier on (Verification.InternalConsistency), whose
  failures are turned into the same error (`load_pte_methods`).
- `.onnx`: the protobuf parse (onnxruntime's InvalidProtobuf / Fail) turned into the same error.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from covspec.bundles.bundle import BundleError

REEXPORT_FIX = "re-export the bundle (covspec export) or copy it again from a good source"


class ProgramFileError(BundleError):
    """A program file that cannot be run as it is; the message names the file and the fix."""


def bad_program(path: Path, what: str) -> ProgramFileError:
    return ProgramFileError(f"{path}: {what}; the file is corrupt or not a program of this kind ({REEXPORT_FIX})")


def check_pte_file(path: Path) -> None:
    """Raises ProgramFileError unless `path` starts like an ExecuTorch program whose sizes fit the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 8 or head[4:6] != b"ET" or not head[6:8].isdigit():
        raise bad_program(path, "no ExecuTorch program header (magic 'ET..' at byte 4)")
    root = struct.unpack_from("<I", head, 0)[0]
    if root >= size:
        raise bad_program(path, f"its flatbuffer root offset {root} is past the end of the file ({size} bytes)")
    if head[8:12] == b"eh00":  # extended header: length, program size, segment base offset, segment size
        length, program_size, segment_base, segment_size = struct.unpack_from("<IQQQ", head, 12)
        if program_size > size or (segment_base and segment_base + segment_size > size):
            raise bad_program(path, f"its header says {program_size} program bytes and segments up to "
                                    f"{segment_base + segment_size}, the file has {size}")


def load_pte_methods(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Loads `names` from the .pte at `path` with the flatbuffer verifier on; runtime errors become
    ProgramFileError naming the file."""
    from executorch.runtime import Runtime, Verification

    check_pte_file(path)
    try:
        program = Runtime.get().load_program(path, verification=Verification.InternalConsistency)
        missing = [n for n in names if n not in program.method_names]
        if missing:
            raise bad_program(path, f"it has no method {', '.join(missing)} (methods: {sorted(program.method_names)})")
        return {name: program.load_method(name) for name in names}
    except RuntimeError as err:
        raise bad_program(path, f"ExecuTorch cannot load it ({err})") from err


def onnx_session(path: Path, options: Any) -> Any:
    """An onnxruntime CPU session of `path`; a file ONNX Runtime cannot parse raises ProgramFileError."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (InvalidProtobuf, InvalidGraph, Fail) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise bad_program(path, f"ONNX Runtime cannot load it ({type(err).__name__}: {first[:200]})") from err
