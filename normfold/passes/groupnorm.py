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

Spelling 3, spelling 2 after onnxruntime's offline optimizer (its transpose optimizer, basic level
and up): the Transpose before the grouping is pushed into the site. X(NCHW) is reshaped straight
to the channels-first grouped shape [N, G, C/G, *S], some steps (the means, the Sub, ...) run there,
and Transposes perm [0, 3, .., 1, 2] carry the mean, the variance and the grouped X over to
[N, *S, G, C/G] for the rest. Any step may sit in either grouped layout as long as each step reads
all its inputs in one layout and every Transpose inside swaps the two layouts the right way
(`_GroupedWalk` tracks that); the reduced axes, the affine constants and the final Reshape are
checked in the layout of the step that uses them. A site whose output is channels-first needs no
Transpose after the fused op.

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
MOVED_KIND = "GroupNorm (decomposed, Transposes between grouped layouts)"


class GroupNormFusion(Rule):
    name = "groupnorm"
    min_opset = MIN_OPSET
    status = "fused"

    # ---- match -------------------------------------------------------------------------------
    def match(self, view: GraphView, node: onnx.NodeProto) -> Match | None:
        if not is_op(node, "Reshape") or len(node.input) < 2:
            return None
        return _match_instance_norm(view, node) or _match_grouped(view, node)

    # ---- check -------------------------------------------------------------------------------
    def check(self, view: GraphView, match: Match, ctx: FoldContext):
        escaped = view.escapes(match.nodes, keep=match.output)
        if escaped:
            return Left("intermediate-used-elsewhere", f"{escaped!r} inside the GroupNorm is also used outside it")
        torch_form = match.kind == TORCH_KIND
        # What no opset can change comes first; then the opset (shape inference often improves after
        # --target-opset converts the model, so an unknown shape below 21 is not the reason to give).
        left = (_check_instance_norm_params if torch_form else _check_swaps)(view, match)
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
        plan = (_check_instance_norm if torch_form else _check_grouped)(view, match, dims)
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
        channels_last = plan.get("channels_last_out", False)
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


# ---- spellings 2 and 3: Reshape -> moments and affine in the grouped shape(s) -> Reshape ----------

CHANNELS_FIRST, CHANNELS_LAST = 0, 1  # the grouped layouts [N, G, C/G, *S] and [N, *S, G, C/G]


def _swap_perm(grouped_rank: int, layout_in: int) -> list[int]:
    """The Transpose perm that takes a grouped tensor from `layout_in` to the other layout."""
    to_last = [0, *range(3, grouped_rank), 1, 2]
    return to_last if layout_in == CHANNELS_FIRST else [to_last.index(i) for i in range(grouped_rank)]


def _is_swap(node: onnx.NodeProto | None) -> bool:
    """A Transpose whose perm swaps the grouped layouts one way or the other (which way is checked
    once the layout of the site is known)."""
    if not is_op(node, "Transpose"):
        return False
    perm = list(attr(node, "perm", []))
    return len(perm) >= 4 and perm in (_swap_perm(len(perm), CHANNELS_FIRST), _swap_perm(len(perm), CHANNELS_LAST))


