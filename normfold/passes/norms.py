"""LayerNorm and RMSNorm, recognised by what a subgraph computes rather than by how it is spelled.

    LayerNorm:  Y = (X - E[X]) * (Var[X] + eps)^-1/2 * gamma + beta        over axes A
    RMSNorm:    Y =  X         * (E[X^2] + eps)^-1/2 * gamma

From every reduction (ReduceMean, ReduceSum, ReduceSumSquare, GlobalAveragePool) the recogniser
takes the tensor X it reduces (seen through Casts, Identity and a square), reads the tensors
downstream of the reduction in the canonical view of `_algebra` (X a Leaf there), and takes the last
one that is exactly one of the two forms. The algebra is the matcher: each of these, and any mix,
is the same site, with no code of its own (tests/test_norms.py holds them as cases):

    TorchScript   X ─> ReduceMean ─> Sub ─> Pow(2) | Mul(d, d) ─> ReduceMean ─> Add(eps) ─> Sqrt ─> Div
                  ─> Mul(gamma) ─> Add(beta)                               (Reciprocal, Pow(-0.5), Div(1, .))
    Keras 3       r = Reciprocal(Sqrt(var + eps)); g = r * gamma;  X * g + (Neg(mean) * g + beta)
    tf_keras      X * g + (beta - mean * g)
    Keras moments ReduceMean ─> Identity (StopGradient) ─> Sub ...;  Add(x * r, Neg(mean) * r)
    jax / Flax    Max(E[X^2] - E[X]^2, 0) + eps ...                       (raw moments)
    sums          ReduceSum(X) / N, ReduceSumSquare(X) / N, ReduceSum(mask * X) / ReduceSum(mask)
    Llama / T5    Cast(f32) twice ─> Pow(2) ─> ReduceMean ─> Add ─> Sqrt ─> Reciprocal ─> Mul ─> Cast ─> Mul(w)
    Gemma, Keras  gamma multiplied into the inverse RMS first;  (1 + w) as the scale

become one LayerNormalization (opset 17) or RMSNormalization (opset 23; onnxruntime's
com.microsoft.SimplifiedLayerNormalization below it with --allow-contrib), with gamma and beta
computed in float64 from every constant the model multiplies in and stored in the input's dtype.

Mixed precision keeps the model's rounding points: when the site computes in a wider type than it
reads and writes (Cast f16 -> f32 ... Cast -> f16), it becomes an op of the narrow type (which
normalizes in float32, stash_type=1, rounds, then scales) only if the model also rounds before gamma
and beta; when the model scales in float32, the two Casts stay and the op runs between them in
float32 with the exact float32 parameters.

A computation that takes a mean square or variance and its inverse square root but is not one of
the forms (max(var, eps) for var + eps, a second tensor mixed in, a non-constant gamma) is reported
`unrecognized-pattern` with its op sequence: a norm is never missed silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import onnx

from normfold.graph import FLOAT_TYPES, GraphView, attr, label, subgraphs
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._algebra import (CanonicalView, canonical_view, Expr, Leaf, Mean, NormForm, Root, norm_form,
                                      varies_along)
from normfold.passes._pattern import is_op, reuse_or_add, shown_dims

REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool")
# Ops a norm's value flows through between its statistics and its output.
FLOWS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Cast", "Identity", "Reshape",
                   "Transpose", "Max", "Where", "ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool",
                   "Squeeze", "Unsqueeze"})
MAX_HOPS = 24
LN_OPSET, RMS_OPSET = 17, 23
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_VERSION = 1
LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
# Element types onnxruntime's CPU GroupNormalization-21 kernel runs (stash_type=1); bfloat16 has none.
GROUPNORM_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class NormSite:
    """A recognised norm: the nodes computing `output` from `input` and constants, and their algebra."""

    form: NormForm
    anchor: onnx.NodeProto  # the first reduction (names the new nodes)
    input: str  # the tensor the fused op reads
    output: str  # the tensor it writes (the site's last tensor keeps its name)
    nodes: list[onnx.NodeProto]  # in graph order
    dtype: int  # the fused op's element type
    note: str = ""
    grouping: "Grouping | None" = None  # set when the norm runs over a grouped view of a tensor: GroupNorm
    transposed: bool = False  # `input` already is X read through form.x.perm (the model's own Transpose)


@dataclass(frozen=True)
class Grouping:
    """X (N, C, *S) seen as Z = Reshape(layout(X)) with C split into (G, C/G), the norm over Z
    reshaped back: a GroupNorm of X. GroupNormalization reads `source` (channels at axis 1) and
    `perm_out` (or None) moves its result into the layout the site wrote."""

    source: str
    groups: int
    per_group: int  # C/G
    axis: int  # where G stands in the layout the norm is read in (C/G right after it)
    rank: int  # the rank of that layout
    perm_out: tuple[int, ...] | None
    transpose_in: tuple[int, ...] | None = None  # a Transpose normfold adds in front (channels-last X)


@dataclass
class Refused:
    """A norm recognised by its algebra that cannot be rewritten (the reason says why)."""

    centered: bool
    left: Left
    grouped: bool = False  # a GroupNorm (reported under its pass)
    nodes: list = field(default_factory=list)  # the norm's nodes, so that no other rule reports it again


@dataclass
class Unrecognized:
    """Statistics of a norm whose use is none of the forms."""

    anchor: onnx.NodeProto
    nodes: list[onnx.NodeProto]
    output: str
    centered: bool
    why: str


def origin(view: GraphView, tensor: str) -> str:
    """The tensor behind Identity and float Casts."""
    for _ in range(8):
        node = view.producer.get(tensor)
        if not (is_op(node, "Identity") or (is_op(node, "Cast") and attr(node, "to") in FLOAT_TYPES
                                             and view.elem_type(node.input[0]) in FLOAT_TYPES)):
            break
        tensor = node.input[0]
    return tensor


def behind(view: GraphView, tensor: str) -> str:
    """The tensor behind Identity, float Casts and Transposes (the canonical view reads through them)."""
    for _ in range(8):
        tensor = origin(view, tensor)
        node = view.producer.get(tensor)
        if not is_op(node, "Transpose"):
            break
        tensor = node.input[0]
    return tensor


def _centering(view: GraphView, reduction: onnx.NodeProto) -> Unrecognized | None:
    """X - (a statistic of X computed from this reduction) that no norm explains: said, with the ops
    after it (a mean reshaped, guarded by div_no_nan, or over a dynamic count)."""
    if not is_op(reduction, "ReduceMean", "ReduceSum", "GlobalAveragePool"):
        return None
    xs = {behind(view, reduction.input[0])} | {behind(view, t) for t in _candidates(view, reduction)}
    downstream = _downstream(view, reduction)[:24]
    reached = set(downstream)
    sub = next((u for t in downstream for u in view.users(t) if is_op(u, "Sub") and u.input[1] in reached
                and behind(view, u.input[0]) in xs), None)
    if sub is None:
        return None
    after = list({id(n): n for t in _downstream(view, sub)[:12] if t in view.producer
                  for n in [view.producer[t]] if n is not sub}.values())
    return Unrecognized(reduction, [reduction, sub] + after, sub.output[0], True,
                        f"{label(reduction)} subtracts a mean like a LayerNorm, but the nodes after it are not a "
                        f"norm normfold can prove ({_op_sequence([reduction, sub] + after)})")


def _candidates(view: GraphView, reduction: onnx.NodeProto) -> list[str]:
    """The tensors a reduction may be taking statistics of: its input, or what its input squares,
    also behind a Transpose; for X - mean(X), X (normalizing it is a LayerNorm of X, which its
    mean's reduction finds first, unless that one is another norm's: two LayerNorms of one X,
    merged up to X - mean(X) by a simplifier)."""
    u = origin(view, reduction.input[0])
    found = [behind(view, u), u]
    node = view.producer.get(u)
    if is_op(node, "Pow", "Mul") and len(node.input) == 2:
        found += [f(view, t) for t in node.input if not view.is_const(t) for f in (behind, origin)]
    return list(dict.fromkeys(centered_of(view, t) or t for t in found))


def centered_of(view: GraphView, tensor: str) -> str | None:
    """X, where `tensor` is X - mean(X), in any spelling of the mean (through Casts, Identity and
    Transposes): its square is a variance, and what it normalizes is a LayerNorm of X."""
    sub = view.producer.get(behind(view, tensor))
    if not is_op(sub, "Sub", "Add"):
        return None
    for x in dict.fromkeys((behind(view, sub.input[0]), behind(view, sub.input[1]))):
        e = canonical_view(view, frozenset({x})).expr(tensor)
        if any(isinstance(a, Mean) and a.arg.leaves == {x} for sig in e.terms for a, _ in sig):
            return x
    return None


def _downstream(view: GraphView, start: onnx.NodeProto, cv: CanonicalView | None = None,
                x: str | None = None) -> list[str]:
    """Float tensors reachable from `start` through value-flow ops, nearest first (bounded). With a
    canonical view, the walk stops at tensors that read anything but `x` (a residual Add after the
    norm): nothing after them is a norm of x alone."""
    order, seen, frontier = [], {id(start)}, [start]
    for _ in range(MAX_HOPS):
        nxt = []
        for node in frontier:
            for out in node.output:
                if out:
                    order.append(out)
                if cv is not None and not cv.expr(out).leaves <= {x}:
                    continue
                for user in view.users(out):
                    if id(user) not in seen and is_op(user, *FLOWS):
                        seen.add(id(user))
                        nxt.append(user)
        frontier = nxt
        if not frontier or len(order) > 256:
            break
    return order


def _cone(view: GraphView, output: str, stops: set[str]) -> list[onnx.NodeProto] | None:
    """The nodes computing `output` from `stops`, constants and shape arithmetic (None if it reads
    anything else)."""
    nodes, seen, stack = {}, set(), [output]
    while stack:
        t = stack.pop()
        if not t or t in stops or t in seen:
            continue
        seen.add(t)
        if view.is_const(t) or view.elem_type(t) not in (None, *FLOAT_TYPES):
            continue  # constants, and Shape/Equal chains (they go when their last reader goes)
        node = view.producer.get(t)
        if node is None:
            return None
        nodes[id(node)] = node
        stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(view.nodes)}
    return sorted(nodes.values(), key=lambda n: order.get(id(n), len(order)))


def _reached(view: GraphView, tensors: list[str]) -> list[onnx.NodeProto]:
    """The nodes writing `tensors` (a reduction's _downstream walk, which starts at its output): the
    nodes of a norm whose cone reads other tensors too, so that its other reductions do not report
    it again."""
    nodes = (view.producer.get(t) for t in tensors)
    return list({id(n): n for n in nodes if n is not None}.values())


def escapes(view: GraphView, nodes: list[onnx.NodeProto], keep: str) -> str | None:
    """The first tensor of the site (other than `keep`) read outside it. A reader that computes
    only integers or booleans (Shape, Size, Equal) is no reader of the value when all it computes
    goes back into the site: Reshape targets, ones_like masks and div_no_nan guards of a dynamic
    batch are built that way, and die with the site."""
    inside = {id(n) for n in nodes}

    def harmless(node: onnx.NodeProto, depth: int = 0) -> bool:
        if id(node) in inside:
            return True
        if depth > 16 or node.domain not in ("", "ai.onnx") or any(True for _ in subgraphs(node)):
            return False
        return all(not out or (not view.is_graph_output(out) and view.elem_type(out) not in (None, *FLOAT_TYPES)
                               and all(harmless(u, depth + 1) for u in view.users(out)))
                   for out in node.output)

    for node in nodes:
        for name in node.output:
            if not name or name == keep:
                continue
            if view.is_graph_output(name) or any(id(u) not in inside and not harmless(u) for u in view.users(name)):
                return name
    return None


def _outside_use(view: GraphView, nodes: list[onnx.NodeProto], tensor: str) -> str:
    """Who reads `tensor` besides the site's `nodes` (what a user looks for in the graph)."""
    inside = {id(n) for n in nodes}
    readers = [label(u) for u in view.users(tensor) if id(u) not in inside]
    where = ["a graph output"] if view.is_graph_output(tensor) else []
    if readers:
        where.append("read by " + ", ".join(readers[:3]) + (", ..." if len(readers) > 3 else ""))
    return " and ".join(where)


def _is_x(cv: CanonicalView, tensor: str, x: str, perm: tuple[int, ...] | None = None) -> bool:
    """Whether `tensor` is X itself (through Casts), or with `perm` X read through that Transpose."""
    e = cv.expr(tensor).single()
    return e is not None and e[0] == ((Leaf(x, perm), Fraction(1)),) and np.all(e[1] == 1)


def _op_sequence(nodes: list[onnx.NodeProto]) -> str:
    return " -> ".join(n.op_type for n in nodes)


def recognise(view: GraphView, reduction: onnx.NodeProto) -> NormSite | Refused | Unrecognized | None:
    """The norm whose statistics `reduction` computes, if any (see the module docstring)."""
    unrecognized = refusal = None
    for x in _candidates(view, reduction):
        cv = canonical_view(view, frozenset({x}))
        tensors = _downstream(view, reduction, cv, x)
        for t in reversed(tensors):  # the furthest first: it includes gamma and beta
            e = cv.expr(t)
            form = norm_form(e) if e.leaves == {x} else None
            if form is None or form.x.name != x or (form.beta is not None and not form.centered):
                continue
            cone = _cone(view, t, {x}) or _reached(view, tensors[:tensors.index(t) + 1])
            grouped = _grouped(view, reduction, x, t, form)
            if isinstance(grouped, NormSite):
                return grouped
            if isinstance(grouped, Left):
                refusal = refusal or Refused(True, grouped, grouped=True, nodes=cone)
                continue
            site = _site(view, cv, reduction, x, t, form)
            if isinstance(site, NormSite):
                return site
            refusal = refusal or Refused(form.centered, site, nodes=cone)
        if unrecognized is None:
            unrecognized = _norm_like(view, cv, reduction, tensors, x)
    if refusal is not None:  # another candidate tensor may have worked; none did
        return refusal
    if unrecognized is None:
        unrecognized = _centering(view, reduction)
    return unrecognized


def _grouped(view: GraphView, reduction, z: str, y: str, form: NormForm):
    """The GroupNorm reading of a LayerNorm over a grouped view of a tensor, or None:

        X ─> Reshape ─> Z ─> [Transposes anywhere inside] ─> norm over all but N and G ─> Reshape ─> Y

    Z splits the channel axis c of X into (G, C/G); the norm is read in some layout of Z (its leaf
    Transpose `form.x.perm`: onnxruntime moves Transposes into the moments); the last Reshape merges G
    and C/G back. Keras 3 / tf_keras (X = Transpose(NCHW) in NHWC, Z = [N, H, W, G, C/G]), their
    optimized forms and channels-first groupings are all this one reading. The Reshapes are checked on
    the inferred shapes (a dynamic batch may be the one unknown: equal element counts make it equal).
    GroupNormalization reads the tensor whose axis 1 holds the channels (through the exporter's
    Transposes) and one Transpose after it restores the layout the site wrote."""
    split, merge = view.producer.get(z), view.sole_user(y)
    if not (is_op(split, "Reshape") and is_op(merge, "Reshape") and form.centered):
        return None
    x, out = split.input[0], merge.output[0]
    dims = _grouping_dims(view, split, merge, form)
    if dims is None or isinstance(dims, Left):
        return dims
    dx, dz, dout = dims
    rank = len(dz)
    p = list(form.x.perm or range(rank))  # axis j of the norm's layout is axis p[j] of Z
    c = _group_axis(dx, dz, p, {a + rank for a in form.axes})
    if c is None:
        return None
    # From here on it is a GroupNorm: what stops the rewrite is said under the groupnorm pass.
    jg = p.index(c)
    for what, coeff in (("gamma", form.gamma), ("beta", form.beta)):
        if coeff is not None and varies_along(coeff, tuple(a - rank for a in range(rank) if a not in (jg, jg + 1))):
            return Left("not-per-channel", f"the GroupNorm's {what} of shape {list(coeff.shape)} varies along "
                                           "axes other than the channels")
    # Axis k of the site's output is axis q[k] of X (G and C/G merged back into c).
    merged = p[:jg] + [c] + p[jg + 2:]
    q = [z_axis if z_axis <= c else z_axis - 1 for z_axis in merged]
    if any(d is not None and d != dx[i] for d, i in zip(dout, q)):
        return Left("unsupported-axis", f"{label(merge)} does not give back the grouped tensor's layout")
    return _groupnorm_site(view, reduction, form, x, out, c, q, Grouping("", int(dz[c]), int(dz[c + 1]), jg, rank, None))


def _groupnorm_site(view: GraphView, reduction, form: NormForm, x: str, out: str, c: int, q: list[int],
                    g: Grouping) -> NormSite | Left:
    """The site once the grouping is proven: what GroupNormalization reads (channels at axis 1, through
    the exporter's Transpose, or a Transpose normfold adds), the Transpose after it, the nodes."""
    xr = len(q)
    to_first = [0, c] + [i for i in range(1, xr) if i != c]
    source = _channels_first(view, x, to_first)
    transpose_in = None
    if source is None:  # channels-last from the start: a Transpose in front (with --allow-transpose)
        source, transpose_in = x, tuple(to_first)
    # Output axis k holds X axis q[k], which is axis to_first.index(q[k]) of the op's result.
    perm_out = tuple(to_first.index(a) for a in q)
    nodes = _cone(view, out, {x})
    escaped = None if nodes is None else escapes(view, nodes, keep=out)
    if nodes is None or escaped is not None:
        return Left("intermediate-used-elsewhere", f"{escaped!r} inside the GroupNorm is also used outside it")
    dtype = view.elem_type(source)
    if dtype is None or dtype != view.elem_type(out):
        return Left("unsupported-dtype", "the GroupNorm reads and writes different types")
    grouping = dataclasses.replace(g, source=source, transpose_in=transpose_in,
                                   perm_out=None if perm_out == tuple(range(xr)) else perm_out)
    return NormSite(form, reduction, source, out, nodes, dtype, grouping=grouping)


def _grouping_dims(view: GraphView, split, merge, form: NormForm):
    """The dimensions of X, Z and the site's output, checkable against each other: inferred ones,
    or, where several sizes are dynamic (equal unknowns prove nothing), each named by what the graph
    computes it from (the Reshapes' targets against X's own dimensions, symbol for symbol)."""
    x, z, out = split.input[0], split.output[0], merge.output[0]
    dx, dz, dout = view.dims(x), view.dims(z), view.dims(out)
    if dx is None or dz is None or dout is None or len(dz) != len(dx) + 1 or len(dout) != len(dx):
        return None
    if sum(1 for d in dz if not isinstance(d, int)) <= 1:
        return dx, dz, dout
    proven = _symbolic_dims(view, split, merge, x)
    if proven is None and isinstance(dz[-1], int) and isinstance(dz[-2], int) and len(form.axes) == len(dz) - 2:
        return Left("unknown-shape", f"{label(split)} groups {x!r} {shown_dims(dx)}, a tensor with several dynamic "
                                     "dimensions; normfold cannot prove it splits only the channels")
    return proven


def _symbolic_dims(view: GraphView, split, merge, x: str):
    """X's, Z's and the output's dimensions with a dynamic size as the symbol of the dimension it
    is (shape_values.ShapeValues), or None when a target has an entry that is neither."""
    from normfold.shape_values import shape_values

    values = shape_values(view)
    dx = values.dims_of(x)
    targets = [values.value(node.input[1]) for node in (split, merge)]
    if dx is None or any(t is None for t in targets):
        return None
    resolved = []
    for target, source in zip(targets, (dx, None)):
        out = [source[i] if t == 0 and source is not None and i < len(source) else t for i, t in enumerate(target)]
        # A -1 in front stands for the batch: every other entry is checked equal, so the element
        # counts make it X's first dimension.
        if out and out[0] == -1 and out.count(-1) == 1:
            out[0] = dx[0]
        if any(isinstance(t, int) and t < 0 for t in out) or (source is None and 0 in out):
            return None
        resolved.append(out)
    return dx, resolved[0], resolved[1]


def _group_axis(dx: list, dz: list, p: list[int], axes: set[int]) -> int | None:
    """The axis c of Z that holds G when Z splits X's axis c into (G, C/G), the norm's layout keeps
    G and C/G together, and the norm runs over every axis but N and G; else None."""
    rank = len(dz)
    for c in range(1, rank - 1):
        if (_splits(dx, dz, c) and c + 1 in p and p.index(c + 1) == p.index(c) + 1 and p[0] == 0
                and axes == set(range(1, rank)) - {p.index(c)}):
            return c
    return None


def _channels_first(view: GraphView, x: str, to_first: list[int]) -> str | None:
    """The tensor GroupNormalization reads: x when its channels are at axis 1, else what the
    exporter's Transpose in front of x reads, when that puts the channels there."""
    if to_first == list(range(len(to_first))):
        return x
    transpose = view.producer.get(x)
    perm0 = [int(i) for i in attr(transpose, "perm") or []] if is_op(transpose, "Transpose") else []
    if len(perm0) == len(to_first) and [perm0[i] for i in to_first] == list(range(len(to_first))):
        return transpose.input[0]
    return None


def _splits(dx: list, dz: list, i: int) -> bool:
    """Whether Z's axes i, i+1 are X's axis i split in two, every other axis the same."""
    return (dz[:i] == dx[:i] and dz[i + 2:] == dx[i + 1:] and isinstance(dz[i], int) and isinstance(dz[i + 1], int)
            and dz[i] * dz[i + 1] == dx[i])


def _site(view: GraphView, cv: CanonicalView, reduction, x: str, y: str, form: NormForm) -> NormSite | Left:
    stops = {x}
    for _ in range(4):
        nodes = _cone(view, y, stops)
        if nodes is None:
            return Left("unrecognized-pattern", f"the norm at {label(reduction)} reads tensors other than {x!r}")
        escaped = escapes(view, nodes, keep=y)
        if escaped is None:
            break
        # A Cast of X read elsewhere too (the residual of an fp32 Llama) stays, and so does the
        # Transpose of X the result is built on (Keras over H, W, C, with a residual): the norm reads it.
        if not (_is_x(cv, escaped, x) or (form.x.perm and _is_x(cv, escaped, x, form.x.perm))):
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the norm is also used outside it "
                                                       f"({_outside_use(view, nodes, escaped)})")
        stops.add(escaped)
    else:
        return Left("intermediate-used-elsewhere", f"tensors inside the norm at {label(reduction)} are used outside it")
    inputs = sorted(stops - {x}) or [x]
    if len(inputs) > 1:
        return Left("intermediate-used-elsewhere", f"{inputs!r} inside the norm are also used outside it")
    site = _precision(view, cv, reduction, form, inputs[0], y, nodes)
    if isinstance(site, NormSite) and form.x.perm and _is_x(cv, site.input, x, form.x.perm):
        site.transposed = True
    return site


