"""One BatchNormalization site at a time: the reason code and the sentence of every refusal, what a
folded site reports (kind, output, created nodes, rounding) and its constants to the last bit.

In process (mutation testing of passes/batchnorm.py, issue 13: a subprocess never sees a mutant).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import normfold
from builders import model_of, ops, the_site, value
from normfold.passes import FoldContext, run_rules
from normfold.passes.batchnorm import BatchNormFold

F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
PARAMS = ("s", "bb", "m", "v")
LISTED = ("an initializer also listed as a graph input, so a caller may override it; "
          "--initializer-inputs constant treats such initializers as constants")


def bn_consts(rng, channels, dtype=np.float32, shape=None):
    shape = shape or (channels,)
    return {"s": rng.standard_normal(shape).astype(dtype), "bb": rng.standard_normal(shape).astype(dtype),
            "m": rng.standard_normal(shape).astype(dtype), "v": (rng.random(shape) + 0.5).astype(dtype)}


def bn_node(src, outputs=("y",), domain="", **attrs):
    return helper.make_node("BatchNormalization", [src, *PARAMS], list(outputs), name="bn", domain=domain, **attrs)


def conv_bn(channels=4, dtype=np.float32, param_shape=None, opset=15, outputs=("y",), domain="", seed=0,
            **bn_attrs):
    """x [1,3,6,6] -> Conv `conv` (3x3, pads 1, bias) -> BatchNormalization `bn` -> y."""
    rng = np.random.default_rng(seed)
    elem = F16 if dtype == np.float16 else F32
    consts = dict(w=rng.standard_normal((channels, 3, 3, 3)).astype(dtype),
                  b=rng.standard_normal(channels).astype(dtype), **bn_consts(rng, channels, dtype, param_shape))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("c", outputs, domain, **bn_attrs)]
    return model_of(nodes, [value("x", [1, 3, 6, 6], elem)], [value(o, None, elem) for o in outputs], consts, opset)


def relu_bn_layer(layer_nodes, consts, x_shape, dtype=np.float32, channels=4, seed=1):
    """x -> Relu `relu` -> BatchNormalization `bn` (output n) -> the given layer nodes (output out)."""
    rng = np.random.default_rng(seed)
    elem = F16 if dtype == np.float16 else F32
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", ("n",)), *layer_nodes]
    return model_of(nodes, [value("x", x_shape, elem)], [value(nodes[-1].output[0], None, elem)],
                    {**consts, **bn_consts(rng, channels, dtype)})


def const(model, name) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def bn_affine(model, eps=1e-5):
    """(scale, shift) of the BN in float64, as the fold computes them (a BN without an epsilon
    attribute: its default, the Python float 1e-5, not a float32 one)."""
    g, beta, m, v = (const(model, n).astype(np.float64).reshape(-1) for n in PARAMS)
    scale = g / np.sqrt(v + eps)
    return scale, beta - m * scale


def left(model, reason, **options):
    folded, report = normfold.fold(model, normfold.FoldOptions(**options))
    site = the_site(report)
    assert (site.status, site.reason) == ("left", reason)
    assert ops(folded) == ops(model)
    return site


# ---- refusals: the reason and the sentence ----------------------------------------------------

def test_training_mode_attribute_alone_leaves_the_bn():
    site = left(conv_bn(training_mode=1), "training-mode")
    assert site.detail == "bn runs in training mode"


def test_used_statistics_outputs_mean_training_mode_without_the_attribute():
    """BatchNormalization-9 has no training_mode: a graph that reads its running mean trains."""
    site = left(conv_bn(opset=9, outputs=("y", "rm")), "training-mode")
    assert site.detail == "bn runs in training mode (outputs ['rm'] are used)"


def test_is_test_0_before_opset_7_names_the_batch_statistics():
    site = left(conv_bn(opset=6, is_test=0), "training-mode")
    assert site.detail == "bn has is_test=0 (opset 6): it normalizes with the batch's statistics"


def test_spatial_0_is_an_unsupported_attribute():
    site = left(conv_bn(opset=7, spatial=0), "unsupported-attribute")
    assert site.detail == "bn has spatial=0 (per-activation statistics)"


def test_bn_after_a_relu_with_no_layer_after_it_is_reported_as_the_bn_alone():
    model = model_of([helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r")], [value("x", [2, 4])],
                     [value("y", None)], bn_consts(np.random.default_rng(2), 4))
    site = left(model, "no-linear-producer")
    assert site.detail == ("bn follows Relu relu and no Conv, Gemm or MatMul reads it alone; "
                           "left as BatchNormalization")
    assert (site.kind, site.nodes, site.output) == ("BatchNormalization", ["bn"], "y")


def test_bn_on_a_graph_input_says_so():
    model = model_of([bn_node("x")], [value("x", [2, 4])], [value("y", None)], bn_consts(np.random.default_rng(2), 4))
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows a graph input and no Conv")


def test_every_non_constant_parameter_is_named_with_its_role():
    model = conv_bn()
    for name in PARAMS:  # graph inputs, not initializers: nothing to override, no option to name
        tensor = next(t for t in model.graph.initializer if t.name == name)
        model.graph.input.append(value(name, list(tensor.dims)))
        model.graph.initializer.remove(tensor)
    site = left(model, "non-constant-parameters")
    assert site.detail == "bn: scale 's', bias 'bb', mean 'm', var 'v' not constant"


@pytest.mark.parametrize("name, role", [("s", "scale"), ("v", "var")])
def test_an_initializer_listed_as_input_is_named_by_the_bn_itself(name, role):
    """The BN's own sentence, not prepare's generic one (which names the initializer first)."""
    model = conv_bn()
    model.graph.input.append(value(name, [4]))
    site = left(model, "non-constant-parameters")
    assert site.detail == f"bn: {role} {name!r} not constant ({LISTED})"


def test_unknown_rank_after_a_matmul_names_the_axis_and_the_layer():
    rng = np.random.default_rng(3)
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), bn_node("h")],
                     [helper.make_tensor_value_info("x", F32, None)], [value("y", None)],
                     dict(w=rng.standard_normal((5, 4)).astype(np.float32), **bn_consts(rng, 4)))
    site = left(model, "unknown-shape")
    assert site.detail == ("rank of 'h' unknown; BN normalizes axis 1, which must hold the output channels "
                           "of MatMul mm")


def test_matmul_channels_on_the_last_of_three_axes_are_not_bn_channels():
    rng = np.random.default_rng(3)
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), bn_node("h")],
                     [value("x", [2, 3, 5])], [value("y", None)],
                     dict(w=rng.standard_normal((5, 6)).astype(np.float32), **bn_consts(rng, 3)))
    site = left(model, "not-per-channel")
    assert site.detail == "BN normalizes axis 1 of a rank-3 tensor whose channels from MatMul mm are on axis 2"


def test_parameters_of_another_length_than_the_layers_channels():
    site = left(conv_bn(channels=4, param_shape=(3,)), "not-per-channel")
    assert site.detail == "bn parameters do not match the 4 channels of conv"


def test_parameters_of_another_length_than_the_next_layers_inputs():
    rng = np.random.default_rng(4)
    model = relu_bn_layer([helper.make_node("Gemm", ["n", "w"], ["out"], name="gemm")],
                          {"w": rng.standard_normal((4, 6)).astype(np.float32)}, [2, 4])
    for t in model.graph.initializer:
        if t.name in PARAMS:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t)[:3], t.name))
    site = left(model, "not-per-channel")
    assert site.detail == "bn parameters do not match the 4 channels of gemm"


@pytest.mark.parametrize("variance, eps", [([1.0, -1.0, 1.0, 1.0], 1e-5), ([1.0, 0.0, 1.0, 1.0], 0.0),
                                           ([1.0, np.nan, 1.0, 1.0], 1e-5)])
def test_var_plus_eps_must_be_positive_and_finite(variance, eps):
    """Refused by the statistics check itself (not later, as weights that would overflow)."""
    model = conv_bn(epsilon=eps)
    next(t for t in model.graph.initializer if t.name == "v").CopyFrom(
        numpy_helper.from_array(np.array(variance, np.float32), "v"))
    site = left(model, "invalid-statistics")
    assert site.detail == "bn: var + eps must be positive and parameters finite"


def test_a_padded_next_conv_is_named_after_the_bn_s_producer():
    rng = np.random.default_rng(5)
    conv = helper.make_node("Conv", ["n", "w"], ["out"], name="layer", pads=[1, 1, 1, 1])
    model = relu_bn_layer([conv], {"w": rng.standard_normal((2, 4, 3, 3)).astype(np.float32)}, [1, 4, 6, 6])
    site = left(model, "no-linear-producer")
    assert site.detail == ("bn follows Relu relu, and the Conv layer after it pads its input: the padded border "
                           "would miss the BN's shift, so it cannot move into the Conv")


def test_other_refusals_of_the_next_layer_are_its_own_sentence():
    """Only a no-linear-producer refusal says what the BN follows; a weight refusal is the layer's."""
    model = relu_bn_layer([helper.make_node("Gemm", ["n", "w"], ["out"], name="gemm")], {}, [2, 4])
    model.graph.input.append(value("w", [4, 6]))
    site = left(model, "non-constant-weights")
    assert site.detail == "Gemm gemm weight 'w' is not a constant"


