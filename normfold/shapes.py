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


def _collect(graph: onnx.GraphProto, out: Shapes, nested: bool = False) -> None:
    """Shapes by name. A subgraph's entries never replace an enclosing graph's: a name a subgraph
    shadows is looked up as unknown there (GraphView.dims), and the outer value keeps its own."""
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if nested:
            out.setdefault(vi.name, (tt.elem_type, dims))
        else:
            out[vi.name] = (tt.elem_type, dims)
    for t in graph.initializer:
        out.setdefault(t.name, (t.data_type, list(t.dims)))
    for node in graph.node:
        for _, sub in subgraphs(node):
            _collect(sub, out, nested=True)


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


def _infer(light: onnx.ModelProto) -> Shapes:
    shapes: Shapes = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, not a requirement: sites that need a shape say so
        inferred = light
    _collect(inferred.graph, shapes)
    return shapes


def infer_shapes(model: onnx.ModelProto) -> Shapes:
    """name -> (elem_type, dims) for every tensor whose type could be inferred (dims: int or None).

    Exporters compute Reshape targets in the graph (tf2onnx: `Cast(C)`; a dynamic batch:
    `Concat(Shape(x)[0:1], [H, W, G, C/G])` through Cast/Squeeze/Div/Unsqueeze), and onnx's
    inference then loses the rank of everything after them. Where that happens, the targets are
    evaluated here (a dynamic dimension as 0, "copy the input's", where it stands at its own
    index, or as -1) and inference runs once more on the light copy with them as constants."""
    light = light_model(model)
    shapes = _infer(light)
    if _fill_reshape_targets(light.graph, shapes):
        shapes = _infer(light)
    return shapes


# The int input that decides each op's output shape (a Reshape target, reduction axes), by position.
_SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1, "Squeeze": 1, "Unsqueeze": 1,
                **{op: 1 for op in ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceMax", "ReduceMin",
                                    "ReduceProd", "ReduceL1", "ReduceL2")}}


def _fill_reshape_targets(graph: onnx.GraphProto, shapes: Shapes) -> bool:
    """Give every Reshape/Expand/ConstantOfShape/Tile/Squeeze/Unsqueeze/Reduce* whose output lost its
    shape a constant shape input (a target, axes) where the graph computes it (in the light copy
    only). Returns whether it changed any."""
    from normfold.shape_values import ShapeValues  # small; only for graphs that need it

    values = None
    changed = False
    for node in graph.node:
        at = _SHAPE_INPUT.get(node.op_type)
        if at is None or node.domain not in ("", "ai.onnx") or len(node.input) <= at or not node.output:
            continue
        out = shapes.get(node.output[0])
        if out is not None and out[1] is not None and None not in out[1]:
            continue
        values = values or ShapeValues(graph, shapes)
        target = values.value(node.input[at])
        if target is None:
            continue
        if node.op_type == "Reshape":
            allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
            target = None if allow_zero and not all(isinstance(t, int) for t in target) else \
                values.reshape_target(node.input[0], target) or target
        if target is not None and not all(isinstance(t, int) for t in target):
            changed |= _annotate(graph, node, target, shapes)
            continue
        if target is None:
            continue
        name = f"{node.input[at]}__normfold_shape"
        if not any(t.name == name for t in graph.initializer):
            graph.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.INT64, [len(target)], target))
        node.input[at] = name
        changed = True
    return changed


def _annotate(graph: onnx.GraphProto, node: onnx.NodeProto, target: list, shapes: Shapes) -> bool:
    """A shape with symbols for an output whose target holds dynamic dimensions of other tensors
    (["input:0", "input:1", 32] after a Tensordot): written as value_info with dim_params in the
    light copy, so inference keeps the rank and the static sizes downstream."""
    if node.op_type == "ConstantOfShape":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        elem = value.data_type if value is not None else onnx.TensorProto.FLOAT
    else:
        info = shapes.get(node.input[0])
        elem = info[0] if info is not None else None
    if elem is None or any(isinstance(t, int) and t < 0 for t in target):
        return False
    if node.op_type == "Reshape" and any(t == 0 for t in target):
        return False  # 0 copies an input dimension: leave it to inference
    dims = [t if isinstance(t, int) else str(t) for t in target]
    graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], elem, dims))
    return True
