"""passes/_next_layer.py in process: a BatchNormalization folded forward into the Conv, Gemm or
MatMul that reads it. Each refusal's reason and sentence, the padding a Conv may have, and the
constants and nodes the fold writes (mutation testing, issue 13: a subprocess never sees a mutant)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import normfold
from builders import fold_and_compare, left, ops, the_site, value
from normfold.graph import GraphView
from normfold.passes._next_layer import find_next_layer, layer_axis

F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
PARAMS = ("s", "bb", "m", "v")


def bn_consts(rng, channels, dtype=np.float32):
    return {"s": rng.standard_normal(channels).astype(dtype), "bb": rng.standard_normal(channels).astype(dtype),
            "m": rng.standard_normal(channels).astype(dtype), "v": (rng.random(channels) + 0.5).astype(dtype)}


def relu_bn(layer_nodes, consts, x_shape, out_shape, channels=4, seed=0, opset=15, elem=F32):
    """x -> Relu `relu` (r) -> BatchNormalization `bn` (n) -> the layer nodes (the last writes `out`)."""
    rng = np.random.default_rng(seed)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("BatchNormalization", ["r", *PARAMS], ["n"], name="bn"), *layer_nodes]
    consts = {**bn_consts(rng, channels, dtype), **consts}
    graph = helper.make_graph(nodes, "g", [value("x", x_shape, elem)], [value("out", out_shape, elem)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def bn_affine(consts):
    g, beta, m, v = (np.asarray(consts[n], np.float64) for n in PARAMS)
    scale = g / np.sqrt(v + 1e-5)  # no epsilon attribute: the default, a Python float
    return scale, beta - m * scale


def const(model, name) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def consts_of(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


RNG = np.random.default_rng(1)
W_CONV = RNG.standard_normal((6, 4, 1, 1)).astype(np.float32)
W_GEMM = RNG.standard_normal((4, 6)).astype(np.float32)


def conv_after(**attrs):
    return relu_bn([helper.make_node("Conv", ["n", "w"], ["out"], name="layer", **attrs)], {"w": W_CONV},
                   [1, 4, 5, 5], None)


def gemm_after(inputs=("n", "w"), **attrs):
    return relu_bn([helper.make_node("Gemm", list(inputs), ["out"], name="layer", **attrs)], {"w": W_GEMM},
                   [2, 4], None)


# ---- refusals: the reason and the sentence ----------------------------------------------------

PREFIX = "bn follows Relu relu, and "


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_a_non_constant_weight_of_the_next_layer_is_named(op):
    model = conv_after() if op == "Conv" else gemm_after()
    w = next(t for t in model.graph.initializer if t.name == "w")
    model.graph.input.append(value("w", list(w.dims)))
    model.graph.initializer.remove(w)
    assert left(model, "non-constant-weights").detail == f"{op} layer weight 'w' is not a constant"


def test_a_non_constant_bias_of_the_next_layer_is_named():
    model = gemm_after(("n", "w", "c"))
    model.graph.input.append(value("c", [6]))
    assert left(model, "non-constant-weights").detail == "Gemm layer bias 'c' is not a constant"


def test_a_listed_weight_of_the_next_layer_names_the_option():
    model = gemm_after()
    model.graph.input.append(value("w", [4, 6]))
    assert left(model, "non-constant-weights").detail == (
        "Gemm layer weight 'w' is not a constant (an initializer also listed as a graph input, so a caller may "
        "override it; --initializer-inputs constant treats such initializers as constants)")


def test_an_integer_weight_of_the_next_layer_is_an_unsupported_dtype():
    model = gemm_after()
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(W_GEMM.astype(np.int32), "w"))
    assert left(model, "unsupported-dtype").detail == "Gemm layer weight has type INT32"


def test_a_conv_weight_of_rank_2_is_refused():
    model = conv_after()
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(W_CONV[:, :, 0, 0], "w"))
    assert left(model, "unsupported-attribute").detail == "Conv layer weight has rank 2"


@pytest.mark.parametrize("attrs", [dict(pads=[0, 1, 0, 0]), dict(auto_pad="SAME_LOWER", kernel=3),
                                   dict(auto_pad="SAME_UPPER", kernel=3)])
def test_a_conv_that_pads_is_refused_with_its_reason(attrs):
    attrs = dict(attrs)  # the parameter is shared by every run of the test in this process
    kernel = attrs.pop("kernel", 1)
    model = relu_bn([helper.make_node("Conv", ["n", "w"], ["out"], name="layer", **attrs)],
                    {"w": RNG.standard_normal((6, 4, kernel, kernel)).astype(np.float32)}, [1, 4, 5, 5], None)
    assert left(model, "no-linear-producer").detail == (
        PREFIX + "the Conv layer after it pads its input: the padded border would miss the BN's shift, so it "
        "cannot move into the Conv")


@pytest.mark.parametrize("attrs", [dict(auto_pad="VALID"), dict(pads=[0, 0, 0, 0]), dict(auto_pad="NOTSET"),
                                   dict(auto_pad="SAME_LOWER")])
def test_a_conv_that_reads_no_padding_takes_the_bn(attrs):
    model = conv_after(**attrs)
    model.graph.output[0].CopyFrom(value("out", [1, 6, 5, 5]))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Relu", "Conv"]


def test_a_gemm_with_trans_a_is_refused():
    assert left(gemm_after(transA=1), "no-linear-producer").detail == (
        PREFIX + "the Gemm layer after it has transA=1: BN's axis 1 is then the Gemm's output rows, which it "
        "cannot scale")


def test_a_matmul_weight_of_rank_3_is_refused():
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["out"], name="layer")],
                    {"w": RNG.standard_normal((1, 4, 6)).astype(np.float32)}, [2, 4], None)
    assert left(model, "no-linear-producer").detail == (
        PREFIX + "the MatMul layer after it cannot absorb the BN: its weight has rank 3")


def test_a_matmul_on_an_input_of_rank_3_is_refused():
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["out"], name="layer")], {"w": W_GEMM[:, :5]},
                    [2, 4, 4], None)
    assert left(model, "no-linear-producer").detail == (
        PREFIX + "the MatMul layer after it cannot absorb the BN: its input has rank 3, so axis 1 is not the "
        "contracted (last) axis")


def test_a_matmul_on_an_input_of_unknown_rank_is_an_unknown_shape():
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["out"], name="layer")], {"w": W_GEMM}, None, None)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", F32, None))
    assert left(model, "unknown-shape").detail == (
        "the MatMul layer after it cannot absorb the BN: the rank of its input is unknown")


# ---- folds: the constants and the nodes -----------------------------------------------------------

@pytest.mark.parametrize("group", [1, 2])
def test_forward_conv_fold_constants_bit_for_bit(group):
    """W'[o, j] = W[o, j] * s[c], b'[o] = b[o] + sum W[o, j, k] * t[c], c the input channel W[o, j] reads."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 4 // group, 1, 1)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    model = relu_bn([helper.make_node("Conv", ["n", "w", "b"], ["out"], name="layer", group=group)],
                    {"w": w, "b": b}, [1, 4, 3, 3], [1, 6, 3, 3])
    consts = consts_of(model)
    folded, report, _ = fold_and_compare(model)
    site = the_site(report)
    assert (site.kind, site.nodes, site.created, site.output) == ("BatchNormalization before Conv",
                                                                 ["layer", "bn"], ["layer"], "out")
    scale, shift = bn_affine(consts)
    taps = (4 // group) * (np.arange(6) // (6 // group))[:, None] + np.arange(4 // group)[None, :]
    w64 = w.astype(np.float64)
    np.testing.assert_array_equal(const(folded, "w"), (w64 * scale[taps][..., None, None]).astype(np.float32))
    bias = b.astype(np.float64) + (w64 * shift[taps][..., None, None]).reshape(6, -1).sum(axis=1)
    np.testing.assert_array_equal(const(folded, "b"), bias.astype(np.float32))


def test_forward_matmul_without_bias_gets_an_add_that_writes_the_old_output():
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["out"], name="layer")], {"w": W_GEMM}, [2, 4], [2, 6])
    consts = consts_of(model)
    folded, report, _ = fold_and_compare(model)
    site = the_site(report)
    assert site.notes == ["created Add layer_bias for the folded bias"] and site.output == "out"
    relu, mm, add = folded.graph.node
    assert (list(mm.input), list(mm.output)) == (["r", "w"], ["out_unbiased"])
    assert (add.name, list(add.input), list(add.output)) == ("layer_bias", ["out_unbiased", "layer_bias_folded"],
                                                             ["out"])
    scale, shift = bn_affine(consts)
    np.testing.assert_array_equal(const(folded, "w"), (W_GEMM.astype(np.float64) * scale[:, None]).astype(np.float32))
    np.testing.assert_array_equal(const(folded, "layer_bias_folded"),
                                  (shift @ W_GEMM.astype(np.float64)).astype(np.float32))


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), ()])
def test_forward_matmul_with_its_bias_add_updates_the_bias(bias_shape):
    b = RNG.standard_normal(bias_shape).astype(np.float32)
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["h"], name="layer"),
                     helper.make_node("Add", ["b", "h"], ["out"], name="add")], {"w": W_GEMM, "b": b}, [2, 4], [2, 6])
    consts = consts_of(model)
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).nodes == ["layer", "add", "bn"] and ops(folded) == ["Relu", "MatMul", "Add"]
    scale, shift = bn_affine(consts)
    new_b = const(folded, "b")
    assert new_b.shape == np.broadcast_shapes(bias_shape, (6,))
    np.testing.assert_array_equal(new_b, (b.astype(np.float64) + shift @ W_GEMM.astype(np.float64)).astype(np.float32))


