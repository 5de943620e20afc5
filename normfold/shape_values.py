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


class ShapeValues:
    def __init__(self, graph: onnx.GraphProto, shapes: dict):
        self.shapes = shapes
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consts = {t.name: t for t in graph.initializer}
        self._cache: dict[str, Value | None] = {}

    def value(self, name: str, depth: int = 0) -> Value | None:
        if name not in self._cache:
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
            info = self.shapes.get(node.input[0])
            if info is None or info[1] is None:
                return None
            dims = [d if isinstance(d, int) else f"{node.input[0]}:{i}" for i, d in enumerate(info[1])]
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

    def reshape_target(self, data: str, target: Value) -> list[int] | None:
        """The target with symbols replaced for inference: 0 ("copy the input's dimension") where the
        symbol is the input's own dimension at the same index, else -1 (at most one)."""
        out: list[int] = []
        for i, t in enumerate(target):
            if isinstance(t, int):
                out.append(t)
            elif t == f"{data}:{i}":
                out.append(0)
            else:
                out.append(-1)
        return out if out.count(-1) <= 1 else None


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
