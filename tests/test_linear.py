"""passes/_linear.py in process: which layout ops a fold looks through on its way back to the
layer, where the new constants are stored, what the report says about them, and the small
helpers' arithmetic (mutation testing, issue 13: a subprocess never sees a mutant)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import normfold
from builders import fold_and_compare, left, model_of, ops, the_site, value
from normfold.passes import FoldContext, run_rules
from normfold.graph import GraphView
from normfold.passes._linear import _all_finite, _rounding, _widens, find_linear_layer
from normfold.passes.batchnorm import BatchNormFold

F32, F16, BF16, F64 = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                       onnx.TensorProto.DOUBLE)
PARAMS = ("s", "bb", "m", "v")


def bn_consts(rng, channels, dtype=np.float32):
    return {"s": rng.standard_normal(channels).astype(dtype), "bb": rng.standard_normal(channels).astype(dtype),
            "m": rng.standard_normal(channels).astype(dtype), "v": (rng.random(channels) + 0.5).astype(dtype)}


def conv_chain_bn(chain, consts=None, elem=F32, channels=4, seed=0, out_elem=None):
    """x [1,3,5,5] -> Conv `conv` (1x1, output c) -> the chain's nodes (the last writes `t`) ->
    BatchNormalization `bn` -> y."""
    rng = np.random.default_rng(seed)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), *chain,
             helper.make_node("BatchNormalization", ["t" if chain else "c", *PARAMS], ["y"], name="bn")]
    consts = dict(w=rng.standard_normal((channels, 3, 1, 1)).astype(dtype), b=rng.standard_normal(channels).astype(dtype),
                  **bn_consts(rng, channels), **(consts or {}))
    return model_of(nodes, [value("x", [1, 3, 5, 5], elem)], [value("y", None, out_elem or F32)], consts)


# ---- what a fold looks through ----------------------------------------------------------------

def test_a_cast_to_an_integer_type_is_not_a_layout_op():
    """Conv -> Cast(int32) -> Cast(float) -> BN: the values were rounded between, so the BN cannot
    move into the Conv."""
    chain = [helper.make_node("Cast", ["c"], ["ci"], name="to_int", to=onnx.TensorProto.INT32),
             helper.make_node("Cast", ["ci"], ["t"], name="to_float", to=F32)]
    folded, report = normfold.fold(conv_chain_bn(chain))
    assert ops(folded) == ["Conv", "Cast", "Cast", "BatchNormalization"]
    assert the_site(report).reason == "no-linear-producer"


def test_a_training_dropout_between_layer_and_bn_is_not_looked_through():
    chain = [helper.make_node("Dropout", ["c", "ratio", "training"], ["t"], name="drop")]
    model = conv_chain_bn(chain, dict(ratio=np.array(0.5, np.float32), training=np.array(True)))
    folded, report = normfold.fold(model)
    assert ops(folded) == ["Conv", "Dropout", "BatchNormalization"]
    assert the_site(report).reason == "no-linear-producer"


# ---- helpers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("src, dst, exact", [
    (F32, F32, True), (F16, F16, True), (onnx.TensorProto.INT32, onnx.TensorProto.INT32, True),
    (F16, F32, True), (F16, F64, True), (F32, F64, True), (BF16, F32, True), (BF16, F64, True),
    (F32, F16, False), (F64, F32, False), (F32, BF16, False), (BF16, F16, False), (F16, BF16, False),
    (F32, onnx.TensorProto.INT32, False), (onnx.TensorProto.INT8, F32, False),
])
def test_widens_is_true_only_when_every_value_survives_the_round_trip(src, dst, exact):
    assert _widens(src, dst) is exact


def test_rounding_of_no_values_is_zero():
    assert _rounding(np.zeros(0, np.float16), np.zeros(0)) == 0.0
    assert _rounding(np.array([1.0, 2.0], np.float16), np.array([1.0, 2.001])) == pytest.approx(0.001)


# ---- check_layer's refusals: the reason and the sentence ---------------------------------------

def test_layer_output_read_elsewhere_is_named():
    model = conv_chain_bn([])
    model.graph.node.append(helper.make_node("Relu", ["c"], ["z"], name="relu"))
    model.graph.output.append(value("z", None))
    assert left(model, "intermediate-used-elsewhere").detail == "Conv conv output 'c' is also used elsewhere"


def test_layer_output_that_is_a_graph_output_says_so():
    model = conv_chain_bn([])
    model.graph.output.append(value("c", None))
    site = left(model, "intermediate-used-elsewhere")
    assert site.detail == "Conv conv output 'c' is also used elsewhere (graph output)"


def test_a_layout_op_output_read_elsewhere_is_named():
    """Every tensor between the layer and the BN must have the one reader."""
    model = conv_chain_bn([helper.make_node("Identity", ["c"], ["t"], name="ident")])
    model.graph.output.append(value("t", None))
    site = left(model, "intermediate-used-elsewhere")
    assert site.detail == "Conv conv output 't' is also used elsewhere (graph output)"


@pytest.mark.parametrize("name, role", [("w", "weight"), ("b", "bias")])
def test_non_constant_weight_or_bias_is_named(name, role):
    model = conv_chain_bn([])
    tensor = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(value(name, list(tensor.dims)))
    model.graph.initializer.remove(tensor)
    assert left(model, "non-constant-weights").detail == f"Conv conv {role} {name!r} is not a constant"


@pytest.mark.parametrize("name, role", [("w", "weight"), ("b", "bias")])
def test_weight_or_bias_listed_as_graph_input_names_the_option(name, role):
    model = conv_chain_bn([])
    model.graph.input.append(value(name, None))
    site = left(model, "non-constant-weights")
    assert site.detail == (f"Conv conv {role} {name!r} is not a constant (an initializer also listed as a graph "
                           "input, so a caller may override it; --initializer-inputs constant treats such "
                           "initializers as constants)")


def test_an_integer_weight_is_an_unsupported_dtype():
    rng = np.random.default_rng(1)
    model = model_of([helper.make_node("MatMulInteger", ["x", "w"], ["h"], name="mmi"),
                      helper.make_node("Cast", ["h"], ["hf"], name="cast", to=F32),
                      helper.make_node("BatchNormalization", ["hf", *PARAMS], ["y"], name="bn")],
                     [value("x", [2, 3], onnx.TensorProto.INT8)], [value("y", None)],
                     dict(w=rng.integers(-3, 3, (3, 4)).astype(np.int8), **bn_consts(rng, 4)))
    folded, report = normfold.fold(model)
    assert the_site(report).reason == "no-linear-producer"  # MatMulInteger is no linear layer of normfold's
    conv = conv_chain_bn([])
    for t in conv.graph.initializer:
        if t.name in ("w", "b"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int32), t.name))
    assert left(conv, "unsupported-dtype").detail == "Conv conv weight has type INT32"


def test_gemm_with_an_invalid_trans_a_is_refused():
    rng = np.random.default_rng(2)
    model = model_of([helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm", transA=2),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [2, 3])], [value("y", None)],
                     dict(w=rng.standard_normal((3, 4)).astype(np.float32), **bn_consts(rng, 4)))
    assert left(model, "unsupported-attribute").detail == "Gemm gemm has an invalid transA"


def test_matmul_with_a_weight_of_rank_3_is_refused():
    rng = np.random.default_rng(2)
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [2, 3])], [value("y", [2, 4])],
                     dict(w=rng.standard_normal((1, 3, 4)).astype(np.float32), **bn_consts(rng, 4)))
    assert left(model, "unsupported-attribute").detail == "MatMul mm weight has rank 3, not 2"


def test_a_fold_that_overflows_names_the_layer_and_the_type():
    model = conv_chain_bn([], elem=F16, out_elem=F16)
    for t in model.graph.initializer:
        if t.name in PARAMS:
            t.CopyFrom(numpy_helper.from_array(np.full(4, 6e4 if t.name == "s" else 1e-4, np.float16), t.name))
    site = left(model, "invalid-statistics")
    assert site.detail == "folding into Conv conv would store values that overflow float16"


# ---- where the new constants go, and the notes ---------------------------------------------------

def const(model, name) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def bn_affine(consts):
    g, beta, m, v = (np.asarray(consts[n], np.float64) for n in PARAMS)
    scale = g / np.sqrt(v + 1e-5)  # no epsilon attribute: the default, a Python float
    return scale, beta - m * scale


def test_a_shared_weight_and_bias_are_cloned_and_the_notes_say_so():
    model = conv_chain_bn([])
    model.graph.node.append(helper.make_node("Conv", ["x", "w", "b"], ["z"], name="other"))
    model.graph.output.append(value("z", None))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.notes == ["weight 'w' is shared with 1 other node(s); cloned as 'conv_weight_folded' so they keep "
                          "the original",
                          "bias 'b' is shared with 1 other node(s); cloned as 'conv_bias_folded' so they keep "
                          "the original"]
    conv = folded.graph.node[0]
    assert list(conv.input) == ["x", "conv_weight_folded", "conv_bias_folded"]
    scale, shift = bn_affine(consts)
    np.testing.assert_array_equal(const(folded, "conv_weight_folded"),
                                  (consts["w"].astype(np.float64) * scale[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(const(folded, "conv_bias_folded"),
                                  (consts["b"].astype(np.float64) * scale + shift).astype(np.float32))
    np.testing.assert_array_equal(const(folded, "w"), consts["w"])
    np.testing.assert_array_equal(const(folded, "b"), consts["b"])


def test_a_weight_read_once_is_replaced_in_place():
    model = conv_chain_bn([])
    folded, report = normfold.fold(model)
    assert the_site(report).notes == []
    assert list(folded.graph.node[0].input) == ["x", "w", "b"]
    assert sorted(t.name for t in folded.graph.initializer) == ["b", "w"]


def test_a_matmul_without_bias_gets_an_add_named_after_it():
    rng = np.random.default_rng(3)
    consts = dict(w=rng.standard_normal((3, 4)).astype(np.float32), **bn_consts(rng, 4))
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [2, 3])], [value("y", [2, 4])], consts)
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.notes == ["created Add mm_bias for the folded bias"]
    assert site.created == ["mm", "mm_bias"] and site.detail == "bn folded into MatMul mm"
    mm, add = folded.graph.node
    assert (mm.op_type, list(mm.input), list(mm.output)) == ("MatMul", ["x", "w"], ["h"])
    assert (add.op_type, add.name, list(add.input), list(add.output)) == ("Add", "mm_bias", ["h", "mm_bias_folded"],
                                                                          ["y"])
    scale, shift = bn_affine(consts)
    np.testing.assert_array_equal(const(folded, "w"), (consts["w"].astype(np.float64) * scale).astype(np.float32))
    np.testing.assert_array_equal(const(folded, "mm_bias_folded"), shift.astype(np.float32))


def test_the_exact_cast_round_trip_around_a_folded_bn_goes_with_a_note():
    """Conv(fp16) -> Cast(f32) -> BN -> Cast(f16): after the fold, the Casts are an exact round trip."""
    chain = [helper.make_node("Cast", ["c"], ["t"], name="up", to=F32)]
    model = conv_chain_bn(chain, elem=F16, out_elem=F16)
    model.graph.node[-1].output[0] = "y32"
    model.graph.node.append(helper.make_node("Cast", ["y32"], ["y"], name="down", to=F16))
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.notes == ["removed the exact Cast round trip up -> down"]
    assert ops(folded) == ["Conv"] and list(folded.graph.node[0].output) == ["y"]


@pytest.mark.parametrize("op, trans_b, shape", [("Conv", 0, (130, 64, 8, 8)), ("Conv", 0, (70000, 1, 2, 2)),
                                                 ("Conv", 0, (2, 2049, 8, 8)), ("Gemm", 0, None), ("Gemm", 1, None)])
def test_a_weight_of_several_blocks_is_scaled_row_by_row_exactly(op, trans_b, shape):
    """_scaled works through 2**18 float64 values at a time: a weight of 130 rows of 4096 spans three
    blocks, and every row must get its own channel's scale (or, along N, the same row of scales);
    so must 70000 rows of one input channel, and two rows of one block each."""
    rng = np.random.default_rng(4)
    if op == "Conv":  # (M, C, k, k)
        w, channels = rng.standard_normal(shape).astype(np.float32), shape[0]
        x = value("x", [1, shape[1], shape[2], shape[3]])
    else:  # (K, N) = (130, 4096), or its transpose with transB
        w, channels = rng.standard_normal((130, 4096)).astype(np.float32), 4096 if not trans_b else 130
        x = value("x", [2, 130 if not trans_b else 4096])
    consts = dict(w=w, **bn_consts(rng, channels))
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    model = model_of([helper.make_node(op, ["x", "w"], ["h"], name="layer", **attrs),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")], [x],
                     [value("y", None)], consts)
    folded, report = normfold.fold(model)
    assert the_site(report).status == "folded"
    scale, _ = bn_affine(consts)
    factor = scale[None, :] if op == "Gemm" and not trans_b else scale.reshape((-1,) + (1,) * (w.ndim - 1))
    np.testing.assert_array_equal(const(folded, "w"), (w.astype(np.float64) * factor).astype(np.float32))


def test_a_flatten_without_an_axis_flattens_from_axis_1():
    """Flatten's default axis is 1: [2, 4, 1, 1] -> [2, 4] keeps the Conv's channels on BN's axis 1."""
    chain = [helper.make_node("Flatten", ["c"], ["t"], name="flat")]
    model = conv_chain_bn(chain)
    model.graph.input[0].CopyFrom(value("x", [2, 3, 1, 1]))
    model.graph.output[0].CopyFrom(value("y", [2, 4]))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv", "Flatten"]


