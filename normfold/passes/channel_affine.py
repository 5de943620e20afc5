"""Fold a per-channel constant Mul / Add / Sub / Div that follows a linear layer into the layer.

This is how TensorFlow exports write BatchNormalization once tf2onnx has pre-computed it:

    Conv -> Mul(C[1,M,1,1]) -> Add(C[1,M,1,1])     becomes     Conv(W', b')

and how Keras 3 writes every BN. Each op is one site: Mul(k) is s = k, Add(k) is t = k, Sub(x, k)
is t = -k, Div(x, k) is s = 1/k. Only a constant that broadcasts along the layer's output-channel
axis alone is folded: a `Mul(C[M])` after a Conv broadcasts along the last (width) axis and is not
a channel scale, so it is left with `not-per-channel`.

Sites are offered only when the op follows a linear layer; a Mul anywhere else is not a norm site
and is not reported. The bias Add right after a MatMul is part of that layer, not a site.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._linear import (_per_channel, apply_fold, channel_count, check_layer, find_linear_layer,
                                     overridable, plan_fold, retarget_output)

OPS = ("Mul", "Add", "Sub", "Div")


class ChannelAffineFold(Rule):
    name = "bn"  # selected together with the BatchNormalization fold: it is BN in TF's spelling
    status = "folded"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if node.op_type not in OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        for data_index in (0, 1):
            if node.op_type in ("Sub", "Div") and data_index == 1:
                break  # k - x and k / x are not affine in the same way
            data, const = node.input[data_index], node.input[1 - data_index]
            # An initializer listed as a graph input (IR < 4 lists them all) is a site too: left
            # with the reason and the option that makes it a constant, never missed silently.
            if not (view.is_const(const) or overridable(view, const)) or view.is_const(data):
                continue
            layer = find_linear_layer(view, data)
            if layer is None or any(n is node for n in layer.nodes):
                continue
            weight = layer.layer.input[1] if len(layer.layer.input) > 1 else ""
            if not (view.is_const(weight) or overridable(view, weight)):
                continue  # e.g. attention's Q @ K^T -> Div(sqrt(d)): not a layer with weights
            shape = view.const_shape(const)
            shape = tuple(view.initializers[const].dims) if shape is None else shape  # a listed initializer
            if np.prod(shape) == 1 and view.sole_user(data) is not node:
                continue  # a scalar op on a shared tensor (GELU's Div by sqrt(2)) is no norm site
            if layer.op == "MatMul" and layer.bias_add is None and not layer.chain and node.op_type == "Add":
                continue  # this Add is the layer's own bias
            return Match(f"{node.op_type} by constant after {layer.op}", layer.nodes + [node], node.output[0],
                         {"op": node, "layer": layer, "data": data, "const": const})
        return None

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        op, layer = match.parts["op"], match.parts["layer"]
        refusal = check_layer(view, layer, match.parts["data"])
        if refusal is not None:
            return refusal
        k = view.const(match.parts["const"])
        if k is None:
            return Left("non-constant-parameters", f"{label(op)}: {match.parts['const']!r} is not a constant"
                        + overridable(view, match.parts["const"]))
        if k.dtype.kind != "f" and str(k.dtype) != "bfloat16":
            return Left("unsupported-dtype", f"{label(op)}: constant has dtype {k.dtype}")
        channels = channel_count(view, layer)
        if channels is None or not _per_channel(k.shape, channels, layer.channel_axis, layer.out_rank):
            rank = "unknown" if layer.out_rank is None else str(layer.out_rank)
            reason = "unknown-shape" if layer.out_rank is None and k.ndim > 1 else "not-per-channel"
            return Left(reason, f"{label(op)}: constant of shape {list(k.shape)} does not broadcast along the "
                                f"output channels of {layer.op} {label(layer.layer)} (output rank {rank})")
        k = np.broadcast_to(k.astype(np.float64).reshape(-1), (channels,)) if k.size == 1 else k.astype(np.float64).reshape(-1)
        if op.op_type == "Div" and np.any(k == 0):
            return Left("invalid-statistics", f"{label(op)} divides by zero")
        if not np.all(np.isfinite(k)):
            return Left("invalid-statistics", f"{label(op)}: constant is not finite")
        one, zero = np.ones(channels), np.zeros(channels)
        scale, shift = {"Mul": (k, zero), "Div": (1.0 / k, zero), "Add": (one, k), "Sub": (one, -k)}[op.op_type]
        return plan_fold(view, layer, scale, shift, channels)

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        op, layer = match.parts["op"], match.parts["layer"]
        notes = apply_fold(view, layer, plan)
        notes += retarget_output(view, layer, op)
        return Rewritten([label(n) for n in layer.nodes], f"{op.op_type} {label(op)} folded into {layer.op} "
                         f"{label(layer.layer)}", notes, plan.rounding)
