"""ChannelPairFold one site at a time: a BatchNorm-like per-channel chain that follows no linear layer.
The reason code and the sentence of every site left, what a fold forward reports and keeps, where a
chain starts and ends, and which tensors are a norm's own (its gamma and beta are no such site).

In process (mutation testing of passes/channel_affine.py, issue 13: a subprocess never sees a mutant).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import normfold
from builders import build, fold_and_compare, model_of, ops, random_feeds, run, value

F = np.float32
RNG = np.random.default_rng(23)
C = 4  # the chain's channels
S = RNG.uniform(0.5, 2.0, (1, C, 1, 1)).astype(F)  # the scale
T = RNG.standard_normal((1, C, 1, 1)).astype(F)  # the shift
W = RNG.standard_normal((3, C, 1, 1)).astype(F)  # a 1x1 Conv reading the C channels
NCHW = "C[1, 4, 1, 1]"
PAIR = f"Mul({NCHW}) -> Add({NCHW}) at Mul(m)"
NO_LAYER_BEFORE = "with no Conv, Gemm or MatMul before it"
LISTED = (" (an initializer also listed as a graph input, so a caller may override it; "
          "--initializer-inputs constant treats such initializers as constants)")


def bn_like(report):
    return [s for s in report.sites if s.kind.startswith("BatchNorm-like")]


def the_bn_like_site(model, **options):
    """Fold `model`: its one site, a BatchNorm-like one. Returns (folded model, site)."""
    folded, report = normfold.fold(model, normfold.FoldOptions(**options))
    [site] = report.sites
    assert site.kind.startswith("BatchNorm-like"), report.to_text(True)
    return folded, site


def assert_no_site(model):
    """Folding `model` finds no site and changes nothing."""
    folded, report = normfold.fold(model)
    assert report.sites == [] and ops(folded) == ops(model), report.to_text(True)


def pair_model(tail: str, head: str = "", x: str = "float[2,4,5,5]", y: str = "float[2,3,5,5]", **consts):
    """x -> [`head` lines writing u] -> Mul(., s) m -> Add(m, t) v -> `tail` lines writing y."""
    first = "m = Mul (u, s)" if head else "m = Mul (x, s)"
    body = "\n ".join(line for line in (head, first, "v = Add (m, t)", tail) if line)
    return build(f"g ({x} x) => ({y} y) {{\n {body}\n}}", **{"s": S, "t": T, **consts})


# ---- sites left: the sentence names the chain, where it is and why it stays -----------------------

def test_chain_written_as_a_graph_output_is_left_saying_so():
    model = build("""g (float[2,4,5,5] x) => (float[2,4,5,5] y) {
      m = Mul (x, s)
      y = Add (m, t)
    }""", s=S, t=T)
    folded, site = the_bn_like_site(model)
    assert (site.status, site.reason, site.kind) == ("left", "no-linear-producer", "BatchNorm-like per-channel Mul/Add")
    assert site.detail == (f"Mul({NCHW}) -> Add({NCHW}) at Mul(m): a BatchNorm on the graph input 'x', "
                           f"{NO_LAYER_BEFORE} and none it can fold into (its output is a graph output)")
    assert (site.nodes, site.output, site.created) == (["Mul(m)", "Add(y)"], "y", [])
    assert ops(folded) == ops(model)


def test_chain_after_an_op_read_by_one_other_op_names_both():
    model = pair_model("y = Relu (v)", "u = Relu (x)", y="float[2,4,5,5]")
    folded, site = the_bn_like_site(model)
    assert (site.status, site.reason) == ("left", "no-linear-producer")
    assert site.detail == (f"{PAIR}: a BatchNorm after Relu Relu(u), {NO_LAYER_BEFORE} and none it can fold into "
                           "(its output is read by Relu Relu(y))")
    assert (site.nodes, site.output) == (["Mul(m)", "Add(v)"], "v")
    assert ops(folded) == ops(model)


def test_chain_read_by_two_ops_counts_its_readers():
    model = build("""g (float[2,4,5,5] x) => (float[2,4,5,5] y, float[2,4,5,5] z) {
      m = Mul (x, s)
      v = Add (m, t)
      y = Relu (v)
      z = Sigmoid (v)
    }""", s=S, t=T)
    _, site = the_bn_like_site(model)
    assert site.reason == "no-linear-producer"
    assert site.detail.endswith("and none it can fold into (its output is read by 2 nodes)"), site.detail


def _inconsistent_conv():
    """onnx's checker (without shape inference) takes a Conv weight of 2 input channels on 4."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["v"]),
             helper.make_node("Conv", ["v", "w"], ["y"])]
    return model_of(nodes, [value("x", [2, 4, 5, 5])], [value("y", [2, 3, 5, 5])],
                    dict(s=S, t=T, w=RNG.standard_normal((3, 2, 1, 1)).astype(F)))