def test_a_layout_op_whose_output_rank_is_unknown_ends_the_search():
    """With the Unsqueeze's output missing from the shapes table, where the channels go is unknown."""
    chain = [helper.make_node("Unsqueeze", ["c", "axes"], ["t"], name="unsq")]
    model = conv_chain_bn(chain, dict(axes=np.array([4], np.int64)))
    shapes = {"x": (F32, [1, 3, 5, 5]), "c": (F32, [1, 4, 5, 5])}
    [site] = run_rules(model.graph, [BatchNormFold()], FoldContext(opset=15), shapes)
    assert (site.status, site.reason) == ("left", "no-linear-producer")


# ---- a MatMul and its bias Add as one layer (_core) ---------------------------------------------

def matmul_add_bn(bias_first=False, bias=None, weight_const=True, extra_reader=None, bn_outputs_also=(), check=True):
    """x [2, 3] -> MatMul `mm` (h) -> Add `add` (hb) -> BatchNormalization `bn` -> y."""
    rng = np.random.default_rng(5)
    consts = dict(w=rng.standard_normal((3, 4)).astype(np.float32), **bn_consts(rng, 4))
    consts["b"] = rng.standard_normal(4).astype(np.float32) if bias is None else bias
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["b", "h"] if bias_first else ["h", "b"], ["hb"], name="add"),
             helper.make_node("BatchNormalization", ["hb", *PARAMS], ["y"], name="bn")]
    inputs, outputs = [value("x", [2, 3])], [value("y", [2, 4])]
    if not weight_const:
        inputs.append(value("w", [3, 4]))
        del consts["w"]
    if extra_reader:
        nodes.append(helper.make_node("Relu", [extra_reader], ["z"], name="relu"))
        outputs.append(value("z", [2, 4]))
    outputs += [value(o, [2, 4]) for o in bn_outputs_also]
    model = model_of(nodes, inputs, outputs, consts)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("bias_shape", [(4,), (1, 4), (1,), ()])
