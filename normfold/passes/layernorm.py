"""tf_keras' fused LayerNorm: a LayerNorm computed through a BatchNormalization.

tf_keras takes this path for a LayerNormalization over trailing axes with epsilon >= 1.001e-5:

    X ─> Reshape([1, N*T, D, 1]) ─> Xr
    Xr ─> ReduceMean(0,2,3) ─┬─> Squeeze ─> m ──────────────────────────┐
    Xr, mean ─> Sub ─> ReduceSumSquare(0,2,3) ─> Div(count) ─> v ──────┤
    Xr ─> BatchNormalization(ones, zeros, m, v, eps) ─> Reshape(X's shape) ─> [Mul(gamma)] ─> [Add(beta)]

The count is Cast(ReduceProd(Gather(Shape(Xr), axes))), or that chain constant-folded by another
tool into one number (checked against the shapes). Every other LayerNorm spelling is recognised by
its algebra in norms.py; this one stays a rule of its own because its statistics feed an op the
canonical view does not read (a BatchNormalization over computed statistics).

It becomes X ─> LayerNormalization(scale=gamma, B=beta, axis=-1, epsilon=eps, stash_type=1) ─> Y.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._pattern import is_op, normalized_shape, other_input, reduce_axes, reuse_or_add, user

MIN_OPSET = 17


def _const_other(view: GraphView, node: onnx.NodeProto | None, tensor: str) -> str | None:
    """The constant operand of a binary `node` whose other operand is `tensor`."""
    if node is None:
        return None
    other = other_input(node, tensor)
    return other if other is not None and other != tensor and view.is_const(other) else None


class LayerNormFusion(Rule):
    name = "layernorm"
    min_opset = MIN_OPSET
    status = "fused"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, "ReduceMean"):
            return None
        sub = next((u for u in view.users(node.output[0]) if is_op(u, "Sub")
                    and list(u.input) == [node.input[0], node.output[0]]), None)
        return None if sub is None else self._batchnorm_moments(view, node, sub)

    def _batchnorm_moments(self, view, mean, sub):
        """tf_keras' fused LayerNorm, computed through a BatchNormalization on a reshaped X:

            X ─> Reshape([1, N*T, D, 1]) ─> Xr
            Xr ─> ReduceMean(0,2,3) ─┬─> Squeeze ─> m ──────────────────────────┐
            Xr, mean ─> Sub ─> ReduceSumSquare(0,2,3) ─> Div(count) ─> v ──────┤
            Xr ─> BatchNormalization(ones, zeros, m, v, eps) ─> Reshape(X's shape) ─> [Mul(gamma)] ─> [Add(beta)]
        """
        xr = mean.input[0]
        reshape_in = view.producer.get(xr)
        rss = user(view, sub.output[0], "ReduceSumSquare")
        div = rss and user(view, rss.output[0], "Div")
        squeeze = user(view, mean.output[0], "Squeeze")
        if not is_op(reshape_in, "Reshape") or div is None or squeeze is None or div.input[0] != rss.output[0]:
            return None
        bn = next((u for u in view.users(xr) if is_op(u, "BatchNormalization") and list(u.input[3:5]) ==
                   [squeeze.output[0], div.output[0]]), None)
        reshape_out = bn and user(view, bn.output[0], "Reshape")
        if reshape_out is None:
            return None
        # The count: Cast(ReduceProd(Gather(Shape(Xr), axes))) (Cast optional), or that chain already
        # constant-folded (onnxscript, onnxsim) into one number, checked against the shapes later.
        count = [] if view.is_const(div.input[1]) else [view.producer.get(div.input[1])]
        if count and is_op(count[-1], "Cast"):
            count.append(view.producer.get(count[-1].input[0]))
        if count and not is_op(count[-1], "ReduceProd"):
            return None
        if count:
            count.append(view.producer.get(count[-1].input[0]))
            if not is_op(count[-1], "Gather"):
                return None
            count.append(view.producer.get(count[-1].input[0]))
            if not is_op(count[-1], "Shape") or count[-1].input[0] != xr:
                return None
        nodes = [reshape_in, *reversed(count), mean, sub, rss, squeeze, div, bn, reshape_out]
        out, gamma, beta, _ = self._affine_tail(view, reshape_out.output[0], nodes)
        parts = {"x": reshape_in.input[0], "gamma": gamma, "beta": beta,
                 "moments": {"xr": xr, "mean": mean, "rss": rss, "squeeze": squeeze, "div": div,
                             "gather": count[-2] if count else None, "bn": bn, "reshape_out": reshape_out}}
        return Match("LayerNorm (tf_keras fused, through BatchNormalization)", nodes, out, parts)

    def _check_moments(self, view, p):
        """The facts that make _batchnorm_moments a LayerNorm over X's last k axes (tf_keras reshapes
        X to [1, prod(leading), prod(normalized), 1]): (eps, k) or Left."""
        m, x = p["moments"], p["x"]
        bn = m["bn"]
        dims, xr_dims, out_dims = view.dims(x), view.dims(m["xr"]), view.dims(m["reshape_out"].output[0])
        if not dims or not xr_dims or None in dims or None in xr_dims:
            return Left("unknown-shape", "the shapes around the tf_keras LayerNorm could not be inferred")
        k = next((k for k in range(1, len(dims)) if list(xr_dims) == [1, int(np.prod(dims[:-k])),
                                                                      int(np.prod(dims[-k:])), 1]), None)
        if k is None or list(out_dims or []) != list(dims):
            return Left("unsupported-axis", f"the reshape to {xr_dims} does not normalize trailing axes of {dims}")
        normalized = int(np.prod(dims[-k:]))
        axes = [0, 2, 3]
        gathered = view.const(m["gather"].input[1]) if m["gather"] is not None else axes
        if m["gather"] is None:  # a constant count: the number of values each mean runs over
            count = view.const(m["div"].input[1])
            if count.size != 1 or float(count.reshape(-1)[0]) != normalized:
                return Left("non-constant-parameters", f"{label(m['div'])}: the divisor {count.reshape(-1)[:4]} is "
                                                       f"not the count {normalized} of the normalized axes")
        squeezed = view.const(m["squeeze"].input[1]) if len(m["squeeze"].input) > 1 else attr(m["squeeze"], "axes")
        for what, got in (("mean", reduce_axes(view, m["mean"])), ("sum of squares", reduce_axes(view, m["rss"])),
                          ("count", gathered), ("squeeze", squeezed)):
            if got is None or sorted(int(a) % 4 for a in np.asarray(got).reshape(-1)) != axes:
                return Left("unsupported-axis", f"the {what} does not run over axes {axes} of the reshaped input")
        scale, bias = view.const(bn.input[1]), view.const(bn.input[2])
        if scale is None or bias is None or not np.all(scale == 1) or not np.all(bias == 0):
            return Left("non-constant-parameters", f"{label(bn)}: scale and bias must be the constants 1 and 0")
        if attr(bn, "training_mode", 0) or [o for o in bn.output[1:] if o]:
            return Left("training-mode", f"{label(bn)} runs in training mode")
        eps = float(attr(bn, "epsilon", 1e-5))
        if not eps > 0:
            return Left("invalid-statistics", f"epsilon {eps} is not positive")
        return eps, k

    def _affine_tail(self, view, n, nodes):
        """[Mul(gamma)] then [Add(beta)] after the normalized tensor `n`."""
        gamma = beta = None
        readers = view.users(n)
        if len(readers) == 1 and is_op(readers[0], "Mul") and _const_other(view, readers[0], n):
            gamma = _const_other(view, readers[0], n)
            nodes.append(readers[0])
            n = readers[0].output[0]
        readers = view.users(n)
        if len(readers) == 1 and is_op(readers[0], "Add") and _const_other(view, readers[0], n):
            beta = _const_other(view, readers[0], n)
            nodes.append(readers[0])
            n = readers[0].output[0]
        return n, gamma, beta, None

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        p = match.parts
        escaped = view.escapes(match.nodes, keep=match.output)
        if escaped:
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the LayerNorm is also used outside it")
        found = self._check_moments(view, p)
        if isinstance(found, Left):
            return found
        eps, k = found
        x = p["x"]
        rank, dims = view.rank(x), view.dims(x)
        norm_shape = tuple(dims[-k:]) if dims is not None and all(isinstance(d, int) for d in dims[-k:]) else None
        affine = []
        for part in ("gamma", "beta"):
            if p[part] is None:
                affine.append(None)
                continue
            value = view.const(p[part])
            shape = normalized_shape(value.shape, k, rank, norm_shape)
            if shape is None:
                return Left("not-per-channel", f"{part} of shape {list(value.shape)} does not broadcast like "
                                               f"the normalized shape {list(norm_shape) if norm_shape else '?'}")
            norm_shape = norm_shape or shape
            affine.append(value)
        if norm_shape is None:
            return Left("unknown-shape", "the size of the normalized axes could not be inferred")
        if ctx.opset < MIN_OPSET:
            return Left("opset-too-old", f"LayerNormalization needs opset {MIN_OPSET}; the model has opset "
                                         f"{ctx.opset} (rerun with --target-opset {MIN_OPSET})")
        dtype = view.elem_type(x)
        if dtype is None:
            return Left("unknown-shape", f"the type of {x!r} could not be inferred")
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        gamma, beta = (None if v is None else np.broadcast_to(
            v.reshape(v.shape[max(0, v.ndim - k):]).astype(np.float64), norm_shape).astype(np_dtype) for v in affine)
        if gamma is None:
            gamma = np.ones(norm_shape, np_dtype)
        return {"k": k, "eps": eps, "gamma": gamma, "beta": beta}

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        p = match.parts
        anchor = p["moments"]["mean"]
        prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or "LayerNorm")
        inputs = [p["x"], reuse_or_add(view, p["gamma"], plan["gamma"], f"{prefix}.scale")]
        if plan["beta"] is not None:
            inputs.append(reuse_or_add(view, p["beta"], plan["beta"], f"{prefix}.bias"))
        fused = onnx.helper.make_node("LayerNormalization", inputs, [match.output],
                                      name=view.unique_name(f"{prefix}/LayerNormalization"),
                                      axis=-plan["k"], epsilon=plan["eps"], stash_type=1)
        last = match.nodes[-1]
        for node in match.nodes:
            view.remove(node)
        view.add_node(fused, after=last)
        return Rewritten([fused.name], f"{len(match.nodes)} nodes fused into LayerNormalization "
                                       f"(axis={-plan['k']}, epsilon={plan['eps']:g})")
