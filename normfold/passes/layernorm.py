"""Fuse a decomposed LayerNorm into one LayerNormalization (opset 17+).

What PyTorch's TorchScript exporter writes at opsets 11-16 for nn.LayerNorm:

    X ─> ReduceMean(axes) ─> mean
    X, mean ─> Sub ─> d ─┬─> Pow(d, 2) | Mul(d, d) ─> ReduceMean(axes) ─> Add(eps) ─> Sqrt ─> std
                         └─> Div(d, std) | Mul(d, Reciprocal(std)) ─> n
    n ─> [Mul(gamma)] ─> [Add(beta)] ─> Y

becomes

    X ─> LayerNormalization(scale=gamma, B=beta, axis=-k, epsilon=eps) ─> Y

where the reductions run over the last k axes. Gamma/beta may sit on either side of Mul/Add and
may be missing (scale becomes ones). Left with a reason: axes that are not trailing; non-constant
gamma, beta or epsilon; an intermediate read outside the pattern; opset < 17.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._pattern import is_op, other_input, reduce_axes, scalar, trailing_count, user

MIN_OPSET = 17


class LayerNormFusion(Rule):
    name = "layernorm"
    status = "fused"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, "ReduceMean"):
            return None
        x, mean = node.input[0], node.output[0]
        sub = next((u for u in view.users(mean) if is_op(u, "Sub") and list(u.input) == [x, mean]), None)
        if sub is None:
            return None
        d = sub.output[0]
        square = next((u for u in view.users(d) if (is_op(u, "Pow") and u.input[0] == d)
                       or (is_op(u, "Mul") and list(u.input) == [d, d])), None)
        if square is None:
            return None
        var = user(view, square.output[0], "ReduceMean")
        if var is None:
            return None
        add_eps = user(view, var.output[0], "Add")
        if add_eps is None:
            return None
        sqrt = user(view, add_eps.output[0], "Sqrt")
        if sqrt is None:
            return None
        std = sqrt.output[0]
        nodes = [node, sub, square, var, add_eps, sqrt]
        div = user(view, std, "Div")
        if div is not None and list(div.input) == [d, std]:
            nodes.append(div)
        else:
            recip = user(view, std, "Reciprocal")
            mul = recip and user(view, recip.output[0], "Mul")
            if mul is None or other_input(mul, recip.output[0]) != d:
                return None
            nodes += [recip, mul]
        out = nodes[-1].output[0]
        gamma = beta = None
        tail = user(view, out, "Mul")
        if tail is not None and len(view.users(out)) == 1 and view.is_const(other_input(tail, out) or ""):
            gamma = other_input(tail, out)
            nodes.append(tail)
            out = tail.output[0]
        tail = user(view, out, "Add")
        if tail is not None and len(view.users(out)) == 1 and view.is_const(other_input(tail, out) or ""):
            beta = other_input(tail, out)
            nodes.append(tail)
            out = tail.output[0]
        parts = {"x": x, "mean": node, "square": square, "var": var, "add_eps": add_eps,
                 "std": std, "gamma": gamma, "beta": beta}
        return Match("LayerNorm (decomposed)", nodes, out, parts)

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        p = match.parts
        x = p["x"]
        escaped = view.escapes(match.nodes, keep=match.output)
        if escaped:
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the LayerNorm is also used outside it")
        square = p["square"]
        if square.op_type == "Pow" and scalar(view, square.input[1]) != 2.0:
            return Left("non-constant-parameters", f"{label(square)}: exponent is not the constant 2")
        eps = scalar(view, other_input(p["add_eps"], p["var"].output[0]))
        if eps is None:
            return Left("non-constant-parameters", f"{label(p['add_eps'])}: epsilon is not a constant scalar")
        if not eps > 0 or not np.isfinite(eps):
            return Left("invalid-statistics", f"epsilon {eps} is not positive")
        axes, var_axes = reduce_axes(view, p["mean"]), reduce_axes(view, p["var"])
        rank = view.rank(x)
        if axes is None or var_axes is None or sorted(a % rank if rank else a for a in axes) != sorted(
                a % rank if rank else a for a in var_axes):
            return Left("unsupported-axis", "the two ReduceMean nodes do not reduce the same known axes")
        if attr(p["mean"], "keepdims", 1) != 1 or attr(p["var"], "keepdims", 1) != 1:
            return Left("unsupported-attribute", "ReduceMean with keepdims=0")
        k = trailing_count(axes, rank)
        if k is None:
            return Left("unsupported-axis", f"reduction over axes {list(axes)} of a rank-{rank or '?'} tensor: "
                                            "LayerNormalization normalizes trailing axes only")
        dims = view.dims(x)
        norm_shape = tuple(dims[-k:]) if dims is not None and all(isinstance(d, int) for d in dims[-k:]) else None
        affine = []
        for label in ("gamma", "beta"):
            name = p[label]
            if name is None:
                affine.append(None)
                continue
            value = view.const(name)
            shape = _normalized(value.shape, k, norm_shape)
            if shape is None:
                return Left("not-per-channel", f"{label} of shape {list(value.shape)} does not broadcast like "
                                               f"the normalized shape {list(norm_shape) if norm_shape else '?'}")
            norm_shape = norm_shape or shape
            affine.append(value)
        if norm_shape is None:
            return Left("unknown-shape", "the size of the normalized axes could not be inferred")
        if ctx.opset < MIN_OPSET:
            return Left("opset-too-old", f"LayerNormalization needs opset {MIN_OPSET}; the model has opset "
                                         f"{ctx.opset} (rerun with --target-opset {MIN_OPSET})")
        dtype = view.elem_type(x)
        gamma, beta = affine
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype) if dtype else (
            gamma.dtype if gamma is not None else np.float32)
        gamma = np.ones(norm_shape, np_dtype) if gamma is None else np.broadcast_to(
            gamma.reshape(gamma.shape[max(0, gamma.ndim - k):]), norm_shape).astype(np_dtype)
        if beta is not None:
            beta = np.broadcast_to(beta.reshape(beta.shape[max(0, beta.ndim - k):]), norm_shape).astype(np_dtype)
        return {"k": k, "eps": eps, "gamma": gamma, "beta": beta}

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        p = match.parts
        anchor = match.nodes[0]
        prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or "LayerNorm")
        scale = _reuse_or_add(view, p["gamma"], plan["gamma"], f"{prefix}.scale")
        inputs = [p["x"], scale]
        if plan["beta"] is not None:
            inputs.append(_reuse_or_add(view, p["beta"], plan["beta"], f"{prefix}.bias"))
        fused = onnx.helper.make_node("LayerNormalization", inputs, [match.output],
                                      name=view.unique_name(f"{prefix}/LayerNormalization"),
                                      axis=-plan["k"], epsilon=plan["eps"], stash_type=1)
        last = match.nodes[-1]
        for node in match.nodes:
            view.remove(node)
        view.add_node(fused, after=last)
        return Rewritten([fused.name], f"{len(match.nodes)} nodes fused into LayerNormalization "
                                       f"(axis={-plan['k']}, epsilon={plan['eps']:g})")


def _normalized(shape: tuple, k: int, norm_shape: tuple | None) -> tuple | None:
    """The normalized shape a gamma/beta of `shape` implies, if it varies only along the last k axes
    and is compatible with `norm_shape` (when known)."""
    if any(d != 1 for d in shape[:max(0, len(shape) - k)]):
        return None
    tail = (1,) * max(0, k - len(shape)) + tuple(shape[max(0, len(shape) - k):])
    if norm_shape is not None:
        return norm_shape if all(t in (1, n) for t, n in zip(tail, norm_shape)) else None
    return tail if 1 not in tail else None


def _reuse_or_add(view: GraphView, name: str | None, value: np.ndarray, base: str) -> str:
    """Use the existing initializer when it already holds exactly `value`; otherwise add one."""
    if name and name in view.initializers and name not in view.input_names:
        current = view.const(name)
        if current.shape == value.shape and current.dtype == value.dtype:
            return name
    return view.add_initializer(base, np.ascontiguousarray(value))
