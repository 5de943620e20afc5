"""Fuse a decomposed RMSNorm into one RMSNormalization (opset 23+).

    RMSNorm(X) = X / sqrt(mean(X^2 over the last k axes) + eps) * gamma

No mean is subtracted (that would be LayerNorm). The spellings exporters write:

    [Cast(to=FLOAT)] ─> x                                 (TorchScript: Llama, Qwen2, T5, Gemma)
    x ─> Pow(x, 2) | Mul(x, x) ─> ReduceMean(last k axes, keepdims=1)
                                  | GlobalAveragePool (rank-3 x: the last axis; tf2onnx)
      ─> Add(eps) ─> ms                  (no Add: epsilon 0, computed exactly by the fused op)
    ms ─┬─> Sqrt ─> std ─┬─> Div(x, std) ───────────────────────────────┐
        │                ├─> Reciprocal(std) ─> r                       │
        │                └─> Div(1, std) ─> r                           │
        └─> Pow(ms, -0.5) ─> r                                          │
    r ─> [Mul(r, gamma) ─> r'] ─> Mul(x, r) ─> n <──────────────────────┘
    n ─> [Cast] ─> [Mul(gamma, .) | Mul(., gamma)] ─> Y

becomes

    X ─> RMSNormalization(scale=gamma, axis=-k, epsilon=eps, stash_type=1) ─> Y

Gamma may sit on either side of its Mul, be multiplied into r before Mul(x, r) (Keras/Gemma), or be
missing (scale becomes ones); the scale is materialised to the normalized shape in X's dtype.
Casts: the leading Cast(to=FLOAT) and the trailing Cast (TorchScript's `x.to(float32)` ...
`.to(dtype)`) join the site when the leading Cast has no reader outside it and the trailing Cast
returns to the leading Cast's input type, before gamma: then the fused op reads the original (e.g.
fp16) X and computes in float32 (stash_type=1), and rounds where the model does (the spec casts the
normalized value to X's type, then scales), so fp16 Llama keeps its fp16 I/O without the Casts.
With gamma applied in float32 (multiplied into r, or before the trailing Cast as in Gemma) the
Casts stay and the fused op is float32: an fp16 op would round gamma and scale in fp16. A Cast whose
output is also read elsewhere (the residual Add in fp32 Llama) stays, and the fused op reads its
output. A trailing Cast that is a no-op on the site's type joins the site.

Below opset 23 the site is fused into onnxruntime's `com.microsoft.SimplifiedLayerNormalization`
(same inputs and attributes) only when FoldContext.allow_contrib is set; the model then needs an
opset import for `com.microsoft` (see `add_contrib_opset_import`, which the caller of the driver
runs: the driver hands rules a graph, not the model). It is never put in the default domain.

Never matched: a squared tensor written by `Sub(X, ReduceMean(X))` (possibly through Casts): that is
LayerNorm's variance, and the layernorm pass owns it. Left with a reason: an intermediate read outside
the site; exponent not 2, numerator not 1, rsqrt exponent not -0.5, epsilon not a positive constant;
non-trailing axes, keepdims=0, GlobalAveragePool on a tensor of rank other than 3; a gamma that does not
vary along the normalized axes only; opset < 23 without allow_contrib.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import FLOAT_TYPES, GraphView, attr, label, subgraphs
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._pattern import (is_op, normalized_shape, other_input, reduce_axes, reuse_or_add, scalar,
                                      trailing_count, user)

MIN_OPSET = 23
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_VERSION = 1
CONTRIB_NOTE = f"uses {CONTRIB_DOMAIN}.SimplifiedLayerNormalization: the model needs the opset import " \
               f"{CONTRIB_DOMAIN}:{CONTRIB_VERSION}"


class RMSNormFusion(Rule):
    name = "rmsnorm"
    min_opset = MIN_OPSET
    status = "fused"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        # Anchor on the square: it names x, the tensor the site normalizes.
        if is_op(node, "Pow") and len(node.input) == 2:
            x = node.input[0]
        elif is_op(node, "Mul") and len(node.input) == 2 and node.input[0] == node.input[1]:
            x = node.input[0]
        else:
            return None
        if _centered(view, x):
            return None  # Sub(X, mean) squared: LayerNorm, not RMSNorm
        square = node
        mean = user(view, square.output[0], "ReduceMean", "GlobalAveragePool")
        if mean is None or mean.input[0] != square.output[0]:
            return None
        add_eps = user(view, mean.output[0], "Add")  # none: epsilon 0 (exact; optimizers drop a tiny one)
        if add_eps is not None and not view.is_const(other_input(add_eps, mean.output[0]) or ""):
            return None
        ms = add_eps.output[0] if add_eps is not None else mean.output[0]
        core = [square, mean] + ([add_eps] if add_eps is not None else [])
        inv = folded_gamma = None
        sqrt = user(view, ms, "Sqrt")
        if sqrt is not None:
            core.append(sqrt)
            std = sqrt.output[0]
            div = user(view, std, "Div")
            if div is not None and div.input[1] == std and div.input[0] == x:
                core.append(div)  # Div(x, std): n directly
            elif div is not None and div.input[1] == std and view.is_const(div.input[0]):
                inv = div  # Div(1, std)
            else:
                inv = user(view, std, "Reciprocal")
                if inv is None:
                    return None
        else:
            inv = user(view, ms, "Pow")  # Pow(ms, -0.5)
            if inv is None or inv.input[0] != ms:
                return None
        if inv is not None:
            core.append(inv)
            r = inv.output[0]
            mul = user(view, r, "Mul")
            if mul is None:
                return None
            o = other_input(mul, r)
            if o != x:
                # gamma multiplied into the inverse RMS first: Mul(r, gamma) -> Mul(x, .)
                if o is None or not view.is_const(o):
                    return None
                folded_gamma = o
                core.append(mul)
                r = mul.output[0]
                mul = user(view, r, "Mul")
                if mul is None or other_input(mul, r) != x:
                    return None
            core.append(mul)
        out = core[-1].output[0]

        # Casts around the site (see the module docstring for when they join it).
        lead = view.producer.get(x)
        compute = view.elem_type(x)
        if not (is_op(lead, "Cast") and attr(lead, "to") == onnx.TensorProto.FLOAT
                and not view.is_graph_output(x)
                and all(any(u is n for n in core) for u in view.users(x))):
            lead = None
        source = view.elem_type(lead.input[0]) if lead is not None else None
        nodes = list(core)
        x_in = x
        trail = view.sole_user(out)
        if is_op(trail, "Cast"):
            to = attr(trail, "to")
            # Not with gamma folded into r: the model applies it in float32, an fp16 op would in fp16.
            if lead is not None and source is not None and to == source and folded_gamma is None:
                nodes = [lead] + nodes + [trail]
                x_in = lead.input[0]
            elif compute is not None and to == compute:
                nodes.append(trail)  # a no-op Cast
            else:
                trail = None
            if trail is not None:
                out = trail.output[0]
        elif lead is not None and source is not None and source == compute:
            nodes = [lead] + nodes  # a no-op leading Cast read only by the site
            x_in = lead.input[0]

        gamma = None
        tail = view.sole_user(out)
        if folded_gamma is None and is_op(tail, "Mul"):
            o = other_input(tail, out)
            if o is not None and o != out and view.is_const(o):
                gamma = o
                nodes.append(tail)
                out = tail.output[0]
        order = {id(n): i for i, n in enumerate(view.nodes)}
        nodes.sort(key=lambda n: order.get(id(n), len(order)))
        parts = {"x": x_in, "square": square, "mean": mean, "add_eps": add_eps, "inv": inv,
                 "gamma": folded_gamma or gamma}
        return Match("RMSNorm (decomposed)", nodes, out, parts)

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        p = match.parts
        x, square, mean, inv = p["x"], p["square"], p["mean"], p["inv"]
        escaped = view.escapes(match.nodes, keep=match.output)
        if escaped:
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the RMSNorm is also used outside it")
        if square.op_type == "Pow" and scalar(view, square.input[1]) != 2.0:
            return Left("non-constant-parameters", f"{label(square)}: exponent is not the constant 2")
        if inv is not None and inv.op_type == "Div" and scalar(view, inv.input[0]) != 1.0:
            return Left("non-constant-parameters", f"{label(inv)}: numerator is not the constant 1")
        if inv is not None and inv.op_type == "Pow" and scalar(view, inv.input[1]) != -0.5:
            return Left("non-constant-parameters", f"{label(inv)}: exponent is not the constant -0.5")
        eps = 0.0 if p["add_eps"] is None else scalar(view, other_input(p["add_eps"], mean.output[0]))
        if eps is None:
            return Left("non-constant-parameters", f"{label(p['add_eps'])}: epsilon is not a constant scalar")
        if not (np.isfinite(eps) and eps >= 0):
            return Left("invalid-statistics", f"epsilon {eps} is negative or not finite")
        rank = view.rank(square.input[0])
        if mean.op_type == "GlobalAveragePool":
            if rank is None:
                return Left("unknown-shape", f"{label(mean)}: the rank of its input could not be inferred")
            if rank != 3:
                return Left("unsupported-axis", f"{label(mean)} over a rank-{rank} tensor: only rank 3 "
                                                "(averaging the last axis) is read as RMSNorm")
            axes: tuple[int, ...] | None = (-1,)
        else:
            if attr(mean, "keepdims", 1) != 1:
                return Left("unsupported-attribute", "ReduceMean with keepdims=0")
            axes = reduce_axes(view, mean)
            if axes is None:
                return Left("unsupported-axis", f"{label(mean)}: the reduction axes are not constant")
        k = trailing_count(axes, rank)
        if k is None:
            return Left("unsupported-axis", f"reduction over axes {list(axes)} of a rank-{rank or '?'} tensor: "
                                            "RMSNormalization normalizes trailing axes only")
        dtype = view.elem_type(x)
        if dtype is None:
            return Left("unknown-shape", f"the element type of {x!r} could not be inferred")
        if dtype not in FLOAT_TYPES:
            return Left("unsupported-dtype", f"{x!r} is {onnx.TensorProto.DataType.Name(dtype)}")
        dims = view.dims(x)
        norm_shape = tuple(dims[-k:]) if dims is not None and all(isinstance(d, int) for d in dims[-k:]) else None
        gamma = None
        if p["gamma"] is not None:
            gamma = view.const(p["gamma"])
            shape = normalized_shape(gamma.shape, k, rank, norm_shape)
            if shape is None:
                return Left("not-per-channel", f"gamma of shape {list(gamma.shape)} does not broadcast like the "
                                               f"normalized shape {list(norm_shape) if norm_shape else '?'}")
            norm_shape = norm_shape or shape
        if norm_shape is None:
            return Left("unknown-shape", "the size of the normalized axes could not be inferred")
        if ctx.opset >= MIN_OPSET:
            op, domain = "RMSNormalization", ""
        elif ctx.allow_contrib:
            op, domain = "SimplifiedLayerNormalization", CONTRIB_DOMAIN
        else:
            return Left("opset-too-old", f"RMSNormalization needs opset {MIN_OPSET}; the model has opset "
                                         f"{ctx.opset} (rerun with --target-opset {MIN_OPSET}, or --allow-contrib "
                                         f"for {CONTRIB_DOMAIN}.SimplifiedLayerNormalization)")
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        if gamma is None:
            scale, rounding = np.ones(norm_shape, np_dtype), None
        else:
            exact = np.broadcast_to(gamma.reshape(gamma.shape[max(0, gamma.ndim - k):]).astype(np.float64),
                                    norm_shape)
            scale = exact.astype(np_dtype)
            rounding = float(np.max(np.abs(scale.astype(np.float64) - exact))) if scale.size else 0.0
        stash = onnx.TensorProto.DOUBLE if dtype == onnx.TensorProto.DOUBLE else onnx.TensorProto.FLOAT
        return {"op": op, "domain": domain, "k": k, "eps": eps, "scale": scale, "stash": stash,
                "rounding": rounding}

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        p = match.parts
        anchor = p["square"]
        prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or "RMSNorm")
        scale = reuse_or_add(view, p["gamma"], plan["scale"], f"{prefix}.scale")
        fused = onnx.helper.make_node(plan["op"], [p["x"], scale], [match.output],
                                      name=view.unique_name(f"{prefix}/{plan['op']}"), domain=plan["domain"],
                                      axis=-plan["k"], epsilon=plan["eps"], stash_type=plan["stash"])
        last = match.nodes[-1]
        for node in match.nodes:
            view.remove(node)
        view.add_node(fused, after=last)
        where = f"{plan['domain']}.{plan['op']}" if plan["domain"] else plan["op"]
        return Rewritten([fused.name], f"{len(match.nodes)} nodes fused into {where} "
                                       f"(axis={-plan['k']}, epsilon={plan['eps']:g})",
                         notes=[CONTRIB_NOTE] if plan["domain"] else [], max_rounding=plan["rounding"])


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


def _centered(view: GraphView, tensor: str) -> bool:
    """Whether `tensor` is `Sub(X, mean)` with mean written by a ReduceMean/GlobalAveragePool
    (looking through Casts on both sides): then its square is a variance, not a mean square."""
    node = view.producer.get(tensor)
    for _ in range(3):
        if not is_op(node, "Cast"):
            break
        node = view.producer.get(node.input[0])
    if not is_op(node, "Sub"):
        return False
    mean = view.producer.get(node.input[1])
    for _ in range(3):
        if not is_op(mean, "Cast"):
            break
        mean = view.producer.get(mean.input[0])
    return is_op(mean, "ReduceMean", "GlobalAveragePool")