def _precision(view, cv, reduction, form: NormForm, source: str, y: str, nodes) -> NormSite | Left:
    """Choose the fused op's type so that it rounds where the model rounds (module docstring)."""
    t_in, t_out = view.elem_type(source), view.elem_type(y)
    if t_in is None or t_out is None:
        return Left("unknown-shape", f"the element types around the norm at {label(reduction)} could not be inferred")
    last = view.producer[y]
    affine = not np.all(form.gamma == 1) or form.beta is not None
    narrowing = [n for n in nodes if is_op(n, "Cast") and attr(n, "to") == t_out and view.elem_type(n.input[0]) != t_out]
    if t_in == t_out and (not narrowing or not affine or any(_rounds_before_affine(cv, n) for n in narrowing)):
        return NormSite(form, reduction, source, y, nodes, t_in)
    # Otherwise the op runs in the wide type between the model's own Casts, which stay.
    end = last.input[0] if is_op(last, "Cast") and last in narrowing else y
    wide = view.elem_type(end)
    lead = next((n for n in nodes if is_op(n, "Cast") and n.input[0] == source and attr(n, "to") == wide), None)
    src = lead.output[0] if lead is not None else (source if t_in == wide else None)
    inner = None if src is None else _cone(view, end, {src})
    if inner is not None and escapes(view, inner, keep=end) is None:
        return NormSite(form, reduction, src, end, inner, wide,
                        note="the model's Casts stay around the fused op: it normalizes and scales in "
                             f"{onnx.TensorProto.DataType.Name(wide)}")
    return Left("unsupported-dtype", f"the norm at {label(reduction)} reads "
                                     f"{onnx.TensorProto.DataType.Name(t_in)} and writes "
                                     f"{onnx.TensorProto.DataType.Name(t_out)} with rounding points the fused "
                                     "op cannot reproduce")


