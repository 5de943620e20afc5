"""TF-style BatchNorm, `Conv -> Mul(C) -> Add(C)`: folded only when the constant is per output channel."""

from __future__ import annotations

import numpy as np
import pytest

import normfold
from builders import build, fold_and_compare, ops, sites

RNG = np.random.default_rng(11)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
K = (RNG.random((1, 4, 1, 1)) + 0.5).astype(np.float32)
T = RNG.standard_normal((1, 4, 1, 1)).astype(np.float32)


def conv_then(body: str, **consts):
    return build(f"""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
      c = Conv <pads=[1,1,1,1]> (x, w)
      {body}
    }}""", w=W, **consts)


@pytest.mark.parametrize("body, consts", [
    ("m = Mul (c, k)\n y = Add (m, t)", dict(k=K, t=T)),
    ("m = Mul (k, c)\n y = Add (t, m)", dict(k=K, t=T)),
    ("y = Mul (c, k)", dict(k=K)),
    ("y = Add (c, t)", dict(t=T)),
    ("y = Sub (c, t)", dict(t=T)),
    ("y = Div (c, k)", dict(k=K)),
    ("y = Mul (c, k)", dict(k=K.reshape(4, 1, 1))),
    ("y = Mul (c, k)", dict(k=np.float32(0.5))),
    ("h = Constant <value = float {0.5}> ()\n y = Mul (c, h)", {}),  # a scalar from a Constant node
])
def test_per_channel_constants_fold_into_conv(body, consts):
    folded, report, _ = fold_and_compare(conv_then(body, **consts))
    assert ops(folded) == ["Conv"]
    assert all(s.status == "folded" for s in report.sites) and report.sites


def test_last_axis_constant_is_not_a_channel_scale():
    # A [C]-shaped constant after NCHW Conv broadcasts along W (width 8 here, 4 channels; use W=4).
    model = build("""g (float[1,3,4,4] x) => (float[1,4,4,4] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      y = Mul (c, k)
    }""", w=W, k=K.reshape(4))
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["Conv", "Mul"]
    assert sites(report, "left", "not-per-channel")


def test_matmul_bias_then_mul_add_folds_into_weights_and_bias():
    rng = np.random.default_rng(2)
    model = build("""g (float[2,5,6] x) => (float[2,5,4] y) {
      h = MatMul (x, w)
      hb = Add (h, b)
      m = Mul (hb, k)
      y = Add (m, t)
    }""", w=rng.standard_normal((6, 4)).astype(np.float32), b=rng.standard_normal(4).astype(np.float32),
                  k=rng.standard_normal(4).astype(np.float32), t=rng.standard_normal(4).astype(np.float32))
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["MatMul", "Add"]
    assert len(sites(report, "folded")) == 2