BEFORE_CONV = f"{PAIR}: a BatchNorm on the graph input 'x', {NO_LAYER_BEFORE}: "


@pytest.mark.parametrize("model, reason, why", [
    (pair_model("y = Conv (v, w)", x="float[4,5,5]", y="float[1,3,5,5]", w=W),
     "not-per-channel", "its constants raise the rank of 'x' from 3 to 4"),
    (pair_model("y = Conv (v, w)", x="float[2,1,5,5]", w=W),
     "not-per-channel", "axis -3 of 'x' has size 1, which the constants of 4 channels broadcast"),
    (pair_model("y = Conv (v, w)", x="float[2,c,5,5]", w=W),
     "unknown-shape", "axis -3 of 'x' has size None, which the constants of 4 channels broadcast"),
    (_inconsistent_conv(), "not-per-channel", "Conv Conv(y) reads 2 channels, not 4"),
], ids=["rank raised", "width 1", "symbolic width", "conv reads other channels"])
def test_chain_before_a_conv_it_cannot_fold_into_says_why(model, reason, why):
    folded, site = the_bn_like_site(model)
    assert (site.status, site.reason, site.kind) == ("left", reason, "BatchNorm-like per-channel Mul/Add before Conv")
    assert site.detail == BEFORE_CONV + why
    assert (site.nodes, site.output) == (["Conv(y)", "Mul(m)", "Add(v)"], "y")
    assert ops(folded) == ops(model)


# ---- folds forward: the report names the layer, its notes and rounding; Shape readers stay valid ----

def test_fold_forward_into_a_conv_keeps_the_shape_readers_of_the_chain_valid():
    model = build("""g (float[2,4,5,5] x) => (float[2,3,5,5] y, int64[4] sh) {
      m = Mul (x, s)
      v = Add (m, t)
      sh = Shape (m)
      y = Conv (v, w)
    }""", s=S, t=T, w=W)
    folded, report, _ = fold_and_compare(model)
    [site] = report.sites
    assert (site.status, site.kind) == ("folded", "BatchNorm-like per-channel Mul/Add before Conv")
    assert site.detail == f"{PAIR} folded forward into Conv Conv(y)"
    assert (site.created, site.notes, site.max_rounding) == (["Conv(y)"], [], None)
    assert ops(folded) == ["Shape", "Conv"]
    assert list(folded.graph.node[0].input) == ["x"]  # Shape(m) now reads the chain's input


def test_fold_forward_into_a_matmul_notes_the_bias_add_it_creates():
    model = build("""g (float[2,4] x) => (float[2,3] y) {
      m = Mul (x, s)
      v = Add (m, t)
      y = MatMul (v, w)
    }""", s=S.reshape(C), t=T.reshape(C), w=RNG.standard_normal((C, 3)).astype(F))
    folded, report, _ = fold_and_compare(model)
    [site] = report.sites
    assert site.detail == "Mul(C[4]) -> Add(C[4]) at Mul(m) folded forward into MatMul MatMul(y_unbiased)"
    assert (site.created, site.notes) == (["MatMul(y_unbiased)"], ["created Add MatMul_bias for the folded bias"])
    assert ops(folded) == ["MatMul", "Add"]


def test_float16_fold_forward_reports_its_rounding():
    f16 = np.float16
    model = build("""g (float16[2,4,5,5] x) => (float16[2,3,5,5] y) {
      m = Mul (x, s)
      v = Add (m, t)
      y = Conv (v, w)
    }""", s=S.astype(f16), t=T.astype(f16), w=W.astype(f16))
    folded, report, _ = fold_and_compare(model, atol=2e-2, rtol=2e-2)
    [site] = report.sites
    assert site.status == "folded" and site.notes == []
    assert isinstance(site.max_rounding, float) and 0 < site.max_rounding < 1e-2
    assert ops(folded) == ["Conv"]


