"""A small editable index over an ONNX GraphProto: producers, consumers, constants, and edits.

Passes read the graph through `GraphView` and change it only through its edit methods, which keep
the indexes current so that a later site sees the effect of an earlier rewrite (Conv -> BN -> BN
folds twice). Node order is rebuilt once, in `commit()`: removed nodes are dropped and new nodes
stand where the last node of the site they replace stood, so the graph stays topologically sorted.

We edit the protobuf in place instead of round-tripping through onnx-graphsurgeon: an export there
copies every initializer and drops metadata, and a fold should touch only the tensors it changes.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


# The standard ops with graph-valued attributes. Reading a node's attributes from the protobuf costs
# more than the rest of most index walks, and those walks visit every node several times.
_STANDARD_WITH_SUBGRAPHS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The graph-valued attributes of a node (If branches, Loop/Scan bodies; any attribute of a
    custom-domain op)."""
    if node.op_type not in _STANDARD_WITH_SUBGRAPHS and node.domain in ("", "ai.onnx"):
        return
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph reads from enclosing scopes (defined neither inside it nor as its inputs)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for _, sub in subgraphs(node):
            used |= free_names(sub)
        defined.update(n for n in node.output if n)
    used.update(o.name for o in graph.output)
    return used - defined


def _initializer_names(graph: onnx.GraphProto) -> set[str]:
    """The initializer names of `graph` and of every graph nested in it."""
    names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        for _, sub in subgraphs(node):
            names |= _initializer_names(sub)
    return names


def shadowing_initializers(graph: onnx.GraphProto, visible: frozenset[str] = frozenset()) -> set[str]:
    """Names that a subgraph initializer shares with a value visible from an enclosing scope."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {n for node in graph.node for n in node.output if n}
    scope = visible | local
    found: set[str] = set()
    for node in graph.node:
        for _, sub in subgraphs(node):
            found |= {t.name for t in sub.initializer} & scope
            found |= shadowing_initializers(sub, frozenset(scope))
    return found


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every value and node name of `graph` and of the graphs nested in it."""
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(n for n in node.output if n)
        if node.name:
            names.add(node.name)
        for _, sub in subgraphs(node):
            names |= all_names(sub)
    return names


