"""Fold a per-channel constant Mul / Add / Sub / Div that follows a linear layer into the layer.

This is how TensorFlow exports write BatchNormalization once tf2onnx has pre-computed it:

    Conv -> Mul(C[1,M,1,1]) -> Add(C[1,M,1,1])     becomes     Conv(W', b')

and how Keras 3 writes every BN. Each op is one site: Mul(k) is s = k, Add(k) is t = k, Sub(x, k)
is t = -k, Div(x, k) is s = 1/k. Only a constant that broadcasts along the layer's output-channel
axis alone is folded: a `Mul(C[M])` after a Conv broadcasts along the last (width) axis and is not
a channel scale, so it is left with `not-per-channel`.

ChannelAffineFold offers a site only when the op follows a linear layer; a lone Mul anywhere else
(GELU's constants, an attention scale, a mask) is not a norm site and is not reported. The bias Add
right after a MatMul is part of that layer, not a site.

ChannelPairFold takes what Keras writes for a BatchNormalization that follows no linear layer (a
pre-activation BN after an Add or on the model input, `BN -> Relu -> Conv`, ResNetV2): a chain of
per-channel constant ops with a scale and a shift, all along the same axis with the same C >= 2
channels, in either operand order:

    X -> Mul(C[c]) -> Add(C[c]) -> [Identity / Transpose ...] -> Conv | Gemm | MatMul
         (also Sub(y, C), Sub(C, y), Div(y, C), and Keras' torch/jax form Sub(C) -> Mul(C) -> Add(C))

It folds forward into the one layer that reads it when that is exact (_next_layer.py: a Conv without
padding, a Gemm, a MatMul along its contracted axis; through Transposes that bring the constants'
axis to the layer's input channels), else it is a site left `no-linear-producer` that says what it
is. The affine tail of a norm (`Div(X - mean, sqrt(var + eps)) -> Mul(gamma) -> Add(beta)`, or a
LayerNormalization / InstanceNormalization / BatchNormalization op before it) is that norm's, which
its own pass fuses or reports; it is no site here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from normfold.graph import GraphView, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._algebra import Mean, Root, canonical_view
from normfold.passes._linear import (LAYOUT_OPS, _per_channel, apply_fold, channel_count, check_layer,
                                     find_linear_layer, is_passthrough, overridable, plan_fold,
                                     redirect_shape_readers, retarget_output, sole_value_reader, value_readers)
from normfold.passes._next_layer import (NextLayer, apply_into_next, check_next_layer, find_next_layer, layer_axis,
                                         plan_into_next)

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


# ---- BatchNorm-like chains that follow no linear layer ---------------------------------------
MAX_STEPS = 8
# Ops that apply their own per-channel affine map: a Mul/Add after them is theirs, not a BatchNorm.
NORM_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
            "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization")


@dataclass
class Step:
    node: onnx.NodeProto
    data: str  # the input carrying the chain's value
    const: str
    shape: tuple[int, ...]

    @property
    def reversed(self) -> bool:  # Sub(C, y) = -y + C
        return self.node.op_type == "Sub" and self.node.input[1] == self.data

    def describe(self) -> str:
        return f"{self.node.op_type}(C{list(self.shape)})"


@dataclass
class Chain:
    steps: list[Step]
    axis: int  # the constants' channel axis, counted from the end (negative)
    channels: int
    nodes: list[onnx.NodeProto]  # the steps' nodes and the Identity / Dropout nodes between them, in order

    @property
    def data(self) -> str:
        return self.steps[0].data

    @property
    def output(self) -> str:
        return self.steps[-1].node.output[0]

    def describe(self) -> str:
        return " -> ".join(s.describe() for s in self.steps)


def _step(view: GraphView, node: onnx.NodeProto | None) -> Step | None:
    """`node` as y -> op(y, C) with a constant C, or an initializer listed as a graph input (a site
    left with the reason and the option that makes it a constant, never missed silently)."""
    if node is None or node.op_type not in OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    for index in (0, 1):
        if node.op_type == "Div" and index == 1:
            break  # C / y is not affine in y
        data, const = node.input[index], node.input[1 - index]
        if view.is_const(data):
            continue
        if view.is_const(const):
            return Step(node, data, const, tuple(view.const_shape(const)))
        if overridable(view, const):
            return Step(node, data, const, tuple(view.initializers[const].dims))
    return None


def _channel_axis(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(axis counted from the end, channel count) of a constant that varies along one axis only,
    with at least 2 entries; None otherwise (a scalar, a mask, a [T, D] table)."""
    varying = [i for i, d in enumerate(shape) if d != 1]
    if len(varying) != 1 or shape[varying[0]] < 2:
        return None
    return varying[0] - len(shape), shape[varying[0]]


