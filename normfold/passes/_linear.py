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

from dataclasses import dataclass, field

import numpy as np
import onnx

from normfold.graph import FLOAT_TYPES, GraphView, attr, label, set_attr
from normfold.passes import Left

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LinearLayer:
    core: list[onnx.NodeProto]  # [layer] or [MatMul, Add(bias)]
    op: str
    output: str  # the tensor the site reads: the layer's output, after `chain`
    channel_axis: int  # axis of `output` that holds the layer's output channels (-1: last)
    out_rank: int | None  # rank of `output`
    chain: list[onnx.NodeProto] = field(default_factory=list)  # layout ops between layer and site

    @property
    def layer(self) -> onnx.NodeProto:
        return self.core[0]

    @property
    def bias_add(self) -> onnx.NodeProto | None:
        return self.core[1] if len(self.core) > 1 else None

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return self.core + self.chain


# Ops that move data without changing values, so a per-channel constant after them is still one
# per output channel of the layer before them (tf2onnx puts convs between Transposes, Keras' Conv1D
# behind a Squeeze and Dense behind Reshapes, mixed precision behind a Cast to float32, TorchScript
# a BatchNorm1d over tokens behind a Flatten, the dynamo exporter an eval-mode Dropout as Identity).
LAYOUT_OPS = ("Transpose", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Cast", "Identity", "Dropout")
MAX_CHAIN = 4

# Readers of a tensor's shape only. A fold keeps every shape, so these stay valid: they do not make
# a tensor "used elsewhere" (LeViT's `bn(x.flatten(0, 1)).reshape_as(x)` reads Shape(x)).
SHAPE_READERS = ("Shape", "Size")


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def value_readers(view: GraphView, tensor: str) -> list[onnx.NodeProto]:
    """The nodes that read `tensor`'s values: every reader but Shape and Size."""
    return [n for n in view.users(tensor) if not (n.op_type in SHAPE_READERS and _is_default_domain(n))]


def sole_value_reader(view: GraphView, tensor: str) -> onnx.NodeProto | None:
    """The one node that reads `tensor`'s values (Shape readers aside), when it is not a graph output."""
    readers = value_readers(view, tensor)
    return readers[0] if len(readers) == 1 and not view.is_graph_output(tensor) else None


def redirect_shape_readers(view: GraphView, old: str, new: str) -> None:
    """Make the Shape/Size readers of `old` read `new`, a tensor of the same shape (before `old` goes)."""
    for node in view.users(old):
        if node.op_type in SHAPE_READERS and _is_default_domain(node):
            for i, name in enumerate(node.input):
                if name == old:
                    view.replace_input(node, i, new)


def is_passthrough(view: GraphView, node: onnx.NodeProto | None) -> bool:
    """An Identity, or a Dropout that is one at inference: no training_mode (or a constant false
    one; before opset 7, is_test=1) and no mask output used."""
    if node is None or not _is_default_domain(node):
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type != "Dropout" or any(o and (view.users(o) or view.is_graph_output(o)) for o in node.output[1:]):
        return False
    if view.opset < 7:  # Dropout-1/6 drops values unless is_test=1
        return attr(node, "is_test", 0) == 1
    if len(node.input) > 2 and node.input[2]:
        mode = view.const(node.input[2])
        return mode is not None and mode.size == 1 and not bool(mode.reshape(-1)[0])
    return True


def _core(view: GraphView, tensor: str) -> LinearLayer | None:
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
                    and sole_value_reader(view, other) is node):
                bias, w = view.const_shape(name), view.const_shape(mm.input[1])
                if len(w) == 2 and _per_channel(bias, w[1], -1, view.rank(tensor)):
                    return LinearLayer([mm, node], "MatMul", tensor, -1, view.rank(tensor))
    return None


