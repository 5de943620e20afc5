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

Spelling 2, Keras 3 / tf_keras through tf2onnx (channels-last, the groups on the last axes):

    X(NCHW) ─> Transpose(0,2,3,1) ─> Reshape(K[-1, H, W, G, C/G]) = Z
    Z ─> mean over axes [1,2,4] = m        (ReduceMean; tf_keras: Where(Equal(n, 0), 0, ReduceSum / n))
    Z, m ─> Sub ─> Mul(d, d) ─> mean over [1,2,4] ─> Add(eps) ─> Sqrt ─> Reciprocal ─> [Mul(C gamma)] = g
    Z, g ─> Mul = a
    Keras 3:  Neg(m), g ─> Mul ─> [Add(C beta)] = s        tf_keras:  m, g ─> Mul ─> Sub(C beta, .) = s
    a, s ─> Add ─> Reshape(K[N, H, W, C]) ─> Y(NHWC)

GroupNormalization normalizes channels at axis 1, so this is fused as

    X(NCHW) ─> GroupNormalization ─> Transpose(0,2,3,1) ─> Y(NHWC)

which is exact because the Transpose only moves data. It is done only when the exporter's own
Transpose from NCHW feeds the grouping Reshape; a GroupNorm over a tensor that was channels-last
from the start is left with `unsupported-axis` (a Transpose pair would be needed around it).

