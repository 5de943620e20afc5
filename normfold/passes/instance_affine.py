"""Absorb a per-channel Mul / Add after InstanceNormalization into its scale and bias.

A GroupNorm with one channel per group, exported by PyTorch as Reshape -> InstanceNormalization ->
Reshape -> Mul(gamma) -> Add(beta) (see groupnorm.py), loses its two Reshapes to onnxsim's and
onnxslim's simplification when X has rank 3 (wav2vec2's feature extractor): what is left is

    X -> InstanceNormalization(s, b, eps) -> [Reshape(Shape(X))] -> [Mul(C gamma[C, 1, ..])] -> [Add(C beta[C, 1, ..])] -> Y

(the Reshape to X's own shape, when the simplifier kept the second one, moves no data and goes too;
when it kept the first one instead, Reshape(X, [0, C, -1]) stays and X is its output here).

InstanceNormalization already applies a per-channel affine map, so the constants go into it:

    X -> InstanceNormalization(s * gamma, b * gamma + beta, eps) -> Y

exact up to the rounding of the new constants (float64, stored in the op's type). Any opset. A
constant that does not broadcast along the channel axis only stays where it is; selected with the
`groupnorm` pass.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._pattern import channel_vector, in_graph_order, is_op, other_input


class InstanceNormAffine(Rule):
    name = "groupnorm"  # selected with the GroupNorm fusion: this is what simplifiers leave of one
    status = "fused"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, "InstanceNormalization") or len(node.input) < 3:
            return None
        nodes, out, affine = [node], node.output[0], {}
        back = view.sole_user(out)
        shape = view.producer.get(back.input[1]) if is_op(back, "Reshape") and len(back.input) > 1 else None
        if (is_op(shape, "Shape") and shape.input[0] == node.input[0] and back.input[0] == out
                and not any(a.name in ("start", "end") for a in shape.attribute)):
            nodes.append(back)  # Reshape(IN(X), Shape(X)): the identity
            if view.sole_user(shape.output[0]) is back:
                nodes.append(shape)
            out = back.output[0]
        for op in ("Mul", "Add"):
            tail = view.sole_user(out)
            const = other_input(tail, out) if is_op(tail, op) else None
            if not const or not view.is_const(const):
                continue
            affine[op] = const
            nodes.append(tail)
            out = tail.output[0]
        if not affine:
            return None
        nodes = in_graph_order(view, nodes)
        return Match("InstanceNormalization with a per-channel Mul/Add after it", nodes, out,
                     {"inorm": node, "affine": affine})

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        inorm, affine = match.parts["inorm"], match.parts["affine"]
        scale, bias = view.const(inorm.input[1]), view.const(inorm.input[2])
        if scale is None or bias is None:
            return Left("non-constant-parameters", f"{label(inorm)}: scale or bias is not a constant")
        dims = view.dims(inorm.input[0])
        if dims is None or len(dims) < 3:
            return Left("unknown-shape", f"the rank of {inorm.input[0]!r} could not be inferred")
        channels = dims[1]
        gamma, beta = np.ones(scale.shape), np.zeros(scale.shape)
        for op, name in affine.items():
            value = view.const(name)
            vector = channel_vector(value, dims)
            if vector is None or vector.shape != scale.shape or value.dtype != scale.dtype:
                return Left("not-per-channel", f"{op} constant of shape {list(value.shape)} does not broadcast "
                                               f"along the {channels} channels of {label(inorm)} only")
            if op == "Mul":
                gamma = vector.astype(np.float64)
            else:
                beta = vector.astype(np.float64)
        new_scale = scale.astype(np.float64) * gamma
        new_bias = bias.astype(np.float64) * gamma + beta
        with np.errstate(over="ignore"):  # refused just below, by name
            stored = new_scale.astype(scale.dtype), new_bias.astype(bias.dtype)
        if not all(np.all(np.isfinite(v)) for v in stored):
            return Left("invalid-statistics", f"the absorbed scale or bias of {label(inorm)} overflows {scale.dtype}")
        return stored

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        inorm = match.parts["inorm"]
        scale, bias = plan
        prefix = inorm.name or "InstanceNormalization"
        view.replace_input(inorm, 1, view.add_initializer(f"{prefix}.scale", scale))
        view.replace_input(inorm, 2, view.add_initializer(f"{prefix}.bias", bias))
        for node in match.nodes:
            if node is not inorm:
                view.remove(node)
        view.rename_output(inorm, 0, match.output)
        absorbed = " and ".join(label(n) for n in match.nodes if n.op_type in ("Mul", "Add"))
        dropped = " (the identity Reshape to X's shape removed)" if any(n.op_type == "Reshape" for n in match.nodes) else ""
        return Rewritten([label(inorm)], f"{absorbed} absorbed into {label(inorm)}'s scale and bias{dropped}")