def test_matmul_bias_add_folds_whichever_side_the_bias_is(bias_first, bias_shape):
    bias = np.random.default_rng(6).standard_normal(bias_shape).astype(np.float32)
    model = matmul_add_bn(bias_first, bias)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    folded, report, _ = fold_and_compare(model)
    site = the_site(report)
    assert (site.status, site.kind, site.nodes, site.created) == ("folded", "BatchNormalization after MatMul",
                                                                  ["mm", "add", "bn"], ["mm", "add"])
    assert ops(folded) == ["MatMul", "Add"]
    add = folded.graph.node[1]
    assert list(add.input) == (["b", "h"] if bias_first else ["h", "b"]) and list(add.output) == ["y"]
    scale, shift = bn_affine(consts)
    expected = np.broadcast_to(bias.astype(np.float64).reshape(-1), (4,)) * scale + shift
    new_b = const(folded, "b")
    assert new_b.shape == (bias_shape if bias.size == 4 else (4,))
    np.testing.assert_array_equal(new_b.reshape(-1), expected.astype(np.float32))


@pytest.mark.parametrize("case", ["weight-not-constant", "bias-not-constant", "matmul-read-elsewhere",
                                  "bias-not-per-channel"])
def test_an_add_that_is_no_bias_of_the_matmul_leaves_the_bn_after_an_add(case):
    if case == "weight-not-constant":
        model = matmul_add_bn(weight_const=False)
    elif case == "matmul-read-elsewhere":
        model = matmul_add_bn(extra_reader="h")
    elif case == "bias-not-per-channel":
        model = matmul_add_bn(bias=np.ones((2, 4), np.float32))
    else:
        model = matmul_add_bn()
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "b"))
        model.graph.input.append(value("b", [4]))
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows Add add and no Conv")


def test_the_bias_add_output_read_elsewhere_is_named():
    site = left(matmul_add_bn(extra_reader="hb"), "intermediate-used-elsewhere")
    assert site.detail == "MatMul mm output 'hb' is also used elsewhere"


