"""Small helpers the rules share: op tests, the one reader of a tensor, reduction axes, constants."""

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


def reduce_axes(view: GraphView, node: onnx.NodeProto) -> tuple[int, ...] | None:
    """Axes of a Reduce* node: the `axes` attribute (opset < 18) or the constant second input
    (opset >= 18, possibly written by a Constant or Cast node: `view.const` evaluates those). None
    when unknown or all axes."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = view.const(node.input[1])
        if value is None:
            return None
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    if not axes:
        return None
    return tuple(int(a) for a in axes)


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


def channel_vector(value: np.ndarray | None, dims: list) -> np.ndarray | None:
    """A [C] vector when `value` broadcast against X (N, C, *S) varies along the channel axis only
    (shapes [C,1,..], [1,C,1,..], [1], scalars) and does not widen X's shape; else None (also when X
    has no channel axis: a rank-1 X reaches here from the GroupNorm match, before its rank is checked)."""
    if value is None or len(dims) < 2 or not isinstance(dims[1], int):
        return None
    rank, channels = len(dims), dims[1]
    shape = list(value.shape)
    if len(shape) > rank:
        return None
    padded = [1] * (rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(padded[1]), (channels,)).copy()


def in_graph_order(view: GraphView, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    ids = {id(n) for n in nodes}
    ordered = [n for n in view.nodes if id(n) in ids]
    return ordered if len(ordered) == len(ids) else nodes


def shown_dims(dims: list) -> str:
    """Dimensions as a report writes them: a dynamic size is `?` (not Python's None)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