def _rounds_before_affine(cv: CanonicalView, cast: onnx.NodeProto) -> bool:
    """Whether a narrowing Cast rounds the normalized value itself (before gamma and beta)."""
    f = norm_form(cv.expr(cast.input[0]))
    return f is not None and np.all(f.gamma == 1) and f.beta is None


def _moment_of(e: Expr, x: str) -> bool:
    """Whether `e` holds a mean of a power (not 1) of the tensor x itself: a norm statistic of x."""
    for sig in e.terms:
        for a, _ in sig:
            if isinstance(a, Mean) and any(isinstance(b, Leaf) and b.name == x and p != 1
                                           for s in a.arg.terms for b, p in s):
                return True
            if isinstance(a, (Mean, Root)) and _moment_of(a.arg if isinstance(a, Mean) else a.base, x):
                return True
    return False


def _norm_like(view, cv: CanonicalView, reduction, tensors, x: str) -> Unrecognized | None:
    """Statistics (a mean of a power of X) under a root or a negative power that no form explains."""
    for t in tensors:
        e = cv.expr(t)
        for sig in e.terms:
            for a, p in sig:
                base = a.base if isinstance(a, Root) else Expr.atom(a) if isinstance(a, Mean) else None
                q = a.power * p if isinstance(a, Root) else p
                if base is None or (q.denominator == 1 and q > 0) or not _moment_of(base, x):
                    continue
                nodes = _cone(view, t, set(reduction.input[:1])) or [reduction]
                centered = any(isinstance(b, Mean) and all(q2 == 1 for s in b.arg.terms for _, q2 in s)
                               for s in base.terms for b, _ in s)
                return Unrecognized(reduction, nodes, t, centered,
                                    f"{label(reduction)} takes a mean square and its inverse square root like a "
                                    f"norm, but what it computes is not a LayerNorm or RMSNorm normfold can prove "
                                    f"({_op_sequence(nodes)})")
    return None