# ---- what a step is: y -> op(y, C) in the default domain, C a constant or a listed initializer ------

def _mul_add_conv(mul_domain: str, add_domain: str):
    """x -> Mul(x, s) -> Add(., t) -> Conv, the Mul and the Add written in these domains."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"], domain=mul_domain),
             helper.make_node("Add", ["m", "t"], ["v"], domain=add_domain), helper.make_node("Conv", ["v", "w"], ["y"])]
    return model_of(nodes, [value("x", [2, 4, 5, 5])], [value("y", [2, 3, 5, 5])], dict(s=S, t=T, w=W))


def test_ops_written_in_the_ai_onnx_domain_are_steps():
    model = _mul_add_conv("ai.onnx", "ai.onnx")
    folded, site = the_bn_like_site(model)
    assert site.status == "folded" and ops(folded) == ["Conv"]
    reference = _mul_add_conv("", "")  # the same model as onnxruntime reads it
    feeds = random_feeds(reference)
    np.testing.assert_allclose(run(folded, feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_mul_of_another_domain_is_no_step():
    model = _mul_add_conv("com.example", "")
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert_no_site(model)


def test_a_constant_over_the_tensor_starts_no_chain():
    """C / x is not affine in x: Div(C, x) -> Add(C) is no BatchNorm."""
    model = build("""g (float[2,4,5,5] x) => (float[2,3,5,5] y) {
      m = Div (s, x)
      v = Add (m, t)
      y = Conv (v, w)
    }""", s=S, t=T, w=W)
    assert_no_site(model)


def test_an_op_on_two_constants_starts_no_chain():
    """Mul(C, C2) -> Add(C3) is a constant, no BatchNorm of anything."""
    model = build("""g (float[2,4,5,5] x) => (float[1,4,1,1] y, float[2,4,5,5] z) {
      m = Mul (s, s2)
      y = Add (m, t)
      z = Relu (x)
    }""", s=S, s2=S, t=T)
    assert_no_site(model)


def test_constant_listed_as_a_graph_input_is_a_site_left_with_the_option():
    model = pair_model("y = Conv (v, w)", w=W)
    model.graph.input.append(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, list(S.shape)))
    folded, site = the_bn_like_site(model)
    assert (site.status, site.reason) == ("left", "non-constant-parameters")
    assert site.detail == "Mul(m): 's' is not a constant" + LISTED
    assert (site.nodes, site.output) == (["Conv(y)", "Mul(m)", "Add(v)"], "y")
    assert ops(folded) == ops(model)
    folded, site = the_bn_like_site(model, initializer_inputs="constant")
    assert site.detail == f"{PAIR} folded forward into Conv Conv(y)" and ops(folded) == ["Conv"]


def test_a_listed_initializer_in_the_middle_of_a_chain_is_one_of_its_steps():
    model = build("""g (float[2,4,5,5] x) => (float[2,4,5,5] y) {
      a = Add (x, t)
      m = Mul (a, s)
      y = Add (m, t)
    }""", s=S, t=T)
    model.graph.input.append(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, list(S.shape)))
    folded, site = the_bn_like_site(model)
    assert (site.reason, site.detail) == ("non-constant-parameters", "Mul(m): 's' is not a constant" + LISTED)
    assert site.nodes == ["Add(a)", "Mul(m)", "Add(y)"] and ops(folded) == ops(model)


# ---- where a chain starts and ends ------------------------------------------------------------------

def test_shifts_alone_are_no_chain():
    model = build("""g (float[2,4,5,5] x) => (float[2,3,5,5] y) {
      a = Add (x, s)
      v = Sub (a, t)
      y = Conv (v, w)
    }""", s=S, t=T, w=W)
    assert_no_site(model)


def _alternating_steps(count: int):
    """x -> Mul -> Add -> Mul -> ... (`count` per-channel ops) -> Conv."""
    lines, consts, prev = [], {"w": W}, "x"
    for k in range(count):
        lines.append(f"v{k} = {'Mul' if k % 2 == 0 else 'Add'} ({prev}, c{k})")
        consts[f"c{k}"], prev = RNG.uniform(0.5, 2.0, (1, C, 1, 1)).astype(F), f"v{k}"
    body = "\n ".join([*lines, f"y = Conv ({prev}, w)"])
    return build(f"g (float[2,4,5,5] x) => (float[2,3,5,5] y) {{\n {body}\n}}", **consts)


def test_a_chain_takes_eight_steps_at_most():
    folded, report, _ = fold_and_compare(_alternating_steps(8))
    [site] = report.sites
    assert site.status == "folded" and ops(folded) == ["Conv"]
    model = _alternating_steps(9)  # the ninth op is no part of the chain, and no layer
    folded, site = the_bn_like_site(model)
    assert (site.status, site.reason) == ("left", "no-linear-producer")
    assert site.nodes == [f"{'Mul' if k % 2 == 0 else 'Add'}(v{k})" for k in range(8)]
    assert site.detail.endswith("and none it can fold into (its output is read by Mul Mul(v8))"), site.detail
    assert ops(folded) == ops(model)


def _identities_between(count: int):
    """x -> Mul -> `count` Identity nodes -> Add -> Conv."""
    lines = ["m = Mul (x, s)", *[f"i{k} = Identity ({'m' if k == 0 else f'i{k - 1}'})" for k in range(count)],
             f"v = Add (i{count - 1}, t)", "y = Conv (v, w)"]
    return build("g (float[2,4,5,5] x) => (float[2,3,5,5] y) {\n " + "\n ".join(lines) + "\n}", s=S, t=T, w=W)


def test_a_step_is_found_through_eight_identities_at_most():
    folded, report, _ = fold_and_compare(_identities_between(8))
    [site] = report.sites
    assert site.status == "folded" and len(site.nodes) == 1 + 1 + 8 + 1 and ops(folded) == ["Conv"]
    model = _identities_between(9)  # Mul and Add are then two lone ops, neither a BatchNorm
    assert_no_site(model)


def test_a_chain_after_a_step_whose_output_is_shared_is_a_site_of_its_own():
    """Add(x, t) is read by Relu too: the Mul -> Add after it starts a chain, folded into the Conv."""
    model = build("""g (float[2,4,5,5] x) => (float[2,3,5,5] y, float[2,4,5,5] z) {
      a = Add (x, t)
      z = Relu (a)
      m = Mul (a, s)
      v = Add (m, t)
      y = Conv (v, w)
    }""", s=S, t=T, w=W)
    folded, report, _ = fold_and_compare(model)
    [site] = report.sites
    assert (site.status, site.nodes) == ("folded", ["Conv(y)", "Mul(m)", "Add(v)"])
    assert ops(folded) == ["Add", "Relu", "Conv"]


def test_a_chain_continues_across_an_inference_dropout():
    """Add -> Dropout -> Mul -> Add is one site: its Mul -> Add is no second one."""
    model = build("""g (float[2,4,5,5] x) => (float[2,4,5,5] y) {
      a = Add (x, t)
      d = Dropout (a)
      m = Mul (d, s)
      y = Add (m, t)
    }""", s=S, t=T)
    folded, site = the_bn_like_site(model)
    assert site.nodes == ["Add(a)", "Dropout(d)", "Mul(m)", "Add(y)"]
    assert site.detail.startswith(f"Add({NCHW}) -> Mul({NCHW}) -> Add({NCHW}) at Add(a): "), site.detail
    assert ops(folded) == ops(model)


def test_a_chain_after_a_matmul_of_two_tensors_is_no_site():
    """A linear layer before the chain (weights or not) makes it ChannelAffineFold's, which takes no
    MatMul of two tensors (attention's Q @ K^T): no BatchNorm-like site either."""
    model = build("""g (float[2,4] x, float[4,4] z) => (float[2,4] y) {
      h = MatMul (x, z)
      m = Mul (h, s)
      y = Add (m, t)
    }""", s=S.reshape(C), t=T.reshape(C))
    assert_no_site(model)


# ---- a norm's own gamma and beta are no BatchNorm; a mean alone or a division alone is no norm ----

SD, TD = S.reshape(C), T.reshape(C)  # constants along the last axis


def _after(lines: list[str], x: str = "float[2,3,4]", y: str = "float[2,3,4]", opset: int = 17, **consts):
    """`lines` writing u from x, then Mul(u, s) -> Add(., t) -> y."""
    body = "\n ".join([*lines, "m = Mul (u, s)", "y = Add (m, t)"])
    return build(f"g ({x} x) => ({y} y) {{\n {body}\n}}", opset=opset, s=SD, t=TD, **consts)


LN = "n = LayerNormalization <axis=-1> (x, one)"


@pytest.mark.parametrize("lines, y", [
    ([LN.replace("n =", "u =")], "float[2,3,4]"),
    ([LN, "u = Transpose <perm=[1,0,2]> (n)"], "float[3,2,4]"),
], ids=["norm op", "norm op, then a layout op"])
def test_the_affine_tail_of_a_norm_op_is_no_site(lines, y):
    model = _after(lines, y=y, one=np.ones(C, F))
    folded, report = normfold.fold(model)
    assert not bn_like(report) and ops(folded) == ops(model), report.to_text(True)


def test_a_chain_after_a_norm_op_and_an_activation_is_a_site():
    model = _after([LN, "u = Relu (n)"], one=np.ones(C, F))
    _, site = the_bn_like_site(model)
    assert site.detail.startswith("Mul(C[4]) -> Add(C[4]) at Mul(m): a BatchNorm after Relu Relu(u), "), site.detail


def test_a_chain_after_a_mean_alone_folds_forward():
    """Global average pooling -> BatchNorm -> Gemm: a mean, no division, so no norm."""
    model = build("""g (float[2,4,5,5] x) => (float[2,3] y) {
      p = ReduceMean <axes=[2,3], keepdims=0> (x)
      m = Mul (p, s)
      v = Add (m, t)
      y = Gemm (v, g)
    }""", s=SD, t=TD, g=RNG.standard_normal((C, 3)).astype(F))
    folded, report, _ = fold_and_compare(model)
    [site] = report.sites
    assert (site.status, site.nodes) == ("folded", ["Gemm(y)", "Mul(m)", "Add(v)"])
    assert ops(folded) == ["ReduceMean", "Gemm"]


@pytest.mark.parametrize("lines, inputs", [
    (["u = Div (x, z)"], "float[2,4] x, float[2,4] z"),
    (["q = Mul (x, x)", "r = ReduceMean <axes=[-1]> (q)", "sq = Sqrt (r)", "u = Mul (x, sq)"], "float[2,4] x"),
], ids=["divided, no mean", "times the root of a mean"])
def test_a_chain_after_a_division_without_mean_or_a_mean_without_division_is_a_site(lines, inputs):
    body = "\n ".join([*lines, "m = Mul (u, s)", "y = Add (m, t)"])
    model = build(f"g ({inputs}) => (float[2,4] y) {{\n {body}\n}}", s=SD, t=TD)
    _, report = normfold.fold(model)
    [site] = bn_like(report)
    assert (site.status, site.reason, site.nodes) == ("left", "no-linear-producer", ["Mul(m)", "Add(y)"])


def _divided_by_nested_roots(depth: int):
    """x / sqrt(1 + sqrt(1 + ... sqrt(1 + mean(x * x)))), `depth` roots, then Mul -> Add."""
    lines = ["q = Mul (x, x)", "r = ReduceMean <axes=[-1]> (q)", "a0 = Add (r, one)", "r0 = Sqrt (a0)"]
    for k in range(1, depth):
        lines += [f"a{k} = Add (r{k - 1}, one)", f"r{k} = Sqrt (a{k})"]
    return _after([*lines, f"u = Div (x, r{depth - 1})"], x="float[2,4]", y="float[2,4]", opset=13, one=F(1))


def test_a_mean_is_looked_for_inside_eight_nested_roots():
    """Eight roots deep the division is a near norm's (its pass reports it): no BatchNorm; the mean
    under nine is not looked for, and the chain is a site."""
    _, report = normfold.fold(_divided_by_nested_roots(8))
    assert not bn_like(report), report.to_text(True)
    _, report = normfold.fold(_divided_by_nested_roots(9))
    [site] = bn_like(report)
    assert site.detail.startswith("Mul(C[4]) -> Add(C[4]) at Mul(m): a BatchNorm after Div Div(u), "), site.detail
