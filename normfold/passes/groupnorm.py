"""Fuse a decomposed GroupNorm into one GroupNormalization (opset 21+, per-channel scale and bias).

GroupNorm splits the C channels of X (N, C, *S) into G groups of C/G consecutive channels and
normalizes each group of each sample over its C/G * prod(S) values, then applies a per-channel
affine map:

    Y[n, c, s] = (X[n, c, s] - mean[n, g]) / sqrt(var[n, g] + eps) * gamma[c] + beta[c],  g = c // (C/G)

with the population variance. That is exactly GroupNormalization-21 (num_groups=G, epsilon=eps,
scale=gamma[C], bias=beta[C]); we always write stash_type=1 (statistics in float32), the only
variant onnxruntime runs for float16 on the CPU. Opsets 18-20 define GroupNormalization with a
per-*group* scale and bias, which cannot express a per-channel gamma, so we emit nothing below 21.

Spelling 1, PyTorch (TorchScript at opsets 13-18 and dynamo): the groups go through
InstanceNormalization, which normalizes axis 2 of [N, G, L] per (n, g):

    X ──┬─> Reshape(K[0, G, -1]) ─> InstanceNormalization(K ones[G], K zeros[G], eps) ─┐
        └─> Shape ──────────────────────────────────────────────────> Reshape(., shape) <┘
                                  ─> [Mul(C gamma[C,1,..])] ─> [Add(C beta[C,1,..])] ─> Y

The second Reshape's shape is Shape(X) or a constant equal to X's shape (dynamo, static export).
The InstanceNormalization scale/bias must be ones/zeros: a per-group affine inside the groups is
not expressible per channel (left with `not-per-channel`). A Mul/Add constant that does not
broadcast per channel is not absorbed; it stays after the fused op.

The Keras 3 / tf_keras spellings (moments over a channels-last grouped Reshape, in any layout
onnxruntime moves them to, static or dynamic batch, weighted moments) are recognised by their
algebra in norms.py (GroupNormRule); this file keeps the InstanceNormalization spelling, whose
statistics are an op of their own.

Always checked: no intermediate read outside the site; epsilon, gamma and beta constant; the
number of groups constant and dividing C; X of rank >= 3 with C known; opset >= 21.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._pattern import channel_vector, in_graph_order, is_op, other_input, shown_dims, user

MIN_OPSET = 21
# Element types onnxruntime's CPU GroupNormalization-21 kernel runs (stash_type=1); bfloat16 has none.
DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
          onnx.TensorProto.DOUBLE: "float64"}
TORCH_KIND = "GroupNorm (Reshape + InstanceNormalization)"


class GroupNormFusion(Rule):
    name = "groupnorm"
    min_opset = MIN_OPSET
    status = "fused"

    # ---- match -------------------------------------------------------------------------------
    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, "Reshape") or len(node.input) < 2:
            return None
        return _match_instance_norm(view, node)

    # ---- check -------------------------------------------------------------------------------
    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        escaped = view.escapes(match.nodes, keep=match.output)
        if escaped:
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the GroupNorm is also used outside it")
        # What no opset can change comes first; then the opset (shape inference often improves after
        # --target-opset converts the model, so an unknown shape below 21 is not the reason to give).
        left = _check_instance_norm_params(view, match)
        if left is not None:
            return left
        if ctx.opset < MIN_OPSET:
            return Left("opset-too-old", f"GroupNormalization with per-channel scale needs opset {MIN_OPSET}; "
                                         f"the model has opset {ctx.opset} (rerun with --target-opset {MIN_OPSET})")
        x = match.parts["x"]
        dims = view.dims(x)
        if dims is None:
            return Left("unknown-shape", f"the rank of {x!r} could not be inferred")
        if len(dims) < 3:
            return Left("unknown-shape", f"{x!r} has rank {len(dims)}; GroupNormalization needs (N, C, ...)")
        channels = dims[1]
        if not isinstance(channels, int):
            return Left("unknown-shape", f"the channel count of {x!r} could not be inferred")
        dtype = view.elem_type(x)
        if dtype not in DTYPES:
            name = onnx.TensorProto.DataType.Name(dtype) if dtype else "unknown"
            return Left("unsupported-dtype", f"{x!r} is {name}; the fused op is written only for float32, "
                                             "float16 and float64 (what onnxruntime's CPU kernel verifies)")
        plan = _check_instance_norm(view, match, dims)
        if isinstance(plan, Left):
            return plan
        eps = plan["eps"]
        if not eps > 0 or not np.isfinite(eps):
            return Left("invalid-statistics", f"epsilon {eps} is not positive")
        np_dtype = np.dtype(DTYPES[dtype])
        gamma, beta = plan["gamma"], plan["beta"]
        plan["scale"] = (np.ones(channels, np_dtype) if gamma is None else gamma).astype(np_dtype)
        plan["bias"] = (np.zeros(channels, np_dtype) if beta is None else beta).astype(np_dtype)
        return plan

    # ---- rewrite -----------------------------------------------------------------------------
    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        p = match.parts
        anchor = p["reshape"]
        prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or "GroupNorm")
        scale = view.add_initializer(f"{prefix}.scale", np.ascontiguousarray(plan["scale"]))
        bias = view.add_initializer(f"{prefix}.bias", np.ascontiguousarray(plan["bias"]))
        fused = onnx.helper.make_node("GroupNormalization", [p["x"], scale, bias], [match.output],
                                      name=view.unique_name(f"{prefix}/GroupNormalization"),
                                      num_groups=plan["groups"], epsilon=plan["eps"], stash_type=1)
        last = match.nodes[-1]
        for node in match.nodes:
            view.remove(node)
        view.add_node(fused, after=last)
        created = [fused.name]
        detail = (f"{len(match.nodes)} nodes fused into GroupNormalization "
                  f"(num_groups={plan['groups']}, epsilon={plan['eps']:g})")
        return Rewritten(created, detail)


# ---- spelling 1: Reshape -> InstanceNormalization -> Reshape -> [Mul] -> [Add] -------------------

def _match_instance_norm(view: GraphView, reshape: onnx.NodeProto) -> Match | None:
    x, grouped = reshape.input[0], reshape.output[0]
    inorm = user(view, grouped, "InstanceNormalization")
    if inorm is None or inorm.input[0] != grouped or len(inorm.input) < 3:
        return None
    back = user(view, inorm.output[0], "Reshape")
    if back is None or back.input[0] != inorm.output[0] or len(back.input) < 2:
        return None
    nodes = [reshape, inorm]
    shape = view.producer.get(back.input[1])
    if is_op(shape, "Shape") and shape.input[0] == x and view.sole_user(shape.output[0]) is back:
        nodes.append(shape)  # only when nothing else reads it; otherwise it stays where it is
    nodes.append(back)
    out = back.output[0]
    dims = view.dims(x)
    gamma = beta = None
    for op in ("Mul", "Add"):
        tail = view.sole_user(out)
        if not is_op(tail, op):
            continue
        const = other_input(tail, out)
        value = view.const(const) if const else None
        if value is None or dims is None or channel_vector(value, dims) is None:
            continue  # not a per-channel constant: it stays after the fused op
        if op == "Mul":
            gamma = const
        else:
            beta = const
        nodes.append(tail)
        out = tail.output[0]
    parts = {"x": x, "reshape": reshape, "inorm": inorm, "back": back, "gamma": gamma, "beta": beta}
    return Match(TORCH_KIND, in_graph_order(view, nodes), out, parts)


def _check_instance_norm_params(view: GraphView, match: Match) -> Left | None:
    inorm = match.parts["inorm"]
    in_scale, in_bias = view.const(inorm.input[1]), view.const(inorm.input[2])
    if in_scale is None or in_bias is None:
        return Left("non-constant-parameters", f"{label(inorm)}: scale or bias is not a constant")
    if not (np.all(in_scale == 1) and np.all(in_bias == 0)):
        return Left("not-per-channel", f"{label(inorm)}: scale/bias are not ones/zeros; an affine map per "
                                       "group inside the groups cannot be written as a per-channel scale")
    return None


def _check_instance_norm(view: GraphView, match: Match, dims: list):
    p = match.parts
    channels, rank = dims[1], len(dims)
    target = _const_ints(view, p["reshape"].input[1])
    if target is None or len(target) != 3 or target[1] <= 0:
        return Left("unsupported-axis", f"{label(p['reshape'])}: the grouping shape {target} is not a constant "
                                        "[N, G, -1]")
    groups = target[1]
    if channels % groups:
        return Left("unsupported-axis", f"{groups} groups do not split {channels} channels evenly; the "
                                        "InstanceNormalization does not normalize whole channels")
    spatial = _product(dims[2:])
    per_group = None if spatial is None else channels // groups * spatial
    # a 0 copies the batch (target[1] is a positive G, checked above)
    if not _reshape_gives(p["reshape"], target, [dims[0], groups, per_group], copy_ok={0}):
        return Left("unsupported-axis", f"{label(p['reshape'])}: shape {target} does not group the channels of "
                                        f"{p['x']!r} {shown_dims(dims)} as [N, {groups}, -1]")
    back = p["back"]
    shape = view.producer.get(back.input[1])
    if not (is_op(shape, "Shape") and shape.input[0] == p["x"] and attr(shape, "start", 0) in (0, -rank)
            and attr(shape, "end") is None):
        restore = _const_ints(view, back.input[1])
        if restore is None or not _reshape_gives(back, restore, dims,
                                                 copy_ok={0, 1} if groups == channels else {0}):
            return Left("unsupported-axis", f"{label(back)}: the shape {restore if restore is not None else '?'} "
                                            f"does not restore {p['x']!r} to {shown_dims(dims)}")
    eps = float(attr(p["inorm"], "epsilon", 1e-5))
    gamma = channel_vector(view.const(p["gamma"]), dims) if p["gamma"] else None
    beta = channel_vector(view.const(p["beta"]), dims) if p["beta"] else None
    return {"groups": groups, "eps": eps, "gamma": gamma, "beta": beta}


def _const_ints(view: GraphView, name: str) -> list[int] | None:
    value = view.const(name)
    if value is None or value.dtype.kind not in "iu" or value.ndim != 1:
        return None
    return [int(v) for v in value]


def _product(dims: list) -> int | None:
    if any(not isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def _reshape_gives(node: onnx.NodeProto, target: list[int], want: list, copy_ok: set[int]) -> bool:
    """Whether Reshape `node` with constant shape `target` produces shape `want` from an input with
    the same element count (`want` entries may be None when unknown). A 0 copies the input's dim and
    is accepted where the caller knows that dim equals the wanted one (`copy_ok`); a single -1 is
    accepted because every other entry is then pinned and the element counts agree."""
    if len(target) != len(want) or sum(1 for t in target if t == -1) > 1:
        return False
    if attr(node, "allowzero", 0) and 0 in target:
        return False
    for i, t in enumerate(target):
        if t == -1:
            continue
        if t == 0:
            if i not in copy_ok:
                return False
        elif want[i] is None or t != want[i]:
            return False
    return True
