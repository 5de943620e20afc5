"""Shape inference without copying the weights.

onnx's shape inference serializes the whole model. We run it on a light copy in which every large
initializer is replaced by a graph input of the same type and shape: shapes come out the same
(only small constants such as Reshape targets matter for inference) at a fraction of the cost.
"""

from __future__ import annotations

import onnx

from normfold.graph import subgraphs

SMALL = 4096  # bytes; initializers up to this size are kept, larger ones become typed inputs

Shapes = dict[str, tuple[int, list | None]]


_SUB_BYTE = frozenset(getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                      if hasattr(onnx.TensorProto, name))


def data_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's data take, from its type and shape; None for packed sub-byte types
    and strings. Header arithmetic: reading len(tensor.raw_data) would copy the bytes out of
    protobuf (about 1 ms per 10 MB, on every call)."""
    if tensor.data_type in _SUB_BYTE or tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return count * itemsize


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return SMALL + 1
    size = data_bytes(t)
    return t.ByteSize() if size is None else size


def _light_graph(graph: onnx.GraphProto, dest: onnx.GraphProto) -> None:
    dest.name = graph.name
    dest.node.extend(graph.node)
    dest.input.extend(graph.input)
    dest.output.extend(graph.output)
    dest.value_info.extend(graph.value_info)
    dest.sparse_initializer.extend(graph.sparse_initializer)
    inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        if _tensor_bytes(t) <= SMALL:
            dest.initializer.append(t)
        elif t.name not in inputs:
            dest.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _collect(graph: onnx.GraphProto, out: Shapes) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out[vi.name] = (tt.elem_type, dims)
    for t in graph.initializer:
        out.setdefault(t.name, (t.data_type, list(t.dims)))
    for node in graph.node:
        for _, sub in subgraphs(node):
            _collect(sub, out)


def light_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without its large weights: each initializer over SMALL bytes becomes a graph input of
    the same type and shape. Shape inference and the checker see the same graph, for a fraction of
    the cost."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.metadata_props.extend(model.metadata_props)
    _light_graph(model.graph, light.graph)
    return light


def infer_shapes(model: onnx.ModelProto) -> Shapes:
    """name -> (elem_type, dims) for every tensor whose type could be inferred (dims: int or None)."""
    light = light_model(model)
    shapes: Shapes = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, not a requirement: sites that need a shape say so
        inferred = light
    _collect(inferred.graph, shapes)
    return shapes