def test_forward_float16_gemm_keeps_the_bias_type_and_reports_rounding():
    w, c = W_GEMM.astype(np.float16), RNG.standard_normal(6).astype(np.float16)
    model = relu_bn([helper.make_node("Gemm", ["n", "w", "c"], ["out"], name="layer", alpha=0.5, beta=2.0)],
                    {"w": w, "c": c}, [2, 4], [2, 6], elem=F16)
    consts = consts_of(model)
    folded, report = normfold.fold(model)
    site = the_site(report)
    scale, shift = bn_affine(consts)
    w64 = w.astype(np.float64)
    new_w, new_c = w64 * scale[:, None], c.astype(np.float64) * 2.0 + 0.5 * (shift @ w64)
    assert const(folded, "c").dtype == np.float16
    np.testing.assert_array_equal(const(folded, "w"), new_w.astype(np.float16))
    np.testing.assert_array_equal(const(folded, "c"), new_c.astype(np.float16))
    gemm = folded.graph.node[1]
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute} == {"alpha": 0.5, "beta": 1.0}
    rounding = max(np.max(np.abs(const(folded, n).astype(np.float64) - e)) for n, e in (("w", new_w), ("c", new_c)))
    assert site.max_rounding == pytest.approx(rounding, rel=1e-9)


