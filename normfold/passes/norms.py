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

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx

from normfold.graph import FLOAT_TYPES, GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._algebra import (CanonicalView, Expr, Leaf, Mean, NormForm, Root, norm_form,
                                      second_moment_leaves, varies_along)
from normfold.passes._pattern import is_op, reuse_or_add

REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool")
# Ops a norm's value flows through between its statistics and its output.
FLOWS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Cast", "Identity", "Reshape",
                   "Transpose", "Max", "Where", "ReduceMean", "ReduceSum", "ReduceSumSquare", "GlobalAveragePool"})
MAX_HOPS = 24
LN_OPSET, RMS_OPSET = 17, 23
CONTRIB_DOMAIN = "com.microsoft"
LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


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


@dataclass
class Refused:
    """A norm recognised by its algebra that cannot be rewritten (the reason says why)."""

    anchor: onnx.NodeProto
    centered: bool
    left: Left


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


def _candidates(view: GraphView, reduction: onnx.NodeProto) -> list[str]:
    """The tensors a reduction may be taking statistics of: its input, or what its input squares
    (not X - mean(X): normalizing that is a LayerNorm of X, whose own reduction comes first)."""
    u = origin(view, reduction.input[0])
    found = [u]
    node = view.producer.get(u)
    if is_op(node, "Pow", "Mul") and len(node.input) == 2:
        found += [origin(view, t) for t in node.input if not view.is_const(t)]
    return [t for t in dict.fromkeys(found) if not centered(view, t)]


def centered(view: GraphView, tensor: str) -> bool:
    """Whether `tensor` is X - mean(X) (through Casts and Identity)."""
    sub = view.producer.get(origin(view, tensor))
    if not is_op(sub, "Sub"):
        return False
    mean = view.producer.get(origin(view, sub.input[1]))
    return is_op(mean, *REDUCTIONS) and origin(view, mean.input[0]) == origin(view, sub.input[0])


def _downstream(view: GraphView, start: onnx.NodeProto) -> list[str]:
    """Float tensors reachable from `start` through value-flow ops, nearest first (bounded)."""
    order, seen, frontier = [], {id(start)}, [start]
    for _ in range(MAX_HOPS):
        nxt = []
        for node in frontier:
            for out in node.output:
                if out:
                    order.append(out)
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


def _is_x(cv: CanonicalView, tensor: str, x: str) -> bool:
    e = cv.expr(tensor).single()
    return e is not None and e[0] == ((Leaf(x), Fraction(1)),) and np.all(e[1] == 1)


def _op_sequence(nodes: list[onnx.NodeProto]) -> str:
    return " -> ".join(n.op_type for n in nodes)


def recognise(view: GraphView, reduction: onnx.NodeProto) -> NormSite | Refused | Unrecognized | None:
    """The norm whose statistics `reduction` computes, if any (see the module docstring)."""
    unrecognized = None
    for x in _candidates(view, reduction):
        cv = CanonicalView(view, leaves=frozenset({x}))
        tensors = _downstream(view, reduction)
        forms = [(t, norm_form(cv.expr(t))) for t in tensors]
        forms = [(t, f) for t, f in forms if f is not None and f.x.name == x and not (f.beta is not None
                                                                                        and not f.centered)]
        refusal = None
        for t, form in reversed(forms):  # the furthest first: it includes gamma and beta
            site = _site(view, cv, reduction, x, t, form)
            if isinstance(site, NormSite):
                return site
            refusal = refusal or Refused(reduction, form.centered, site)
        if refusal is not None:
            return refusal
        if unrecognized is None:
            unrecognized = _norm_like(view, cv, reduction, tensors)
    if unrecognized is None and is_op(reduction, "ReduceMean", "GlobalAveragePool"):
        sub = next((u for u in view.users(reduction.output[0]) if is_op(u, "Sub") and
                    list(u.input) == [reduction.input[0], reduction.output[0]]), None)
        if sub is not None:  # X - mean(X) going on in a way that is no norm we know: say so
            return Unrecognized(reduction, [reduction, sub], sub.output[0], True,
                                f"{label(reduction)} subtracts a mean like a LayerNorm, but the nodes after it "
                                "are not a norm normfold can prove")
    return unrecognized


def _site(view: GraphView, cv: CanonicalView, reduction, x: str, y: str, form: NormForm) -> NormSite | Left:
    stops = {x}
    for _ in range(4):
        nodes = _cone(view, y, stops)
        if nodes is None:
            return Left("unrecognized-pattern", f"the norm at {label(reduction)} reads tensors other than {x!r}")
        escaped = view.escapes(nodes, keep=y)
        if escaped is None:
            break
        # A Cast of X read elsewhere too (the residual of an fp32 Llama) stays; the norm reads it.
        if not _is_x(cv, escaped, x):
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the norm is also used outside it")
        stops.add(escaped)
    else:
        return Left("intermediate-used-elsewhere", f"tensors inside the norm at {label(reduction)} are used outside it")
    inputs = sorted(stops - {x}) or [x]
    if len(inputs) > 1:
        return Left("intermediate-used-elsewhere", f"{inputs!r} inside the norm are also used outside it")
    return _precision(view, cv, reduction, form, inputs[0], y, nodes, x)


def _precision(view, cv, reduction, form: NormForm, source: str, y: str, nodes, x: str) -> NormSite | Left:
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
    if inner is not None and view.escapes(inner, keep=end) is None:
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


def _norm_like(view, cv: CanonicalView, reduction, tensors) -> Unrecognized | None:
    """Statistics (a mean of a power of X) under a root or a negative power that no form explains."""
    for t in tensors:
        e = cv.expr(t)
        for sig in e.terms:
            for a, p in sig:
                base = a.base if isinstance(a, Root) else Expr.atom(a) if isinstance(a, Mean) else None
                q = a.power * p if isinstance(a, Root) else p
                if base is None or (q.denominator == 1 and q > 0) or not second_moment_leaves(base):
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
    kind = ""

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, *REDUCTIONS):
            return None
        found = _recognised(view, node)
        if isinstance(found, Unrecognized) or found is None:
            return None  # NormLike reports it, after every other rule had its chance
        centered = found.form.centered if isinstance(found, NormSite) else found.centered
        if centered != self.centered:
            return None
        if isinstance(found, Refused):
            return Match(self.kind, [node], node.output[0], {"left": found.left})
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
    """recognise(), once per node: the rules of both families and NormLike ask in turn."""
    memo = view.__dict__.setdefault("_recognised", {})
    if id(node) not in memo:
        memo.clear()
        memo[id(node)] = recognise(view, node)
    return memo[id(node)]


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
    if dims is not None and x.perm is not None:
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
    moved = site.form.x.perm
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
                     f"{CONTRIB_DOMAIN}:1")
    return Rewritten([n.name for n in created], f"{len(site.nodes)} nodes fused into {where} (axis={-plan['k']}, "
                                                f"epsilon={plan['eps']:g}{wrapped})", notes=notes,
                     max_rounding=plan["rounding"] if op != "LayerNormalization" or plan["rounding"] else None)
