"""Shape arithmetic with unknown dimensions: the value of a small int tensor as a list whose
entries are ints or a symbol ("x:0", dimension 0 of tensor x) where they come from a dynamic
dimension. Exporters build Reshape targets this way for a dynamic batch:

    Shape(x) -> Cast -> Slice[0:1] -> Squeeze -> Div(1) -> Unsqueeze -> Concat(., [H, W, G, C/G]) -> Cast

is [x:0, H, W, G, C/G]: enough to know the rank, every static size, and that the first entry is
the input's own first dimension.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from normfold.graph import attr, constant_node_value

Value = list  # of int | str

BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Where"})
REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceProd"})
# Ops whose output has their first input's shape.
SAME_SHAPE = frozenset({"Identity", "Cast", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Neg", "Abs", "Erf", "Exp", "Sqrt",
                        "Softplus", "Elu", "Selu", "HardSigmoid", "HardSwish", "Gelu", "Clip", "Dropout", "Softmax",
                        "LogSoftmax", "Not", "Floor", "Ceil", "Round", "Reciprocal", "Sign", "Mish", "Celu"})


class ShapeValues:
    def __init__(self, graph: onnx.GraphProto, shapes: dict):
        self.shapes = shapes
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consts = {t.name: t for t in graph.initializer}
        self._cache: dict[str, Value | None] = {}
        # dims_of results, kept only when no step was cut off by the depth limit (such a result
        # depends on where the walk started); without them the walk through a residual stream's
        # Adds revisits every tensor once per path to it.
        self._dims: dict[str, Value | None] = {}
        self._cuts = 0

    def value(self, name: str, depth: int = 0) -> Value | None:
        if name not in self._cache:
            self._cuts += depth >= 24
            self._cache[name] = self._value(name, depth) if depth < 24 else None
        return self._cache[name]

    def _value(self, name: str, depth: int) -> Value | None:
        if name in self.consts:
            array = numpy_helper.to_array(self.consts[name])
            return _ints(array)
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op == "Constant":
            value = constant_node_value(node)
            return None if value is None else _ints(value)
        if op == "Shape":
            dims = self.dims_of(node.input[0])
            if dims is None:
                return None
            start, end = attr(node, "start", 0), attr(node, "end", None)
            return dims[start:end]
        ins = [self.value(i, depth + 1) if i else None for i in node.input]
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"):
            return ins[0]  # scalars and one-element vectors read alike here
        if op == "Concat":
            return None if any(v is None for v in ins) else [d for v in ins for d in v]
        if op in ("Slice", "Gather"):
            data = ins[0]
            if data is None:
                return None
            if op == "Gather":
                idx = ins[1]
                if idx is None or not all(isinstance(i, int) for i in idx):
                    return None
                return [data[i] for i in idx]
            starts, ends = ins[1], ins[2]
            steps = ins[4] if len(ins) > 4 else None
            if not (starts and ends) or len(starts) != 1 or not all(isinstance(v, int) for v in starts + ends):
                return None
            step = steps[0] if steps else 1
            return data[slice(starts[0], ends[0], step)] if isinstance(step, int) else None
        if op in ("Mul", "Div", "Add", "Sub") and len(ins) == 2 and ins[0] is not None and ins[1] is not None:
            a, b = ins
            if len(a) != len(b):
                a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a)) if len(b) == 1 else (None, None)
            if a is None:
                return None
            return [_arith(op, x, y) for x, y in zip(a, b)]
        return None

    def dims_of(self, name: str, depth: int = 0) -> Value | None:
        """The dimensions of a tensor, a dynamic one as a symbol named after the tensor it first
        appears in: through Transposes and ops that keep their input's shape, a dimension keeps
        its symbol, so two tensors' dynamic sizes compare equal when they are the same size."""
        if name in self._dims:
            found = self._dims[name]
            return None if found is None else list(found)
        cuts = self._cuts
        found = self._dims_of(name, depth)
        if self._cuts == cuts:
            self._dims[name] = None if found is None else list(found)
        return found

    def _dims_of(self, name: str, depth: int) -> Value | None:
        info = self.shapes.get(name)
        if info is None or info[1] is None:
            return None
        dims = list(info[1])
        if all(isinstance(d, int) for d in dims):
            return dims
        node = self.producer.get(name)
        inner = None
        if node is not None and depth >= 32:
            self._cuts += 1
        elif node is not None and node.domain in ("", "ai.onnx"):
            if node.op_type == "Transpose":
                base = self.dims_of(node.input[0], depth + 1)
                perm = attr(node, "perm") or list(reversed(range(len(dims))))
                inner = [base[p] for p in perm] if base is not None and len(base) == len(dims) else None
            elif node.op_type in SAME_SHAPE:
                inner = self.dims_of(node.input[0], depth + 1)
            elif node.op_type in BROADCAST:
                inner = self._broadcast(node, len(dims), depth)
            elif node.op_type in REDUCE and attr(node, "keepdims", 1) == 1:
                inner = self._reduced(node, dims, depth)
            elif node.op_type == "ConstantOfShape":
                inner = self.value(node.input[0], depth + 1)
            elif node.op_type == "Reshape" and len(node.input) > 1:
                inner = self._reshaped(node, len(dims), depth)
        if inner is not None and len(inner) == len(dims):
            return [d if isinstance(d, int) else inner[i] for i, d in enumerate(dims)]
        return [d if isinstance(d, int) else f"{name}:{i}" for i, d in enumerate(dims)]

    def _reshaped(self, node: onnx.NodeProto, rank: int, depth: int) -> Value | None:
        """A Reshape's output dimensions from its target: 0 copies the input's, one -1 in front is
        the input's first dimension when every other entry matches the input's (element counts)."""
        target = self.value(node.input[1], depth + 1)
        source = self.dims_of(node.input[0], depth + 1)
        if target is None or source is None or len(target) != rank:
            return None
        out = [source[i] if t == 0 and i < len(source) else t for i, t in enumerate(target)]
        if out.count(-1) == 1 and out[0] == -1 and out[1:] and source[1:] and \
                _product(out[1:]) is not None and _product(out[1:]) == _product(source[1:]):
            out[0] = source[0]
        return None if any(isinstance(t, int) and t < 0 for t in out) else out

    def _broadcast(self, node: onnx.NodeProto, rank: int, depth: int) -> Value | None:
        """An elementwise op's output dimensions from its inputs' (right-aligned broadcasting)."""
        sides = [self.dims_of(i, depth + 1) for i in node.input if i]
        if not sides or any(d is None or len(d) > rank for d in sides):
            return None
        out = []
        for column in zip(*([1] * (rank - len(d)) + list(d) for d in sides)):
            wide = {d for d in column if d != 1}
            out.append(wide.pop() if len(wide) == 1 else 1 if not wide else None)
        return None if None in out else out

    def _reduced(self, node: onnx.NodeProto, dims: list, depth: int) -> Value | None:
        """A keepdims reduction's output dimensions: its input's, with the reduced axes 1."""
        source = self.dims_of(node.input[0], depth + 1)
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.value(node.input[1], depth + 1)
        if source is None or len(source) != len(dims) or not axes or not all(isinstance(a, int) for a in axes):
            return None
        reduced = {a % len(dims) for a in axes}
        return [1 if i in reduced else d for i, d in enumerate(source)]

    def reshape_target(self, data: str, target: Value) -> list[int] | None:
        """The target with symbols replaced for inference: 0 ("copy the input's dimension") where the
        symbol is the input's own dimension at the same index, else -1 (at most one)."""
        own = self.dims_of(data) or []
        out: list[int] = []
        for i, t in enumerate(target):
            if isinstance(t, int):
                out.append(t)
            elif i < len(own) and t == own[i]:
                out.append(0)
            else:
                out.append(-1)
        return out if out.count(-1) <= 1 else None


def shape_values(view) -> ShapeValues:
    """The ShapeValues of a GraphView, built once per view (it indexes every node)."""
    found = view.__dict__.get("_shape_values")
    if found is None:
        found = view.__dict__["_shape_values"] = ShapeValues(view.graph, view.shapes)
    return found


def _product(dims: Value):
    """The product of int dimensions, or None when a symbol stands among them."""
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def _ints(array: np.ndarray) -> Value | None:
    if array.dtype.kind not in "iu" or array.size > 16:
        return None
    return [int(v) for v in array.reshape(-1)]


def _arith(op: str, a, b):
    if isinstance(a, int) and isinstance(b, int):
        if op == "Div":
            return a // b if b else None
        return {"Mul": a * b, "Add": a + b, "Sub": a - b}[op]
    if op in ("Mul", "Div") and b == 1:
        return a  # x:0 * 1, x:0 / 1
    if op == "Mul" and a == 1:
        return b
    return None