# ---- biases created only when needed (_shifted_bias) ---------------------------------------------

@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_no_bias_is_created_when_the_shift_is_zero(op):
    """mean 0 and beta 0: the BN only scales, so a layer without a bias stays without one."""
    rng = np.random.default_rng(7)
    if op == "Conv":
        w, x, y = rng.standard_normal((4, 3, 1, 1)).astype(np.float32), value("x", [1, 3, 2, 2]), value("y", [1, 4, 2, 2])
    else:
        w, x, y = rng.standard_normal((3, 4)).astype(np.float32), value("x", [2, 3]), value("y", [2, 4])
    consts = dict(w=w, **bn_consts(rng, 4))
    consts["m"], consts["bb"] = np.zeros(4, np.float32), np.zeros(4, np.float32)
    model = model_of([helper.make_node(op, ["x", "w"], ["h"], name="layer"),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")], [x], [y], consts)
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and the_site(report).notes == []
    assert ops(folded) == [op] and list(folded.graph.node[0].input) == ["x", "w"]


# ---- pass-throughs (is_passthrough) and the Cast round trip (retarget_output) --------------------

@pytest.mark.parametrize("case", ["mask-read", "mode-not-constant", "identity-elsewhere", "mode-of-two-values"])
def test_what_is_no_pass_through_between_layer_and_bn(case):
    consts = {}
    extra_inputs, extra_nodes = [], []
    if case == "mask-read":
        chain = [helper.make_node("Dropout", ["c"], ["t", "mask"], name="drop")]
        extra_nodes = [helper.make_node("Not", ["mask"], ["keep"], name="not")]
    elif case == "identity-elsewhere":
        chain = [helper.make_node("Identity", ["c"], ["t"], name="ident", domain="custom")]
    else:
        chain = [helper.make_node("Dropout", ["c", "ratio", "training"], ["t"], name="drop")]
        consts["ratio"] = np.array(0.5, np.float32)
        if case == "mode-of-two-values":
            consts["training"] = np.array([False, False])
        else:
            extra_inputs = [value("training", [], onnx.TensorProto.BOOL)]
    model = conv_chain_bn(chain, consts)
    model.graph.node.extend(extra_nodes)
    if extra_nodes:
        model.graph.output.append(value("keep", None, onnx.TensorProto.BOOL))
    model.graph.input.extend(extra_inputs)
    folded, report = normfold.fold(model)
    assert "BatchNormalization" in ops(folded)
    assert the_site(report).reason == "no-linear-producer"


def test_an_eval_dropout_with_a_constant_false_mode_is_looked_through():
    chain = [helper.make_node("Dropout", ["c", "ratio", "training"], ["t"], name="drop")]
    model = conv_chain_bn(chain, dict(ratio=np.array(0.5, np.float32), training=np.array(False)))
    folded, report = normfold.fold(model)
    assert ops(folded) == ["Conv", "Dropout"] and the_site(report).status == "folded"


def cast_round_trip(up_to=F32, down_to=F16, elem=F16, bn_out_is_output=False):
    """Conv(elem) -> Cast `up` -> BN -> Cast `down` -> y."""
    model = conv_chain_bn([helper.make_node("Cast", ["c"], ["t"], name="up", to=up_to)], elem=elem,
                          out_elem=down_to)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(up_to)
    for t in model.graph.initializer:
        if t.name in PARAMS:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    model.graph.node[-1].output[0] = "n"
    model.graph.node.append(helper.make_node("Cast", ["n"], ["y"], name="down", to=down_to))
    if bn_out_is_output:
        model.graph.output.append(value("n", None, up_to))
    return model


def test_the_exact_cast_round_trip_goes_and_the_site_names_what_is_left():
    folded, report = normfold.fold(cast_round_trip())
    site = the_site(report)
    assert site.notes == ["removed the exact Cast round trip up -> down"] and site.created == ["conv"]
    assert ops(folded) == ["Conv"] and list(folded.graph.node[0].output) == ["y"]


@pytest.mark.parametrize("case", ["narrowing", "other-type-back", "bn-output-kept"])
def test_a_cast_pair_that_is_no_exact_round_trip_stays(case):
    model = {"narrowing": lambda: cast_round_trip(F16, F32, elem=F32),  # f32 -> f16 -> f32 rounds
             "other-type-back": lambda: cast_round_trip(F32, F64),
             "bn-output-kept": lambda: cast_round_trip(bn_out_is_output=True)}[case]()
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.status == "folded" and site.notes == [] and site.created == ["conv", "up"]
    assert ops(folded) == ["Conv", "Cast", "Cast"]


def test_channels_flattened_into_the_first_axis_are_found_there():
    """[1, 4, 5, 5] -> Flatten(axis=2) -> [4, 25]: the channels are axis 0, not BN's axis 1."""
    model = conv_chain_bn([helper.make_node("Flatten", ["c"], ["t"], name="flat", axis=2)])
    for t in model.graph.initializer:
        if t.name in PARAMS:
            t.CopyFrom(numpy_helper.from_array(np.ones(25, np.float32), t.name))
    site = left(model, "not-per-channel")
    assert site.detail == "BN normalizes axis 1 of a rank-2 tensor whose channels from Conv conv are on axis 0"


def test_an_identity_of_another_domain_is_no_pass_through_before_the_next_layer():
    rng = np.random.default_rng(9)
    consts = dict(w=rng.standard_normal((4, 6)).astype(np.float32), **bn_consts(rng, 4))
    model = model_of([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                      helper.make_node("BatchNormalization", ["r", *PARAMS], ["n"], name="bn"),
                      helper.make_node("Identity", ["n"], ["i"], name="ident", domain="custom"),
                      helper.make_node("Gemm", ["i", "w"], ["y"], name="gemm")],
                     [value("x", [2, 4])], [value("y", [2, 6])], consts)
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows Relu relu and no Conv")


def flatten_bn(x_shape, axis, channels):
    model = conv_chain_bn([helper.make_node("Flatten", ["c"], ["t"], name="flat", axis=axis)])
    model.graph.input[0].CopyFrom(value("x", x_shape))
    for t in model.graph.initializer:
        if t.name in PARAMS:
            t.CopyFrom(numpy_helper.from_array(np.ones(channels, np.float32), t.name))
    return model


def test_channels_merged_with_a_batch_of_two_are_no_axis_of_their_own():
    """[2, 4, 5, 5] -> Flatten(axis=2) -> [8, 25]: the channels are mixed with the batch."""
    site = left(flatten_bn([2, 3, 5, 5], 2, 25), "no-linear-producer")
    assert site.detail.startswith("bn follows Flatten flat and no Conv")


def test_a_flatten_at_the_last_axis_keeps_the_channels_on_axis_0():
    """Flatten(axis=rank) is valid: [1, 4, 1, 1] -> [4, 1]."""
    site = left(flatten_bn([1, 3, 1, 1], 4, 1), "not-per-channel")
    assert site.detail == "BN normalizes axis 1 of a rank-2 tensor whose channels from Conv conv are on axis 0"


def test_a_flatten_whose_input_dims_are_unknown_ends_the_search():
    model = flatten_bn([1, 3, 5, 5], 2, 25)
    [site] = run_rules(model.graph, [BatchNormFold()], FoldContext(opset=15), {"t": (F32, [4, 25])})
    assert (site.status, site.reason) == ("left", "no-linear-producer")


def test_a_transpose_without_perm_reverses_the_axes():
    """Conv1d [2, 4, 5] -> Transpose() -> [5, 4, 2]: reversed, the channels are still axis 1."""
    model = conv_chain_bn([helper.make_node("Transpose", ["c"], ["t"], name="tr")])
    model.graph.input[0].CopyFrom(value("x", [2, 3, 5]))
    model.graph.output[0].CopyFrom(value("y", [5, 4, 2]))
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w)[..., 0], "w"))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv", "Transpose"]