def _through(view: GraphView, node: onnx.NodeProto, axis: int, rank: int | None) -> tuple[int, int | None] | None:
    """Where the channel axis goes through a layout op: (axis, rank) of its output, or None when
    the op mixes channels with other axes or the shapes needed are unknown."""
    out_rank = view.rank(node.output[0])
    if node.op_type == "Cast":
        return (axis, rank) if attr(node, "to") in FLOAT_TYPES else None
    if node.op_type in ("Identity", "Dropout"):
        return (axis, rank) if is_passthrough(view, node) else None
    if rank is None or out_rank is None:
        return None
    pos = axis % rank
    if node.op_type == "Flatten":
        # [d0..d(a-1), da..d(r-1)] -> [prod(d0..d(a-1)), prod(da..d(r-1))]: the channels stay an
        # axis of their own only when every other axis merged with them has size 1.
        split = int(attr(node, "axis", 1))
        split = split + rank if split < 0 else split
        dims = view.dims(node.input[0])
        group = range(0, split) if pos < split else range(split, rank)
        if dims is None or not 0 <= split <= rank or any(dims[i] != 1 for i in group if i != pos):
            return None
        return (0 if pos < split else 1), 2
    if node.op_type == "Transpose":
        perm = attr(node, "perm") or list(reversed(range(rank)))
        return list(perm).index(pos), out_rank
    if node.op_type in ("Squeeze", "Unsqueeze"):
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1:
            value = view.const(node.input[1])
            axes = None if value is None else [int(a) for a in value.reshape(-1)]
        if axes is None:
            return None
        if node.op_type == "Squeeze":
            axes = sorted(a % rank for a in axes)
            return (None if pos in axes else (pos - sum(a < pos for a in axes), out_rank))
        axes = sorted(a % out_rank for a in axes)
        new = pos
        for a in axes:  # inserted positions, in increasing order
            if a <= new:
                new += 1
        return new, out_rank
    if node.op_type == "Reshape":
        # Only a reshape that keeps the channels as the (unchanged) last axis.
        before, after = view.dims(node.input[0]), view.dims(node.output[0])
        if pos == rank - 1 and before and after and isinstance(before[-1], int) and before[-1] == after[-1]:
            return out_rank - 1, out_rank
        return None
    return None


def find_linear_layer(view: GraphView, tensor: str) -> LinearLayer | None:
    """The linear layer that writes `tensor`, perhaps behind a few layout ops, by structure only
    (constness and single use are checked by check_layer)."""
    chain: list[onnx.NodeProto] = []
    while True:
        layer = _core(view, tensor)
        if layer is not None:
            break
        node = view.producer.get(tensor)
        if (node is None or not _is_default_domain(node) or node.op_type not in LAYOUT_OPS or len(chain) >= MAX_CHAIN
                or not node.input or not node.input[0]):
            return None
        chain.insert(0, node)
        tensor = node.input[0]
    axis, rank = layer.channel_axis, layer.out_rank
    for node in chain:
        moved = _through(view, node, axis, rank)
        if moved is None:
            return None
        axis, rank = moved
    layer.chain = chain
    layer.output = chain[-1].output[0] if chain else layer.output
    layer.channel_axis, layer.out_rank = axis, rank
    return layer


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
    w = view.const_shape(node.input[1])
    if w is None or len(w) < 2:
        return None
    if layer.op == "Conv":
        return w[0]
    if layer.op == "ConvTranspose":
        return w[1] * int(attr(node, "group", 1))
    if layer.op == "Gemm":
        return w[0] if attr(node, "transB", 0) else w[1]
    return w[1] if len(w) == 2 else None


def overridable(view: GraphView, name: str) -> str:
    """Why `name` is not a constant when it is an initializer listed as a graph input (old IR
    models list every initializer there), naming the option that treats it as one; else ''."""
    if name in view.initializers and name in view.input_names:
        return (" (an initializer also listed as a graph input, so a caller may override it; "
                "--initializer-inputs constant treats such initializers as constants)")
    return ""


