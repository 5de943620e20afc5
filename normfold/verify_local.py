"""Local verification: every rewritten site checked on its own, for models too big to run whole.

For each folded or fused site, two small models are cut out: the original pattern (the nodes the
site record names, in the original file) and its replacement (the nodes of the result that compute
the site's output tensor from the same inputs), each with the constants it reads (external weights
are loaded one tensor at a time; the cone of nodes computing a constant comes along). Both run in
onnxruntime on the same seeded inputs of the site's inferred shape at several magnitudes: N(0, 1),
large (30 * N(0, 1) + 5), and with variance near and below a norm's epsilon
(3e-3 * N, 1e-3 * N, 1e-4 * N), so that an epsilon mistake, or max(var, eps) taken for
var + eps, cannot pass. They are compared like whole models are (default tolerances from the lowest
float type in the pattern, the accuracy rule against a float64 run of the pattern when those
fail). Memory is that of the largest site, not of the model.

What this does not check: the parts of the model no site touches (unchanged by the passes) and an
opset conversion (--target-opset) outside the sites.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import external_data_helper

from normfold.errors import VerificationUnavailable
from normfold.graph import label
from normfold.report import OutputComparison, SiteRecord, Verification

# (name, scale, offset): inputs are offset + scale * N(0, 1)
# The small-variance inputs have mean 0: around a large mean, float32 moments lose the variance to
# cancellation in onnxruntime's fused kernels, which says nothing about the rewrite.
MAGNITUDES = (("N(0,1)", 1.0, 0.0), ("large", 30.0, 5.0), ("variance near epsilon", 3e-3, 0.0),
              ("variance 1e-6", 1e-3, 0.0), ("variance below epsilon", 1e-4, 0.0))
FREE_DIMS = ((4, 1), (1, None), (16, 1), (64, 1))  # (value, leading axis value) tried in order
MAX_SITE_NODES = 200
SESSION_FACTOR = 2.5  # whole-model session memory ~ weight bytes x this (measured: 2.4x on fp16 Llama)
MEMORY_FRACTION = 0.6  # of MemAvailable


def whole_model_too_big(path: str | os.PathLike, size: int | None = None) -> tuple[bool, str]:
    """Whether one onnxruntime session of the model would exceed MEMORY_FRACTION of the available
    memory (estimated as weight bytes x SESSION_FACTOR: `size`, or measured), and a sentence saying so."""
    from normfold.accuracy import _available_memory
    from normfold.verify import model_bytes

    size = model_bytes(path) if size is None else size
    available = _available_memory()
    if available is None:
        return False, ""
    need = size * SESSION_FACTOR
    text = (f"whole-model verification would need about {need / 2**30:.1f} GiB ({size / 2**30:.1f} GiB of weights "
            f"x {SESSION_FACTOR:g}), more than {MEMORY_FRACTION:g} of the {available / 2**30:.1f} GiB available")
    return need > MEMORY_FRACTION * available, text


class _Model:
    """A model's graph without its weights, indexed for cutting out subgraphs."""

    def __init__(self, path: str | os.PathLike | bytes):
        from normfold.shapes import infer_shapes

        if isinstance(path, bytes):
            self.proto, self.folder = onnx.load_from_string(path), ""
        else:
            self.proto = onnx.load(os.fspath(path), load_external_data=False)
            self.folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        graph = self.proto.graph
        self.shapes = infer_shapes(self.proto)
        self.by_label = {label(n): n for n in graph.node}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input} - set(self.inits)
        self.order = {id(n): i for i, n in enumerate(graph.node)}
        self._constant: dict[str, bool] = {}

    def is_constant(self, tensor: str) -> bool:
        """Computed from initializers and Constant nodes only."""
        if tensor in self._constant:
            return self._constant[tensor]
        self._constant[tensor] = False  # cycles cannot happen in a valid graph; this guards anyway
        if tensor in self.inits:
            result = True
        elif tensor in self.inputs or tensor not in self.producer:
            result = False
        else:
            node = self.producer[tensor]
            result = node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike") \
                and all(self.is_constant(i) for i in node.input if i)
        self._constant[tensor] = result
        return result

    def small_value(self, tensor: str) -> np.ndarray | None:
        """The value of a small constant (an initializer stored inline, or a Constant node)."""
        from onnx import numpy_helper

        t = self.inits.get(tensor)
        if t is not None:
            return numpy_helper.to_array(t) if t.data_location != onnx.TensorProto.EXTERNAL and len(t.dims) <= 1 \
                and (not t.dims or t.dims[0] <= 16) else None
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
        return None

    def constant_cone(self, tensor: str, nodes: dict[int, onnx.NodeProto]) -> None:
        if tensor in self.inits or tensor not in self.producer:
            return
        node = self.producer[tensor]
        if id(node) not in nodes:
            nodes[id(node)] = node
            for i in node.input:
                if i:
                    self.constant_cone(i, nodes)

    def cut(self, nodes: dict[int, onnx.NodeProto], output: str, feeds: dict[str, tuple[int, list[int]]]) -> bytes:
        """The subgraph of `nodes` (with the constant cones they read) as a model computing `output`
        from the data inputs `feeds` (name -> (elem_type, shape))."""
        for node in list(nodes.values()):
            for i in node.input:
                if i and i not in feeds and self.is_constant(i):
                    self.constant_cone(i, nodes)
        ordered = sorted(nodes.values(), key=lambda n: self.order[id(n)])
        read = {i for n in ordered for i in n.input if i}
        inits = []
        for name in sorted(read & set(self.inits)):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(self.inits[name])
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                external_data_helper.load_external_data_for_tensor(tensor, self.folder)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
            inits.append(tensor)
        elem = self.shapes.get(output, (onnx.TensorProto.FLOAT, None))[0]
        graph = onnx.helper.make_graph(
            ordered, "site", [onnx.helper.make_tensor_value_info(n, t, s) for n, (t, s) in feeds.items() if n in read],
            [onnx.helper.make_tensor_value_info(output, elem, None)], inits)
        model = onnx.helper.make_model(graph, opset_imports=list(self.proto.opset_import),
                                       ir_version=self.proto.ir_version)
        model.functions.extend(self.proto.functions)
        return model.SerializeToString()