def test_a_bn_output_that_is_also_a_graph_output_stays():
    """The one reader is the Gemm, but the graph returns the BN's values too: they must stay."""
    model = gemm_after()
    model.graph.output.append(value("n", [2, 4]))
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows Relu relu and no Conv")


# ---- which reader is the next layer (find_next_layer) ----------------------------------------------

@pytest.mark.parametrize("count, folds", [(4, True), (5, False)])
def test_the_next_layer_is_found_behind_at_most_four_identities(count, folds):
    names = ["n", *(f"i{k}" for k in range(count))]
    idents = [helper.make_node("Identity", [names[k]], [names[k + 1]], name=f"ident{k}") for k in range(count)]
    model = relu_bn([*idents, helper.make_node("Gemm", [names[-1], "w"], ["out"], name="layer")], {"w": W_GEMM},
                    [2, 4], [2, 6])
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert (site.status == "folded") == folds
    if folds:
        assert site.nodes == ["layer", *(f"ident{k}" for k in range(count)), "bn"] and ops(folded) == ["Relu", "Gemm"]
    else:
        assert site.reason == "no-linear-producer"


@pytest.mark.parametrize("inputs", [("a", "n"), ("n", "n")])
def test_a_bn_output_read_as_the_weight_side_is_not_folded_forward(inputs):
    model = relu_bn([helper.make_node("MatMul", list(inputs), ["out"], name="layer")], {"a": np.ones((4, 4), np.float32)},
                    [4, 4], [4, 4])
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows Relu relu and no Conv")


def test_an_add_of_a_non_constant_after_the_matmul_stays_after_the_created_one():
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["h"], name="layer"),
                     helper.make_node("Add", ["h", "z"], ["out"], name="add")], {"w": W_GEMM}, [2, 4], None)
    model.graph.input.append(value("z", [6]))
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.status == "folded" and site.nodes == ["layer", "bn"]
    assert ops(folded) == ["Relu", "MatMul", "Add", "Add"] and folded.graph.node[-1].name == "add"


def test_a_conv_of_another_domain_is_no_next_layer():
    model = relu_bn([helper.make_node("Conv", ["n", "w"], ["out"], name="layer", domain="custom")], {"w": W_CONV},
                    [1, 4, 5, 5], None)
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows Relu relu and no Conv")


