"""Folding a per-channel affine map on a linear layer's INPUT into that layer.

Used by the BatchNormalization fold when no linear layer writes the BN's input but one reads its
output (a BatchNorm1d between a Relu and a Linear head, an MLP's Linear -> Relu -> BN -> Linear, a
BN on the model's input). With the BN as x' = s * x + t along axis 1 of x:

    Conv     W (M, C/group, k...): W'[o, j] = W[o, j] * s[c],  b'[o] = b[o] + sum_{j,k} W[o, j, k] * t[c]
             with c = (o // (M/group)) * (C/group) + j, the input channel that W[o, j] reads.
             Only without padding: a padded border reads zeros of x', to which no t was added,
             while b' adds t's share for every tap.
    Gemm     Y = alpha * A @ B + beta * C with A = x' (transA=0; A's axis 1 is the contracted K):
             B' = diag(s) B (rows of B, or columns when transB=1), C' = beta * C + alpha * (t @ B),
             beta := 1.
    MatMul   x' of rank 2 (BN's axis 1 is then the contracted last axis), W (K, N) constant:
             W' = diag(s) W, bias' = bias + t @ W (an Add is created when the MatMul has none).

The per-channel constant chains that Keras writes for a BatchNorm with no linear layer before it
(`Mul(C) -> Add(C)`, see channel_affine.py) fold the same way; their channels may reach the layer
through Transposes (tf2onnx's NHWC -> NCHW before a Conv), and a MatMul takes them along the last
axis of an input of any rank (the contracted axis): x' @ W = x @ (diag(s) W) + t @ W.

All arithmetic is float64; results are stored in the dtype of the constants they replace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from normfold.graph import FLOAT_TYPES, GraphView, attr, label
from normfold.passes import Left
from normfold.passes._linear import (MAX_CHAIN, FoldPlan, _bias_name, finish_plan, is_passthrough, overridable,
                                     sole_value_reader, store_plan)

NEXT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class NextLayer:
    core: list[onnx.NodeProto]  # [layer] or [MatMul, Add(bias)]
    through: list[onnx.NodeProto] = field(default_factory=list)  # Identity / inference Dropout (/ Transpose) before it

    @property
    def layer(self) -> onnx.NodeProto:
        return self.core[0]

    @property
    def op(self) -> str:
        return self.layer.op_type

    @property
    def bias_add(self) -> onnx.NodeProto | None:
        return self.core[1] if len(self.core) > 1 else None


def _is_transpose(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "Transpose" and node.domain in ("", "ai.onnx")


def find_next_layer(view: GraphView, tensor: str, transposes: bool = False) -> NextLayer | None:
    """The Conv/Gemm/MatMul that is the one reader of `tensor` (Shape readers aside, and perhaps
    behind Identity or inference Dropout nodes, and with `transposes` Transpose nodes), reading it
    as its data input (by structure only; check_next_layer checks the rest)."""
    through: list[onnx.NodeProto] = []
    reader = sole_value_reader(view, tensor)
    while ((is_passthrough(view, reader) or (transposes and _is_transpose(reader)))
           and reader.input[0] == tensor and len(through) < MAX_CHAIN):
        through.append(reader)
        tensor = reader.output[0]
        reader = sole_value_reader(view, tensor)
    if (reader is None or reader.op_type not in NEXT_OPS or reader.domain not in ("", "ai.onnx")
            or len(reader.input) < 2 or reader.input[0] != tensor or tensor in reader.input[1:]):
        return None
    core = [reader]
    if reader.op_type == "MatMul":  # MatMul -> Add(constant bias), as exporters write Linear/Dense
        add = view.sole_user(reader.output[0])
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.input) == 2:
            other = add.input[1] if add.input[0] == reader.output[0] else add.input[0]
            if other != reader.output[0] and view.is_const(other):
                core.append(add)
    return NextLayer(core, through)


def _pads_nothing(node: onnx.NodeProto, kernel: tuple[int, ...]) -> bool:
    """Whether the Conv reads no padding: explicit pads all zero (or VALID), or SAME with a 1x1 kernel
    (whose SAME padding is zero for every stride)."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return True
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in kernel)
    return not any(attr(node, "pads", []) or [])


def layer_axis(view: GraphView, layer: NextLayer, axis: int) -> tuple[int, int] | None:
    """(position, rank) at the layer's data input of `axis` (counted from the end, negative) of the
    tensor its `through` nodes read, following the Transposes; None when a rank is unknown."""
    rank = view.rank(layer.layer.input[0])
    if rank is None and layer.op == "Conv":
        weight = view.const_shape(layer.layer.input[1])
        rank = len(weight) if weight else None
    if rank is None and layer.op == "Gemm":
        rank = 2
    if rank is None or not -rank <= axis < 0:
        return None
    pos = axis + rank
    for node in layer.through:
        if _is_transpose(node):
            perm = attr(node, "perm") or list(reversed(range(rank)))
            if len(perm) != rank:
                return None
            pos = list(perm).index(pos)
    return pos, rank