def _cone(model: _Model, tensor: str, stops: set[str], limit: int) -> dict[int, onnx.NodeProto] | None:
    """The nodes computing `tensor` from the tensors `stops` and constants, or None when it needs
    anything else (a graph input, more than `limit` nodes)."""
    nodes: dict[int, onnx.NodeProto] = {}
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if not t or t in seen or t in stops or model.is_constant(t):
            continue
        seen.add(t)
        node = model.producer.get(t)
        if node is None or len(nodes) >= limit:
            return None
        nodes[id(node)] = node
        stack.extend(node.input)
    return nodes


def _pattern(original: _Model, result: _Model, site: SiteRecord):
    """(original nodes, result nodes, data inputs, compared tensor) of one site. The data inputs
    are what the site's nodes read from the rest of the graph, less those computed from the others
    (a Transpose of the same input, a Reshape target from its Shape): fed independently, they
    would not be the same data. The compared tensor is the site's output, or, when the result no
    longer has it (a later rewrite took it in), the tensor its replacement nodes write."""
    seeds = [n for n in (original.by_label.get(name) for name in site.nodes) if n is not None]
    produced = {o for n in seeds for o in n.output}
    free: list[str] = []
    for node in seeds:
        for i in node.input:
            if i and i not in produced and i not in free and not original.is_constant(i):
                free.append(i)
    changed = True
    while changed:
        changed = False
        for f in list(free):
            if _cone(original, f, set(free) - {f}, 16) is not None:
                free.remove(f)
                changed = True
    target = result_target = site.output
    if target not in result.producer:
        # the last node of the replacement, in graph order, writes what the site now produces; its
        # counterpart in the original is what the same reader reads there (the rewrite may have
        # rewired the readers instead of keeping the tensor's name)
        created = sorted((result.by_label[c] for c in site.created if c in result.by_label),
                         key=lambda n: result.order[id(n)])
        pair = _counterpart(original, result, created[-1].output[0]) if created else None
        if pair is None:
            raise VerificationUnavailable(f"site {site.id}: its output is not in the result")
        target, result_target = pair
    before = _cone(original, target, set(free), MAX_SITE_NODES)
    after = _cone(result, result_target, set(free), MAX_SITE_NODES)
    if not before or after is None:
        raise VerificationUnavailable(f"site {site.id}: cannot cut it out of the "
                                      + ("original" if not before else "result") + " on its own")
    read = {i for n in list(before.values()) + list(after.values()) for i in n.input}
    return before, after, [f for f in free if f in read], target, result_target