def test_matmul_bias_alone_is_not_a_site():
    model = build("""g (float[2,6] x) => (float[2,4] y) {
      h = MatMul (x, w)
      y = Add (h, b)
    }""", w=np.ones((6, 4), np.float32), b=np.ones(4, np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ["MatMul", "Add"] and report.sites == []


def test_mul_after_activation_is_not_a_site():
    model = conv_then("r = Relu (c)\n y = Mul (r, k)", k=K)
    folded, report = normfold.fold(model)
    assert ops(folded) == ["Conv", "Relu", "Mul"] and report.sites == []


def test_attention_scores_div_is_not_reported():
    model = build("""g (float[2,5,4] q, float[2,4,5] kt) => (float[2,5,5] y) {
      s = MatMul (q, kt)
      y = Div (s, d)
    }""", d=np.float32(2.0))
    _, report = normfold.fold(model)
    assert report.sites == []


def test_nhwc_constants_after_transpose_fold_into_conv():
    """tf2onnx without optimizers: Conv -> Transpose(NHWC) -> Mul(C[M]) -> Add(C[M])."""
    model = build("""g (float[1,3,8,8] x) => (float[1,8,8,4] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      t = Transpose <perm=[0,2,3,1]> (c)
      m = Mul (t, k)
      y = Add (m, b)
    }""", w=W, k=K.reshape(4), b=T.reshape(4))
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["Conv", "Transpose"]
    assert len(sites(report, "folded")) == 2


def test_nchw_shaped_constant_after_transpose_is_not_per_channel():
    model = build("""g (float[1,3,4,4] x) => (float[1,4,4,4] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      t = Transpose <perm=[0,2,3,1]> (c)
      y = Mul (t, k)
    }""", w=W, k=K)  # [1,4,1,1] now broadcasts along H of the NHWC tensor
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["Conv", "Transpose", "Mul"]
    assert sites(report, "left", "not-per-channel")


def test_keras_conv1d_squeeze_bias_and_bn_fold():
    """Keras Conv1D: Conv(2-D, kernel 1x3) -> Squeeze(2) -> Add(bias) -> Mul -> Add."""
    rng = np.random.default_rng(8)
    model = build("""g (float[2,4,1,10] x) => (float[2,6,8] y) {
      c = Conv (x, w)
      s = Squeeze (c, ax)
      bb = Add (s, bias)
      m = Mul (bb, k)
      y = Add (m, t)
    }""", w=rng.standard_normal((6, 4, 1, 3)).astype(np.float32), ax=np.array([2], np.int64),
                  bias=rng.standard_normal((1, 6, 1)).astype(np.float32), k=rng.standard_normal((1, 6, 1)).astype(np.float32),
                  t=rng.standard_normal((1, 6, 1)).astype(np.float32))
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["Conv", "Squeeze"]


def test_dense_behind_reshape_folds():
    """Keras Dense on rank 3: Reshape -> MatMul -> Reshape -> Add(bias) -> Mul -> Add."""
    rng = np.random.default_rng(9)
    model = build("""g (float[2,5,6] x) => (float[2,5,4] y) {
      r = Reshape (x, s1)
      h = MatMul (r, w)
      h3 = Reshape (h, s2)
      hb = Add (h3, b)
      m = Mul (hb, k)
      y = Add (m, t)
    }""", s1=np.array([10, 6], np.int64), s2=np.array([2, 5, 4], np.int64),
                  w=rng.standard_normal((6, 4)).astype(np.float32), b=rng.standard_normal(4).astype(np.float32),
                  k=rng.standard_normal(4).astype(np.float32), t=rng.standard_normal(4).astype(np.float32))
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["Reshape", "MatMul", "Add", "Reshape"]


def test_mixed_precision_bn_folds_and_drops_the_cast_round_trip():
    """Keras mixed_float16: Conv(fp16) -> Cast(f32) -> Mul -> Add -> Cast(f16)."""
    model = build("""g (float16[1,3,8,8] x) => (float16[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      c32 = Cast <to=1> (c)
      m = Mul (c32, k)
      a = Add (m, t)
      y = Cast <to=10> (a)
    }""", w=W.astype(np.float16), k=K, t=T)
    folded, report, comparisons = fold_and_compare(model)
    assert ops(folded) == ["Conv"]
    assert any("round trip" in note for s in report.sites for note in s.notes)
    assert all(s.max_rounding is not None for s in sites(report, "folded"))


def test_downcast_between_is_not_dropped():
    model = build("""g (float[1,3,8,8] x) => (float16[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      c16 = Cast <to=10> (c)
      y = Mul (c16, k)
    }""", w=W, k=K.astype(np.float16))
    folded, _, _ = fold_and_compare(model, atol=1e-2, rtol=1e-2)
    assert ops(folded) == ["Conv", "Cast"]


@pytest.mark.parametrize("body, consts", [
    ("y = Sub (t, c)", dict(t=T)),  # t - conv is -conv + t, not conv - t
    ("y = Div (k, c)", dict(k=K)),  # k / conv is not affine in conv at all
])
def test_constant_minus_or_over_the_layer_is_not_folded(body, consts):
    folded, report, _ = fold_and_compare(conv_then(body, **consts))
    assert ops(folded) == ["Conv", body.split()[2]]
    assert not [s for s in report.sites if s.status == "folded"]


def test_channel_constant_after_a_layer_of_unknown_rank_names_the_unknown_shape():
    """A [1, 1, C] constant after a MatMul whose output rank is unknown could broadcast the output
    to a higher rank: the reason is the unknown shape, not a wrong axis."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Mul", ["h", "k"], ["y"], name="mul")],
        "g", [helper.make_tensor_value_info("x", 1, None)], [helper.make_tensor_value_info("y", 1, None)],
        [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((1, 1, 4)).astype(np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    folded, report = normfold.fold(model)
    assert ops(folded) == ["MatMul", "Mul"]
    [site] = report.sites
    assert (site.status, site.reason) == ("left", "unknown-shape")


@pytest.mark.parametrize("listed", ["k", "w"])
def test_constants_listed_as_graph_inputs_are_sites_left_with_the_option(listed):
    """IR < 4 lists every initializer as a graph input; with --initializer-inputs input (or an IR >= 4
    model listing them) the Mul is still reported, with the reason and the option, never missed."""
    from onnx import helper

    model = conv_then("y = Mul (c, k)", k=K)
    value = {"k": K, "w": W}[listed]
    model.graph.input.append(helper.make_tensor_value_info(listed, 1, list(value.shape)))
    folded, report = normfold.fold(model)
    assert ops(folded) == ["Conv", "Mul"]
    [site] = report.sites
    assert site.reason == ("non-constant-parameters" if listed == "k" else "non-constant-weights")
    assert "--initializer-inputs constant" in site.detail
    folded, report, _ = fold_and_compare(model, initializer_inputs="constant")
    assert ops(folded) == ["Conv"]