class _GroupedWalk:
    """Follows the tensors of one grouped site, also through Transposes that swap the two grouped
    layouts: onnxruntime's transpose optimizer moves tf2onnx's channels-last Transpose into the
    moments that way (spelling 3), so that a Sub may read the grouped tensor through a Transpose
    and a mean straight from the Reshape. `flip[t]` counts those swaps (mod 2) between the grouping
    Reshape's output and site tensor t; `check` turns it into a layout once the Reshape is known.
    Every node taken reads all its site inputs in the same layout, so elementwise ops line up."""

    def __init__(self, view: GraphView, start: str):
        self.view = view
        self.flip: dict[str, int] = {start: 0}
        self.swaps: dict[int, onnx.NodeProto] = {}

    def reads(self, tensor: str) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
        """(node, swaps on the way) for every node reading `tensor`, directly or through swaps."""
        found = []
        for node in self.view.users(tensor):
            if _is_swap(node):
                found += [(reader, [node, *chain]) for reader, chain in self.reads(node.output[0])]
            else:
                found.append((node, []))
        return found

    def route(self, name: str, tensor: str) -> list[onnx.NodeProto] | None:
        """The swaps from site tensor `tensor` to `name`, when `name` is it or a swap of it."""
        chain = []
        while name != tensor:
            node = self.view.producer.get(name)
            if not _is_swap(node):
                return None
            chain.insert(0, node)
            name = node.input[0]
        return chain

    def take(self, node: onnx.NodeProto, *reads: tuple[str, list[onnx.NodeProto]]) -> bool:
        """Accept `node`, which reads each site tensor through its swaps, if all reads agree on the layout."""
        layouts = {self.flip[tensor] ^ (len(chain) & 1) for tensor, chain in reads}
        if len(layouts) != 1:
            return False
        for tensor, chain in reads:
            for i, swap in enumerate(chain, 1):
                self.swaps[id(swap)] = swap
                self.flip[swap.output[0]] = self.flip[tensor] ^ (i & 1)
        layout = layouts.pop()
        for name in node.output:
            self.flip[name] = layout
        return True

    def single(self, tensor: str, *op_types: str) -> onnx.NodeProto | None:
        """The one node of `op_types` reading `tensor` (directly or through swaps), taken."""
        found = [(node, chain) for node, chain in self.reads(tensor) if is_op(node, *op_types)]
        if len(found) != 1 or not self.take(found[0][0], (tensor, found[0][1])):
            return None
        return found[0][0]

    def binary(self, tensor: str, op_type: str, partner: str, at: int | None = None) -> onnx.NodeProto | None:
        """The node op_type(tensor, partner), in either order unless `at` fixes tensor's position,
        each read directly or through swaps, both in the same layout; taken."""
        for node, chain in self.reads(tensor):
            if not is_op(node, op_type) or len(node.input) != 2:
                continue
            read = chain[-1].output[0] if chain else tensor
            for pos in (0, 1) if at is None else (at,):
                other = self.route(node.input[1 - pos], partner) if node.input[pos] == read else None
                if other is not None and self.take(node, (tensor, chain), (partner, other)):
                    return node
        return None

    def with_const(self, tensor: str, op_type: str, sole: bool = False) -> tuple[onnx.NodeProto, str] | None:
        """op_type(tensor, constant) or op_type(constant, tensor), and the constant; taken. With
        `sole`, only when that node is the one reader of `tensor`."""
        found = self.reads(tensor)
        if sole and (len(found) != 1 or self.view.is_graph_output(tensor)):
            return None
        for node, chain in found:
            read = chain[-1].output[0] if chain else tensor
            const = other_input(node, read) if is_op(node, op_type) else None
            if const and self.view.is_const(const) and self.take(node, (tensor, chain)):
                return node, const
        return None


