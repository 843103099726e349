"""The real-size bench's pieces that run fast: the published shapes built from their configs (on the
meta device: parameter counts only), and ONNX files whose weights live in an external-data file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.realsize_models import (
    QWEN,
    SMOLVLM,
    Shape,
    build_config,
    published_shape,
    qwen_full_attention,
)


def meta_model(shape: Shape, folder: Path) -> torch.nn.Module:
    import transformers

    config = build_config(shape, folder)
    cls = "Idefics3ForConditionalGeneration" if shape.name == SMOLVLM else "Qwen2_5_VLForConditionalGeneration"
    with torch.device("meta"):
        return getattr(transformers, cls)(config)


def distinct_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_published_shapes_have_the_published_parameter_counts(tmp_path: Path) -> None:
    smol = meta_model(published_shape(SMOLVLM), tmp_path / "smol")
    assert distinct_parameters(smol) == 256_484_928  # SmolVLM-256M-Instruct: 256.5M (untied head)
    assert smol.model.connector.modality_projection.proj.in_features == 768 * 16  # pixel shuffle x4
    qwen = meta_model(published_shape(QWEN), tmp_path / "qwen")
    assert round(distinct_parameters(qwen) / 1e9, 2) == 3.75  # Qwen2.5-VL-3B, tied embeddings
    assert qwen.lm_head.weight is qwen.get_input_embeddings().weight


def test_shallow_qwen_tower_keeps_a_full_attention_block() -> None:
    assert qwen_full_attention(32) == [7, 15, 23, 31]
    assert qwen_full_attention(16) == [7, 15]
    assert qwen_full_attention(4) == [3]


def test_strip_onnx_moves_large_weights_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from covspec.export import lower

    module = torch.nn.Linear(64, 32)
    x = torch.randn(2, 64)
    path = tmp_path / "m.onnx"
    lower.to_onnx(module, (x,), path, ["x"], ["y"])
    monkeypatch.setattr(lower, "ONNX_INLINE_LIMIT", 0)
    lower.strip_onnx(path)
    assert lower.onnx_data_files(path) == [tmp_path / "m.onnx.data"]
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(y), module(x).detach(), atol=1e-5)
    monkeypatch.setattr(lower, "ONNX_INLINE_LIMIT", 1 << 40)
    lower.strip_onnx(path)  # back inline: the data file goes
    assert lower.onnx_data_files(path) == [] and not (tmp_path / "m.onnx.data").exists()


def test_pte_written_without_joining_runs(tmp_path: Path) -> None:
    from executorch.runtime import Runtime

    from covspec.export.lower import to_pte

    module = torch.nn.Linear(16, 8)
    x = torch.randn(1, 16)
    to_pte(module, (x,), tmp_path / "m.pte")
    method = Runtime.get().load_program(tmp_path / "m.pte").load_method("forward")
    assert torch.allclose(method.execute([x])[0], module(x).detach(), atol=1e-5)