def test_a_transpose_in_the_ai_onnx_domain_carries_keras_constants_to_the_conv():
    """NHWC x * s + t -> Transpose(ai.onnx) -> Conv: the Transpose is the standard op by its other name."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"], name="mul"), helper.make_node("Add", ["m", "t"], ["v"], name="add"),
             helper.make_node("Transpose", ["v"], ["p"], name="tr", perm=[0, 3, 1, 2], domain="ai.onnx"),
             helper.make_node("Conv", ["p", "w"], ["out"], name="layer")]
    consts = {"s": rng.uniform(0.5, 2.0, 4).astype(np.float32), "t": rng.standard_normal(4).astype(np.float32),
              "w": rng.standard_normal((3, 4, 1, 1)).astype(np.float32)}
    graph = helper.make_graph(nodes, "g", [value("x", [2, 5, 5, 4])], [value("out", [2, 3, 5, 5])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    folded, report = normfold.fold(model)
    [site] = report.sites
    assert site.status == "folded", site.detail
    assert ops(folded) == ["Transpose", "Conv"]
    w64 = consts["w"].astype(np.float64)
    np.testing.assert_array_equal(const(folded, "w"), (w64 * consts["s"].astype(np.float64)[None, :, None, None])
                                  .astype(np.float32))


# ---- where a channel constant's axis lands at the next layer's input (layer_axis) -------------------

def keras_chain(x_shape, k_shape, layer):
    """x -> Mul(s) `mul` -> Add(t) `add` -> the layer (reads v, writes out); constants of k_shape."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"], name="mul"), helper.make_node("Add", ["m", "t"], ["v"], name="add"),
             layer]
    consts = {"s": rng.uniform(0.5, 2.0, k_shape).astype(np.float32), "t": rng.standard_normal(k_shape).astype(np.float32),
              "w": (rng.standard_normal((3, 4, 1, 1)) if layer.op_type == "Conv" else rng.standard_normal((4, 3)))
              .astype(np.float32)}
    graph = helper.make_graph(nodes, "g", [value("x", x_shape)], [value("out", None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op, x_shape, k_shape, status", [
    ("Conv", [2, 4, 5, 5], (1, 4, 1, 1), "folded"),  # the Conv's input rank from its weight
    ("Gemm", [3, 4], (4,), "folded"),  # a Gemm's input has rank 2
    ("MatMul", [3, 4], (4,), "left"),  # a MatMul's input may have any rank
])
def test_the_next_layers_input_rank_when_the_shapes_table_lacks_it(op, x_shape, k_shape, status):
    from normfold.passes import FoldContext, run_rules
    from normfold.passes.channel_affine import ChannelPairFold

    model = keras_chain(x_shape, k_shape, helper.make_node(op, ["v", "w"], ["out"], name="layer"))
    [site] = run_rules(model.graph, [ChannelPairFold()], FoldContext(opset=15), {"x": (F32, x_shape)})
    assert site.status == status, site.detail
    if status == "left":
        assert site.reason == "unknown-shape"
        assert site.detail.endswith(": the rank of 'x' or of the input of MatMul layer is unknown")


def test_constants_along_the_batch_axis_do_not_reach_a_conv_s_channels():
    """NCHW x * s[4, 1, 1, 1]: axis 0 is the batch, and a Conv reads its channels on axis 1."""
    model = keras_chain([4, 4, 5, 5], (4, 1, 1, 1), helper.make_node("Conv", ["v", "w"], ["out"], name="layer"))
    site = left(model, "no-linear-producer")
    assert site.detail.endswith("the Conv layer after it reads its channels on axis 1, not on axis 0, the one the "
                                "constants scale")


def test_a_transpose_without_perm_reverses_the_axes_on_the_way_to_the_conv():
    """[2, 5, 4, 3] * s[4, 1] -> Transpose() -> [3, 4, 5, 2]: reversed, the constants' axis is the Conv's 1."""
    model = keras_chain([2, 5, 4, 3], (4, 1), helper.make_node("Transpose", ["v"], ["p"], name="tr"))
    model.graph.node.append(helper.make_node("Conv", ["p", "w"], ["out"], name="layer"))
    model.graph.output[0].CopyFrom(value("out", [3, 3, 5, 2]))
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(W_CONV[:3], "w"))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    [site] = report.sites
    assert site.status == "folded", site.detail
    assert ops(folded) == ["Transpose", "Conv"]