def find_chain(view: GraphView, node: onnx.NodeProto) -> Chain | None:
    """The chain of per-channel constant ops that starts at `node` (by structure: every op reads
    the one before it alone, every constant varies along the same axis only, with the same count),
    when it holds a scale (Mul/Div) and a shift (Add/Sub); None otherwise."""
    first = _step(view, node)
    found = _channel_axis(first.shape) if first is not None else None
    if found is None:
        return None
    steps, nodes = [first], [node]
    while len(steps) < MAX_STEPS:
        through, step = _next_step(view, steps[-1].node.output[0])
        if step is None or _channel_axis(step.shape) != found:
            break
        steps.append(step)
        nodes += [*through, step.node]
    ops = {s.node.op_type for s in steps}
    if not (ops & {"Mul", "Div"} and ops & {"Add", "Sub"}):
        return None
    return Chain(steps, *found, nodes)


def _next_step(view: GraphView, tensor: str) -> tuple[list[onnx.NodeProto], Step | None]:
    """The step that alone reads `tensor`, also through Identity / inference Dropout nodes that
    alone read it (paddle2onnx writes an Identity after every op), and those nodes."""
    through, reader = [], sole_value_reader(view, tensor)
    while is_passthrough(view, reader) and len(through) < MAX_STEPS:
        through.append(reader)
        tensor = reader.output[0]
        reader = sole_value_reader(view, tensor)
    step = _step(view, reader)
    return (through, step) if step is not None and step.data == tensor else ([], None)


def _continues_a_chain(view: GraphView, chain: Chain) -> bool:
    """Whether the chain's first op is in the middle of one that starts earlier (the earlier op was
    reported, or is the start of this site), also across Identity / Dropout nodes."""
    node = view.producer.get(chain.data)
    for _ in range(MAX_STEPS):
        if not is_passthrough(view, node):
            break
        node = view.producer.get(node.input[0])
    before = _step(view, node)
    if before is None or _channel_axis(before.shape) != (chain.axis, chain.channels):
        return False
    step = _next_step(view, before.node.output[0])[1]
    return step is not None and step.node is chain.steps[0].node


def _norms_own_affine(view: GraphView, tensor: str) -> bool:
    """Whether `tensor` is a norm's normalized value: a norm op's output (through layout ops), or
    a tensor divided by something where a mean occurs (a decomposed LayerNorm / RMSNorm, or a near
    one, that its pass fuses or reports, gamma and beta with it). A mean alone is no norm: global
    average pooling -> BatchNorm is a BatchNorm."""
    name = tensor
    for _ in range(MAX_STEPS):
        node = view.producer.get(name)
        if node is None:
            break
        if node.op_type in NORM_OPS:
            return True
        if node.op_type not in LAYOUT_OPS or not node.input:
            break
        name = node.input[0]
    expr = canonical_view(view).expr(tensor)
    divided = any(power * (atom.power if isinstance(atom, Root) else 1) < 0 for sig in expr.terms for atom, power in sig)
    return divided and _has_mean(expr)


def _has_mean(expr, depth: int = 0) -> bool:
    """Whether a Mean occurs in the canonical expression, also inside roots and means."""
    for sig in expr.terms:
        for atom, _ in sig:
            if isinstance(atom, Mean):
                return True
            if isinstance(atom, Root) and depth < MAX_STEPS and _has_mean(atom.base, depth + 1):
                return True
    return False