# ---- folds: the constants, and what the report says ----------------------------------------------

@pytest.mark.parametrize("param_shape", [(1,), (1, 4)])
def test_parameters_of_one_value_or_a_leading_1_fold_per_channel(param_shape):
    """The statistics are read flat: a single value applies to every channel, a [1, C] one per channel."""
    model = conv_bn(param_shape=param_shape)
    folded, report = normfold.fold(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv"]
    scale, shift = (np.broadcast_to(a, (4,)) for a in bn_affine(model))
    w, b = const(model, "w").astype(np.float64), const(model, "b").astype(np.float64)
    np.testing.assert_array_equal(const(folded, "w"), (w * scale[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(const(folded, "b"), (b * scale + shift).astype(np.float32))


def test_float16_fold_is_computed_in_float64_and_reports_its_rounding():
    model = conv_bn(dtype=np.float16, channels=8, seed=7)
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert (site.status, site.kind, site.output, site.nodes) == ("folded", "BatchNormalization after Conv", "y",
                                                                 ["conv", "bn"])
    assert site.detail == "bn folded into Conv conv" and site.created == ["conv"]
    scale, shift = bn_affine(model)
    w = const(model, "w").astype(np.float64) * scale[:, None, None, None]
    b = const(model, "b").astype(np.float64) * scale + shift
    np.testing.assert_array_equal(const(folded, "w"), w.astype(np.float16))
    np.testing.assert_array_equal(const(folded, "b"), b.astype(np.float16))
    rounding = max(np.max(np.abs(const(folded, n).astype(np.float64) - e)) for n, e in (("w", w), ("b", b)))
    assert site.max_rounding == pytest.approx(rounding, rel=1e-9) and rounding > 0
    assert [o.name for o in folded.graph.output] == ["y"] and folded.graph.node[0].output[0] == "y"


def test_float16_forward_fold_reports_created_nodes_output_and_rounding():
    rng = np.random.default_rng(6)
    consts = {"w": rng.standard_normal((4, 6)).astype(np.float16), "c": rng.standard_normal(6).astype(np.float16)}
    model = relu_bn_layer([helper.make_node("Gemm", ["n", "w", "c"], ["out"], name="gemm")], consts, [2, 4],
                          dtype=np.float16)
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert (site.status, site.kind, site.output) == ("folded", "BatchNormalization before Gemm", "out")
    assert site.nodes == ["gemm", "bn"] and site.created == ["gemm"]
    assert site.detail == "bn folded forward into Gemm gemm"
    scale, shift = bn_affine(model)
    w64, c64 = consts["w"].astype(np.float64), consts["c"].astype(np.float64)
    w, c = w64 * scale[:, None], c64 + shift @ w64
    np.testing.assert_array_equal(const(folded, "w"), w.astype(np.float16))
    np.testing.assert_array_equal(const(folded, "c"), c.astype(np.float16))
    rounding = max(np.max(np.abs(const(folded, n).astype(np.float64) - e)) for n, e in (("w", w), ("c", c)))
    assert site.max_rounding == pytest.approx(rounding, rel=1e-9) and rounding > 0
    assert ops(folded) == ["Relu", "Gemm"] and folded.graph.node[1].input[0] == "r"


def test_a_bn_in_the_ai_onnx_domain_is_the_standard_op():
    folded, report = normfold.fold(conv_bn(domain="ai.onnx"))
    assert the_site(report).status == "folded" and ops(folded) == ["Conv"]


def test_a_conv_whose_weight_rank_is_not_in_the_shapes_table_still_folds():
    """A Conv's output rank is its weight's; a weight written by a Constant node that shape
    inference did not annotate has no rank, and the Conv's channels are on axis 1 whatever it is."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = model_of([helper.make_node("Constant", [], ["w"], name="wc", value=numpy_helper.from_array(w, "w")),
                      helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c")],
                     [value("x", [1, 3, 5, 5])], [value("y", None)], bn_consts(rng, 4))
    scale, _ = bn_affine(model)
    [site] = run_rules(model.graph, [BatchNormFold()], FoldContext(opset=15), shapes={})
    assert site.status == "folded", site.detail
    assert site.notes == []  # the Constant's one reader: a new initializer, nothing shared
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    new_w = const(model, conv.input[1])
    np.testing.assert_array_equal(new_w, (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32))