def test_an_unnamed_matmul_after_a_bn_gets_a_bias_add_named_after_its_op():
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["out"])], {"w": W_GEMM}, [2, 4], [2, 6])
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.notes == ["created Add MatMul_bias for the folded bias"]
    add = folded.graph.node[-1]
    assert (add.name, list(add.input), list(add.output)) == ("MatMul_bias", ["out_unbiased", "MatMul_bias_folded"],
                                                             ["out"])


def test_the_created_bias_add_leaves_the_matmul_output_annotated():
    """The MatMul now writes `out_unbiased`, of the shape and type `out` had: later passes read it."""
    from normfold.passes import FoldContext, run_rules
    from normfold.passes.batchnorm import BatchNormFold
    from normfold.shapes import infer_shapes

    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["out"], name="layer")], {"w": W_GEMM}, [2, 4], [2, 6])
    shapes = infer_shapes(model)
    [site] = run_rules(model.graph, [BatchNormFold()], FoldContext(opset=15), shapes)
    assert site.status == "folded"
    assert shapes["out_unbiased"] == shapes["out"] == (F32, [2, 6])
    del shapes["out"]  # a shapes table without the layer output: the fold still writes the Add
    model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["out"], name="layer")], {"w": W_GEMM}, [2, 4], [2, 6])
    [site] = run_rules(model.graph, [BatchNormFold()], FoldContext(opset=15), shapes)
    assert site.status == "folded" and "out_unbiased" in {o for n in model.graph.node for o in n.output}


def test_a_bn_that_only_shifts_leaves_the_next_weight_as_it_is():
    """gamma 1, var 1, epsilon 0: the scale is exactly 1, so only the Gemm's C changes (and the weight,
    shared with another MatMul, is neither rewritten nor cloned)."""
    model = gemm_after()
    model.graph.node.append(helper.make_node("MatMul", ["x", "w"], ["z"], name="other"))
    model.graph.output.append(value("z", [2, 6]))
    for t in model.graph.initializer:
        if t.name in ("s", "v"):
            t.CopyFrom(numpy_helper.from_array(np.ones(4, np.float32), t.name))
    next(n for n in model.graph.node if n.op_type == "BatchNormalization").attribute.append(
        helper.make_attribute("epsilon", 0.0))
    model.graph.output[0].CopyFrom(value("out", [2, 6]))
    consts = consts_of(model)
    folded, report, _ = fold_and_compare(model)
    site = the_site(report)
    assert site.status == "folded" and site.notes == []
    gemm = folded.graph.node[1]
    assert list(gemm.input) == ["r", "w", "layer_bias_folded"]
    np.testing.assert_array_equal(const(folded, "w"), W_GEMM)
    shift = consts["bb"].astype(np.float64) - consts["m"].astype(np.float64)
    np.testing.assert_array_equal(const(folded, "layer_bias_folded"), (shift @ W_GEMM.astype(np.float64))
                                  .astype(np.float32))


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_a_bn_that_only_scales_creates_no_bias_in_the_next_layer(op):
    """beta 0 and mean 0: the shift is 0, so a layer without a bias stays without one."""
    model = relu_bn([helper.make_node(op, ["n", "w"], ["out"], name="layer")], {"w": W_GEMM}, [2, 4], [2, 6])
    for t in model.graph.initializer:
        if t.name in ("bb", "m"):
            t.CopyFrom(numpy_helper.from_array(np.zeros(4, np.float32), t.name))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and the_site(report).notes == []
    assert ops(folded) == ["Relu", op] and list(folded.graph.node[1].input) == ["r", "w"]


def test_a_forward_fold_that_overflows_names_the_layer_and_the_type():
    model = relu_bn([helper.make_node("Gemm", ["n", "w"], ["out"], name="layer")],
                    {"w": np.full((4, 6), 60000, np.float16)}, [2, 4], [2, 6], elem=F16)
    next(t for t in model.graph.initializer if t.name == "v").CopyFrom(
        numpy_helper.from_array(np.full(4, 1e-7, np.float16), "v"))
    site = left(model, "invalid-statistics")
    assert site.detail == "folding into Gemm layer would store values that overflow float16"


def test_a_listed_bias_of_the_next_layer_names_the_option():
    model = gemm_after(("n", "w", "c"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(6, np.float32), "c"))
    model.graph.input.append(value("c", [6]))
    assert left(model, "non-constant-weights").detail == (
        "Gemm layer bias 'c' is not a constant (an initializer also listed as a graph input, so a caller may "
        "override it; --initializer-inputs constant treats such initializers as constants)")


