"""Folding a per-channel affine map `y' = s * y + t` into the linear layer that writes `y`.

Shared by the BatchNormalization fold (s = gamma / sqrt(var + eps), t = beta - mean * s) and the
fold of TF-style `Mul(C)` / `Add(C)` constants. All arithmetic is float64; results are stored in
the dtype of the tensor they replace.

Where the output channel lives in each layer's constants:

    Conv           W (M, C/group, k...)        scale W along axis 0; b' = b * s + t
    ConvTranspose  W (C_in, M/group, k...)     view W as (group, C_in/group, M/group, k...),
                                               scale along the M/group axis; b' = b * s + t
    Gemm           Y = alpha * A @ B' + beta * C, B' = B (K, N) or B.T when transB=1:
                   scale B along N; C' = beta * C * s + t, beta := 1
    MatMul [+Add]  Y = X @ W (K, N) [+ bias]: scale W along axis 1; bias' = bias * s + t
                   (an Add is created for t when there was no bias)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from normfold.graph import FLOAT_TYPES, GraphView, attr, label, set_attr
from normfold.passes import Left

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LinearLayer:
    nodes: list[onnx.NodeProto]  # [layer] or [MatMul, Add(bias)]
    op: str
    output: str  # the tensor the layer (with its bias Add) writes
    channel_axis: int  # axis of the output that holds output channels (-1: last)
    out_rank: int | None

    @property
    def layer(self) -> onnx.NodeProto:
        return self.nodes[0]

    @property
    def bias_add(self) -> onnx.NodeProto | None:
        return self.nodes[1] if len(self.nodes) > 1 else None


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def find_linear_layer(view: GraphView, tensor: str) -> LinearLayer | None:
    """The linear layer that writes `tensor`, by structure only (constness is checked later)."""
    node = view.producer.get(tensor)
    if node is None or not _is_default_domain(node):
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        return LinearLayer([node], node.op_type, tensor, 1, view.rank(node.input[1]) if len(node.input) > 1 else None)
    if node.op_type == "Gemm":
        return LinearLayer([node], "Gemm", tensor, 1, 2)
    if node.op_type == "MatMul":
        return LinearLayer([node], "MatMul", tensor, -1, view.rank(tensor))
    if node.op_type == "Add":
        # MatMul -> Add(bias): the bias belongs to the layer (what exporters write for Linear/Dense).
        for i, name in enumerate(node.input[:2]):
            other = node.input[1 - i]
            mm = view.producer.get(other)
            if (mm is not None and mm.op_type == "MatMul" and _is_default_domain(mm)
                    and view.is_const(name) and view.is_const(mm.input[1])
                    and view.sole_user(other) is node):
                bias = view.const(name)
                w = view.const(mm.input[1])
                if w.ndim == 2 and _per_channel(bias.shape, w.shape[1], -1, view.rank(tensor)):
                    return LinearLayer([mm, node], "MatMul", tensor, -1, view.rank(tensor))
    return None


def _per_channel(shape: tuple, channels: int, axis: int, out_rank: int | None) -> bool:
    """Does a constant of `shape` broadcast against the layer output along the channel axis only
    (and without growing the output's rank)?"""
    if len(shape) == 0:
        return True
    if out_rank is None:
        # Without the output rank only a shape that cannot raise it is safe: rank 1 along the last axis.
        if axis != -1 or len(shape) > 1:
            return False
        return shape[0] in (1, channels)
    if len(shape) > out_rank:
        return False
    padded = (1,) * (out_rank - len(shape)) + tuple(shape)
    ch = axis % out_rank
    return all(d == 1 for i, d in enumerate(padded) if i != ch) and padded[ch] in (1, channels)


def channel_count(view: GraphView, layer: LinearLayer) -> int | None:
    node = layer.layer
    w = view.const(node.input[1])
    if w is None or w.ndim < 2:
        return None
    if layer.op == "Conv":
        return w.shape[0]
    if layer.op == "ConvTranspose":
        return w.shape[1] * int(attr(node, "group", 1))
    if layer.op == "Gemm":
        return w.shape[0] if attr(node, "transB", 0) else w.shape[1]
    return w.shape[1] if w.ndim == 2 else None


def check_layer(view: GraphView, layer: LinearLayer, site_input: str) -> Left | None:
    """Can `layer` absorb a per-channel affine map applied to its output `site_input`?"""
    node = layer.layer
    if view.is_graph_output(site_input) or len(view.users(site_input)) != 1:
        return Left("intermediate-used-elsewhere",
                    f"{layer.op} {label(node)} output {site_input!r} is also used elsewhere"
                    + (" (graph output)" if view.is_graph_output(site_input) else ""))
    if len(node.input) < 2 or not view.is_const(node.input[1]):
        return Left("non-constant-weights", f"{layer.op} {label(node)} weight {node.input[1]!r} is not a constant")
    weight = view.const(node.input[1])
    bias_name = _bias_name(layer)
    if bias_name and not view.is_const(bias_name):
        return Left("non-constant-weights", f"{layer.op} {label(node)} bias {bias_name!r} is not a constant")
    if view.elem_type(node.input[1]) not in FLOAT_TYPES and weight.dtype.kind != "f" and str(weight.dtype) != "bfloat16":
        return Left("unsupported-dtype", f"{layer.op} {label(node)} weight has dtype {weight.dtype}")
    if layer.op == "Gemm" and attr(node, "transA", 0) not in (0, 1):
        return Left("unsupported-attribute", f"Gemm {label(node)} has an invalid transA")
    if layer.op == "MatMul" and weight.ndim != 2:
        return Left("unsupported-attribute", f"MatMul {label(node)} weight has rank {weight.ndim}, not 2")
    return None


def _bias_name(layer: LinearLayer) -> str | None:
    node = layer.layer
    if layer.op in ("Conv", "ConvTranspose", "Gemm"):
        return node.input[2] if len(node.input) > 2 and node.input[2] else None
    add = layer.bias_add
    if add is None:
        return None
    return add.input[0] if add.input[1] == layer.layer.output[0] else add.input[1]


def _store(view: GraphView, node: onnx.NodeProto, index: int, value: np.ndarray, notes: list[str],
           what: str) -> None:
    """Put `value` at input `index` of `node`: in place when only `node` reads the initializer,
    otherwise as a new initializer, so other readers keep the old value."""
    name = node.input[index] if index < len(node.input) else ""
    if name and name in view.initializers and name not in view.input_names and view.uses_of_initializer(name) == 1:
        view.set_initializer(name, value)
        return
    new_name = view.add_initializer(f"{node.name or node.op_type}_{what}_folded", value)
    if name and view.uses_of_initializer(name) > 1:
        others = len(view.users(name)) - 1
        notes.append(f"{what} {name!r} is shared with {others} other node(s); "
                     f"cloned as {new_name!r} so they keep the original")
    view.replace_input(node, index, new_name)


def _rounding(stored: np.ndarray, exact: np.ndarray) -> float:
    diff = np.abs(stored.astype(np.float64) - exact)
    return float(diff.max()) if diff.size else 0.0


def fold_into_layer(view: GraphView, layer: LinearLayer, scale: np.ndarray, shift: np.ndarray,
                    channels: int) -> tuple[list[str], float]:
    """Fold `y' = scale * y + shift` (float64 vectors of length `channels`) into `layer`.
    Returns notes for the report and the largest rounding change of the stored constants."""
    node = layer.layer
    notes: list[str] = []
    rounding = 0.0
    scale = np.broadcast_to(np.asarray(scale, np.float64), (channels,))
    shift = np.broadcast_to(np.asarray(shift, np.float64), (channels,))
    weight = view.const(node.input[1])
    dtype = weight.dtype

    if not np.all(scale == 1.0):
        w = weight.astype(np.float64)
        if layer.op == "Conv":
            w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        elif layer.op == "ConvTranspose":
            group = int(attr(node, "group", 1))
            grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
            per_group = scale.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
            w = (grouped * per_group).reshape(w.shape)
        elif layer.op == "Gemm":
            w = w * (scale[:, None] if attr(node, "transB", 0) else scale[None, :])
        else:  # MatMul
            w = w * scale[None, :]
        stored = w.astype(dtype)
        rounding = max(rounding, _rounding(stored, w))
        _store(view, node, 1, stored, notes, "weight")

    bias_name = _bias_name(layer)
    if layer.op in ("Conv", "ConvTranspose"):
        b = view.const(bias_name).astype(np.float64) if bias_name else np.zeros(channels)
        new_b = b * scale + shift
        stored = new_b.astype(dtype)
        rounding = max(rounding, _rounding(stored, new_b))
        if bias_name or np.any(new_b != 0):
            _store(view, node, 2, stored, notes, "bias")
    elif layer.op == "Gemm":
        beta = float(attr(node, "beta", 1.0))
        c = view.const(bias_name).astype(np.float64) * beta if bias_name else np.zeros(channels)
        new_c = c * scale + shift  # broadcasts C ([], [N], [1, N] or [M, N]) along N
        stored = new_c.astype(dtype)
        rounding = max(rounding, _rounding(stored, new_c))
        if bias_name or np.any(new_c != 0):
            _store(view, node, 2, stored, notes, "bias")
            if beta != 1.0:
                set_attr(node, "beta", 1.0)
    else:  # MatMul [+ Add]
        add = layer.bias_add
        if add is not None:
            index = 0 if add.input[0] == bias_name else 1
            bias = view.const(bias_name)
            new_b = np.broadcast_to(bias.astype(np.float64), (channels,)) * scale + shift
            stored = new_b.reshape(bias.shape if bias.size == channels else (channels,)).astype(bias.dtype)
            rounding = max(rounding, _rounding(stored.reshape(-1), new_b))
            _store(view, add, index, stored, notes, "bias")
        elif np.any(shift != 0):
            stored = shift.astype(dtype)
            rounding = max(rounding, _rounding(stored, shift))
            bias_name = view.add_initializer(f"{node.name or 'MatMul'}_bias_folded", stored)
            add = onnx.helper.make_node("Add", [node.output[0], bias_name], [view.unique_name(f"{node.output[0]}_biased")],
                                        name=view.unique_name(f"{node.name or 'MatMul'}_bias"))
            view.add_node(add, after=node)
            layer.nodes.append(add)
            notes.append(f"created Add {add.name} for the folded bias")
    return notes, rounding


def retarget_output(view: GraphView, layer: LinearLayer, removed: onnx.NodeProto) -> None:
    """Remove the folded node `removed` and make the layer write its output tensor instead, so every
    consumer (and a graph output of that name) stays wired."""
    out = removed.output[0]
    view.remove(removed)
    last = layer.nodes[-1]
    view.rename_output(last, 0, out)
