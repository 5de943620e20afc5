"""Small helpers for matching elementwise/reduce chains, shared by the norm fusions."""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr


def is_op(node: onnx.NodeProto | None, *op_types: str) -> bool:
    return node is not None and node.op_type in op_types and node.domain in ("", "ai.onnx")


def user(view: GraphView, tensor: str, *op_types: str) -> onnx.NodeProto | None:
    """The one node of `op_types` that reads `tensor`, if there is exactly one."""
    found = [n for n in view.users(tensor) if is_op(n, *op_types)]
    return found[0] if len(found) == 1 else None


def other_input(node: onnx.NodeProto, tensor: str) -> str | None:
    """The input of a binary node that is not `tensor` (None if `tensor` is not an input)."""
    if len(node.input) != 2:
        return None
    if node.input[0] == tensor:
        return node.input[1]
    if node.input[1] == tensor:
        return node.input[0]
    return None


def scalar(view: GraphView, tensor: str | None) -> float | None:
    """The value of a constant with exactly one element."""
    if tensor is None:
        return None
    value = view.const(tensor)
    if value is None or value.size != 1:
        return None
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def reduce_axes(view: GraphView, node: onnx.NodeProto) -> tuple[int, ...] | None:
    """Axes of a Reduce* node: the `axes` attribute (opset < 18) or the constant second input
    (opset >= 18, possibly written by a Constant or Cast node). None when unknown or all axes."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = view.const(node.input[1])
        if value is None:
            cast = view.producer.get(node.input[1])
            if is_op(cast, "Cast"):
                value = view.const(cast.input[0])
        if value is None:
            return None
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    if not axes:
        return None
    return tuple(int(a) for a in axes)


def trailing_count(axes: tuple[int, ...], rank: int | None) -> int | None:
    """k when `axes` are exactly the last k axes of a rank-`rank` tensor (in any order), else None."""
    k = len(axes)
    if len(set(axes)) != k:
        return None
    if rank is not None:
        normal = sorted(a % rank if -rank <= a < rank else -1 for a in axes)
        return k if normal == list(range(rank - k, rank)) else None
    # Rank unknown: only negative axes can be shown to be trailing.
    return k if sorted(axes) == list(range(-k, 0)) else None


def is_mean(node: onnx.NodeProto | None) -> bool:
    """ReduceMean, or GlobalAveragePool (tf2onnx writes it for a mean over the last axis of a
    rank-3 tensor; it averages every axis after the first two, keeping them as size 1)."""
    return is_op(node, "ReduceMean", "GlobalAveragePool")


def mean_axes(view: GraphView, node: onnx.NodeProto) -> tuple[int, ...] | None:
    """The axes a mean node reduces (None when unknown), and always with keepdims for GAP."""
    if node.op_type == "GlobalAveragePool":
        rank = view.rank(node.input[0])
        return tuple(range(2, rank)) if rank is not None and rank > 2 else None
    return reduce_axes(view, node)


def keeps_dims(node: onnx.NodeProto) -> bool:
    return node.op_type == "GlobalAveragePool" or attr(node, "keepdims", 1) == 1


FLOAT_CASTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


def float_cast(node: onnx.NodeProto | None) -> bool:
    """A Cast between floating-point types (exporters wrap fp16 norms in these)."""
    return is_op(node, "Cast") and attr(node, "to") in FLOAT_CASTS


def through_cast(view: GraphView, tensor: str, nodes: list) -> str:
    """If the only reader of `tensor` is a float Cast, step over it (adding it to `nodes`)."""
    readers = view.users(tensor)
    if len(readers) == 1 and float_cast(readers[0]) and not view.is_graph_output(tensor):
        nodes.append(readers[0])
        return readers[0].output[0]
    return tensor


def normalized_shape(shape: tuple, k: int, rank: int | None, norm_shape: tuple | None) -> tuple | None:
    """The normalized shape a gamma/beta of `shape` implies, if it varies only along the last k axes,
    does not add axes to a rank-`rank` input, and is compatible with `norm_shape` (when known)."""
    if rank is not None and len(shape) > rank:
        return None
    if any(d != 1 for d in shape[:max(0, len(shape) - k)]):
        return None
    tail = (1,) * max(0, k - len(shape)) + tuple(shape[max(0, len(shape) - k):])
    if norm_shape is not None:
        return norm_shape if all(t in (1, n) for t, n in zip(tail, norm_shape)) else None
    return tail if 1 not in tail else None


def reuse_or_add(view: GraphView, name: str | None, value: np.ndarray, base: str) -> str:
    """Use the existing initializer when it already holds exactly `value`; otherwise add one."""
    if name and name in view.initializers and name not in view.input_names:
        current = view.const(name)
        if current.shape == value.shape and current.dtype == value.dtype and np.array_equal(current, value):
            return name
    return view.add_initializer(base, np.ascontiguousarray(value))