def test_a_next_weight_without_a_recorded_type_is_typed_by_its_value():
    """A Gemm weight written by a Constant node, with nothing in the shapes table: its float32 value
    says it can take the BN."""
    from normfold.passes import FoldContext, run_rules
    from normfold.passes.batchnorm import BatchNormFold

    model = gemm_after()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "w"))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["w"], name="wc",
                                                value=numpy_helper.from_array(W_GEMM, "w")))
    [site] = run_rules(model.graph, [BatchNormFold()], FoldContext(opset=15), shapes={})
    assert site.status == "folded", site.detail


def test_constants_along_the_rows_do_not_reach_a_gemm_s_inputs():
    """[4, 4] * s[4, 1]: the constants scale axis 0 (the rows), and a Gemm contracts axis 1."""
    model = keras_chain([4, 4], (4, 1), helper.make_node("Gemm", ["v", "w"], ["out"], name="layer"))
    site = left(model, "no-linear-producer")
    assert site.detail.endswith("the Gemm layer after it reads its channels on axis 1, not on axis 0, the one the "
                                "constants scale")


def test_a_same_padded_conv_with_a_3x1_kernel_pads():
    """SAME padding is zero only when every kernel dimension is 1, the first one too."""
    model = relu_bn([helper.make_node("Conv", ["n", "w"], ["out"], name="layer", auto_pad="SAME_UPPER")],
                    {"w": RNG.standard_normal((6, 4, 3, 1)).astype(np.float32)}, [1, 4, 5, 5], None)
    assert left(model, "no-linear-producer").detail == (
        PREFIX + "the Conv layer after it pads its input: the padded border would miss the BN's shift, so it "
        "cannot move into the Conv")


# ---- the next layer's spellings and search (find_next_layer, layer_axis) -------------------------

def test_a_next_conv_in_the_ai_onnx_domain_takes_the_bn():
    """"ai.onnx" is the default domain by its other name: the Conv after the BN is its next layer."""
    model = conv_after()
    model.graph.node[-1].domain = "ai.onnx"
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.status == "folded", site.detail
    assert ops(folded) == ["Relu", "Conv"]


def test_a_bias_add_in_the_ai_onnx_domain_is_the_next_matmuls():
    """MatMul -> Add(b) with the Add spelled in "ai.onnx": the Add is the MatMul's bias Add (its
    constant takes the shift; no Add is created), as in the default domain; in another it is not."""
    for domain, core in (("ai.onnx", ["layer", "add"]), ("custom", ["layer"])):
        model = relu_bn([helper.make_node("MatMul", ["n", "w"], ["h"], name="layer"),
                         helper.make_node("Add", ["h", "b"], ["out"], name="add", domain=domain)],
                        {"w": W_GEMM, "b": np.ones(6, np.float32)}, [2, 4], [2, 6])
        after = find_next_layer(GraphView(model.graph, shapes={}, opset=15), "n")
        assert [n.name for n in after.core] == core


def test_a_transpose_before_the_next_layer_is_looked_through_only_when_asked():
    """BN -> Transpose -> Conv: by default (the BN fold) the Transpose ends the search; with
    `transposes` (the Keras constant chains) the Conv behind it is the next layer."""
    model = relu_bn([helper.make_node("Transpose", ["n"], ["p"], name="tr", perm=[0, 1, 3, 2]),
                     helper.make_node("Conv", ["p", "w"], ["out"], name="layer")], {"w": W_CONV}, [1, 4, 5, 5], None)
    view = GraphView(model.graph, shapes={}, opset=15)
    assert find_next_layer(view, "n") is None
    after = find_next_layer(view, "n", transposes=True)
    assert [n.name for n in after.core] == ["layer"] and [n.name for n in after.through] == ["tr"]


def test_a_conv_of_unknown_rank_with_a_weight_that_is_no_constant_has_no_layer_axis():
    """Neither the shapes table nor a constant weight tells the Conv input's rank: no axis (the
    weight is then refused by check_next_layer), not an error."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["n"], name="relu"),
                               helper.make_node("Conv", ["n", "w"], ["out"], name="layer")], "g",
                              [value("x", None), value("w", None)], [value("out", None)])
    view = GraphView(graph, shapes={}, opset=15)
    after = find_next_layer(view, "n")
    assert after is not None and after.op == "Conv"
    assert layer_axis(view, after, -1) is None