@pytest.mark.parametrize("opset, axis", [(11, 4), (15, 4), (15, -1)])  # axes an attribute before opset 13
def test_an_unsqueeze_after_the_channels_keeps_them_on_axis_1(opset, axis):
    if opset < 13:
        chain, consts = [helper.make_node("Unsqueeze", ["c"], ["t"], name="unsq", axes=[axis])], {}
    else:
        chain, consts = [helper.make_node("Unsqueeze", ["c", "axes"], ["t"], name="unsq")], {"axes": np.array([axis])}
    model = conv_chain_bn(chain, consts)
    model.opset_import[0].version = opset
    model.graph.output[0].CopyFrom(value("y", [1, 4, 5, 5, 1]))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv", "Unsqueeze"]


# ---- Squeeze, Unsqueeze and Reshape between the layer and the BN (_through) ---------------------

def conv_layout_bn(layout, x_shape, bn_channels, consts=None, opset=15):
    """x -> Conv `conv` (1x1, 4 channels) -> the layout nodes (the last writes t) -> BN -> y."""
    model = conv_chain_bn(layout, consts)
    model.opset_import[0].version = opset
    model.graph.input[0].CopyFrom(value("x", x_shape))
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(np.ones((4, 3) + (1,) * (len(x_shape) - 2), np.float32), "w"))
    for t in model.graph.initializer:
        if t.name in PARAMS:
            t.CopyFrom(numpy_helper.from_array(np.ones(bn_channels, np.float32), t.name))
    return model


def squeeze(axes=None, opset=15, op="Squeeze"):
    if axes is None:
        return [helper.make_node(op, ["c"], ["t"], name="sq")], {}
    if opset < 13:
        return [helper.make_node(op, ["c"], ["t"], name="sq", axes=axes)], {}
    return [helper.make_node(op, ["c", "axes"], ["t"], name="sq")], {"axes": np.array(axes, np.int64)}


@pytest.mark.parametrize("op, axes, x_shape, bn_channels, axis", [
    ("Squeeze", [0], [1, 3, 2, 5], 2, 0),  # [1, 4, 2, 5] -> [4, 2, 5]
    ("Squeeze", [0, 2], [1, 3, 1, 5], 5, 0),  # [1, 4, 1, 5] -> [4, 5]
    ("Unsqueeze", [0], [1, 3, 5], 1, 2),  # [1, 4, 5] -> [1, 1, 4, 5]
    ("Unsqueeze", [1], [1, 3, 5], 1, 2),  # [1, 4, 5] -> [1, 1, 4, 5]
    ("Unsqueeze", [-4, 4], [1, 3, 5], 1, 2),  # [1, 4, 5] -> [1, 1, 4, 5, 1]
])
def test_squeeze_and_unsqueeze_before_the_channels_move_them(op, axes, x_shape, bn_channels, axis):
    layout, consts = squeeze(axes, op=op)
    site = left(conv_layout_bn(layout, x_shape, bn_channels, consts), "not-per-channel")
    rank = len(x_shape) - len(axes) if op == "Squeeze" else len(x_shape) + len(axes)
    assert site.detail == (f"BN normalizes axis 1 of a rank-{rank} tensor whose channels from Conv conv are on "
                           f"axis {axis}")


@pytest.mark.parametrize("opset", [11, 15])
def test_a_squeeze_after_the_channels_keeps_them_on_axis_1(opset):
    layout, consts = squeeze([2], opset)
    model = conv_layout_bn(layout, [1, 3, 1, 5], 4, consts, opset)
    model.graph.output[0].CopyFrom(value("y", [1, 4, 5]))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv", "Squeeze"]