def label(node: onnx.NodeProto) -> str:
    """How reports name a node: its name, or `Op(output)` for the many unnamed nodes exporters write."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def count_ops(graph: onnx.GraphProto) -> dict[str, int]:
    """Op-type histogram of a graph and all its subgraphs; custom domains as `domain::Op`."""
    counts: dict[str, int] = defaultdict(int)

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] += 1
            for _, sub in subgraphs(node):
                walk(sub)

    walk(graph)
    return dict(sorted(counts.items()))


class GraphView:
    """Index of one graph. `outer` is the view of the enclosing graph for If/Loop/Scan bodies.

    Names resolve by scope: a subgraph's own inputs, initializers and node outputs first, then the
    enclosing graphs'. One case is ambiguous in practice: a subgraph initializer with the name of a
    value visible from an outer scope. onnx's checker accepts it, but onnxruntime and onnx's
    reference evaluator both read the *outer* value there, against the scoping rule. Such a
    shadowing name is therefore never a constant, nor of known shape, inside the subgraph (its
    sites stay as they were). Nor is the outer value of that name: onnxruntime drops an outer
    initializer that no node of its own graph reads, and then the subgraph reads its own, so
    rewriting either side could change what the other computes. The outer graph also counts every
    subgraph initializer name as read by the node holding the subgraph.
    New names are unique across the whole model, so a rewrite never creates such a clash."""

    def __init__(self, graph: onnx.GraphProto, path: str = "main", outer: "GraphView | None" = None,
                 shapes: dict[str, tuple[int, list]] | None = None, opset: int | None = None,
                 base_dir: str | None = None):
        self.graph = graph
        # where weights still in external data files are read from (see io.read_model(lazy=True))
        self.base_dir = base_dir if base_dir is not None else (outer.base_dir if outer else "")
        self.opset = opset or (outer.opset if outer else onnx.defs.onnx_opset_version())
        self._const_cache: dict[str, np.ndarray | None] = {}
        self._derived: dict = {}  # see derived(); emptied by every edit, with _const_cache
        self.path = path
        self.outer = outer
        # name -> (elem_type, dims) with dims entries int or None; filled from shape inference.
        self.shapes = shapes if shapes is not None else (outer.shapes if outer else {})
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self._removed: set[int] = set()
        self._placed_after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        self.initializers = {t.name: t for t in graph.initializer}
        self.input_names = {i.name for i in graph.input}
        self.output_names = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        # One set for the whole model (every scope): a new name never shadows, nor is shadowed by, another.
        # (this graph's node and output names join it as _index reads them)
        self._names: set[str] = outer._names if outer is not None else set().union(
            *(all_names(sub) for node in self.nodes for _, sub in subgraphs(node)))
        self._names |= set(self.initializers) | self.input_names | self.output_names
        self._dropped_tensors: set[str] = set()
        self._maybe_dead: set[str] = set()  # tensors whose readers a rewrite removed or redirected
        self._position = self._index_all()
        local = set(self.initializers) | self.input_names | set(self.producer)
        self.shadowed: set[str] = {n for n in local if outer is not None and outer.visible(n)}
        # names that are ambiguous in every scope (see the class docstring)
        self.ambiguous: set[str] = outer.ambiguous if outer is not None else shadowing_initializers(graph)

    def _index_all(self) -> dict[int, int] | None:
        """Index every node; returns each node's index in the graph's order, or None when that
        order is not topological (the checker refuses such a model; the library may still be
        handed one): a node reads a value that it or a later node produces, or two nodes produce
        one name. (One pass: the protobuf's fields cost more to read than the checks.)"""
        position: dict[int, int] = {}
        sorted_ = True
        pending: set[str] = set()  # read before any node produced it: a graph input, or out of order
        for i, node in enumerate(self.nodes):
            pending.update(name for name in node.input if name and name not in self.producer)
            made = len(self.producer)
            self._index(node)
            sorted_ = sorted_ and len(self.producer) - made == sum(1 for name in node.output if name)
            position[id(node)] = i
        return position if sorted_ and not pending & self.producer.keys() else None

    def position(self, node: onnx.NodeProto) -> int | None:
        """Where `node` stands in the topological order (a node added after another stands where that
        one stands); None when unknown. A node standing before every producer of a tensor's
        inputs computes nothing from that tensor: the canonical view reads its outputs as leaves."""
        return None if self._position is None else self._position.get(id(node))

    def visible(self, name: str) -> bool:
        """Whether `name` is a value of this graph or of an enclosing one."""
        return (name in self.initializers or name in self.input_names or name in self.producer
                or (self.outer is not None and self.outer.visible(name)))

    # ---- index -------------------------------------------------------------------------------
    def _reads(self, node: onnx.NodeProto) -> list[str]:
        names = [n for n in node.input if n]
        for _, sub in subgraphs(node):
            # a subgraph initializer named like an outer value may be read as that value (see the class)
            names.extend(sorted(free_names(sub) | _initializer_names(sub)))
        return names

    def _index(self, node: onnx.NodeProto) -> None:
        for name in self._reads(node):
            self.consumers[name].append(node)
        for name in node.output:
            if name:
                self.producer[name] = node
                self._names.add(name)
        if node.name:
            self._names.add(node.name)

    def _unindex(self, node: onnx.NodeProto) -> None:
        for name in self._reads(node):
            users = self.consumers.get(name, [])
            for i, user in enumerate(users):
                if user is node:
                    del users[i]
                    break
        for name in node.output:
            if name and self.producer.get(name) is node:
                del self.producer[name]

    # ---- queries -----------------------------------------------------------------------------
    def is_removed(self, node: onnx.NodeProto) -> bool:
        return id(node) in self._removed

    def live_nodes(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if id(n) not in self._removed]

    def users(self, name: str) -> list[onnx.NodeProto]:
        """Distinct nodes that read `name` (a node reading it twice, Mul(d, d), counts once)."""
        seen: dict[int, onnx.NodeProto] = {}
        for node in self.consumers.get(name, []):
            seen.setdefault(id(node), node)
        return list(seen.values())

    def is_graph_output(self, name: str) -> bool:
        return name in self.output_names

    def sole_user(self, name: str) -> onnx.NodeProto | None:
        users = self.users(name)
        if len(users) == 1 and not self.is_graph_output(name):
            return users[0]
        return None

    def escapes(self, nodes: Iterable[onnx.NodeProto], keep: str) -> str | None:
        """The first tensor written by `nodes` (other than `keep`) that is used outside them."""
        inside = {id(n) for n in nodes}
        for node in nodes:
            for name in node.output:
                if not name or name == keep:
                    continue
                if self.is_graph_output(name) or any(id(u) not in inside for u in self.users(name)):
                    return name
        return None

    def const(self, name: str, _depth: int = 0) -> np.ndarray | None:
        """The value of `name` if it is a constant: an initializer that is not also a graph input
        (such an initializer is only a default the caller may override), a Constant node, or a
        short chain of shape/cast/arithmetic ops over constants (exporters compute zero biases and
        reshaped weights that way)."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        value = self._const(name, _depth)
        self._const_cache[name] = value
        return value

    def _const(self, name: str, depth: int) -> np.ndarray | None:
        if name in self.initializers:
            if name in self.input_names or name in self.shadowed or name in self.ambiguous:
                return None
            return numpy_helper.to_array(self.initializers[name], self.base_dir)
        node = self.producer.get(name)
        if node is not None:
            if node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type == "Constant":
                return constant_node_value(node)
            if node.op_type == "CastLike":
                # Only the type of the second input matters, and that is known without its value.
                value, target = self.const(node.input[0], depth + 1), self.elem_type(node.input[1])
                if value is not None and target is not None:
                    return value.astype(onnx.helper.tensor_dtype_to_np_dtype(target))
            if node.op_type in EVALUABLE_OPS and depth < MAX_EVAL_DEPTH and len(node.output) == 1:
                inputs = self._evaluable_inputs(node, depth)
                return None if inputs is None else evaluate_node(node, inputs, self.opset)
            return None
        if self.outer is not None and name not in self.input_names:
            return self.outer.const(name)
        return None

    def _evaluable_inputs(self, node: onnx.NodeProto, depth: int) -> list | None:
        """The values of `node`'s inputs when all are constants small enough to evaluate, else None.
        Weights are judged by their headers and decoded last: asking whether Gather(embedding, ids)
        or Mul(gamma, x) is constant must not read the weight from its external file when the other
        input is not (on a 2.75 GB Llama that read 2.6 s of weights in a fold of 2.7 s)."""
        names = [n for n in node.input if n]
        weights = [n for n in names if n in self.initializers and n not in self._const_cache]
        if not all(self.is_const(n) for n in weights):
            return None
        if sum(int(np.prod(self.initializers[n].dims)) for n in weights) > MAX_EVAL_ELEMENTS:
            return None
        values = {n: self.const(n, depth + 1) for n in names if n not in weights}
        if any(v is None for v in values.values()):
            return None
        values.update((n, self.const(n, depth + 1)) for n in weights)
        if sum(v.size for v in values.values()) > MAX_EVAL_ELEMENTS:
            return None
        return [values[n] if n else None for n in node.input]

    def is_const(self, name: str) -> bool:
        """Like `const(name) is not None`, without decoding a weight initializer (the common case)."""
        if name in self.initializers and name not in self._const_cache:
            return name not in self.input_names and name not in self.shadowed and name not in self.ambiguous
        return self.const(name) is not None

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant, from an initializer's header when it is one (no decoding)."""
        if (name in self.initializers and name not in self.input_names and name not in self.shadowed
                and name not in self.ambiguous):
            return tuple(self.initializers[name].dims)
        value = self.const(name)
        return None if value is None else value.shape

    def rank(self, name: str) -> int | None:
        dims = self.dims(name)
        return None if dims is None else len(dims)

    def dims(self, name: str) -> list | None:
        if name in self.shadowed:  # the shapes table holds the outer value's
            return None
        info = self.shapes.get(name)
        if info is not None:
            return info[1]
        # An initializer a rewrite added after shape inference ran (a folded weight): its header is exact.
        if name in self.initializers and name not in self.input_names:
            return list(self.initializers[name].dims)
        return None

    def elem_type(self, name: str) -> int | None:
        if name in self.shadowed:
            return None
        info = self.shapes.get(name)
        if info is not None:
            return info[0]
        if name in self.initializers:
            return self.initializers[name].data_type
        return None

    def uses_of_initializer(self, name: str) -> int:
        return len(self.users(name)) + (1 if self.is_graph_output(name) else 0)

    # ---- edits -------------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        """Replace an initializer's contents where it stands (keeps the initializer order stable)."""
        tensor = self.initializers[name]
        if (sys.byteorder == "little" and tensor.HasField("raw_data") and list(tensor.dims) == list(value.shape)
                and onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) == value.dtype):
            tensor.raw_data = np.ascontiguousarray(value).tobytes()  # one copy, not from_array + CopyFrom
        else:
            tensor.CopyFrom(numpy_helper.from_array(value, name))
        self._edited()

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        name = self.unique_name(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.initializers[name] = self.graph.initializer[-1]
        self._edited()
        return name

    def derived(self, key, build):
        """What `build()` computes from the graph as it is now, built once for `key` and shared by
        every caller until the next edit (the canonical view recognisers read the graph through:
        a LayerNorm's two reductions, and the channel pass asking about the same tensors, then
        build each tensor's expression once)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def _edited(self) -> None:
        self._const_cache.clear()
        self._derived.clear()

    def replace_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        self._unindex(node)
        while len(node.input) <= index:
            node.input.append("")
        old = node.input[index]
        node.input[index] = name
        self._index(node)
        self._maybe_dead.add(old)
        self._edited()

    def rename_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """Make `node` write tensor `name` (whose old producer must have been removed)."""
        self._unindex(node)
        self._dropped_tensors.add(node.output[index])
        node.output[index] = name
        self._index(node)
        self._edited()

    def remove(self, node: onnx.NodeProto) -> None:
        self._unindex(node)
        self._removed.add(id(node))
        self._maybe_dead.update(n for n in node.input if n)
        for name in node.output:
            if name and name not in self.producer:
                self._dropped_tensors.add(name)
        self._edited()

    def add_node(self, node: onnx.NodeProto, after: onnx.NodeProto) -> None:
        """Add `node`, placed in the final order right after `after` (which may be removed)."""
        if not node.name:
            node.name = self.unique_name(node.op_type)
        self._placed_after[id(after)].append(node)
        if self._position is not None:
            self._position[id(node)] = self._position.get(id(after), len(self.nodes))
        self._index(node)
        self._edited()

    def commit(self) -> None:
        """Write the edits into the GraphProto: node order, dead constants, stale value_info.
        The view must not be used afterwards."""
        # Nodes that computed constants only the removed or redirected readers used are dead now.
        pending = sorted(self._maybe_dead)
        while pending:
            name = pending.pop()
            node = self.producer.get(name)
            if (node is None or node.domain not in ("", "ai.onnx") or any(True for _ in subgraphs(node))
                    or any(self.users(o) or self.is_graph_output(o) for o in node.output if o)):
                continue
            self.remove(node)
            pending.extend(n for n in node.input if n)
        order: list[onnx.NodeProto] = []

        def place(node: onnx.NodeProto) -> None:
            if id(node) not in self._removed:
                order.append(node)
            for added in self._placed_after.get(id(node), []):
                place(added)

        for node in self.nodes:
            place(node)
        if len(order) != len(self.graph.node) or any(a is not b for a, b in zip(order, self.graph.node)):
            del self.graph.node[:]
            self.graph.node.extend(order)
        dead = {n for n in self._maybe_dead
                if n in self.initializers and not self.users(n) and not self.is_graph_output(n)
                and n not in self.input_names}
        if dead:
            # Delete in place, back to front: rebuilding the field would copy every weight.
            for i in reversed(range(len(self.graph.initializer))):
                if self.graph.initializer[i].name in dead:
                    del self.graph.initializer[i]
        gone = {n for n in self._dropped_tensors if n not in self.producer and n not in self.input_names}
        if gone and any(v.name in gone for v in self.graph.value_info):
            keep_vi = [v for v in self.graph.value_info if v.name not in gone]
            del self.graph.value_info[:]
            self.graph.value_info.extend(keep_vi)


# Ops whose output we compute when every input is constant, so that a weight written as
# `Reshape(Transpose(C))` or a zero bias written as `Expand(CastLike(0, x), Shape(W))` counts as constant.
EVALUABLE_OPS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Expand",
    "Shape", "Size", "Concat", "Slice", "Gather", "ConstantOfShape", "Range", "Neg", "Reciprocal", "Sqrt",
    "Add", "Sub", "Mul", "Div", "Pow", "Abs", "Max", "Min", "Sum",
})
MAX_EVAL_DEPTH = 8
MAX_EVAL_ELEMENTS = 1 << 24


def _simple_value(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """The ops exporters put in front of constants most (Identity is 85 of 103 evaluations over
    the corpus), computed directly: onnx.reference costs ~60 ms to import, more than folding a
    small model. None when the op is not one of them."""
    if node.op_type == "Identity":
        return inputs[0]
    if node.op_type == "Transpose":
        perm = attr(node, "perm")
        try:
            return np.transpose(inputs[0], list(perm) if perm else None)
        except ValueError:  # a perm that does not fit the rank: not a constant we can use
            return None
    return None


def evaluate_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    """Run one node on constant inputs: the commonest ops directly, the rest with onnx's
    reference evaluator."""
    simple = _simple_value(node, inputs)
    if simple is not None:
        return simple
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    single = onnx.NodeProto()
    single.CopyFrom(node)
    del single.input[:]
    single.input.extend(names)
    del single.output[:]
    single.output.append("out")
    graph = onnx.helper.make_graph(
        [single], "const", [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                            for n, v in zip(names, inputs) if v is not None],
        [onnx.helper.make_empty_tensor_value_info("out")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        (value,) = ReferenceEvaluator(model).run(None, {n: v for n, v in zip(names, inputs) if v is not None})
    except Exception:
        return None
    return np.asarray(value)


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None
