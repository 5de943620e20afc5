"""Fold inference-mode BatchNormalization into the linear layer before it.

    X -> Conv(W, b) -> BatchNormalization(g, beta, m, v, eps) -> Y
becomes
    X -> Conv(W', b') -> Y        with s = g / sqrt(v + eps),
                                  W' = W * s (per output channel), b' = (b - m) * s + beta

The same holds after ConvTranspose (any group), Gemm (transB 0/1, any alpha/beta, with or without
C) and MatMul with a constant 2-D right-hand side (with or without its bias Add); see _linear.py
for where each layer keeps its output channels. BatchNormalization normalizes axis 1, so after
MatMul it folds only when the output has rank 2 (axis 1 is then the last, the MatMul's channels).

When no linear layer writes the BN's input but the one reader of its output is a Conv without
padding, a Gemm or a MatMul on a rank-2 input (a BatchNorm1d after a Relu feeding a Linear), the BN
folds forward into that layer instead (see _next_layer.py):

    X -> BatchNormalization -> Gemm(B, C)    becomes    X -> Gemm(diag(s) B, C + t @ B)

Left as it is, with a reason: training mode; non-constant statistics; var + eps <= 0; a producer
whose output is also read elsewhere; no linear layer before it nor one after it that can take it
exactly (then BN is already the cheapest form).
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._linear import (apply_fold, channel_count, check_layer, find_linear_layer, overridable,
                                     plan_fold, redirect_shape_readers, retarget_output)
from normfold.passes._next_layer import apply_into_next, check_next_layer, find_next_layer, plan_into_next


class BatchNormFold(Rule):
    name = "bn"
    status = "folded"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            return None
        layer = find_linear_layer(view, node.input[0])
        if layer is not None:
            return Match(f"BatchNormalization after {layer.op}", layer.nodes + [node], node.output[0],
                         {"bn": node, "layer": layer, "next": None})
        after = find_next_layer(view, node.output[0])
        if after is not None:  # the site writes what the layer after it writes
            # nodes: the layer, then the BN, as for every fold (reports name the folded node last)
            return Match(f"BatchNormalization before {after.op}", [*after.core, *after.through, node],
                         after.core[-1].output[0],
                         {"bn": node, "layer": None, "next": after})
        return Match("BatchNormalization", [node], node.output[0], {"bn": node, "layer": None, "next": None})

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        bn: onnx.NodeProto = match.parts["bn"]
        layer = match.parts["layer"]
        extra_outputs = [o for o in bn.output[1:] if o]
        if view.opset < 7 and attr(bn, "is_test", 0) != 1:  # BatchNormalization-1/6: batch statistics unless is_test
            return Left("training-mode", f"{label(bn)} has is_test=0 (opset {view.opset}): it normalizes with the "
                                         "batch's statistics")
        if attr(bn, "training_mode", 0) or extra_outputs:
            return Left("training-mode", f"{label(bn)} runs in training mode"
                        + (f" (outputs {extra_outputs} are used)" if extra_outputs else ""))
        if attr(bn, "spatial", 1) != 1:
            return Left("unsupported-attribute", f"{label(bn)} has spatial=0 (per-activation statistics)")
        if layer is None and match.parts["next"] is None:
            return Left("no-linear-producer", f"{label(bn)} follows {_producer(view, bn)} and no Conv, Gemm or "
                                              "MatMul reads it alone; left as BatchNormalization")
        names = ("scale", "bias", "mean", "var")
        values = [view.const(n) for n in bn.input[1:5]]
        missing = [f"{part} {n!r}" for part, n, v in zip(names, bn.input[1:5], values) if v is None]
        if missing:
            why = next((overridable(view, n) for n in bn.input[1:5] if overridable(view, n)), "")
            return Left("non-constant-parameters", f"{label(bn)}: {', '.join(missing)} not constant{why}")
        if layer is None:
            return _check_forward(view, bn, match.parts["next"], values)
        refusal = check_layer(view, layer, bn.input[0])
        if refusal is not None:
            return refusal
        if layer.out_rank is None and layer.channel_axis != 1:
            return Left("unknown-shape", f"rank of {layer.output!r} unknown; BN normalizes axis 1, which must "
                                         f"hold the output channels of {layer.op} {label(layer.layer)}")
        if layer.out_rank is not None and layer.channel_axis % layer.out_rank != 1:
            return Left("not-per-channel", f"BN normalizes axis 1 of a rank-{layer.out_rank} tensor whose "
                                           f"channels from {layer.op} {label(layer.layer)} are on axis "
                                           f"{layer.channel_axis % layer.out_rank}")
        channels = channel_count(view, layer)
        affine = _statistics(bn, values, channels, layer.layer)
        if isinstance(affine, Left):
            return affine
        return plan_fold(view, layer, *affine, channels)

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        bn, layer = match.parts["bn"], match.parts["layer"]
        if layer is None:  # forward, into the layer that reads the BN
            after = match.parts["next"]
            notes = apply_into_next(view, after, plan)
            view.replace_input(after.layer, 0, bn.input[0])
            for node in [bn, *after.through]:  # their outputs go; Shape readers read BN's input (same shape)
                redirect_shape_readers(view, node.output[0], bn.input[0])
                view.remove(node)
            return Rewritten([label(n) for n in after.core], f"{label(bn)} folded forward into {after.op} "
                             f"{label(after.layer)}", notes, plan.rounding)
        notes = apply_fold(view, layer, plan)
        notes += retarget_output(view, layer, bn)
        return Rewritten([label(n) for n in layer.nodes], f"{label(bn)} folded into {layer.op} {label(layer.layer)}",
                         notes, plan.rounding)


def _producer(view: GraphView, bn: onnx.NodeProto) -> str:
    producer = view.producer.get(bn.input[0])
    return f"{producer.op_type} {label(producer)}" if producer else "a graph input"


def _statistics(bn: onnx.NodeProto, values: list, channels: int | None, layer: onnx.NodeProto):
    """(scale, shift) of the BN as one affine map per channel (float64), or Left."""
    gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in values)
    if channels is None or any(v.size not in (1, channels) for v in (gamma, beta, mean, var)):
        return Left("not-per-channel", f"{label(bn)} parameters do not match the {channels} channels of {label(layer)}")
    denom = var + float(attr(bn, "epsilon", 1e-5))
    if not np.all(denom > 0) or not all(np.all(np.isfinite(v)) for v in (gamma, beta, mean, var)):
        return Left("invalid-statistics", f"{label(bn)}: var + eps must be positive and parameters finite")
    scale = gamma / np.sqrt(denom)
    return scale, beta - mean * scale


def _check_forward(view: GraphView, bn: onnx.NodeProto, after, values: list):
    channels, refusal = check_next_layer(view, after, bn.output[0])
    if refusal is not None:
        if refusal.reason == "no-linear-producer":
            refusal.detail = f"{label(bn)} follows {_producer(view, bn)}, and {refusal.detail}"
        return refusal
    affine = _statistics(bn, values, channels, after.layer)
    if isinstance(affine, Left):
        return affine
    return plan_into_next(view, after, *affine, channels)