def check_layer(view: GraphView, layer: LinearLayer, site_input: str) -> Left | None:
    """Can `layer` absorb a per-channel affine map applied to its output `site_input`?"""
    node = layer.layer
    path = [n.output[0] for n in layer.nodes[len(layer.core) - 1:]]  # layer output, then each layout op's
    for tensor in path:
        if view.is_graph_output(tensor) or len(value_readers(view, tensor)) != 1:
            return Left("intermediate-used-elsewhere",
                        f"{layer.op} {label(node)} output {tensor!r} is also used elsewhere"
                        + (" (graph output)" if view.is_graph_output(tensor) else ""))
    if len(node.input) < 2 or not view.is_const(node.input[1]):
        return Left("non-constant-weights", f"{layer.op} {label(node)} weight {node.input[1]!r} is not a constant"
                    + overridable(view, node.input[1]))
    shape = view.const_shape(node.input[1])
    bias_name = _bias_name(layer)
    if bias_name and not view.is_const(bias_name):
        return Left("non-constant-weights", f"{layer.op} {label(node)} bias {bias_name!r} is not a constant"
                    + overridable(view, bias_name))
    elem = view.elem_type(node.input[1])
    if elem is None:
        elem = onnx.helper.np_dtype_to_tensor_dtype(view.const(node.input[1]).dtype)
    if elem not in FLOAT_TYPES:
        return Left("unsupported-dtype", f"{layer.op} {label(node)} weight has type "
                                         f"{onnx.TensorProto.DataType.Name(elem)}")
    if layer.op == "Gemm" and attr(node, "transA", 0) not in (0, 1):
        return Left("unsupported-attribute", f"Gemm {label(node)} has an invalid transA")
    if layer.op == "MatMul" and len(shape) != 2:
        return Left("unsupported-attribute", f"MatMul {label(node)} weight has rank {len(shape)}, not 2")
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


def _all_finite(values: np.ndarray) -> bool:
    """Whether no value is NaN or infinite, without a float64 copy (a 400 MB model's weights
    would cost 800 MB and most of the fold's time): min and max propagate NaN and hold any inf."""
    if values.size == 0:
        return True
    with np.errstate(invalid="ignore"):  # a NaN is the answer here, not a warning
        low, high = values.min(), values.max()
    return bool(np.isfinite(np.float64(low)) and np.isfinite(np.float64(high)))


def _rounding(stored: np.ndarray, exact: np.ndarray) -> float:
    diff = np.abs(stored.astype(np.float64) - exact)
    return float(diff.max()) if diff.size else 0.0


@dataclass
class FoldPlan:
    """The constants a fold will write, computed (and checked) before the graph is touched."""

    weight: np.ndarray | None  # new weight, or None when the scale is 1 everywhere
    bias: np.ndarray | None  # new bias / C / bias-Add constant, or None when none is needed
    rounding: float | None  # largest |stored - exact float64| over the new constants (16-bit types)
    reset_gemm_beta: bool = False


