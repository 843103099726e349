"""torch.export of a graph, then to an ExecuTorch program (XNNPACK delegate) or an ONNX file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def export_program(module: torch.nn.Module, example: tuple[torch.Tensor, ...],
                   dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes, strict=False)


def to_pte(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path,
           dynamic_shapes: Any = None) -> dict[str, Any]:
    """Writes `path` (.pte, XNNPACK-delegated where XNNPACK takes the operator); returns which
    operators run outside the delegate (on ExecuTorch's portable kernels)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = export_program(module, example, dynamic_shapes)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph
    delegated = sum(1 for n in graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target))
    portable = sorted({getattr(n.target, "__name__", str(n.target)).split(":")[0]
                       for n in graph.nodes if n.op == "call_function" and "call_delegate" not in str(n.target)
                       and "getitem" not in str(n.target) and "sym_size" not in str(n.target)})
    write_program(edge.to_executorch(), path)
    return {"delegate": "XnnpackBackend", "delegated_subgraphs": delegated, "portable_ops": portable}


def to_multimethod_pte(programs: dict[str, torch.export.ExportedProgram], constants: dict[str, Any],
                       path: Path) -> dict[str, Any]:
    """Writes `path`: one .pte with every program of `programs` as a method (XNNPACK-delegated where
    XNNPACK takes the operator) and `constants` as constant methods; the methods share their mutable
    buffers (one KV cache). Returns, per method, which operators run outside the delegate."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()], constant_methods=constants)
    lowering = {name: _lowering(edge.exported_program(name).graph) for name in programs}
    config = ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False,
                                                                             share_mutable_buffers=True))
    write_program(edge.to_executorch(config), path)
    return lowering


def write_program(program: Any, path: Path) -> None:
    """Writes an ExecutorchProgramManager's program to `path` without first joining it into one bytes
    object (`.buffer`), a whole extra copy of the program at the export's peak."""
    with open(path, "wb") as f:
        program.write_to_file(f)


def _lowering(graph: torch.fx.Graph) -> dict[str, Any]:
    calls = [n for n in graph.nodes if n.op == "call_function"]
    portable = sorted({getattr(n.target, "__name__", str(n.target)).split(":")[0] for n in calls
                       if "call_delegate" not in str(n.target) and "getitem" not in str(n.target)
                       and "sym_size" not in str(n.target)})
    return {"delegated_subgraphs": sum(1 for n in calls if "call_delegate" in str(n.target)), "portable_ops": portable}


def to_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
            output_names: list[str], dynamic_shapes: Any = None) -> None:
    """Writes `path` (.onnx, weights inline) with torch.onnx's dynamo exporter."""
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), example, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=input_names, output_names=output_names,
                                    optimize=True, verbose=False, report=False)
    program.save(str(path), external_data=False)


ONNX_INLINE_LIMIT = 1_800_000_000  # bytes of weights kept inside the .onnx (protobuf's hard limit is 2 GiB)


def onnx_data_files(path: Path) -> list[Path]:
    """The external-data files an .onnx file refers to (none for a model with its weights inline)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    model = onnx.load(str(path), load_external_data=False)
    names = {ExternalDataInfo(t).location for t in _get_all_tensors(model)
             if t.data_location == onnx.TensorProto.EXTERNAL}
    return [path.parent / name for name in sorted(names)]


def strip_onnx(path: Path) -> None:
    """Drops what only debugging reads (per-node metadata and doc strings: the exporter's stack
    traces, which can outweigh an int8 model's weights; value_info shape hints), in place. Weights
    over ONNX_INLINE_LIMIT go to one external-data file, `<name>.data`, next to it."""
    import onnx

    def strip(graph: Any) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    strip(attr.g)
        for value in [*graph.input, *graph.output]:
            del value.metadata_props[:]
        del graph.value_info[:]

    data_files = onnx_data_files(path)
    model = onnx.load(str(path))  # the external data too
    strip(model.graph)
    del model.metadata_props[:]
    for data in data_files:
        data.unlink()
    if sum(len(t.raw_data) for t in model.graph.initializer) > ONNX_INLINE_LIMIT:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data")
    else:
        onnx.save(model, str(path))