# ---- the rules ------------------------------------------------------------------------------
class NormRule(Rule):
    """One rule per family over the shared recogniser: `centered` picks LayerNorm or RMSNorm."""

    status = "fused"
    recognizer = True  # the driver offers it no node another site already reported
    centered = True
    grouped = False
    kind = ""

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, *REDUCTIONS):
            return None
        found = _recognised(view, node)
        if isinstance(found, Unrecognized) or found is None:
            return None  # NormLike reports it, after every other rule had its chance
        centered = found.form.centered if isinstance(found, NormSite) else found.centered
        grouped = found.grouping is not None if isinstance(found, NormSite) else found.grouped
        if centered != self.centered or grouped != self.grouped:
            return None
        if isinstance(found, Refused):
            return Match(self.kind, found.nodes or [node], node.output[0], {"left": found.left})
        return Match(self.kind, found.nodes, found.output, {"site": found})

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        if "left" in match.parts:
            return match.parts["left"]
        site: NormSite = match.parts["site"]
        shape = _normalized(view, site, ctx.allow_transpose and self.centered)
        if isinstance(shape, Left):
            return shape
        perm, k, norm_shape = shape
        op = self._op(ctx)
        if isinstance(op, Left):
            return op
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(site.dtype)
        gamma, rounding = _parameter(site.form.gamma, perm, k, norm_shape, np_dtype)
        beta = None
        if site.form.beta is not None:
            beta, r2 = _parameter(site.form.beta, perm, k, norm_shape, np_dtype)
            rounding = max(rounding, r2)
        eps = site.form.stats.eps
        if not (np.isfinite(eps) and eps >= 0):
            return Left("invalid-statistics", f"epsilon {eps} is negative or not finite")
        return {"op": op, "perm": perm, "k": k, "gamma": gamma, "beta": beta, "eps": eps, "rounding": rounding}

    def _op(self, ctx: FoldContext):
        raise NotImplementedError

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        site: NormSite = match.parts["site"]
        return emit(view, site, plan, self.centered)