@pytest.mark.parametrize("case", ["channels-squeezed", "no-axes", "axes-not-constant"])
def test_a_squeeze_that_may_drop_the_channels_ends_the_search(case):
    if case == "channels-squeezed":  # one channel, squeezed away: BN's axis 1 is the length
        layout, consts = squeeze([1])
        model = conv_layout_bn(layout, [2, 3, 5], 5, consts)
        w = next(t for t in model.graph.initializer if t.name == "w")
        w.CopyFrom(numpy_helper.from_array(np.ones((1, 3, 1), np.float32), "w"))
        b = next(t for t in model.graph.initializer if t.name == "b")
        b.CopyFrom(numpy_helper.from_array(np.ones(1, np.float32), "b"))
    elif case == "no-axes":  # every axis of size 1 goes; which ones is left to the shapes
        layout, consts = squeeze()
        model = conv_layout_bn(layout, [1, 3, 1, 5], 4, consts)
    else:
        layout, consts = squeeze([0])
        model = conv_layout_bn(layout, [1, 3, 2, 5], 4, {})
        model.graph.input.append(value("axes", [1], onnx.TensorProto.INT64))
        model.graph.value_info.append(value("t", [4, 2, 5]))  # the rank known, the axes not
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows Squeeze sq and no Conv")


def test_a_reshape_that_keeps_the_last_axis_is_no_layout_op_for_conv_channels():
    """Only channels on the last axis survive a Reshape that keeps it; a Conv's are on axis 1."""
    layout = [helper.make_node("Reshape", ["c", "shape"], ["t"], name="rs")]
    model = conv_layout_bn(layout, [1, 3, 3, 5], 5, {"shape": np.array([12, 5], np.int64)})
    site = left(model, "no-linear-producer")
    assert site.detail.startswith("bn follows Reshape rs and no Conv")


# ---- a MatMul's bias along the channels (_per_channel) -----------------------------------------

@pytest.mark.parametrize("bias_shape, reason", [((4,), "unknown-shape"), ((1,), "unknown-shape"),
                                                ((1, 4), "no-linear-producer"), ((4, 1), "no-linear-producer")])
def test_a_bias_after_a_matmul_of_unknown_rank_is_the_layers_only_when_it_cannot_add_an_axis(bias_shape, reason):
    model = matmul_add_bn(bias=np.ones(bias_shape, np.float32), check=False)
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", F32, None))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", F32, None))
    site = left(model, reason)
    if reason == "unknown-shape":
        assert site.detail == ("rank of 'hb' unknown; BN normalizes axis 1, which must hold the output channels "
                               "of MatMul mm")
        assert site.nodes == ["mm", "add", "bn"]
    else:
        assert site.detail.startswith("bn follows Add add and no Conv")


def test_a_channel_constant_of_higher_rank_than_the_layer_output_is_not_per_channel():
    """Conv [1, 4, 5, 5] * k [1, 1, 4, 1, 1]: the product has rank 5, its channels on axis 2."""
    model = model_of([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                      helper.make_node("Mul", ["c", "k"], ["y"], name="mul")], [value("x", [1, 3, 5, 5])],
                     [value("y", None)], dict(w=np.ones((4, 3, 1, 1), np.float32), k=np.ones((1, 1, 4, 1, 1), np.float32)))
    site = left(model, "not-per-channel")
    assert site.detail == ("mul: constant of shape [1, 1, 4, 1, 1] does not broadcast along the output channels of "
                           "Conv conv (output rank 4)")


def test_a_conv_transpose_without_a_group_attribute_has_one_group():
    rng = np.random.default_rng(10)
    consts = dict(w=rng.standard_normal((4, 6, 2, 2)).astype(np.float32), **bn_consts(rng, 6))
    model = model_of([helper.make_node("ConvTranspose", ["x", "w"], ["h"], name="ct"),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [1, 4, 3, 3])], [value("y", [1, 6, 4, 4])], consts)
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["ConvTranspose"]
    scale, _ = bn_affine(consts)
    np.testing.assert_array_equal(const(folded, "w"),
                                  (consts["w"].astype(np.float64) * scale[None, :, None, None]).astype(np.float32))


def test_a_float16_grouped_conv_transpose_reports_its_rounding():
    """The exact float64 weight is compared with the stored one in the weight's own shape."""
    rng = np.random.default_rng(11)
    consts = dict(w=rng.standard_normal((4, 3, 2, 2)).astype(np.float16), **bn_consts(rng, 6, np.float16))
    model = model_of([helper.make_node("ConvTranspose", ["x", "w"], ["h"], name="ct", group=2),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [1, 4, 3, 3], F16)], [value("y", [1, 6, 4, 4], F16)], consts)
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.status == "folded", site.detail
    scale, shift = bn_affine(consts)
    w = (consts["w"].astype(np.float64).reshape(2, 2, 3, 2, 2) * scale.reshape(2, 1, 3, 1, 1)).reshape(4, 3, 2, 2)
    np.testing.assert_array_equal(const(folded, "w"), w.astype(np.float16))
    bias = const(folded, folded.graph.node[0].input[2])
    rounding = max(np.max(np.abs(const(folded, "w").astype(np.float64) - w)),
                   np.max(np.abs(bias.astype(np.float64) - shift)))
    assert site.max_rounding == pytest.approx(rounding, rel=1e-9) and rounding > 0


def test_an_unnamed_matmul_gets_an_add_named_after_its_op():
    rng = np.random.default_rng(12)
    consts = dict(w=rng.standard_normal((3, 4)).astype(np.float32), **bn_consts(rng, 4))
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"]),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [2, 3])], [value("y", [2, 4])], consts)
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert site.created == ["MatMul(h)", "MatMul_bias"]
    assert site.notes == ["created Add MatMul_bias for the folded bias"]
    add = folded.graph.node[1]
    assert (add.name, list(add.input), list(add.output)) == ("MatMul_bias", ["h", "MatMul_bias_folded"], ["y"])