def _counterpart(original: _Model, result: _Model, tensor: str) -> tuple[str, str] | None:
    """(original tensor, result tensor) that play the same role, found by following `tensor`
    forward in the result to a place both models share: a node of the original that reads it (at
    the same input), or a graph output. None when there is no such place within a few nodes."""
    outputs = [o.name for o in result.proto.graph.output]
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in result.proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for _ in range(8):
        if tensor in outputs:
            return original.proto.graph.output[outputs.index(tensor)].name, tensor
        for node in readers.get(tensor, []):
            twin = original.by_label.get(label(node))
            if twin is not None and twin.op_type == node.op_type:
                index = list(node.input).index(tensor)
                if index < len(twin.input):
                    return twin.input[index], tensor
        following = readers.get(tensor, [])
        if len(following) != 1 or not following[0].output:
            return None
        tensor = following[0].output[0]
    return None


def _epsilons(model: _Model, nodes: dict[int, onnx.NodeProto]) -> list[float]:
    """The epsilons of a pattern: `epsilon` attributes, and small positive scalars added in it."""
    found = set()
    for node in nodes.values():
        for a in node.attribute:
            if a.name == "epsilon" and a.type == onnx.AttributeProto.FLOAT and a.f > 0:
                found.add(float(a.f))
        if node.op_type == "Add":
            for name in node.input:
                value = model.small_value(name)
                if value is not None and value.size == 1 and 0 < abs(float(value.flat[0])) < 1e-2:
                    found.add(abs(float(value.flat[0])))
    return sorted(found)


def _magnitudes(epsilons: list[float]) -> list[tuple[str, float, float]]:
    """MAGNITUDES plus, for each epsilon of the pattern, inputs whose variance is that epsilon and
    a hundredth of it (where max(var, eps) and var + eps differ most, and eps dominates)."""
    extra = []
    for eps in epsilons:
        extra += [(f"variance = epsilon {eps:g}", float(np.sqrt(eps)), 0.0),
                  (f"variance = epsilon {eps:g} / 100", float(np.sqrt(eps)) / 10, 0.0)]
    return list(MAGNITUDES) + extra


def _feeds(spec: dict[str, tuple[int, list]], free: tuple[int, int | None], seed: int,
           magnitudes=MAGNITUDES) -> list[tuple[str, dict]]:
    """One feed per magnitude for the data inputs `spec` (name -> (elem_type, dims or None))."""
    value, leading = free
    leading = value if leading is None else leading
    result = []
    for index, (what, scale, offset) in enumerate(magnitudes):
        rng = np.random.default_rng([seed, index])
        feeds = {}
        for name, (elem, dims) in spec.items():
            shape = [d if isinstance(d, int) and d > 0 else (leading if axis == 0 else value)
                     for axis, d in enumerate(dims or [])]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
            if np.issubdtype(dtype, np.floating) or str(dtype) == "bfloat16":
                # 16-bit inputs stay in the range their layers are built for (30x overflows fp16 sums)
                big = scale > 1 and np.dtype(dtype).itemsize == 2
                feeds[name] = np.asarray((offset + scale * rng.standard_normal(shape)) / (8.0 if big else 1.0)
                                         ).astype(dtype)
            elif dtype == np.bool_:
                feeds[name] = np.asarray(rng.integers(0, 2, size=shape)).astype(np.bool_)
            else:
                feeds[name] = np.asarray(rng.integers(0, 2, size=shape)).astype(dtype)
        result.append((what, feeds))
    return result


