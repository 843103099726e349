"""The edge bundle: the target in the form the edge can run, with the choice and the reason recorded.

Backends, best first: "tensorrt" (engine built from the target's decoder ONNX, where TensorRT and an
NVIDIA GPU are present), "onnx" (ONNX Runtime on the same programs the device bundle uses, when asked
for), "pytorch" (the Hugging Face checkpoint, copied, run by covspec.models on CPU or CUDA).
The checkpoint is always included: the edge runtime's reference path and the fallback. With the
draft given, its checkpoint is included too (`draft/`): `covspec edge serve --model OUT/edge` then
runs it beside the target, for edge_sd and for covspec devices that hand drafting to the edge.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from covspec.bundles.manifest import write_manifest
from covspec.export.tensorrt_engine import build_engine, tensorrt_unavailable
from covspec.export.write_programs import (
    ExportUnsupported,
    Step,
    check_exportable,
    describe_model,
    write_programs,
)
from covspec.models import load_adapter

BACKENDS = ("auto", "tensorrt", "onnx", "pytorch")
CHECKPOINT_DIR = "checkpoint"
DRAFT_DIR = "draft"


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, reason)."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown edge backend {requested!r} (backends: {', '.join(BACKENDS)})")
    missing = tensorrt_unavailable()
    if requested in ("auto", "tensorrt") and missing is None:
        return "tensorrt", "TensorRT and an NVIDIA GPU are present"
    if requested == "onnx":
        return "onnx", "asked for ONNX Runtime"
    if requested == "pytorch":
        return "pytorch", "asked for the PyTorch checkpoint"
    why = f"TensorRT unavailable: {missing}" + ("; asked for tensorrt" if requested == "tensorrt" else "")
    return "pytorch", f"{why}; the edge runs the Hugging Face checkpoint with PyTorch (CUDA if present, else CPU)"


def build_edge_bundle(target: Path, out: Path, backend: str = "auto", max_len: int | None = None,
                      max_chunk: int = 64, step: Step = lambda _: None, draft: Path | None = None) -> Path:
    chosen, reason = choose_backend(backend)
    step(f"edge backend: {chosen} ({reason})")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    step(f"copying target checkpoint {target}")
    shutil.copytree(target, out / CHECKPOINT_DIR)
    adapter = load_adapter(target)
    body: dict[str, Any] = {"kind": "edge", "source": Path(target).name, "family": adapter.family,
                            "tokenizer_fingerprint": adapter.fingerprint(), "vocab_size": adapter.vocab_size,
                            "checkpoint": CHECKPOINT_DIR, "tokenizer_dir": CHECKPOINT_DIR, "backend": chosen, "reason": reason}
    if chosen in ("onnx", "tensorrt"):
        try:
            llava = check_exportable(adapter, ("llava",))  # the runtime of ONNX edge bundles
        except ExportUnsupported as err:
            body.update(backend="pytorch", reason=f"{reason}; {err}")
        else:
            info = describe_model(llava, max_len, max_chunk)
            programs, unsupported = write_programs(llava, out, info, "none", ("onnx",), step)
            body.update({k: v for k, v in info.items() if k not in body}, programs=programs,
                        unsupported=unsupported)
            if "onnx" not in programs:
                body.update(backend="pytorch", reason=f"{reason}; ONNX export failed: {unsupported.get('onnx')}")
            elif chosen == "tensorrt":
                step("building the TensorRT engine (fp16)")
                build_engine(out / "decoder.onnx", out / "decoder.engine", info["decoder"])
                programs["tensorrt"] = {"decoder": "decoder.engine", "vision": "vision.onnx"}
    if draft is not None:
        body.update(add_draft(Path(draft), out, body["tokenizer_fingerprint"], step))
    step(f"[bold]edge bundle: {body['backend']}[/bold] ({body['reason']})")
    write_manifest(out, body)
    return out


def add_draft(draft: Path, out: Path, fingerprint: str, step: Step) -> dict[str, Any]:
    """Copies the draft checkpoint into the edge bundle (edge-side drafting) when it tokenizes as the
    target does: the manifest entries ({"draft": DRAFT_DIR}, or {"draft_skipped": why})."""
    theirs = load_adapter(draft).fingerprint()
    if theirs != fingerprint:
        step(f"draft {draft} not added to the edge bundle: its tokenizer differs from the target's")
        return {"draft_skipped": "the draft's tokenizer differs from the target's"}
    step(f"copying draft checkpoint {draft} (edge-side drafting: edge_sd, covspec's placement)")
    shutil.copytree(draft, out / DRAFT_DIR)
    return {"draft": DRAFT_DIR}