def _recognised(view: GraphView, node: onnx.NodeProto):
    """recognise(), once per node until the graph is edited: the rules of both families and
    NormLike ask in turn."""
    return view.derived(("recognised", id(node)), lambda: recognise(view, node))


class NormLike(Rule):
    """Statistics of a norm that no rule rewrote or reported: left `unrecognized-pattern`, so that a
    norm is never missed silently. Runs after every other rule of its pass at the node."""

    status = "fused"
    recognizer = True

    def __init__(self, centered: bool):
        self.centered = centered
        self.name = "layernorm" if centered else "rmsnorm"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, *REDUCTIONS):
            return None
        found = _recognised(view, node)
        if not isinstance(found, Unrecognized) or found.centered != self.centered:
            return None
        return Match(f"{'LayerNorm' if self.centered else 'RMSNorm'}-like (unrecognized spelling)", found.nodes,
                     found.output, {"left": Left("unrecognized-pattern", found.why)})

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        return match.parts["left"]


class LayerNormRule(NormRule):
    name = "layernorm"
    min_opset = LN_OPSET
    centered = True
    kind = "LayerNorm (decomposed)"

    def _op(self, ctx):
        if ctx.opset < LN_OPSET:
            return Left("opset-too-old", f"LayerNormalization needs opset {LN_OPSET}; the model has opset "
                                         f"{ctx.opset} (rerun with --target-opset {LN_OPSET})")
        return ("LayerNormalization", "")