def check_next_layer(view: GraphView, layer: NextLayer, site_input: str, axis: int = 1) -> tuple[int, Left | None]:
    """(input channel count, refusal or None): can `layer` absorb an affine map along axis `axis`
    of its input `site_input` (1 for a BatchNormalization)? The count is 0 when unknown."""
    node = layer.layer
    if not view.is_const(node.input[1]):
        return 0, Left("non-constant-weights", f"{layer.op} {label(node)} weight {node.input[1]!r} is not a constant"
                       + overridable(view, node.input[1]))
    bias = _bias_name(layer)
    if bias and not view.is_const(bias):
        return 0, Left("non-constant-weights", f"{layer.op} {label(node)} bias {bias!r} is not a constant"
                       + overridable(view, bias))
    elem = view.elem_type(node.input[1])
    if elem is None:
        elem = onnx.helper.np_dtype_to_tensor_dtype(view.const(node.input[1]).dtype)
    if elem not in FLOAT_TYPES:
        return 0, Left("unsupported-dtype", f"{layer.op} {label(node)} weight has type "
                                            f"{onnx.TensorProto.DataType.Name(elem)}")
    shape = view.const_shape(node.input[1])
    if layer.op in ("Conv", "Gemm") and axis != 1:
        return 0, Left("no-linear-producer", f"the {layer.op} {label(node)} after it reads its channels on axis 1, "
                                             f"not on axis {axis}, the one the constants scale")
    if layer.op == "Conv":
        if len(shape) < 3:
            return 0, Left("unsupported-attribute", f"Conv {label(node)} weight has rank {len(shape)}")
        if not _pads_nothing(node, shape[2:]):
            return 0, Left("no-linear-producer", f"the Conv {label(node)} after it pads its input: the padded "
                                                 "border would miss the BN's shift, so it cannot move into the Conv")
        return shape[1] * int(attr(node, "group", 1)), None
    if layer.op == "Gemm":
        if attr(node, "transA", 0):
            return 0, Left("no-linear-producer", f"the Gemm {label(node)} after it has transA=1: BN's axis 1 is "
                                                 "then the Gemm's output rows, which it cannot scale")
        return (shape[1] if attr(node, "transB", 0) else shape[0]), None
    rank = view.rank(site_input)
    if len(shape) != 2 or rank is None or rank < 2 or axis != rank - 1:
        why = (f"its weight has rank {len(shape)}" if len(shape) != 2 else
               f"its input has rank {rank}, so axis {axis} is not the contracted (last) axis" if rank is not None
               else "the rank of its input is unknown")
        return 0, Left("no-linear-producer" if rank is not None or len(shape) != 2 else "unknown-shape",
                       f"the MatMul {label(node)} after it cannot absorb the BN: {why}")
    return shape[0], None


def plan_into_next(view: GraphView, layer: NextLayer, scale: np.ndarray, shift: np.ndarray,
                   channels: int) -> FoldPlan | Left:
    """The constants that fold x' = scale * x + shift (along x's axis 1) into the layer reading x'."""
    node = layer.layer
    scale = np.broadcast_to(np.asarray(scale, np.float64), (channels,))
    shift = np.broadcast_to(np.asarray(shift, np.float64), (channels,))
    weight = view.const(node.input[1])
    dtype = weight.dtype
    w64 = weight.astype(np.float64)
    bias_name = _bias_name(layer)
    reset_beta = False
    if layer.op == "Conv":
        group, out = int(attr(node, "group", 1)), weight.shape[0]
        # the input channel each W[o, j] reads: the j-th of o's group
        taps = (channels // group) * (np.arange(out) // (out // group))[:, None] + np.arange(weight.shape[1])[None, :]
        spread = taps.shape + (1,) * (weight.ndim - 2)
        new_w = w64 * scale[taps].reshape(spread)
        added = (w64 * shift[taps].reshape(spread)).reshape(out, -1).sum(axis=1)
        base = view.const(bias_name).astype(np.float64) if bias_name else np.zeros(out)
        new_b = base + added
    elif layer.op == "Gemm":
        trans_b, alpha, beta = attr(node, "transB", 0), float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        b_kn = w64.T if trans_b else w64  # (K, N)
        new_w = (b_kn * scale[:, None]).T if trans_b else b_kn * scale[:, None]
        added = alpha * (shift @ b_kn)
        base = view.const(bias_name).astype(np.float64) * beta if bias_name else np.zeros(b_kn.shape[1])
        new_b = base + added  # C ([], [N], [1, N] or [M, N]) plus a row along N
        reset_beta = beta != 1.0
    else:  # MatMul
        new_w = w64 * scale[:, None]
        added = shift @ w64
        if bias_name:
            bias = view.const(bias_name)
            new_b = (bias.astype(np.float64) + added).reshape(np.broadcast_shapes(bias.shape, added.shape))
        else:
            new_b = added
    exact: list[tuple[np.ndarray, np.ndarray]] = []  # (stored, exact) pairs
    stored_w = stored_b = None
    with np.errstate(over="ignore"):  # an overflow is refused below, by name
        if not np.all(scale == 1.0):
            stored_w = new_w.astype(dtype)
            exact.append((stored_w, new_w))
        if bias_name or np.any(new_b != 0):
            stored_b = new_b.astype(view.const(bias_name).dtype if bias_name else dtype)
            exact.append((stored_b, new_b))
    return finish_plan(layer.op, node, exact, stored_w, stored_b, reset_beta and stored_b is not None)


def apply_into_next(view: GraphView, layer: NextLayer, plan: FoldPlan) -> list[str]:
    """Write the plan's constants into the layer. Returns notes for the report."""
    node = layer.layer
    notes: list[str] = []
    if not store_plan(view, layer, plan, notes):
        # a bias Add after the MatMul, writing the MatMul's old output so that its readers stay wired
        out = node.output[0]
        view.rename_output(node, 0, view.unique_name(f"{out}_unbiased"))
        bias_name = view.add_initializer(f"{node.name or 'MatMul'}_bias_folded", plan.bias)
        add = onnx.helper.make_node("Add", [node.output[0], bias_name], [out],
                                    name=view.unique_name(f"{node.name or 'MatMul'}_bias"))
        view.add_node(add, after=node)
        if out in view.shapes:
            view.shapes[node.output[0]] = view.shapes[out]
        notes.append(f"created Add {add.name} for the folded bias")
    return notes