class ChannelPairFold(Rule):
    name = "bn"  # a BatchNorm in Keras' spelling
    status = "folded"

    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if node.op_type not in OPS:
            return None
        chain = find_chain(view, node)
        if chain is None or _continues_a_chain(view, chain):
            return None
        if find_linear_layer(view, chain.data) is not None or _norms_own_affine(view, chain.data):
            return None  # ChannelAffineFold's site, or a norm's gamma and beta
        after = find_next_layer(view, chain.output, transposes=True)
        if after is None:
            return Match("BatchNorm-like per-channel Mul/Add", chain.nodes, chain.output,
                         {"chain": chain, "next": None})
        return Match(f"BatchNorm-like per-channel Mul/Add before {after.op}",
                     [*after.core, *after.through, *chain.nodes], after.core[-1].output[0],
                     {"chain": chain, "next": after})

    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        chain: Chain = match.parts["chain"]
        after: NextLayer | None = match.parts["next"]
        affine = _affine(view, chain)
        if isinstance(affine, Left):
            return affine
        if after is None:
            return Left("no-linear-producer", f"{_what(view, chain)} and none it can fold into ({_readers(view, chain)})")
        at = layer_axis(view, after, chain.axis)
        dims = view.dims(chain.data)
        if at is None or dims is None:
            return Left("unknown-shape", f"{_what(view, chain)}: the rank of {chain.data!r} or of the input of "
                                         f"{after.op} {label(after.layer)} is unknown")
        if len(dims) != at[1]:
            return Left("not-per-channel", f"{_what(view, chain)}: its constants raise the rank of {chain.data!r} "
                                           f"from {len(dims)} to {at[1]}")
        width = dims[chain.axis]
        if width != chain.channels:
            reason = "unknown-shape" if not isinstance(width, int) else "not-per-channel"
            return Left(reason, f"{_what(view, chain)}: axis {chain.axis} of {chain.data!r} has size {width}, "
                                f"which the constants of {chain.channels} channels broadcast")
        channels, refusal = check_next_layer(view, after, after.layer.input[0], at[0])
        if refusal is not None:
            refusal.detail = f"{_what(view, chain)}, and {refusal.detail}"
            return refusal
        if channels != chain.channels:
            return Left("not-per-channel", f"{_what(view, chain)}: {after.op} {label(after.layer)} reads "
                                           f"{channels} channels, not {chain.channels}")
        return plan_into_next(view, after, *affine, chain.channels)

    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        chain: Chain = match.parts["chain"]
        after: NextLayer = match.parts["next"]
        notes = apply_into_next(view, after, plan)
        reader = after.through[0] if after.through else after.layer
        view.replace_input(reader, list(reader.input).index(chain.output), chain.data)
        for node in chain.nodes:  # their outputs go; Shape readers read the chain's input (same shape)
            redirect_shape_readers(view, node.output[0], chain.data)
            view.remove(node)
        return Rewritten([label(n) for n in after.core], f"{chain.describe()} at {label(chain.nodes[0])} folded "
                         f"forward into {after.op} {label(after.layer)}", notes, plan.rounding)


def _affine(view: GraphView, chain: Chain):
    """(scale, shift), float64 per channel, of the whole chain as y = scale * x + shift; or Left."""
    scale, shift = np.ones(chain.channels), np.zeros(chain.channels)
    for step in chain.steps:
        k = view.const(step.const)
        if k is None:
            return Left("non-constant-parameters", f"{label(step.node)}: {step.const!r} is not a constant"
                        + overridable(view, step.const))
        if k.dtype.kind != "f" and str(k.dtype) != "bfloat16":
            return Left("unsupported-dtype", f"{label(step.node)}: constant has dtype {k.dtype}")
        k = k.astype(np.float64).reshape(-1)
        if not np.all(np.isfinite(k)):
            return Left("invalid-statistics", f"{label(step.node)}: constant is not finite")
        op = step.node.op_type
        if op == "Div" and np.any(k == 0):
            return Left("invalid-statistics", f"{label(step.node)} divides by zero")
        if op in ("Mul", "Div"):
            factor = k if op == "Mul" else 1.0 / k
            scale, shift = scale * factor, shift * factor
        elif step.reversed:  # C - y
            scale, shift = -scale, k - shift
        else:
            shift = shift + (k if op == "Add" else -k)
    return scale, shift


def _what(view: GraphView, chain: Chain) -> str:
    producer = view.producer.get(chain.data)
    source = f"after {producer.op_type} {label(producer)}" if producer else f"on the graph input {chain.data!r}"
    return (f"{chain.describe()} at {label(chain.nodes[0])}: a BatchNorm {source}, with no Conv, Gemm or "
            "MatMul before it")


def _readers(view: GraphView, chain: Chain) -> str:
    out = chain.output
    readers = value_readers(view, out)
    if view.is_graph_output(out):
        return "its output is a graph output"
    if len(readers) != 1:
        return f"its output is read by {len(readers)} nodes"
    reader = readers[0]
    return f"its output is read by {reader.op_type} {label(reader)}"