def _match_grouped(view: GraphView, reshape: onnx.NodeProto) -> Match | None:
    z = reshape.output[0]
    walk = _GroupedWalk(view, z)
    mean = _mean_like(walk, z)
    if mean is None:
        return None
    mean_nodes, m = mean
    sub = walk.binary(m, "Sub", z, at=1)
    if sub is None:
        return None
    d = sub.output[0]
    square = walk.binary(d, "Mul", d)
    if square is None:
        power = walk.with_const(d, "Pow")
        square = power[0] if power and power[0].input[1] == power[1] else None
    var = square and _mean_like(walk, square.output[0])
    if var is None:
        return None
    var_nodes, v = var
    add_eps, eps = walk.with_const(v, "Add") or (None, None)
    sqrt = add_eps and walk.single(add_eps.output[0], "Sqrt")
    recip = sqrt and walk.single(sqrt.output[0], "Reciprocal")
    if recip is None:
        return None
    nodes = [reshape, *mean_nodes, sub, square, *var_nodes, add_eps, sqrt, recip]
    g, gamma, scale = recip.output[0], None, None
    found = walk.with_const(g, "Mul", sole=True)
    if found:
        scale, gamma = found
        nodes.append(scale)
        g = scale.output[0]
    a = walk.binary(g, "Mul", z)
    if a is None:
        return None
    neg = walk.single(m, "Neg")
    b = walk.binary(g, "Mul", neg.output[0]) if neg is not None else walk.binary(g, "Mul", m)
    if b is None:
        return None
    nodes += [a] + ([neg] if neg is not None else []) + [b]
    shift, beta = b, None
    add_beta = walk.with_const(b.output[0], "Add", sole=True) if neg is not None else None
    sub_from_beta = walk.with_const(b.output[0], "Sub", sole=True) if neg is None else None
    if add_beta:
        shift, beta = add_beta
    elif sub_from_beta and sub_from_beta[0].input[0] == sub_from_beta[1]:  # beta - mean * g
        shift, beta = sub_from_beta
    elif sub_from_beta:
        return None
    if shift is not b:
        nodes.append(shift)
    s = shift.output[0]
    if neg is not None or beta is not None:  # y = a + s
        total = walk.binary(s, "Add", a.output[0])
    else:  # y = a - mean * g
        total = walk.binary(s, "Sub", a.output[0], at=1)
    back = total and walk.single(total.output[0], "Reshape")
    if back is None or walk.route(back.input[0], total.output[0]) is None:
        return None
    nodes += [total, back, *walk.swaps.values()]
    x, transpose = reshape.input[0], view.producer.get(reshape.input[0])
    perm = list(attr(transpose, "perm", [])) if is_op(transpose, "Transpose") else []
    if len(perm) >= 3 and perm == [0, *range(2, len(perm)), 1]:  # tf2onnx's NC* -> N*C before the grouping
        x = transpose.input[0]
        if view.sole_user(transpose.output[0]) is reshape:
            nodes.append(transpose)
    else:
        transpose = None
    parts = {"x": x, "transpose": transpose, "reshape": reshape, "back": back,
             "means": (mean_nodes, var_nodes), "add_eps": add_eps, "eps": eps, "square": square,
             "gamma": gamma, "scale": scale, "beta": beta, "shift": shift, "flip": walk.flip,
             "swaps": list(walk.swaps.values())}
    kind = MOVED_KIND if walk.swaps else KERAS_KIND
    return Match(kind, _in_graph_order(view, nodes), back.output[0], parts)


def _mean_like(walk: _GroupedWalk, tensor: str) -> tuple[list[onnx.NodeProto], str] | None:
    """The nodes and output of a mean of `tensor`: ReduceMean, or tf_keras's div_no_nan spelling
    `Where(Equal(n, 0), 0, Div(ReduceSum(tensor), n))` (the Where/Equal may be missing)."""
    view = walk.view
    for op in ("ReduceMean", "ReduceSum"):
        found = [(node, chain) for node, chain in walk.reads(tensor)
                 if is_op(node, op) and node.input[0] == (chain[-1].output[0] if chain else tensor)]
        if found:
            break
    if not found or not walk.take(found[0][0], (tensor, found[0][1])):
        return None
    reduce = found[0][0]
    if reduce.op_type == "ReduceMean":
        return [reduce], reduce.output[0]
    div = walk.with_const(reduce.output[0], "Div")
    if div is None or walk.route(div[0].input[0], reduce.output[0]) is None:
        return None
    nodes, out = [reduce, div[0]], div[0].output[0]
    where = walk.single(out, "Where")
    if where is not None and walk.route(where.input[2], out) is not None:
        equal = view.producer.get(where.input[0])
        if is_op(equal, "Equal"):
            nodes += [equal, where]  # the Equal is shared by the mean and the variance
            out = where.output[0]
        elif view.is_const(where.input[0]):  # the Equal already constant-folded (onnxsim, onnxruntime)
            nodes.append(where)
            out = where.output[0]
    return nodes, out


def _grouped_layout(match: Match, tensor: str) -> int:
    """The grouped layout `tensor` of the site has: the Reshape's own (channels-last after tf2onnx's
    NC* -> N*C Transpose, else channels-first), flipped by every swap on the way."""
    p = match.parts
    return (CHANNELS_LAST if p["transpose"] is not None else CHANNELS_FIRST) ^ p["flip"][tensor]