def _channels_of(c: np.ndarray, g: Grouping) -> np.ndarray:
    """A coefficient of the grouped layout (varying along G and C/G only) as the [C] vector
    GroupNormalization-21 takes (channel = group * C/G + index)."""
    full = c.reshape((1,) * (g.rank - c.ndim) + c.shape)  # coefficients are right-aligned
    pick = tuple(slice(None) if i in (g.axis, g.axis + 1) else 0 for i in range(g.rank))
    grouped = np.broadcast_to(full[pick] if full.ndim else full, (g.groups, g.per_group))
    return np.ascontiguousarray(grouped.reshape(-1), dtype=np.float64)


class GroupNormRule(NormRule):
    """A LayerNorm over a grouped view of X (see _grouped) becomes one GroupNormalization-21."""

    name = "groupnorm"
    min_opset = 21
    grouped = True
    kind = "GroupNorm (decomposed, grouped view)"

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        if "left" in match.parts:
            return match.parts["left"]
        site: NormSite = match.parts["site"]
        g = site.grouping
        if g.transpose_in is not None and not ctx.allow_transpose:
            return Left("unsupported-axis", f"the GroupNorm groups the last axis of {site.input!r}, which no "
                                            "Transpose from a channels-first tensor puts there (--allow-transpose "
                                            "wraps GroupNormalization in a Transpose pair)")
        if ctx.opset < 21:
            return Left("opset-too-old", f"GroupNormalization with per-channel scale needs opset 21; the model has "
                                         f"opset {ctx.opset} (rerun with --target-opset 21)")
        if site.dtype not in GROUPNORM_DTYPES:
            return Left("unsupported-dtype", f"{site.input!r} is {onnx.TensorProto.DataType.Name(site.dtype)}; the "
                                             "fused op is written only for float32, float16 and float64")
        eps = site.form.stats.eps
        if not (np.isfinite(eps) and eps > 0):
            return Left("invalid-statistics", f"epsilon {eps} is not positive")
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(site.dtype)
        params, rounding = [], 0.0
        for c in (site.form.gamma, site.form.beta if site.form.beta is not None else np.zeros(())):
            exact = _channels_of(c, g)
            stored = exact.astype(np_dtype)
            rounding = max(rounding, float(np.max(np.abs(stored.astype(np.float64) - exact))))
            params.append(stored)
        return {"scale": params[0], "bias": params[1], "eps": eps, "rounding": rounding}

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        site: NormSite = match.parts["site"]
        g = site.grouping
        anchor = site.anchor
        prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or "GroupNorm")
        scale = view.add_initializer(f"{prefix}.scale", plan["scale"])
        bias = view.add_initializer(f"{prefix}.bias", plan["bias"])
        out = site.output if g.perm_out is None else view.unique_name(f"{prefix}/GroupNormalization_output_0")
        source, created = g.source, []
        if g.transpose_in is not None:
            source = view.unique_name(f"{prefix}/Transpose_in_output")
            created.append(onnx.helper.make_node("Transpose", [g.source], [source], perm=list(g.transpose_in),
                                                 name=view.unique_name(f"{prefix}/Transpose_in")))
        created += [onnx.helper.make_node("GroupNormalization", [source, scale, bias], [out],
                                         name=view.unique_name(f"{prefix}/GroupNormalization"),
                                         num_groups=g.groups, epsilon=plan["eps"], stash_type=1)]
        if g.perm_out is not None:
            created.append(onnx.helper.make_node("Transpose", [out], [site.output], perm=list(g.perm_out),
                                                 name=view.unique_name(f"{prefix}/Transpose")))
        last = site.nodes[-1]
        for node in site.nodes:
            view.remove(node)
        for node in created:
            view.add_node(node, after=last)
        detail = (f"{len(site.nodes)} nodes fused into GroupNormalization (num_groups={g.groups}, "
                  f"epsilon={plan['eps']:g})")
        if g.perm_out is not None:
            detail += f", then Transpose(perm={list(g.perm_out)}) to the layout the site produced"
        return Rewritten([n.name for n in created], detail, max_rounding=plan["rounding"])