def test_a_shift_alone_leaves_a_shared_weight_alone():
    """Conv -> Add(t): the scale is 1, so the weight is not rewritten (nor cloned for its other reader)."""
    rng = np.random.default_rng(13)
    t = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    model = model_of([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                      helper.make_node("Add", ["c", "t"], ["y"], name="add"),
                      helper.make_node("Conv", ["x", "w"], ["z"], name="other")],
                     [value("x", [1, 3, 2, 2])], [value("y", [1, 4, 2, 2]), value("z", [1, 4, 2, 2])],
                     dict(w=rng.standard_normal((4, 3, 1, 1)).astype(np.float32), t=t))
    folded, report, _ = fold_and_compare(model)
    [site] = [s for s in report.sites if s.status == "folded"]
    assert site.notes == [] and list(folded.graph.node[0].input) == ["x", "w", "conv_bias_folded"]
    np.testing.assert_array_equal(const(folded, "conv_bias_folded"), t.reshape(-1))


# ---- the search back to the layer, and the readers of what it writes ------------------------------

@pytest.mark.parametrize("count, folds", [(4, True), (5, False)])
def test_the_search_looks_through_at_most_four_layout_ops(count, folds):
    chain = [helper.make_node("Identity", ["c" if i == 0 else f"i{i}"], ["t" if i == count - 1 else f"i{i + 1}"],
                              name=f"ident{i}") for i in range(count)]
    folded, report = normfold.fold(conv_chain_bn(chain))
    site = the_site(report)
    assert (site.status == "folded") == folds
    if folds:
        assert site.nodes == ["conv", *(f"ident{i}" for i in range(count)), "bn"]
        assert list(folded.graph.node[-1].output) == ["y"]
    else:
        assert site.reason == "no-linear-producer"


@pytest.mark.parametrize("op", ["Shape", "Size"])
def test_a_shape_reader_of_the_layer_output_reads_the_folded_output(op):
    model = conv_chain_bn([])
    model.graph.node.append(helper.make_node(op, ["c"], ["shape_out"], name="reader"))
    model.graph.output[0].CopyFrom(value("y", [1, 4, 5, 5]))
    model.graph.output.append(value("shape_out", [4] if op == "Shape" else [], onnx.TensorProto.INT64))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv", op]
    assert list(folded.graph.node[1].input) == ["y"]


def test_a_shape_op_of_another_domain_reads_values():
    model = conv_chain_bn([])
    model.graph.node.append(helper.make_node("Shape", ["c"], ["shape_out"], name="reader", domain="custom"))
    model.graph.output.append(value("shape_out", None, onnx.TensorProto.INT64))
    assert left(model, "intermediate-used-elsewhere").detail == "Conv conv output 'c' is also used elsewhere"


def test_an_empty_bias_input_is_no_bias():
    model = conv_chain_bn([])
    model.graph.node[0].input[2] = ""
    folded, report = normfold.fold(model)
    assert the_site(report).status == "folded"
    assert list(folded.graph.node[0].input) == ["x", "w", "conv_bias_folded"]


def test_a_float32_fold_reports_no_rounding():
    """Measured only for 16-bit types, where it can matter."""
    folded, report = normfold.fold(conv_chain_bn([]))
    assert the_site(report).status == "folded" and the_site(report).max_rounding is None


def test_a_nan_in_the_weight_is_refused_by_name():
    model = conv_chain_bn([])
    w = next(t for t in model.graph.initializer if t.name == "w")
    values = numpy_helper.to_array(w).copy()
    values[1, 0, 0, 0] = np.nan
    w.CopyFrom(numpy_helper.from_array(values, "w"))
    site = left(model, "invalid-statistics")
    assert site.detail == "folding into Conv conv would store values that overflow float32"


@pytest.mark.parametrize("values, finite", [([], True), ([1.0, -2.0], True), ([1.0, np.nan], False),
                                            ([np.inf, 1.0], False), ([1.0, -np.inf], False)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite(values, finite, dtype):
    assert _all_finite(np.array(values, dtype)) is finite


@pytest.mark.parametrize("beta", [2.0, 0.5])
def test_gemm_beta_goes_into_the_new_c_and_is_reset_to_1(beta):
    rng = np.random.default_rng(14)
    consts = dict(w=rng.standard_normal((3, 4)).astype(np.float32), c=rng.standard_normal(4).astype(np.float32),
                  **bn_consts(rng, 4))
    model = model_of([helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="gemm", beta=beta),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [2, 3])], [value("y", [2, 4])], consts)
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Gemm"]
    gemm = folded.graph.node[0]
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute} == {"beta": 1.0}
    scale, shift = bn_affine(consts)
    np.testing.assert_array_equal(const(folded, "c"),
                                  (consts["c"].astype(np.float64) * beta * scale + shift).astype(np.float32))


def test_the_layer_output_read_elsewhere_behind_a_layout_op_is_named():
    """Conv -> Identity -> BN, with the Conv's own output also a graph output."""
    model = conv_chain_bn([helper.make_node("Identity", ["c"], ["t"], name="ident")])
    model.graph.output.append(value("c", None))
    site = left(model, "intermediate-used-elsewhere")
    assert site.detail == "Conv conv output 'c' is also used elsewhere (graph output)"


def test_a_gemm_with_trans_a_folds_like_any_gemm():
    """transA transposes the input, not the output: the channels stay on axis 1."""
    rng = np.random.default_rng(15)
    consts = dict(w=rng.standard_normal((3, 4)).astype(np.float32), **bn_consts(rng, 4))
    model = model_of([helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm", transA=1),
                      helper.make_node("BatchNormalization", ["h", *PARAMS], ["y"], name="bn")],
                     [value("x", [3, 2])], [value("y", [2, 4])], consts)
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Gemm"]


def test_a_dropout_of_opset_7_is_an_identity_at_inference():
    """Dropout-7 lost is_test: outside training it passes its input through."""
    model = conv_chain_bn([helper.make_node("Dropout", ["c"], ["t"], name="drop")])
    model.opset_import[0].version = 7
    model.graph.output[0].CopyFrom(value("y", [1, 4, 5, 5]))
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Conv", "Dropout"]