def _check_swaps(view: GraphView, match: Match) -> Left | None:
    """Every Transpose inside the site must turn the grouped layout it reads into the other one."""
    for swap in match.parts["swaps"]:
        perm = list(attr(swap, "perm", []))
        want = _swap_perm(len(perm), _grouped_layout(match, swap.input[0]))
        if perm != want:
            return Left("unsupported-axis", f"{label(swap)}: perm {perm} does not swap the grouped layouts "
                                            f"the way the site needs ({want})")
    return None


def _check_grouped(view: GraphView, match: Match, dims: list):
    p = match.parts
    channels, rank = dims[1], len(dims)
    first = p["transpose"] is None  # the Reshape groups X (N, C, *S) itself, not its channels-last view
    target = _const_ints(view, p["reshape"].input[1])
    layout_hint = "[N, G, C/G, *spatial]" if first else "[N, *spatial, G, C/G]"
    if target is None or len(target) != rank + 1:
        return Left("unsupported-axis", f"{label(p['reshape'])}: the grouping shape {target} is not a constant "
                                        f"{layout_hint}")
    groups, per_group = (target[1], target[2]) if first else (target[-2], target[-1])
    if groups <= 0 or per_group <= 0 or channels % groups or per_group != channels // groups:
        return _not_grouped(match, target, dims, f"does not split {channels} channels of {p['x']!r} {dims} into "
                                                 f"groups of consecutive channels {layout_hint}")
    shapes = {CHANNELS_FIRST: [dims[0], groups, per_group, *dims[2:]],
              CHANNELS_LAST: [dims[0], *dims[2:], groups, per_group]}
    reduced = {CHANNELS_FIRST: set(range(2, rank + 1)), CHANNELS_LAST: set(range(1, rank - 1)) | {rank}}
    group_axis = {CHANNELS_FIRST: 1, CHANNELS_LAST: rank - 1}
    # A 0 in a Reshape's shape copies the input's dim: right where the dims of the two shapes agree.
    copy_ok = {CHANNELS_FIRST: {0, 1} if groups == channels else {0}, CHANNELS_LAST: set(range(rank - 1))}
    base = CHANNELS_FIRST if first else CHANNELS_LAST
    if not _reshape_gives(view, p["reshape"], target, shapes[base], copy_ok[base]):
        return _not_grouped(match, target, dims, f"does not group {p['x']!r} {dims} as {shapes[base]}")
    out_layout = _grouped_layout(match, p["back"].output[0])
    restored = list(dims) if out_layout == CHANNELS_FIRST else [dims[0], *dims[2:], channels]
    restore = _const_ints(view, p["back"].input[1])
    if restore is None or not _reshape_gives(view, p["back"], restore, restored, copy_ok[out_layout]):
        return Left("unsupported-axis", f"{label(p['back'])}: the shape {restore} does not restore {restored}")
    mean_nodes, var_nodes = p["means"]
    for nodes in (mean_nodes, var_nodes):
        reduce = nodes[0]
        layout = _grouped_layout(match, reduce.output[0])
        want = reduced[layout]
        axes = reduce_axes(view, reduce)
        if axes is None or {a % (rank + 1) for a in axes if -rank - 1 <= a <= rank} != want or len(axes) != len(want):
            return Left("unsupported-axis", f"{label(reduce)}: reduction over axes {list(axes) if axes else '?'} of "
                                            f"the grouped tensor {shapes[layout]}; a group norm reduces {sorted(want)}")
        if attr(reduce, "keepdims", 1) != 1:
            return Left("unsupported-attribute", f"{label(reduce)}: keepdims=0")
        if len(nodes) > 1:
            def grouping(node, match=match):
                layout = _grouped_layout(match, node.output[0])
                return shapes[layout], reduced[layout]
            left = _check_count(view, nodes, grouping)
            if left is not None:
                return left
    square = p["square"]
    if square.op_type == "Pow" and scalar(view, square.input[1]) != 2.0:
        return Left("non-constant-parameters", f"{label(square)}: exponent is not the constant 2")
    eps = scalar(view, p["eps"])
    if eps is None:
        return Left("non-constant-parameters", f"{label(p['add_eps'])}: epsilon is not a constant scalar")
    affine = []
    for name, node in (("gamma", p["scale"]), ("beta", p["shift"])):
        if p[name] is None:
            affine.append(None)
            continue
        layout = _grouped_layout(match, node.output[0])
        value = _grouped_per_channel(view.const(p[name]), rank + 1, group_axis[layout], groups, per_group)
        if value is None:
            return Left("not-per-channel", f"{name} of shape {list(view.const(p[name]).shape)} does not vary "
                                           f"along the group axes of {shapes[layout]} only")
        affine.append(value)
    return {"groups": groups, "eps": eps, "gamma": affine[0], "beta": affine[1],
            "channels_last_out": out_layout == CHANNELS_LAST}