class RMSNormRule(NormRule):
    name = "rmsnorm"
    min_opset = RMS_OPSET
    centered = False
    kind = "RMSNorm (decomposed)"

    def _op(self, ctx):
        if ctx.opset >= RMS_OPSET:
            return ("RMSNormalization", "")
        if ctx.allow_contrib:
            return ("SimplifiedLayerNormalization", CONTRIB_DOMAIN)
        return Left("opset-too-old", f"RMSNormalization needs opset {RMS_OPSET}; the model has opset {ctx.opset} "
                                     f"(rerun with --target-opset {RMS_OPSET}, or --allow-contrib for "
                                     f"{CONTRIB_DOMAIN}.SimplifiedLayerNormalization)")


# ---- check and rewrite, shared by the families ------------------------------------------------
def _normalized(view: GraphView, site: NormSite, allow_transpose: bool):
    """(perm or None, k, normalized shape) for the fused op over `site.input`, or Left."""
    axes, x = site.form.axes, site.form.x
    rank = view.rank(site.input)
    k = len(axes)
    trailing = axes == tuple(range(-k, 0))
    for what, c in (("gamma", site.form.gamma), ("beta", site.form.beta)):
        if c is None:
            continue
        if rank is not None and c.ndim > rank:
            return Left("not-per-channel", f"{what} of shape {list(c.shape)} has more axes than the input")
        others = tuple(a for a in range(-(rank or c.ndim), 0) if a not in axes)
        if varies_along(c, others):
            return Left("not-per-channel", f"{what} of shape {list(c.shape)} varies along axes that are not "
                                           f"normalized ({list(axes)})")
    if rank is None and not trailing:
        return Left("unknown-shape", f"the rank of {site.input!r} could not be inferred")
    perm = None
    if not trailing:
        if rank is None:
            return Left("unknown-shape", f"the rank of {site.input!r} could not be inferred")
        if not trailing and not allow_transpose:
            return Left("unsupported-axis", f"reduction over axes {[a + rank for a in axes]} of a rank-{rank} "
                                            "tensor: the fused op normalizes trailing axes only"
                                            + (" (--allow-transpose wraps it in a Transpose pair)"
                                               if site.form.centered else ""))
        reduced = [a + rank for a in axes]
        perm = [i for i in range(rank) if i not in reduced] + reduced
    dims = view.dims(site.input)
    if dims is not None and x.perm is not None and not site.transposed:
        dims = [dims[i] for i in x.perm]
    if dims is not None:
        dims = [dims[i] for i in perm] if perm is not None else dims
    norm_shape = tuple(dims[-k:]) if dims is not None and all(isinstance(d, int) for d in dims[-k:]) else None
    if norm_shape is None:
        g = site.form.gamma
        if perm is None and g.ndim >= k and all(d > 1 for d in g.shape[-k:]):
            norm_shape = tuple(g.shape[-k:])
        else:
            return Left("unknown-shape", "the size of the normalized axes could not be inferred")
    return perm, k, norm_shape


