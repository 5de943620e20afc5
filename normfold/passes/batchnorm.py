"""Fold inference-mode BatchNormalization into the linear layer before it.

    X -> Conv(W, b) -> BatchNormalization(g, beta, m, v, eps) -> Y
becomes
    X -> Conv(W', b') -> Y        with s = g / sqrt(v + eps),
                                  W' = W * s (per output channel), b' = (b - m) * s + beta

The same holds after ConvTranspose (any group), Gemm (transB 0/1, any alpha/beta, with or without
C) and MatMul with a constant 2-D right-hand side (with or without its bias Add); see _linear.py
for where each layer keeps its output channels. BatchNormalization normalizes axis 1, so after
MatMul it folds only when the output has rank 2 (axis 1 is then the last, the MatMul's channels).

Left as it is, with a reason: training mode; non-constant statistics; var + eps <= 0; a producer
whose output is also read elsewhere; no linear producer at all (then BN is already the cheapest form).
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._linear import (apply_fold, channel_count, check_layer, find_linear_layer, plan_fold,
                                     retarget_output)


class BatchNormFold(Rule):
    name = "bn"
    status = "folded"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            return None
        layer = find_linear_layer(view, node.input[0])
        kind = f"BatchNormalization after {layer.op}" if layer else "BatchNormalization"
        nodes = (layer.nodes if layer else []) + [node]
        return Match(kind, nodes, node.output[0], {"bn": node, "layer": layer})

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        bn: onnx.NodeProto = match.parts["bn"]
        layer = match.parts["layer"]
        extra_outputs = [o for o in bn.output[1:] if o]
        if attr(bn, "training_mode", 0) or extra_outputs:
            return Left("training-mode", f"{label(bn)} runs in training mode"
                        + (f" (outputs {extra_outputs} are used)" if extra_outputs else ""))
        if attr(bn, "spatial", 1) != 1:
            return Left("unsupported-attribute", f"{label(bn)} has spatial=0 (per-activation statistics)")
        if layer is None:
            producer = view.producer.get(bn.input[0])
            what = f"{producer.op_type} {label(producer)}" if producer else "a graph input"
            return Left("no-linear-producer", f"{label(bn)} follows {what}; left as BatchNormalization")
        names = ("scale", "bias", "mean", "var")
        values = [view.const(n) for n in bn.input[1:5]]
        missing = [f"{part} {n!r}" for part, n, v in zip(names, bn.input[1:5], values) if v is None]
        if missing:
            return Left("non-constant-parameters", f"{label(bn)}: {', '.join(missing)} not constant")
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
        gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in values)
        if channels is None or any(v.size not in (1, channels) for v in (gamma, beta, mean, var)):
            return Left("not-per-channel", f"{label(bn)} parameters do not match the {channels} channels of {label(layer.layer)}")
        eps = float(attr(bn, "epsilon", 1e-5))
        denom = var + eps
        if not np.all(denom > 0) or not all(np.all(np.isfinite(v)) for v in (gamma, beta, mean, var)):
            return Left("invalid-statistics", f"{label(bn)}: var + eps must be positive and parameters finite")
        scale = gamma / np.sqrt(denom)
        return plan_fold(view, layer, scale, beta - mean * scale, channels)

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        bn, layer = match.parts["bn"], match.parts["layer"]
        notes = apply_fold(view, layer, plan)
        notes += retarget_output(view, layer, bn)
        return Rewritten([label(n) for n in layer.nodes], f"{label(bn)} folded into {layer.op} {label(layer.layer)}",
                         notes, plan.rounding)