Always checked: no intermediate read outside the site; epsilon, gamma and beta constant; the
number of groups constant and dividing C; X of rank >= 3 with C known; opset >= 21.
"""

from __future__ import annotations

import numpy as np
import onnx

from normfold.graph import GraphView, attr, label
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule
from normfold.passes._pattern import is_op, other_input, reduce_axes, scalar, user

MIN_OPSET = 21
# Element types onnxruntime's CPU GroupNormalization-21 kernel runs (stash_type=1); bfloat16 has none.
DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
          onnx.TensorProto.DOUBLE: "float64"}
TORCH_KIND = "GroupNorm (Reshape + InstanceNormalization)"
KERAS_KIND = "GroupNorm (decomposed, channels-last)"


class GroupNormFusion(Rule):
    name = "groupnorm"
    min_opset = MIN_OPSET
    status = "fused"

    # ---- match -------------------------------------------------------------------------------
    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, "Reshape") or len(node.input) < 2:
            return None
        return _match_instance_norm(view, node) or _match_channels_last(view, node)

    # ---- check -------------------------------------------------------------------------------
    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        escaped = view.escapes(match.nodes, keep=match.output)
        if escaped:
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the GroupNorm is also used outside it")
        torch_form = match.kind == TORCH_KIND
        # What no opset can change comes first; then the opset (shape inference often improves after
        # --target-opset converts the model, so an unknown shape below 21 is not the reason to give).
        left = (_check_instance_norm_params if torch_form else _check_transpose)(view, match)
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
        plan = (_check_instance_norm if torch_form else _check_channels_last)(view, match, dims)
        if isinstance(plan, Left):
            return plan
        eps = plan["eps"]
        if not eps > 0 or not np.isfinite(eps):
            return Left("invalid-statistics", f"epsilon {eps} is not positive")
        np_dtype = np.dtype(DTYPES[dtype])
        gamma, beta = plan["gamma"], plan["beta"]
        plan["scale"] = (np.ones(channels, np_dtype) if gamma is None else gamma).astype(np_dtype)
        plan["bias"] = (np.zeros(channels, np_dtype) if beta is None else beta).astype(np_dtype)
        plan["rank"] = len(dims)
        return plan

    # ---- rewrite -----------------------------------------------------------------------------
    def rewrite(self, view: GraphView, match: Match, plan) -> Rewritten:
        p = match.parts
        anchor = p["reshape"]
        prefix = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else (anchor.name or "GroupNorm")
        scale = view.add_initializer(f"{prefix}.scale", np.ascontiguousarray(plan["scale"]))
        bias = view.add_initializer(f"{prefix}.bias", np.ascontiguousarray(plan["bias"]))
        channels_last = match.kind == KERAS_KIND
        out = view.unique_name(f"{prefix}/GroupNormalization_output_0") if channels_last else match.output
        fused = onnx.helper.make_node("GroupNormalization", [p["x"], scale, bias], [out],
                                      name=view.unique_name(f"{prefix}/GroupNormalization"),
                                      num_groups=plan["groups"], epsilon=plan["eps"], stash_type=1)
        last = match.nodes[-1]
        for node in match.nodes:
            view.remove(node)
        view.add_node(fused, after=last)
        created = [fused.name]
        detail = (f"{len(match.nodes)} nodes fused into GroupNormalization "
                  f"(num_groups={plan['groups']}, epsilon={plan['eps']:g})")
        if channels_last:
            perm = [0] + list(range(2, plan["rank"])) + [1]
            back = onnx.helper.make_node("Transpose", [out], [match.output], perm=perm,
                                         name=view.unique_name(f"{prefix}/Transpose"))
            view.add_node(back, after=last)
            created.append(back.name)
            detail += f", then Transpose(perm={perm}) to the channels-last layout the site produced"
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
        if value is None or dims is None or _per_channel(value, dims) is None:
            continue  # not a per-channel constant: it stays after the fused op
        if op == "Mul":
            gamma = const
        else:
            beta = const
        nodes.append(tail)
        out = tail.output[0]
    parts = {"x": x, "reshape": reshape, "inorm": inorm, "back": back, "gamma": gamma, "beta": beta}
    return Match(TORCH_KIND, _in_graph_order(view, nodes), out, parts)


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
    if not _reshape_gives(view, p["reshape"], target, [dims[0], groups, per_group],
                          copy_ok={0, 1} if groups == channels else {0}):
        return Left("unsupported-axis", f"{label(p['reshape'])}: shape {target} does not group the channels of "
                                        f"{p['x']!r} {dims} as [N, {groups}, -1]")
    back = p["back"]
    shape = view.producer.get(back.input[1])
    if not (is_op(shape, "Shape") and shape.input[0] == p["x"] and attr(shape, "start", 0) in (0, -rank)
            and attr(shape, "end") is None):
        restore = _const_ints(view, back.input[1])
        if restore is None or not _reshape_gives(view, back, restore, dims,
                                                 copy_ok={0, 1} if groups == channels else {0}):
            return Left("unsupported-axis", f"{label(back)}: the shape {restore if restore is not None else '?'} "
                                            f"does not restore {p['x']!r} to {dims}")
    eps = float(attr(p["inorm"], "epsilon", 1e-5))
    gamma = _per_channel(view.const(p["gamma"]), dims) if p["gamma"] else None
    beta = _per_channel(view.const(p["beta"]), dims) if p["beta"] else None
    return {"groups": groups, "eps": eps, "gamma": gamma, "beta": beta}


# ---- spelling 2: Transpose -> Reshape -> Keras moments and affine -> Reshape (channels-last) ------

def _match_channels_last(view: GraphView, reshape: onnx.NodeProto) -> Match | None:
    z = reshape.output[0]
    mean = _mean_like(view, z)
    if mean is None:
        return None
    mean_nodes, m = mean
    sub = next((u for u in view.users(m) if is_op(u, "Sub") and list(u.input) == [z, m]), None)
    if sub is None:
        return None
    d = sub.output[0]
    square = next((u for u in view.users(d) if (is_op(u, "Mul") and list(u.input) == [d, d])
                   or (is_op(u, "Pow") and u.input[0] == d)), None)
    var = square and _mean_like(view, square.output[0])
    if var is None:
        return None
    var_nodes, v = var
    add_eps = user(view, v, "Add")
    sqrt = add_eps and user(view, add_eps.output[0], "Sqrt")
    recip = sqrt and user(view, sqrt.output[0], "Reciprocal")
    if recip is None:
        return None
    nodes = [reshape, *mean_nodes, sub, square, *var_nodes, add_eps, sqrt, recip]
    g, gamma = recip.output[0], None
    scale = view.sole_user(g)
    if is_op(scale, "Mul") and view.is_const(other_input(scale, g) or ""):
        gamma = other_input(scale, g)
        nodes.append(scale)
        g = scale.output[0]
    a = next((u for u in view.users(g) if is_op(u, "Mul") and other_input(u, g) == z), None)
    if a is None:
        return None
    neg = user(view, m, "Neg")
    b = next((u for u in view.users(g) if is_op(u, "Mul") and u is not a
              and other_input(u, g) in (m, neg and neg.output[0])), None)
    if b is None:
        return None
    negated = other_input(b, g) != m
    nodes += [a] + ([neg] if negated else []) + [b]
    shift, beta = b, None
    after = view.sole_user(b.output[0])
    if negated and is_op(after, "Add") and view.is_const(other_input(after, b.output[0]) or ""):
        shift, beta = after, other_input(after, b.output[0])
    elif not negated and is_op(after, "Sub") and after.input[1] == b.output[0] and view.is_const(after.input[0]):
        shift, beta = after, after.input[0]
    if shift is not b:
        nodes.append(shift)
    s = shift.output[0]
    if negated or beta is not None:  # y = a + s
        total = next((u for u in view.users(s) if is_op(u, "Add") and other_input(u, s) == a.output[0]), None)
    else:  # y = a - mean * g
        total = next((u for u in view.users(s) if is_op(u, "Sub") and list(u.input) == [a.output[0], s]), None)
    back = total and user(view, total.output[0], "Reshape")
    if back is None or back.input[0] != total.output[0]:
        return None
    nodes += [total, back]
    transpose = view.producer.get(reshape.input[0])
    x = reshape.input[0]
    if is_op(transpose, "Transpose"):
        x = transpose.input[0]
        if view.sole_user(transpose.output[0]) is reshape:
            nodes.append(transpose)
    else:
        transpose = None
    parts = {"x": x, "transpose": transpose, "reshape": reshape, "back": back, "z": z,
             "mean": mean_nodes[0], "var": var_nodes[0], "means": (mean_nodes, var_nodes),
             "add_eps": add_eps, "v": v, "square": square, "gamma": gamma, "beta": beta}
    return Match(KERAS_KIND, _in_graph_order(view, nodes), back.output[0], parts)


def _mean_like(view: GraphView, tensor: str) -> tuple[list[onnx.NodeProto], str] | None:
    """The nodes and output of a mean of `tensor`: ReduceMean, or tf_keras's div_no_nan spelling
    `Where(Equal(n, 0), 0, Div(ReduceSum(tensor), n))` (the Where/Equal may be missing)."""
    mean = next((u for u in view.users(tensor) if is_op(u, "ReduceMean") and u.input[0] == tensor), None)
    if mean is not None:
        return [mean], mean.output[0]
    total = next((u for u in view.users(tensor) if is_op(u, "ReduceSum") and u.input[0] == tensor), None)
    div = total and user(view, total.output[0], "Div")
    if div is None or div.input[0] != total.output[0]:
        return None
    nodes, out = [total, div], div.output[0]
    where = user(view, out, "Where")
    if where is not None and where.input[2] == out:
        equal = view.producer.get(where.input[0])
        if is_op(equal, "Equal"):
            nodes += [equal, where]  # the Equal is shared by the mean and the variance
            out = where.output[0]
        elif view.is_const(where.input[0]):  # the Equal already constant-folded (onnxsim, onnxruntime)
            nodes.append(where)
            out = where.output[0]
    return nodes, out


def _check_transpose(view: GraphView, match: Match) -> Left | None:
    """The grouped tensor must come from the exporter's Transpose NC* -> N*C, so that the fused op
    can read the channels-first tensor before it and the Transpose can move after it."""
    transpose = match.parts["transpose"]
    perm = list(attr(transpose, "perm", [])) if transpose is not None else []
    if len(perm) < 3 or perm != [0] + list(range(2, len(perm))) + [1]:
        why = (f"{label(transpose)} has perm {perm}, not channels-first to channels-last" if transpose is not None
               else "no Transpose from channels-first precedes it")
        return Left("unsupported-axis", f"the grouped tensor is channels-last and {why}; GroupNormalization "
                                        "normalizes channels at axis 1, so fusing would need a Transpose pair "
                                        "around it")
    return None


def _check_channels_last(view: GraphView, match: Match, dims: list):
    p = match.parts
    channels, rank = dims[1], len(dims)
    target = _const_ints(view, p["reshape"].input[1])
    if target is None or len(target) != rank + 1 or target[-2] <= 0 or target[-1] <= 0:
        return Left("unsupported-axis", f"{label(p['reshape'])}: the grouping shape {target} is not a constant "
                                        "[N, *spatial, G, C/G]")
    groups = target[-2]
    if channels % groups or target[-1] != channels // groups:
        return Left("unsupported-axis", f"{label(p['reshape'])}: shape {target} does not split {channels} channels "
                                        f"into groups of consecutive channels")
    last = [dims[0], *dims[2:], channels]  # the channels-last layout of X
    grouped = [dims[0], *dims[2:], groups, channels // groups]
    copy_ok = set(range(rank - 1))
    if not _reshape_gives(view, p["reshape"], target, grouped, copy_ok):
        return Left("unsupported-axis", f"{label(p['reshape'])}: shape {target} does not reshape {last} to {grouped}")
    restore = _const_ints(view, p["back"].input[1])
    if restore is None or not _reshape_gives(view, p["back"], restore, last, copy_ok):
        return Left("unsupported-axis", f"{label(p['back'])}: the shape {restore} does not restore {last}")
    want = set(range(1, rank - 1)) | {rank}  # every axis of the grouped tensor but N and G
    mean_nodes, var_nodes = p["means"]
    for nodes in (mean_nodes, var_nodes):
        reduce = nodes[0]
        axes = reduce_axes(view, reduce)
        if axes is None or {a % (rank + 1) for a in axes if -rank - 1 <= a <= rank} != want or len(axes) != len(want):
            return Left("unsupported-axis", f"{label(reduce)}: reduction over axes {list(axes) if axes else '?'} of "
                                            f"the grouped tensor; a group norm reduces {sorted(want)}")
        if attr(reduce, "keepdims", 1) != 1:
            return Left("unsupported-attribute", f"{label(reduce)}: keepdims=0")
        if len(nodes) > 1:
            left = _check_count(view, nodes, grouped, want)
            if left is not None:
                return left
    square = p["square"]
    if square.op_type == "Pow" and scalar(view, square.input[1]) != 2.0:
        return Left("non-constant-parameters", f"{label(square)}: exponent is not the constant 2")
    eps = scalar(view, other_input(p["add_eps"], p["v"]))
    if eps is None:
        return Left("non-constant-parameters", f"{label(p['add_eps'])}: epsilon is not a constant scalar")
    affine = []
    for name in ("gamma", "beta"):
        if p[name] is None:
            affine.append(None)
            continue
        value = _grouped_per_channel(view.const(p[name]), rank + 1, groups, channels // groups)
        if value is None:
            return Left("not-per-channel", f"{name} of shape {list(view.const(p[name]).shape)} does not vary "
                                           f"along the group axes [{groups}, {channels // groups}] only")
        affine.append(value)
    return {"groups": groups, "eps": eps, "gamma": affine[0], "beta": affine[1]}


def _check_count(view: GraphView, nodes: list[onnx.NodeProto], grouped: list, axes: set[int]) -> Left | None:
    """tf_keras's ReduceSum / n (div_no_nan): n must be the constant element count of a group."""
    div = nodes[1]
    count = view.const(div.input[1])
    size = _product([grouped[a] for a in sorted(axes)])
    padded = None if count is None else [1] * (len(grouped) - count.ndim) + list(count.shape)
    if (count is None or size is None or count.ndim > len(grouped) or not np.all(count == size)
            or any(padded[a] != 1 for a in axes)):
        return Left("non-constant-parameters", f"{label(div)}: the divisor is not the constant element count "
                                               f"{size if size else '?'} of a group")
    if len(nodes) == 3:  # Where(constant condition, 0, ReduceSum / n): it must never pick the 0
        where = nodes[2]
        if np.any(view.const(where.input[0])):
            return Left("non-constant-parameters", f"{label(where)}: the div_no_nan guard's constant condition "
                                                   "is not all false")
    elif len(nodes) > 2:
        equal, where = nodes[2], nodes[-1]
        zero = other_input(equal, div.input[1])
        zero_value = view.const(zero) if zero else None
        if zero_value is None or np.any(count == zero_value):
            return Left("non-constant-parameters", f"{label(where)}: the div_no_nan guard is not a constant "
                                                   "comparison of the count with 0")
    return None