def _parameter(c: np.ndarray, perm, k: int, norm_shape: tuple, np_dtype) -> tuple[np.ndarray, float]:
    """gamma or beta as the fused op takes it: the normalized shape, in the op's dtype; and its rounding."""
    if perm is not None:
        rank = len(perm)
        c = np.transpose(c.reshape((1,) * (rank - c.ndim) + c.shape), perm)
    # Axes before the last k are 1 here (checked in _normalized): keep the trailing k.
    c = c.reshape(c.shape[c.ndim - k:]) if c.ndim >= k else c.reshape((1,) * (k - c.ndim) + c.shape)
    exact = np.broadcast_to(c, norm_shape)
    with np.errstate(all="ignore"):
        stored = exact.astype(np_dtype)
    rounding = float(np.max(np.abs(stored.astype(np.float64) - exact))) if stored.size else 0.0
    return np.ascontiguousarray(stored), rounding


def emit(view: GraphView, site: NormSite, plan: dict, centered: bool) -> Rewritten:
    """Replace the site's nodes by the fused op (and the Transposes it needs), writing site.output."""
    anchor = site.anchor
    prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or ("LayerNorm" if centered
                                                                                          else "RMSNorm"))
    op, domain = plan["op"]
    inputs = [site.input, reuse_or_add(view, None, plan["gamma"], f"{prefix}.scale")]
    if plan["beta"] is not None:
        inputs.append(reuse_or_add(view, None, plan["beta"], f"{prefix}.bias"))
    created = []
    moved = None if site.transposed else site.form.x.perm
    if moved is not None:  # the statistics read X, the rest Transpose(X): the op reads a Transpose(X)
        inputs[0] = view.unique_name(f"{prefix}/Transpose_output")
        created.append(onnx.helper.make_node("Transpose", [site.input], [inputs[0]], perm=list(moved),
                                             name=view.unique_name(f"{prefix}/Transpose")))
    perm = plan["perm"]
    out = site.output if perm is None else view.unique_name(f"{prefix}/{op}_output")
    if perm is not None:
        source = inputs[0]
        inputs[0] = view.unique_name(f"{prefix}/Transpose_in_output")
        created.append(onnx.helper.make_node("Transpose", [source], [inputs[0]], perm=perm,
                                             name=view.unique_name(f"{prefix}/Transpose_in")))
    stash = onnx.TensorProto.DOUBLE if site.dtype == onnx.TensorProto.DOUBLE else onnx.TensorProto.FLOAT
    extra = {"stash_type": 1} if op == "LayerNormalization" else {"stash_type": stash}
    created.append(onnx.helper.make_node(op, inputs, [out], name=view.unique_name(f"{prefix}/{op}"), domain=domain,
                                         axis=-plan["k"], epsilon=plan["eps"], **extra))
    if perm is not None:
        created.append(onnx.helper.make_node("Transpose", [out], [site.output],
                                             perm=[int(i) for i in np.argsort(perm)],
                                             name=view.unique_name(f"{prefix}/Transpose_out")))
    last = site.nodes[-1]
    for node in site.nodes:
        view.remove(node)
    for node in created:
        view.add_node(node, after=last)
    where = f"{domain}.{op}" if domain else op
    wrapped = "" if perm is None else f", between Transposes {perm} and back"
    if moved is not None:
        wrapped += f", on the input's Transpose {list(moved)} moved in front of it"
    notes = [site.note] if site.note else []
    if domain:
        notes.append(f"uses {CONTRIB_DOMAIN}.SimplifiedLayerNormalization: the model needs the opset import "
                     f"{CONTRIB_DOMAIN}:{CONTRIB_VERSION}")
    return Rewritten([n.name for n in created], f"{len(site.nodes)} nodes fused into {where} (axis={-plan['k']}, "
                                                f"epsilon={plan['eps']:g}{wrapped})", notes=notes,
                     max_rounding=plan["rounding"] if op != "LayerNormalization" or plan["rounding"] else None)


def add_contrib_opset_import(model: onnx.ModelProto) -> bool:
    """Add the `com.microsoft` opset import when a node of the model (or of a subgraph or function)
    uses that domain and the model does not import it. Returns whether it added one."""
    if any(imp.domain == CONTRIB_DOMAIN for imp in model.opset_import):
        return False

    def uses(graph: onnx.GraphProto) -> bool:
        return any(n.domain == CONTRIB_DOMAIN or any(uses(g) for _, g in subgraphs(n)) for n in graph.node)

    if not (uses(model.graph) or any(n.domain == CONTRIB_DOMAIN for f in model.functions for n in f.node)):
        return False
    model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, CONTRIB_VERSION))
    return True
