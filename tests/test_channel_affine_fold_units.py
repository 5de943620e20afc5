"""ChannelAffineFold (a per-channel Mul / Add / Sub / Div after a linear layer) case by case, and the
affine map ChannelPairFold reads off a BatchNorm-like chain (`_affine`): which nodes are sites, the
reason and the exact detail of each site left, the notes and nodes of a fold, and the folded values.

In-process calls only (mutation testing sees mutants only in the test process). The graphs are made
with onnx.helper so that every node has a name and the details name it; a few are models onnx's
checker would refuse (a Mul of arity 3, a Conv without its weight, a float Conv times an int32
constant): normfold does not type-check what it is given, and such a node must stay as it was.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

import normfold
from builders import fold_and_compare, model_of, ops, the_site, value

RNG = np.random.default_rng(31)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # Conv 3 -> 4 channels, 3x3 valid: 8x8 -> 6x6
FLOAT, INT32, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.BFLOAT16
LISTED = ("(an initializer also listed as a graph input, so a caller may override it; "
          "--initializer-inputs constant treats such initializers as constants)")


def per_channel(*values, dtype=np.float32) -> np.ndarray:
    """A [1, 4, 1, 1] constant: one value per output channel of the Conv."""
    return np.array(values, dtype).reshape(1, 4, 1, 1)


def conv_then(op: str, k, *, op_inputs=("c", "k"), domain: str = "", conv_inputs=("x", "w"), extra=(),
              inputs=(), outputs=(), **consts) -> onnx.ModelProto:
    """x -> Conv `conv` -> `op` `op.lower()` (reading `op_inputs`) -> y, plus `extra` nodes."""
    nodes = [helper.make_node("Conv", list(conv_inputs), ["c"], name="conv"),
             helper.make_node(op, list(op_inputs), ["y"], name=op.lower(), domain=domain), *extra]
    values = {"w": W, "k": k, **consts} if k is not None else {"w": W, **consts}
    return model_of(nodes, [value("x", [1, 3, 8, 8]), *inputs], [value("y", [1, 4, 6, 6]), *outputs], values)


def left_site(model: onnx.ModelProto, **options):
    """Fold `model`: its one site is left, and no node changed. Returns the site."""
    folded, report = normfold.fold(model, normfold.FoldOptions(**options))
    site = the_site(report)
    assert site.status == "left", report.to_text(True)
    assert ops(folded) == ops(model)
    return site


# ---- which nodes are sites (match) ----------------------------------------------------------------

def test_a_mul_with_three_inputs_or_one_is_no_site():
    """Only a binary op is `x op C`: a Mul node of another arity (the checker refuses it) is left
    alone, not read as a Mul of its first two inputs, nor a crash."""
    for op_inputs in (("c", "k", "k"), ("c",)):
        model = conv_then("Mul", np.float32(2), op_inputs=op_inputs)
        folded, report = normfold.fold(model)
        assert report.sites == [] and ops(folded) == ["Conv", "Mul"]


def test_a_mul_in_the_ai_onnx_domain_is_a_site_and_folds():
    """`ai.onnx` is another spelling of the default domain: its Mul is the same op."""
    model = conv_then("Mul", per_channel(0.5, 2, -1, 3), domain="ai.onnx")
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert (site.status, site.detail, site.output) == ("folded", "Mul mul folded into Conv conv", "y")
    assert ops(folded) == ["Conv"]
    weight = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "w"))
    np.testing.assert_allclose(weight, W * per_channel(0.5, 2, -1, 3).reshape(4, 1, 1, 1), rtol=1e-6)


def test_a_conv_without_a_weight_input_is_no_site():
    """A Conv that names no weight has none to fold into: no site, and no error looking for it."""
    model = conv_then("Mul", np.float32(2), conv_inputs=("x",))
    folded, report = normfold.fold(model)
    assert report.sites == [] and ops(folded) == ["Conv", "Mul"]


def test_a_scalar_mul_by_a_listed_initializer_on_a_shared_tensor_is_no_site():
    """A scalar op on a tensor others read too (GELU's Div by sqrt(2)) is no norm site, also when
    the scalar is an initializer listed as a graph input (its shape read from the initializer)."""
    model = conv_then("Mul", np.float32(2), extra=[helper.make_node("Relu", ["c"], ["z"], name="relu")],
                      inputs=[value("k", [])], outputs=[value("z", [1, 4, 6, 6])])
    folded, report = normfold.fold(model)
    assert report.sites == [] and ops(folded) == ["Conv", "Mul", "Relu"]


# ---- the sites left and why (check) -----------------------------------------------------------

def test_a_constant_listed_as_a_graph_input_is_left_with_the_rules_own_detail():
    model = conv_then("Mul", per_channel(2, 2, 2, 2), inputs=[value("k", [1, 4, 1, 1])])
    site = left_site(model)
    assert (site.reason, site.output) == ("non-constant-parameters", "y")
    assert site.detail == f"mul: 'k' is not a constant {LISTED}"


def test_an_int32_constant_after_a_float_conv_is_left_unsupported_dtype():
    """float Conv times an int32 constant (a type clash onnx's checker refuses): never folded into
    the float weights."""
    site = left_site(conv_then("Mul", per_channel(2, 3, 4, 5, dtype=np.int32)))
    assert (site.reason, site.detail) == ("unsupported-dtype", "mul: constant has dtype int32")


def test_a_bfloat16_constant_after_a_bfloat16_matmul_folds_into_its_weight():
    bf16 = ml_dtypes.bfloat16
    w, k = RNG.standard_normal((6, 4)).astype(bf16), np.array([0.5, 2, 3, -1], bf16)
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                      helper.make_node("Mul", ["h", "k"], ["y"], name="mul")],
                     [value("x", [2, 6], BFLOAT16)], [value("y", [2, 4], BFLOAT16)], dict(w=w, k=k))
    folded, report = normfold.fold(model)
    assert the_site(report).detail == "Mul mul folded into MatMul mm" and ops(folded) == ["MatMul"]
    [weight] = [numpy_helper.to_array(t) for t in folded.graph.initializer]
    expected = (w.astype(np.float64) * k.astype(np.float64)).astype(bf16)
    assert weight.dtype == bf16 and np.array_equal(weight.astype(np.float64), expected.astype(np.float64))


def matmul_of_unknown_rank_then_mul(k: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Mul", ["h", "k"], ["y"], name="mul")],
        "g", [helper.make_tensor_value_info("x", FLOAT, None)], [helper.make_tensor_value_info("y", FLOAT, None)],
        [numpy_helper.from_array(RNG.standard_normal((6, 4)).astype(np.float32), "w"), numpy_helper.from_array(k, "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_after_a_layer_of_unknown_rank_a_rank_2_constant_is_an_unknown_shape_a_wrong_vector_not_per_channel():
    """Without the output rank a [1, C] constant might raise it (unknown-shape), while a rank-1
    constant of the wrong length is wrong whatever the rank (not-per-channel); both details say
    the rank is unknown."""
    end = "does not broadcast along the output channels of MatMul mm (output rank unknown)"
    site = left_site(matmul_of_unknown_rank_then_mul(np.ones((1, 4), np.float32)))
    assert (site.reason, site.detail) == ("unknown-shape", f"mul: constant of shape [1, 4] {end}")
    site = left_site(matmul_of_unknown_rank_then_mul(np.ones(3, np.float32)))
    assert (site.reason, site.detail) == ("not-per-channel", f"mul: constant of shape [3] {end}")


def test_a_one_element_constant_of_rank_4_scales_every_channel():
    model = conv_then("Mul", np.full((1, 1, 1, 1), 0.5, np.float32))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv"]


def test_a_div_by_a_zero_channel_is_left_invalid_statistics():
    site = left_site(conv_then("Div", per_channel(2, 0, 3, 4)))
    assert (site.reason, site.detail) == ("invalid-statistics", "div divides by zero")


def test_a_mul_by_an_infinite_channel_is_left_invalid_statistics():
    site = left_site(conv_then("Mul", per_channel(2, np.inf, 3, 4)))
    assert (site.reason, site.detail) == ("invalid-statistics", "mul: constant is not finite")


# ---- what a fold reports (rewrite) --------------------------------------------------------------

def test_a_fold_into_a_shared_weight_notes_the_clone_and_names_the_layer():
    model = conv_then("Mul", per_channel(0.5, 2, -1, 3), extra=[helper.make_node("Conv", ["x", "w"], ["z"], name="conv2")],
                      outputs=[value("z", [1, 4, 6, 6])])
    folded, report, _ = fold_and_compare(model)
    site = the_site(report)
    assert (site.status, site.created, site.output) == ("folded", ["conv"], "y")
    assert site.notes == ["weight 'w' is shared with 1 other node(s); cloned as 'conv_weight_folded' so they keep the "
                          "original"]
    assert ops(folded) == ["Conv", "Conv"]


def test_a_sub_after_a_matmul_without_bias_creates_the_bias_add_and_says_so():
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                      helper.make_node("Sub", ["h", "k"], ["y"], name="sub")],
                     [value("x", [2, 6])], [value("y", [2, 4])],
                     dict(w=RNG.standard_normal((6, 4)).astype(np.float32), k=np.arange(4, dtype=np.float32)))
    folded, report, _ = fold_and_compare(model)
    site = the_site(report)
    assert (site.detail, site.created) == ("Sub sub folded into MatMul mm", ["mm", "mm_bias"])
    assert site.notes == ["created Add mm_bias for the folded bias"]
    assert ops(folded) == ["MatMul", "Add"]


# ---- the affine map of a BatchNorm-like chain (ChannelPairFold's _affine) -------------------------

def chain_model(s, t, *, first: str = "Mul", elem=FLOAT, listed=(), reader=None, **consts) -> onnx.ModelProto:
    """x [2, 4, 3, 3] -> `first` (x, s) -> Add (., t) -> y: a BatchNorm on the graph input; with
    `reader` (nodes from `v` to `y`) the chain writes `v` and they read it."""
    out = "v" if reader else "y"
    nodes = [helper.make_node(first, ["x", "s"], ["m"], name=first.lower()),
             helper.make_node("Add", ["m", "t"], [out], name="add"), *(reader or [])]
    y_shape = [2, 3, 3, 3] if reader else [2, 4, 3, 3]
    inputs = [value("x", [2, 4, 3, 3], elem)] + [value(n, [1, 4, 1, 1], elem) for n in listed]
    return model_of(nodes, inputs, [value("y", y_shape, elem)], dict(s=s, t=t, **consts))


def conv_1x1(input_name: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Conv", [input_name, "w1"], ["y"], name="conv1x1")]


W1 = RNG.standard_normal((3, 4, 1, 1)).astype(np.float32)
S, T = per_channel(0.5, 2, -1, 3), per_channel(1, -2, 0.25, 3)


def test_a_chain_constant_listed_as_a_graph_input_is_left_with_the_rules_own_detail():
    site = left_site(chain_model(S, T, listed=("s",)))
    assert (site.reason, site.detail) == ("non-constant-parameters", f"mul: 's' is not a constant {LISTED}")


def test_an_int32_chain_is_left_unsupported_dtype():
    site = left_site(chain_model(S.astype(np.int32), T.astype(np.int32), elem=INT32))
    assert (site.reason, site.detail) == ("unsupported-dtype", "mul: constant has dtype int32")


def test_a_chain_with_an_infinite_scale_is_left_invalid_statistics():
    site = left_site(chain_model(per_channel(2, np.inf, 3, 4), T))
    assert (site.reason, site.detail) == ("invalid-statistics", "mul: constant is not finite")


def test_a_chain_dividing_by_a_zero_channel_is_left_invalid_statistics():
    site = left_site(chain_model(per_channel(2, 0, 3, 4), T, first="Div"))
    assert (site.reason, site.detail) == ("invalid-statistics", "div divides by zero")


def test_a_chain_multiplying_and_adding_zeros_folds_forward():
    """A zero in a Mul's or an Add's constant is a valid scale or shift (only a Div by zero is not)."""
    model = chain_model(per_channel(2, 0, 3, 4), per_channel(0, 1, 0, 2), reader=conv_1x1("v"), w1=W1)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv"]


def test_a_constant_minus_the_chain_after_a_shift_folds_forward():
    """C - (s * x + t) = -s * x + (C - t): the shift before a reversed Sub is subtracted from C."""
    reader = [helper.make_node("Sub", ["c2", "v"], ["r"], name="rsub"), *conv_1x1("r")]
    model = chain_model(S, T, reader=reader, w1=W1, c2=per_channel(4, -1, 2, 0.5))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    site = the_site(report)
    assert site.detail == "Mul(C[1, 4, 1, 1]) -> Add(C[1, 4, 1, 1]) -> Sub(C[1, 4, 1, 1]) at mul folded forward into Conv conv1x1"
    assert ops(folded) == ["Conv"]


def test_a_bfloat16_chain_folds_forward_into_a_bfloat16_matmul():
    bf16 = ml_dtypes.bfloat16
    s, t = np.array([0.5, 2, -1, 4], bf16), np.array([1, -2, 0.25, 3], bf16)
    g = RNG.standard_normal((4, 3)).astype(bf16)
    model = model_of([helper.make_node("Mul", ["x", "s"], ["m"], name="mul"), helper.make_node("Add", ["m", "t"], ["v"], name="add"),
                      helper.make_node("MatMul", ["v", "g"], ["y"], name="mm")],
                     [value("x", [5, 4], BFLOAT16)], [value("y", [5, 3], BFLOAT16)], dict(s=s, t=t, g=g))
    folded, report = normfold.fold(model)
    assert the_site(report).detail == "Mul(C[4]) -> Add(C[4]) at mul folded forward into MatMul mm"
    assert ops(folded) == ["MatMul", "Add"]
    stored = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in folded.graph.initializer}
    f64 = {"s": s.astype(np.float64), "t": t.astype(np.float64), "g": g.astype(np.float64)}
    assert np.array_equal(stored["g"], (f64["s"][:, None] * f64["g"]).astype(bf16).astype(np.float64))
    assert np.array_equal(stored["mm_bias_folded"], (f64["t"] @ f64["g"]).astype(bf16).astype(np.float64))