def _run(model: bytes, label_: str, feeds: list[dict], output: str) -> list[np.ndarray]:
    from normfold.verify import _run as run_session
    from normfold.verify import open_session

    session = open_session(model, label_)
    names = {i.name for i in session.session.get_inputs()}
    return [run_session(session, {k: v for k, v in f.items() if k in names}, [output])[output] for f in feeds]


def check_site(original: _Model, result: _Model, site: SiteRecord, seed: int = 0, atol=None,
               rtol=None) -> OutputComparison:
    """The site's pattern and its replacement, run on the same inputs at every magnitude."""
    from normfold.accuracy import _by_accuracy, _by_magnitude, _run_float64
    from normfold.verify import _merge, compare_arrays, lowest_float_types

    nodes, replacement, free, target, result_target = _pattern(original, result, site)
    spec = {name: original.shapes.get(name, (None, None)) for name in free}
    missing = [n for n, (elem, dims) in spec.items() if elem is None or dims is None]
    if missing:
        raise VerificationUnavailable(f"site {site.id}: the type or rank of input(s) {missing} is unknown")
    last_error: Exception | None = None
    magnitudes = _magnitudes(_epsilons(original, nodes))
    for free_dims in FREE_DIMS:
        feeds = _feeds(spec, free_dims, seed, magnitudes)
        shaped = {n: (elem, list(feeds[0][1][n].shape)) for n, (elem, _) in spec.items()}
        pattern = original.cut(dict(nodes), target, shaped)
        try:
            expected = _run(pattern, f"site {site.id} (original)", [f for _, f in feeds], target)
        except VerificationUnavailable as exc:
            last_error = exc
            continue
        got = _run(result.cut(dict(replacement), result_target, shaped), f"site {site.id} (result)",
                   [f for _, f in feeds], result_target)
        tolerance_dtype = lowest_float_types(onnx.load_from_string(pattern), [target]).get(target)
        merged = None
        for e, g in zip(expected, got):
            merged = _merge(merged, compare_arrays(target, e, g, atol, rtol, tolerance_dtype))
        merged.name = site.id
        if not merged.passed and merged.tolerance_dtype and atol is None and rtol is None and merged.max_abs_error < np.inf:
            try:
                exact, _ = _run_float64(pattern, [f for _, f in feeds], [target])
            except VerificationUnavailable:
                _by_magnitude(merged, expected, got)
            else:
                _by_accuracy(merged, expected, got, [x[target] for x in exact])
        return merged
    raise last_error or VerificationUnavailable(f"site {site.id}: cannot run its pattern")


def verify_locally(original_path, result_path, sites: list[SiteRecord], *, seed: int = 0, atol=None,
                   rtol=None) -> Verification:
    """Every rewritten site of `sites` checked on its own (see the module docstring)."""
    atol = atol.get(None) if isinstance(atol, dict) else atol
    rtol = rtol.get(None) if isinstance(rtol, dict) else rtol
    original, result = _Model(original_path), _Model(result_path)
    verification = Verification("passed", seed=seed, mode="local")
    verification.rule = ("each rewritten site's pattern and replacement on the same inputs at several magnitudes: "
                         + verification.rule)
    skipped = []
    for site in sites:
        if site.status == "left" or not site.output:
            continue
        if site.graph != "main":
            skipped.append(f"{site.id} (in a subgraph)")
            continue
        try:
            comparison = check_site(original, result, site, seed, atol, rtol)
        except VerificationUnavailable as exc:
            skipped.append(str(exc))
            continue
        verification.sites.append(comparison)
    verification.sites.sort(key=lambda c: (c.passed, -c.needed_atol, -c.max_abs_error))
    verification.inputs = {}
    failing = [c.name for c in verification.sites if not c.passed]
    if skipped:
        verification.notes.append(f"{len(skipped)} site(s) not verified locally: " + "; ".join(skipped[:5]))
    if failing:
        verification.status = "failed"
        verification.first_failing_site = failing[0]
        verification.detail = f"sites differ: {', '.join(failing[:10])}"
    elif skipped and not verification.sites:
        verification.status = "unavailable"
        verification.detail = verification.notes[-1]
    elif skipped:
        verification.status = "unavailable"
        verification.detail = verification.notes[-1]
    return verification