# ---- what find_linear_layer finds: malformed layers, other domains, a chain's output --------------

def test_a_layout_op_of_another_domain_is_not_looked_through():
    """Conv -> custom Transpose (perm the identity, as the default-domain one would move nothing)
    -> BN: an op of another domain may compute anything; the BN stays (its output's shape given,
    as no inference knows the op)."""
    chain = [helper.make_node("Transpose", ["c"], ["t"], name="swap", domain="custom", perm=[0, 1, 2, 3])]
    [site] = run_rules(conv_chain_bn(chain).graph, [BatchNormFold()], FoldContext(opset=15), {"t": (F32, [1, 4, 5, 5])})
    assert (site.status, site.reason) == ("left", "no-linear-producer")
    assert site.detail.startswith("bn follows Transpose swap and no Conv")


def test_a_layout_op_without_inputs_ends_the_search():
    """A malformed Identity with no input (run_rules may be handed a graph the checker refuses):
    no layer behind it, and no error."""
    view = GraphView(model_of([helper.make_node("Identity", [], ["t"], name="ident")], [], [value("t", [4])], {}).graph,
                     shapes={}, opset=15)
    assert find_linear_layer(view, "t") is None


def test_a_conv_without_a_weight_is_found_with_no_output_rank_and_left():
    """A Conv with only its data input: found as the layer (no rank from a weight it lacks), and
    the BN after it left as inconsistent, not an error out of the search."""
    model = model_of([helper.make_node("Conv", ["x"], ["c"], name="conv"),
                      helper.make_node("BatchNormalization", ["c", *PARAMS], ["y"], name="bn")],
                     [value("x", [1, 3, 5, 5])], [value("y", None)], bn_consts(np.random.default_rng(0), 4))
    layer = find_linear_layer(GraphView(model.graph, shapes={}, opset=15), "c")
    assert (layer.op, layer.output, layer.channel_axis, layer.out_rank) == ("Conv", "c", 1, None)
    [site] = run_rules(model.graph, [BatchNormFold()], FoldContext(opset=15), {})
    assert (site.status, site.reason, site.nodes) == ("left", "inconsistent-constants", ["conv", "bn"])


def test_an_add_of_more_than_two_inputs_is_no_bias_add():
    """Add is binary: a malformed Add whose third input is a constant and fourth a MatMul's output
    is not read as that MatMul's bias Add."""
    rng = np.random.default_rng(16)
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                      helper.make_node("Add", ["x", "x", "b", "h"], ["hb"], name="add")],
                     [value("x", [2, 3])], [value("hb", [2, 3])],
                     dict(w=rng.standard_normal((3, 3)).astype(np.float32), b=np.ones(3, np.float32)))
    assert find_linear_layer(GraphView(model.graph, shapes={}, opset=15), "hb") is None


def test_a_gemm_output_is_rank_2_so_a_flatten_after_it_keeps_the_channels_on_axis_1():
    """Found alone, a Gemm writes its channels on axis 1 of a rank-2 output; behind Flatten(axis=1)
    they stay there."""
    rng = np.random.default_rng(17)
    consts = dict(w=rng.standard_normal((3, 4)).astype(np.float32), c=rng.standard_normal(4).astype(np.float32),
                  **bn_consts(rng, 4))
    model = model_of([helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="gemm"),
                      helper.make_node("Flatten", ["h"], ["t"], name="flat", axis=1),
                      helper.make_node("BatchNormalization", ["t", *PARAMS], ["y"], name="bn")],
                     [value("x", [2, 3])], [value("y", [2, 4])], consts)
    layer = find_linear_layer(GraphView(model.graph, shapes={}, opset=15), "h")
    assert (layer.op, layer.output, layer.channel_axis, layer.out_rank) == ("Gemm", "h", 1, 2)
    folded, report, _ = fold_and_compare(model)
    assert the_site(report).status == "folded" and ops(folded) == ["Gemm", "Flatten"]


def test_the_tensor_of_unknown_rank_named_is_the_last_layout_ops_output():
    """MatMul -> Cast -> BN with no shapes known: the BN's input, the Cast's output, is the tensor
    whose rank is unknown (not the MatMul's)."""
    rng = np.random.default_rng(18)
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                      helper.make_node("Cast", ["h"], ["t"], name="up", to=F32),
                      helper.make_node("BatchNormalization", ["t", *PARAMS], ["y"], name="bn")],
                     [helper.make_tensor_value_info("x", F32, None)], [helper.make_tensor_value_info("y", F32, None)],
                     dict(w=rng.standard_normal((3, 4)).astype(np.float32), **bn_consts(rng, 4)))
    site = left(model, "unknown-shape")
    assert site.detail == "rank of 't' unknown; BN normalizes axis 1, which must hold the output channels of MatMul mm"


def test_a_shared_bias_of_a_matmuls_add_is_cloned_and_the_note_says_so():
    """MatMul -> Add(b) -> BN, and b read by another Add too: the folded bias is a new initializer
    named after the bias Add, and b stays for the other reader."""
    model = matmul_add_bn()
    model.graph.node.append(helper.make_node("Add", ["x2", "b"], ["z"], name="other"))
    model.graph.input.append(value("x2", [2, 4]))
    model.graph.output.append(value("z", [2, 4]))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    folded, report, _ = fold_and_compare(model)
    site = the_site(report)
    assert site.status == "folded"
    assert site.notes == ["bias 'b' is shared with 1 other node(s); cloned as 'add_bias_folded' so they keep the original"]
    add = next(n for n in folded.graph.node if n.name == "add")
    assert list(add.input) == ["h", "add_bias_folded"]
    scale, shift = bn_affine(consts)
    np.testing.assert_array_equal(const(folded, "add_bias_folded"),
                                  (consts["b"].astype(np.float64) * scale + shift).astype(np.float32))
    np.testing.assert_array_equal(const(folded, "b"), consts["b"])