# ---- helpers -------------------------------------------------------------------------------------

def _const_ints(view: GraphView, name: str) -> list[int] | None:
    value = view.const(name)
    if value is None or value.dtype.kind not in "iu" or value.ndim != 1:
        return None
    return [int(v) for v in value]


def _product(dims: list) -> int | None:
    if any(not isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


def _reshape_gives(view: GraphView, node: onnx.NodeProto, target: list[int], want: list, copy_ok: set[int]) -> bool:
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


def _per_channel(value: np.ndarray | None, dims: list) -> np.ndarray | None:
    """A [C] vector when `value` broadcast against X (N, C, *S) varies along the channel axis only
    (shapes [C,1,..], [1,C,1,..], [1], scalars) and does not widen X's shape; else None."""
    if value is None or not isinstance(dims[1], int):
        return None
    rank, channels = len(dims), dims[1]
    shape = list(value.shape)
    if len(shape) > rank:
        return None
    padded = [1] * (rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(padded[1]), (channels,)).copy()


def _grouped_per_channel(value: np.ndarray | None, rank: int, groups: int, per_group: int) -> np.ndarray | None:
    """A [C] vector from a constant over the grouped tensor (N, *S, G, C/G) that varies along its
    last two axes only; channel c = g * C/G + j, the order Reshape(C -> G, C/G) gives."""
    if value is None or value.ndim > rank:
        return None
    padded = [1] * (rank - value.ndim) + list(value.shape)
    if any(d != 1 for d in padded[:-2]) or padded[-2] not in (1, groups) or padded[-1] not in (1, per_group):
        return None
    return np.broadcast_to(value.reshape(padded[-2:]), (groups, per_group)).reshape(-1).copy()


def _in_graph_order(view: GraphView, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    ids = {id(n) for n in nodes}
    ordered = [n for n in view.nodes if id(n) in ids]
    return ordered if len(ordered) == len(ids) else nodes