def _not_grouped(match: Match, target: list[int], dims: list, why: str) -> Left:
    p = match.parts
    if p["transpose"] is None and not p["swaps"] and target[-2] > 0 and target[-2] * target[-1] == dims[-1]:
        why = (f"groups the last axis of {p['x']!r} {dims}: the tensor is channels-last and no Transpose from "
               "channels-first precedes it; GroupNormalization normalizes channels at axis 1, so fusing would "
               "need a Transpose pair around it")
    return Left("unsupported-axis", f"{label(p['reshape'])}: shape {target} {why}")


def _check_count(view: GraphView, nodes: list[onnx.NodeProto], grouping) -> Left | None:
    """tf_keras's ReduceSum / n (div_no_nan): n must be the constant element count of a group, and
    the guard Where(Equal(n, 0), 0, .) must never pick the 0. `grouping(node)` gives the grouped
    shape and reduced axes in the layout `node` computes in; neither constant may widen a reduced axis."""
    div = nodes[1]
    count = view.const(div.input[1])
    grouped, axes = grouping(div)
    size = _product([grouped[a] for a in sorted(axes)])
    if count is None or size is None or not np.all(count == size) or not _kept_narrow(count, grouped, axes):
        return Left("non-constant-parameters", f"{label(div)}: the divisor is not the constant element count "
                                               f"{size if size else '?'} of a group")
    if len(nodes) > 2:
        where = nodes[-1]
        equal = nodes[2] if len(nodes) == 4 else None
        if equal is not None:  # Equal(n, 0) of two constants; compared here, not evaluated as a graph
            sides = [view.const(name) for name in equal.input]
            condition = None if any(v is None for v in sides) else np.equal(*sides)
        else:  # already constant-folded (onnxsim, onnxruntime)
            condition = view.const(where.input[0])
        grouped, axes = grouping(where)
        if condition is None or np.any(condition) or not _kept_narrow(condition, grouped, axes):
            return Left("non-constant-parameters", f"{label(where)}: the div_no_nan guard is not a constant "
                                                   "condition that is false everywhere")
    return None


def _kept_narrow(value: np.ndarray, grouped: list, axes: set[int]) -> bool:
    """Whether constant `value` broadcast against a tensor of shape `grouped` keeps the reduced axes size 1."""
    if value.ndim > len(grouped):
        return False
    padded = [1] * (len(grouped) - value.ndim) + list(value.shape)
    return all(padded[a] == 1 for a in axes)


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


def _grouped_per_channel(value: np.ndarray | None, rank: int, group_axis: int, groups: int,
                         per_group: int) -> np.ndarray | None:
    """A [C] vector from a constant over a grouped tensor of rank `rank` that varies along its group
    axes only (`group_axis` and the next: [N, G, C/G, *S] or [N, *S, G, C/G]); channel c = g * C/G + j,
    the order Reshape(C -> G, C/G) gives."""
    if value is None or value.ndim > rank:
        return None
    padded = [1] * (rank - value.ndim) + list(value.shape)
    pair = padded[group_axis:group_axis + 2]
    others = padded[:group_axis] + padded[group_axis + 2:]
    if any(d != 1 for d in others) or pair[0] not in (1, groups) or pair[1] not in (1, per_group):
        return None
    return np.broadcast_to(value.reshape(pair), (groups, per_group)).reshape(-1).copy()


def _in_graph_order(view: GraphView, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    ids = {id(n) for n in nodes}
    ordered = [n for n in view.nodes if id(n) in ids]
    return ordered if len(ordered) == len(ids) else nodes