def _scaled(operand: np.ndarray, factor: np.ndarray, dtype) -> np.ndarray:
    """operand * factor computed in float64 and stored as `dtype`, a block of rows at a time, so
    that the float64 intermediate stays small (a 400 MB model would otherwise need 800 MB more)."""
    out = np.empty(operand.shape, dtype)
    rows = max(1, (1 << 18) // max(1, operand[0].size if operand.ndim else 1))
    per_row = factor.shape[0] == operand.shape[0] and operand.shape[0] > 1
    block = np.empty((min(rows, operand.shape[0]),) + operand.shape[1:], np.float64)
    for start in range(0, operand.shape[0], rows):
        end = min(start + rows, operand.shape[0])
        part = block[: end - start]
        np.multiply(operand[start:end], factor[start:end] if per_row else factor, out=part, dtype=np.float64)
        with np.errstate(over="ignore"):  # an overflow is refused by finish_plan, by name
            out[start:end] = part
    return out


def plan_fold(view: GraphView, layer: LinearLayer, scale: np.ndarray, shift: np.ndarray,
              channels: int) -> FoldPlan | Left:
    """Compute, in float64, the constants that fold `y' = scale * y + shift` into `layer`, stored
    in the dtype of the constants they replace. Refuses when a stored value would not be finite
    (e.g. a tiny variance that overflows float16 weights)."""
    scale = np.broadcast_to(np.asarray(scale, np.float64), (channels,))
    shift = np.broadcast_to(np.asarray(shift, np.float64), (channels,))
    weight = view.const(layer.layer.input[1])
    exact: list[tuple[np.ndarray, np.ndarray]] = []  # (stored, exact) pairs
    new_w = None if np.all(scale == 1.0) else _scaled_weight(layer, weight, scale, exact)
    new_b, reset_beta = _shifted_bias(view, layer, scale, shift, channels, weight.dtype, exact)
    return finish_plan(layer.op, layer.layer, exact, new_w, new_b, reset_beta)


def _scaled_weight(layer: LinearLayer, weight: np.ndarray, scale: np.ndarray,
                   exact: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The weight with each output channel multiplied by its scale, in the weight's dtype; the
    (stored, exact) pair is appended to `exact`."""
    node, dtype = layer.layer, weight.dtype
    if layer.op == "Conv":
        operand, factor = weight, scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    elif layer.op == "ConvTranspose":
        group = int(attr(node, "group", 1))
        operand = weight.reshape((group, weight.shape[0] // group) + weight.shape[1:])
        factor = scale.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
    elif layer.op == "Gemm":
        operand, factor = weight, scale[:, None] if attr(node, "transB", 0) else scale[None, :]
    else:  # MatMul
        operand, factor = weight, scale[None, :]
    if dtype.itemsize <= 2:  # keep the float64 product: the rounding report compares with it
        w = np.multiply(operand, factor, dtype=np.float64)
        with np.errstate(over="ignore"):  # an overflow is refused by finish_plan, by name
            new_w = w.astype(dtype).reshape(weight.shape)
        exact.append((new_w, w.reshape(weight.shape)))
    else:
        new_w = _scaled(operand, factor, dtype).reshape(weight.shape)
        exact.append((new_w, new_w))  # checked for overflow only
    return new_w


def _shifted_bias(view: GraphView, layer: LinearLayer, scale: np.ndarray, shift: np.ndarray, channels: int,
                  dtype, exact: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray | None, bool]:
    """The new bias (`bias * scale + shift`: Conv's B, Gemm's C, a MatMul's bias Add or the Add to
    create), or None when none is needed; and whether Gemm's beta must be reset to 1 (it was
    multiplied into C). The (stored, exact) pair is appended to `exact`."""
    node = layer.layer
    bias_name = _bias_name(layer)
    new_b, reset_beta = None, False
    if layer.op in ("Conv", "ConvTranspose"):
        b = view.const(bias_name).astype(np.float64) if bias_name else np.zeros(channels)
        value = b * scale + shift
        if bias_name or np.any(value != 0):
            new_b = value.astype(dtype)
            exact.append((new_b, value))
    elif layer.op == "Gemm":
        beta = float(attr(node, "beta", 1.0))
        c = view.const(bias_name).astype(np.float64) * beta if bias_name else np.zeros(channels)
        value = c * scale + shift  # broadcasts C ([], [N], [1, N] or [M, N]) along N
        if bias_name or np.any(value != 0):
            new_b = value.astype(dtype)
            exact.append((new_b, value))
            reset_beta = beta != 1.0
    elif layer.bias_add is not None:  # MatMul + Add(bias)
        bias = view.const(bias_name)
        value = np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)) * scale + shift
        new_b = value.reshape(bias.shape if bias.size == channels else (channels,)).astype(bias.dtype)
        exact.append((new_b.reshape(-1), value))
    elif np.any(shift != 0):  # MatMul without bias: an Add will be created
        new_b = shift.astype(dtype)
        exact.append((new_b, shift))
    return new_b, reset_beta


def finish_plan(op: str, node: onnx.NodeProto, exact: list[tuple[np.ndarray, np.ndarray]],
                weight: np.ndarray | None, bias: np.ndarray | None, reset_beta: bool) -> FoldPlan | Left:
    """The FoldPlan of the new constants, or Left when one of them (`exact`: stored, float64 pairs)
    overflowed its type."""
    for stored, _ in exact:
        if not _all_finite(stored):
            return Left("invalid-statistics", f"folding into {op} {label(node)} would store values that "
                                              f"overflow {stored.dtype}")
    # The rounding report matters where it can be large (16-bit types); for float32/64 it is ~1e-8
    # relative and computing it would cost a float64 copy of every weight.
    rounding = max((_rounding(stored, value) for stored, value in exact if stored.dtype.itemsize <= 2), default=None)
    return FoldPlan(weight, bias, rounding, reset_beta)


def store_plan(view: GraphView, layer, plan: FoldPlan, notes: list[str]) -> bool:
    """Write a FoldPlan's weight, and its bias where the layer has one (a LinearLayer or a
    NextLayer). False when the bias still needs a place: a MatMul without its bias Add."""
    node = layer.layer
    if plan.weight is not None:
        _store(view, node, 1, plan.weight, notes, "weight")
    if plan.bias is None:
        return True
    if layer.op in ("Conv", "ConvTranspose", "Gemm"):
        _store(view, node, 2, plan.bias, notes, "bias")
        if plan.reset_gemm_beta:  # beta * C is in the new C
            set_attr(node, "beta", 1.0)
    elif layer.bias_add is not None:
        add = layer.bias_add
        _store(view, add, 0 if add.input[0] == _bias_name(layer) else 1, plan.bias, notes, "bias")
    else:
        return False
    return True


def apply_fold(view: GraphView, layer: LinearLayer, plan: FoldPlan) -> list[str]:
    """Write a FoldPlan's constants into the layer. Returns notes for the report."""
    node = layer.layer
    notes: list[str] = []
    if not store_plan(view, layer, plan, notes):
        bias_name = view.add_initializer(f"{node.name or 'MatMul'}_bias_folded", plan.bias)
        add = onnx.helper.make_node("Add", [node.output[0], bias_name], [view.unique_name(f"{node.output[0]}_biased")],
                                    name=view.unique_name(f"{node.name or 'MatMul'}_bias"))
        view.add_node(add, after=node)
        if node.output[0] in view.shapes:  # same shape and type as the MatMul output
            view.shapes[add.output[0]] = view.shapes[node.output[0]]
        if layer.chain:
            view.replace_input(layer.chain[0], 0, add.output[0])
        layer.core.append(add)
        notes.append(f"created Add {add.name} for the folded bias")
    return notes


