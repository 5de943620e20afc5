"""Fuse a decomposed LayerNorm into one LayerNormalization (opset 17+).

    LayerNorm(X) = (X - mean(X)) / sqrt(var(X) + eps) * gamma + beta     over the last k axes

The spellings real exporters write (d = X - mean, "mean" is ReduceMean or GlobalAveragePool):

  PyTorch TorchScript, opsets 11-16 (fp16 exports add the Casts in brackets):
    X ─> mean ─> Sub ─> d [─> Cast(f64)] ─┬─> Pow(., 2) | Mul(d, d) ─> mean ─> Add(eps) ─> Sqrt ─> std
                                          └─> Div(d, std) | Mul(d, Reciprocal(std)) ─> n
    n [─> Cast(f16)] ─> [Mul(gamma)] ─> [Add(beta)] ─> Y            (gamma/beta on either side)

  Keras 3 through tf2onnx (factored; center=False drops Add(beta), scale=False drops Mul(gamma)):
    r = Reciprocal(Sqrt(Add(mean(Mul(d, d)), eps)));  g = Mul(r, gamma)
    (r may also be written Pow(Add(var, eps), -0.5), in this and the PyTorch form)
    Y = Add(Mul(X, g), Add(Mul(Neg(mean), g), beta))

  tf_keras (non-fused path):   Y = Add(Mul(X, g), Sub(beta, Mul(mean, g)))

  After onnxruntime's offline optimizer, a Transpose(X) in front of a LayerNorm sits between X - mean
  and the rest: mean over X's axis a, d = X - mean, then Transpose(d, perm) feeds the square and the
  Div (a must be the axis perm moves last). Fused as X -> Transpose(perm) -> LayerNormalization.

  In every spelling the Add(eps) may be missing (onnxscript's optimizer drops BERT's 1e-12): that is
  epsilon 0, which LayerNormalization computes exactly (0 / 0 = NaN where the variance is 0, as before).

  tf_keras (fused path, eps >= 1.001e-5): a BatchNormalization over X reshaped to [1, N*T, D, 1],
  with moments computed in the graph (see _batchnorm_moments).

  jax/Flax (raw moments):      var = Max(Sub(mean(X * X), mean * mean), 0)  (Max optional)
                               Y = Div(d, Sqrt(Add(var, eps))) ─> [Mul(gamma)] ─> [Add(beta)]

  Mixed precision: Cast(f16 -> f32) before and Cast(f32 -> f16) after any of the above.

All become
    X ─> LayerNormalization(scale=gamma, B=beta, axis=-k, epsilon=eps, stash_type=1) ─> Y
with gamma/beta broadcast to the normalized shape (ones when there is no gamma). When the chain is
wrapped in Casts from and back to fp16/bf16, the fused op is float32 between the same Casts: an
fp16 LayerNormalization would apply gamma and beta in fp16 (the spec casts the normalized value to
the input type before scaling), rounding float32 parameters and adding roundings the model does
not have. Only a wrapped chain without gamma and beta is fused on the fp16 tensor, Casts absorbed:
its one rounding, at the end, is the same either way.

Left with a reason: axes that are not trailing (channels-first LayerNorm over axis 1 of NCHW);
non-constant gamma, beta or epsilon; an intermediate read outside the pattern; opset < 17.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._pattern import (float_cast, is_mean, is_op, keeps_dims, mean_axes, normalized_shape,
                                      other_input, reduce_axes, reuse_or_add, scalar, through_cast, trailing_count,
                                      user)

MIN_OPSET = 17
LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _square_of(view: GraphView, tensor: str) -> onnx.NodeProto | None:
    """A reader of `tensor` that squares it: Pow(t, 2) or Mul(t, t) (the exponent is checked later)."""
    return next((u for u in view.users(tensor) if (is_op(u, "Pow") and u.input[0] == tensor)
                 or (is_op(u, "Mul") and list(u.input) == [tensor, tensor])), None)


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

    # ---- match -------------------------------------------------------------------------------
    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_mean(node):
            return None
        x, mean = node.input[0], node.output[0]
        nodes = [node]
        centered = _identity_reshape(view, mean)  # tf2onnx sometimes reshapes the mean to its own shape
        if centered is not None:
            nodes.append(centered)
        m = centered.output[0] if centered is not None else mean
        sub = next((u for u in view.users(m) if is_op(u, "Sub") and list(u.input) == [x, m]), None)
        if sub is None:
            return None
        nodes.append(sub)
        found = self._rest(view, x, mean, sub, nodes)
        if found is None:
            moments = self._batchnorm_moments(view, node, sub)
            if moments is not None:
                return moments
            # X - mean(X) that goes on in a way we do not know: say so rather than stay silent.
            return Match("LayerNorm-like (unrecognized spelling)", nodes[:1] + [sub], sub.output[0],
                         {"unrecognized": True})
        out, gamma, beta, transpose, reduces, add_eps, var, moved = found
        parts = {"x": x, "reduces": reduces, "add_eps": add_eps, "var": var, "gamma": gamma, "beta": beta,
                 "squares": [n for n in nodes if is_op(n, "Pow") and scalar(view, n.input[1]) != -0.5]}
        if transpose is not None:  # the statistics are taken on X, the result built on Transpose(X)
            parts["x"], parts["perm_in"] = transpose.output[0], list(attr(transpose, "perm") or [])
        if moved is not None:  # the mean on X, the rest on Transpose(X - mean): fused on a new Transpose(X)
            parts["perm_moved"] = [int(i) for i in attr(moved, "perm")]
        self._absorb_casts(view, nodes, parts, out)
        return Match("LayerNorm (decomposed)", nodes, parts.pop("out", out), parts)

    def _rest(self, view, x, mean, sub, nodes):
        """From d = X - mean on: the variance, epsilon, and one of the normalization spellings."""
        d = through_cast(view, sub.output[0], nodes)
        moved = view.sole_user(d)
        if is_op(moved, "Transpose") and attr(moved, "perm"):
            # onnxruntime's transpose optimizer moves a Transpose(X) in front of a LayerNorm to X - mean:
            # the mean runs on X, the rest on Transpose(X - mean). Fused on Transpose(X) (check_axes).
            nodes.append(moved)
            d = moved.output[0]
        else:
            moved = None
        variance = self._central_variance(view, d, nodes) or (
            self._raw_variance(view, x, mean, nodes) if moved is None else None)
        if variance is None:
            return None
        reduces, var = variance
        # Without an Add the epsilon is 0 (onnxscript's optimizer drops BERT's 1e-12): still exact.
        add_eps = user(view, var, "Add")
        if add_eps is not None:
            nodes.append(add_eps)
        var_eps = add_eps.output[0] if add_eps is not None else var
        sqrt = user(view, var_eps, "Sqrt")
        rsqrt = user(view, var_eps, "Pow")
        if sqrt is not None:
            nodes.append(sqrt)
            std = sqrt.output[0]
            found = self._divide(view, d, std, nodes) or self._factored(view, x, mean, std, nodes)
        elif rsqrt is not None and rsqrt.input[0] == var_eps and scalar(view, rsqrt.input[1]) == -0.5:
            nodes.append(rsqrt)  # (var + eps) ** -0.5: the reciprocal std in one node
            found = (self._scale_by(view, d, rsqrt.output[0], nodes)
                     or self._factored_from(view, x, mean, rsqrt.output[0], nodes, len(nodes)))
        else:
            return None
        if found is None:
            return None
        return (*found, reduces, add_eps, var, moved)

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
        """The facts that make _batchnorm_moments a LayerNorm over X's last axis: (eps, k=1) or Left."""
        m, x = p["moments"], p["x"]
        bn = m["bn"]
        dims, xr_dims, out_dims = view.dims(x), view.dims(m["xr"]), view.dims(m["reshape_out"].output[0])
        if not dims or not xr_dims or None in dims or None in xr_dims:
            return Left("unknown-shape", "the shapes around the tf_keras LayerNorm could not be inferred")
        leading = int(np.prod(dims[:-1]))
        if list(xr_dims) != [1, leading, dims[-1], 1] or list(out_dims or []) != list(dims):
            return Left("unsupported-axis", f"the reshape to {xr_dims} does not normalize the last axis of {dims}")
        axes = [0, 2, 3]
        gathered = view.const(m["gather"].input[1]) if m["gather"] is not None else axes
        if m["gather"] is None:  # a constant count: the number of values each mean runs over
            count = view.const(m["div"].input[1])
            if count.size != 1 or float(count.reshape(-1)[0]) != dims[-1]:
                return Left("non-constant-parameters", f"{label(m['div'])}: the divisor {count.reshape(-1)[:4]} is "
                                                       f"not the count {dims[-1]} of the normalized axis")
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
        return eps, 1

    def _central_variance(self, view, d, nodes):
        """mean((X - mean)^2)"""
        square = _square_of(view, d)
        var = square and user(view, square.output[0], "ReduceMean", "GlobalAveragePool")
        if var is None:
            return None
        nodes += [square, var]
        return [nodes[0], var], var.output[0]

    def _raw_variance(self, view, x, mean, nodes):
        """mean(X^2) - mean^2, optionally clamped at 0 (jax/Flax)."""
        mean_sq = _square_of(view, mean)
        x_sq = _square_of(view, x)
        ex2 = x_sq and user(view, x_sq.output[0], "ReduceMean", "GlobalAveragePool")
        sub = mean_sq and ex2 and user(view, mean_sq.output[0], "Sub")
        if sub is None or list(sub.input) != [ex2.output[0], mean_sq.output[0]]:
            return None
        nodes += [mean_sq, x_sq, ex2, sub]
        var = sub.output[0]
        clamp = user(view, var, "Max")
        if clamp is not None and scalar(view, other_input(clamp, var)) == 0.0:
            nodes.append(clamp)
            var = clamp.output[0]
        return [nodes[0], ex2], var

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

    def _divide(self, view, d, std, nodes):
        """Div(d, std) or Mul(d, Reciprocal(std)), then the affine tail."""
        div = user(view, std, "Div")
        if div is not None and list(div.input) == [d, std]:
            found = [div]
        else:
            recip = user(view, std, "Reciprocal")
            mul = recip and user(view, recip.output[0], "Mul")
            if mul is None or other_input(mul, recip.output[0]) != d:
                return None
            found = [recip, mul]
        nodes += found
        n = through_cast(view, found[-1].output[0], nodes)
        return self._affine_tail(view, n, nodes)

    def _scale_by(self, view, d, r, nodes):
        """Mul(d, r) with r the reciprocal std, then the affine tail."""
        mul = user(view, r, "Mul")
        if mul is None or other_input(mul, r) != d:
            return None
        nodes.append(mul)
        return self._affine_tail(view, through_cast(view, mul.output[0], nodes), nodes)

    def _factored(self, view, x, mean, std, nodes):
        """Keras: Y = X * g + (beta - mean * g), g = gamma / std, in its two exported spellings."""
        recip = user(view, std, "Reciprocal")
        if recip is None:
            return None
        start = len(nodes)
        nodes.append(recip)
        return self._factored_from(view, x, mean, recip.output[0], nodes, start)

    def _factored_from(self, view, x, mean, r, nodes, start):
        """The factored form from the reciprocal std `r` on; on failure `nodes` is cut back to `start`."""
        g, gamma = _skip_identity_reshape(view, r, nodes), None
        scale = user(view, g, "Mul")
        if scale is not None and _const_other(view, scale, g) is not None:
            gamma = _const_other(view, scale, g)
            nodes.append(scale)
            g = scale.output[0]
        muls = [u for u in view.users(g) if is_op(u, "Mul")]
        # X * g, where X may be seen through a Transpose (tf2onnx: gamma applied in NHWC to NCHW X)
        transposed = next((t for t in view.users(x) if is_op(t, "Transpose")), None)
        x_mul = next((m for m in muls if other_input(m, g) == x), None)
        if x_mul is None and transposed is not None:
            x_mul = next((m for m in muls if other_input(m, g) == transposed.output[0]), None)
        else:
            transposed = None
        mean_mul = next((m for m in muls if m is not x_mul), None)
        if x_mul is None or mean_mul is None or len(muls) != 2:
            del nodes[start:]
            return None
        shifted = other_input(mean_mul, g)
        wrapper = view.producer.get(shifted)
        if is_op(wrapper, "Reshape") and _identity_reshape(view, wrapper.input[0]) is wrapper:
            shifted = wrapper.input[0]
        else:
            wrapper = None
        neg = view.producer.get(shifted)
        negated = is_op(neg, "Neg") and neg.input[0] == mean
        if not negated and shifted != mean:
            del nodes[start:]
            return None
        nodes += ([neg] if negated else []) + ([wrapper] if wrapper is not None else []) + [mean_mul]
        m, beta = mean_mul.output[0], None
        combine = user(view, m, "Add" if negated else "Sub")
        if combine is not None and (negated and _const_other(view, combine, m)
                                    or not negated and combine.input[1] == m and view.is_const(combine.input[0])):
            beta = combine.input[0] if combine.input[1] == m else combine.input[1]
            nodes.append(combine)
            m = combine.output[0]
        # The final node joins X * g with the shift: Add for "+ beta - mean*g" forms, Sub without beta.
        joiner_op = "Sub" if (not negated and beta is None) else "Add"
        final = user(view, x_mul.output[0], joiner_op)
        if final is None or sorted(final.input) != sorted([x_mul.output[0], m]) or (
                joiner_op == "Sub" and list(final.input) != [x_mul.output[0], m]):
            del nodes[start:]
            return None
        nodes += [x_mul, final]
        return final.output[0], gamma, beta, transposed

    def _absorb_casts(self, view, nodes, parts, out):
        """The Cast(f16 -> f32) that feeds X joins the site, with X read in fp16, when that is exact:
        the chain already returns to fp16 by a Cast of its own before gamma/beta (PyTorch's
        `.float()` ... `.type_as(x)`: the fp16 op rounds where the model does), or the chain has no
        gamma/beta and a Cast back to fp16 follows it (one rounding at the end either way). A chain
        with float32 gamma/beta keeps its Casts and is fused in float32 (module docstring)."""
        cast_in = view.producer.get(parts["x"])
        if not float_cast(cast_in) or view.is_graph_output(parts["x"]):
            return
        low = view.elem_type(cast_in.input[0])
        inside = {id(n) for n in nodes}
        if low not in LOW_PRECISION or any(id(u) not in inside for u in view.users(parts["x"])):
            return
        inner = next((n for n in reversed(nodes) if is_op(n, "Cast")), None)
        if inner is not None and attr(inner, "to") == low:
            nodes.insert(0, cast_in)
            parts["x"] = cast_in.input[0]
            return
        readers = view.users(out)
        if (parts["gamma"] is None and parts["beta"] is None and len(readers) == 1 and float_cast(readers[0])
                and attr(readers[0], "to") == low and not view.is_graph_output(out)):
            nodes.insert(0, cast_in)
            nodes.append(readers[0])
            parts["x"] = cast_in.input[0]
            parts["out"] = readers[0].output[0]

    # ---- check -------------------------------------------------------------------------------
    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        p = match.parts
        if p.get("unrecognized"):
            return Left("unrecognized-pattern", f"{label(match.nodes[0])} subtracts a mean like a LayerNorm, but "
                                                "the nodes after it are not a spelling normfold knows")
        x = p["x"]
        escaped = view.escapes(match.nodes, keep=match.output)
        if escaped:
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the LayerNorm is also used outside it")
        if "moments" in p:
            found = self._check_moments(view, p)
            if isinstance(found, Left):
                return found
            (eps, k), perm, rank = found, None, view.rank(x)
        else:
            found = self._eps_and_axes(view, p, ctx)
            if isinstance(found, Left):
                return found
            eps, k, perm, rank = found
        dims = view.dims(x)
        for order in (p.get("perm_moved"), perm):  # the layout the normalized axes are trailing in
            if order is not None and dims is not None:
                dims = [dims[i] for i in order]
        norm_shape = tuple(dims[-k:]) if dims is not None and all(isinstance(d, int) for d in dims[-k:]) else None
        affine = []
        for part in ("gamma", "beta"):
            name = p[part]
            if name is None:
                affine.append(None)
                continue
            value = view.const(name)
            if perm is not None:
                if value.ndim > rank:
                    return Left("not-per-channel", f"{part} of shape {list(value.shape)} has more axes than the input")
                value = np.transpose(value.reshape((1,) * (rank - value.ndim) + value.shape), perm)
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
        out_type = view.elem_type(match.output)
        if out_type is not None and out_type != dtype:  # e.g. float32 in, Cast to fp16 inside, X's Cast shared
            return Left("unsupported-dtype", f"the norm reads {onnx.TensorProto.DataType.Name(dtype)} and writes "
                                             f"{onnx.TensorProto.DataType.Name(out_type)}; LayerNormalization's "
                                             "input and output have one type")
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        gamma, beta = (None if v is None else np.broadcast_to(
            v.reshape(v.shape[max(0, v.ndim - k):]).astype(np.float64), norm_shape).astype(np_dtype) for v in affine)
        if gamma is None:
            gamma = np.ones(norm_shape, np_dtype)
        return {"k": k, "eps": eps, "gamma": gamma, "beta": beta, "perm": perm}

    def _eps_and_axes(self, view: GraphView, p: dict, ctx: FoldContext):
        """Epsilon, the number k of normalized trailing axes, and the Transpose (or None) that
        makes them trailing; or Left."""
        x = p["x"]
        for square in p["squares"]:
            if scalar(view, square.input[1]) != 2.0:
                return Left("non-constant-parameters", f"{label(square)}: exponent is not the constant 2")
        eps = 0.0 if p["add_eps"] is None else scalar(view, other_input(p["add_eps"], p["var"]))
        if eps is None:
            return Left("non-constant-parameters", f"{label(p['add_eps'])}: epsilon is not a constant scalar")
        if not eps >= 0 or not np.isfinite(eps):
            return Left("invalid-statistics", f"epsilon {eps} is negative or not finite")
        rank = view.rank(x)
        all_axes = [mean_axes(view, r) for r in p["reduces"]]
        if any(a is None for a in all_axes):
            return Left("unknown-shape", "the reduction axes could not be determined")
        moved = p.get("perm_moved")
        if moved is not None:  # the mean reduces X; the variance, Transpose(X - mean): compare in the latter
            if rank is None or sorted(moved) != list(range(rank)):
                return Left("unsupported-axis", "the Transpose inside the LayerNorm has no usable perm")
            all_axes[0] = tuple(moved.index(a % rank) for a in all_axes[0] if -rank <= a < rank)
        normal = [sorted(a % rank for a in axes) if rank else sorted(axes) for axes in all_axes]
        if any(n != normal[0] for n in normal):
            return Left("unsupported-axis", "the mean and the variance reduce different axes")
        if not all(keeps_dims(r) for r in p["reduces"]):
            return Left("unsupported-attribute", "ReduceMean with keepdims=0")
        axes = all_axes[0]
        if p.get("perm_in") and rank and sorted(p["perm_in"]) == list(range(rank)):
            axes = tuple(p["perm_in"].index(a % rank) for a in axes)  # where X's reduced axes are in Transpose(X)
        elif "perm_in" in p:
            return Left("unsupported-axis", "the Transpose applied to the input has no usable perm")
        k = trailing_count(axes, rank)
        perm = None
        if k is None:
            if not ctx.allow_transpose or rank is None or moved is not None:
                return Left("unsupported-axis", f"reduction over axes {list(axes)} of a rank-{rank or '?'} tensor: "
                                                "LayerNormalization normalizes trailing axes only "
                                                "(--allow-transpose wraps it in a Transpose pair)")
            # Move the normalized axes to the end, normalize there, and move them back.
            reduced = sorted(a % rank for a in axes)
            perm = [i for i in range(rank) if i not in reduced] + reduced
            k = len(reduced)
        return eps, k, perm, rank

    # ---- rewrite -----------------------------------------------------------------------------
    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        p = match.parts
        anchor = next(n for n in match.nodes if is_mean(n))
        prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or "LayerNorm")
        scale = reuse_or_add(view, p["gamma"], plan["gamma"], f"{prefix}.scale")
        inputs = [p["x"], scale]
        if plan["beta"] is not None:
            inputs.append(reuse_or_add(view, p["beta"], plan["beta"], f"{prefix}.bias"))
        perm = plan["perm"]
        out = match.output if perm is None else view.unique_name(f"{prefix}/LayerNormalization_output")
        created = []
        if p.get("perm_moved") is not None:  # the model's own Transpose, moved back in front of the norm
            inputs[0] = view.unique_name(f"{prefix}/Transpose_output")
            created.append(onnx.helper.make_node("Transpose", [p["x"]], [inputs[0]], perm=p["perm_moved"],
                                                 name=view.unique_name(f"{prefix}/Transpose")))
        if perm is not None:
            inputs[0] = view.unique_name(f"{prefix}/Transpose_in_output")
            created.append(onnx.helper.make_node("Transpose", [p["x"]], [inputs[0]], perm=perm,
                                                 name=view.unique_name(f"{prefix}/Transpose_in")))
        created.append(onnx.helper.make_node("LayerNormalization", inputs, [out],
                                             name=view.unique_name(f"{prefix}/LayerNormalization"),
                                             axis=-plan["k"], epsilon=plan["eps"], stash_type=1))
        if perm is not None:
            created.append(onnx.helper.make_node("Transpose", [out], [match.output],
                                                 perm=[int(i) for i in np.argsort(perm)],
                                                 name=view.unique_name(f"{prefix}/Transpose_out")))
        last = match.nodes[-1]
        for node in match.nodes:
            view.remove(node)
        for node in created:
            view.add_node(node, after=last)
        wrapped = "" if perm is None else f", between Transposes {perm} and back"
        if p.get("perm_moved") is not None:
            wrapped += f", on the input's Transpose {p['perm_moved']} moved in front of it"
        return Rewritten([n.name for n in created], f"{len(match.nodes)} nodes fused into LayerNormalization "
                                                    f"(axis={-plan['k']}, epsilon={plan['eps']:g}{wrapped})")


def _skip_identity_reshape(view: GraphView, tensor: str, nodes: list) -> str:
    """Step over a Reshape that is the only reader of `tensor` and keeps its shape."""
    readers = view.users(tensor)
    reshape = _identity_reshape(view, tensor)
    if reshape is None or len(readers) != 1:
        return tensor
    nodes.append(reshape)
    return reshape.output[0]


def _identity_reshape(view: GraphView, tensor: str) -> onnx.NodeProto | None:
    """A Reshape reading `tensor` that gives it back its own (known) shape."""
    before = view.dims(tensor)
    if before is None or None in before:
        return None
    for reshape in view.users(tensor):
        if is_op(reshape, "Reshape") and reshape.input[0] == tensor:
            after = view.const(reshape.input[1])
            if after is not None and [int(a) for a in after.reshape(-1)] == list(before):
                return reshape
    return None