def retarget_output(view: GraphView, layer: LinearLayer, removed: onnx.NodeProto) -> list[str]:
    """Remove the folded node `removed` and make the layer (or its last layout op) write its output
    tensor instead, so every consumer (and a graph output of that name) stays wired. A Cast up from
    the layer's dtype followed by a Cast straight back is then an exact round trip: both go."""
    out = removed.output[0]
    last = layer.nodes[-1]
    redirect_shape_readers(view, last.output[0], out)  # the tensor goes; `out` has its shape
    view.remove(removed)
    view.rename_output(last, 0, out)
    notes = []
    readers = view.users(out)
    if (layer.chain and layer.chain[-1].op_type == "Cast" and len(readers) == 1 and readers[0].op_type == "Cast"
            and not view.is_graph_output(out)):
        up, down = layer.chain[-1], readers[0]
        before = view.elem_type(up.input[0])
        if before is not None and attr(down, "to") == before and _widens(before, attr(up, "to")):
            final = down.output[0]
            view.remove(down)
            view.remove(up)
            feeder = view.producer[up.input[0]]
            view.rename_output(feeder, list(feeder.output).index(up.input[0]), final)
            layer.chain.pop()
            notes.append(f"removed the exact Cast round trip {label(up)} -> {label(down)}")
    return notes


_PRECISION = {onnx.TensorProto.BFLOAT16: 0, onnx.TensorProto.FLOAT16: 1, onnx.TensorProto.FLOAT: 2,
              onnx.TensorProto.DOUBLE: 3}


def _widens(src: int, dst: int) -> bool:
    """Is every value of type `src` exactly representable in `dst`?"""
    if src == dst:
        return True
    if src == onnx.TensorProto.BFLOAT16:
        return dst in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    return src in _PRECISION and dst in _PRECISION and _PRECISION[dst] > _PRECISION[src]
