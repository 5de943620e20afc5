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


# ---- BatchNorm-like Mul -> Add that follows no linear layer (Keras' pre-activation BN) -----------
from pathlib import Path  # noqa: E402

import onnx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DATA = Path(__file__).parent / "data"

# How the chain is spelled: (body lines from `u` to `v`, constants' roles). s: scale, t: shift.
FORMS = {
    "mul-add": "m = Mul (u, s)\n v = Add (m, t)",
    "mul-add, constants first": "m = Mul (s, u)\n v = Add (t, m)",
    "mul-sub": "m = Mul (u, s)\n v = Sub (m, t)",
    "mul, constant minus": "m = Mul (u, s)\n v = Sub (t, m)",
    "div-add": "m = Div (u, s)\n v = Add (m, t)",
    "sub-mul-add (Keras' torch/jax backends)": "d = Sub (u, t)\n m = Mul (d, s)\n v = Add (m, t2)",
    "sub-mul-add, an Identity after each op (paddle2onnx)": "d = Sub (u, t)\n di = Identity (d)\n"
                                                            " m = Mul (di, s)\n mi = Identity (m)\n v = Add (mi, t2)",
}
# Where the channels are and what reads the chain: (input shape, constant shape, reader lines from `v`
# to `y`, output shape, whether the fold is exact). C is the channel count.
LAYOUTS = {
    "NCHW [1,C,1,1] -> Conv 1x1": ("[2,C,5,5]", (1, "C", 1, 1), "y = Conv (v, w1)", "[2,3,5,5]", True),
    "NCHW [C,1,1] -> Conv 3x3 valid": ("[2,C,5,5]", ("C", 1, 1), "y = Conv (v, w3)", "[2,3,3,3]", True),
    "NHWC [C] -> Transpose -> Conv": ("[2,5,5,C]", ("C",), "p = Transpose <perm=[0,3,1,2]> (v)\n y = Conv (p, w1)",
                                      "[2,3,5,5]", True),
    "[N,C] [1,C] -> Gemm": ("[4,C]", (1, "C"), "y = Gemm (v, g, gb)", "[4,3]", True),
    "[N,C] [C] -> Identity -> MatMul": ("[4,C]", ("C",), "i = Identity (v)\n y = MatMul (i, g)", "[4,3]", True),
    "[B,T,C] [C] -> MatMul (contracted axis)": ("[2,4,C]", ("C",), "y = MatMul (v, g)", "[2,4,3]", True),
    "NCHW -> padded Conv": ("[2,C,5,5]", (1, "C", 1, 1), "y = Conv <pads=[1,1,1,1]> (v, w3)", "[2,3,5,5]", False),
    "NCHW -> Relu -> Conv": ("[2,C,5,5]", (1, "C", 1, 1), "r = Relu (v)\n y = Conv (r, w1)", "[2,3,5,5]", False),
    "NHWC [C] -> Conv without the Transpose": ("[2,5,5,C]", ("C",), "y = Transpose <perm=[0,3,1,2]> (v)", "[2,C,5,5]",
                                               False),
    "NHWC -> Transpose to the wrong axis -> Conv": ("[2,C,5,C]", ("C",), "p = Transpose <perm=[0,1,3,2]> (v)\n"
                                                    " y = Conv (p, w1)", "[2,3,C,5]", False),
}
PRODUCERS = {"graph input": "u = Identity (x)", "Add (residual)": "u = Add (x, x)", "Relu": "u = Relu (x)"}


def bn_like_model(form: str, layout: str, producer: str, channels: int, seed: int) -> onnx.ModelProto:
    x_shape, k_shape, reader, y_shape, _ = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    shape = tuple(channels if d == "C" else d for d in k_shape)
    body = FORMS[form]
    consts = {"s": rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape),
              "t": rng.standard_normal(shape), "t2": rng.standard_normal(shape),
              "w1": rng.standard_normal((3, channels, 1, 1)), "w3": rng.standard_normal((3, channels, 3, 3)),
              "g": rng.standard_normal((channels, 3)), "gb": rng.standard_normal(3)}
    text = "\n ".join([PRODUCERS[producer], body, reader])
    if producer == "graph input":  # the chain reads x itself
        text = text.replace("u = Identity (x)\n ", "").replace("(u,", "(x,").replace(", u)", ", x)")
    used = {k: v.astype(np.float32) for k, v in consts.items() if f" {k})" in text or f"({k}," in text
            or f", {k}," in text or f" {k}," in text}
    c = str(channels)
    return build(f"g (float{x_shape.replace('C', c)} x) => (float{y_shape.replace('C', c)} y) {{\n {text}\n}}",
                 **used)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=st.sampled_from(sorted(FORMS)), layout=st.sampled_from(sorted(LAYOUTS)),
       producer=st.sampled_from(sorted(PRODUCERS)), channels=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_bn_like_chain_folds_forward_when_exact_and_is_reported_otherwise(form, layout, producer, channels, seed):
    """A per-channel scale-and-shift chain that follows no linear layer, in every spelling, operand
    order and layout: folded into the layer that reads it when the channels reach that layer's input
    channels and nothing pads; otherwise one site left `no-linear-producer` that names it. The
    outputs agree in onnxruntime either way."""
    model = bn_like_model(form, layout, producer, channels, seed)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    chain = [line.split() for line in FORMS[form].splitlines()]  # [out, =, op, (in, const)]
    written = {n.output[0] for n in folded.graph.node}
    [site] = report.sites
    if LAYOUTS[layout][4]:
        assert site.status == "folded", report.to_text(True)
        assert not written & {line[0] for line in chain}  # every op of the chain is gone
        created = 1 if LAYOUTS[layout][2].endswith("MatMul (v, g)") or "MatMul (i, g)" in LAYOUTS[layout][2] else 0
        assert len(folded.graph.node) == len(model.graph.node) - len(chain) + created  # (a bias Add for MatMul)
    else:
        assert (site.status, site.reason) == ("left", "no-linear-producer"), report.to_text(True)
        assert ops(folded) == ops(model)
        shape = list(next(t.dims for t in model.graph.initializer if t.name == "s"))
        described = " -> ".join(f"{line[2]}(C{shape})" for line in chain if line[2] != "Identity")
        assert site.detail.startswith(f"{described} at "), site.detail
        assert "a BatchNorm " in site.detail


@pytest.mark.parametrize("name", ["keras3_bn_preact_op13.onnx", "keras3_bn_preact_noopt_op17.onnx",
                                  "tfkeras_bn_preact_op13.onnx"])
def test_real_pre_activation_bn_exports_have_every_bn_folded_or_reported(name, tmp_path):
    """The outside evaluation's ResNetV2-style exports (tf2onnx 1.17 of Keras 3 / tf_keras, copied as
    written), 4 BatchNorm layers each: on the input, after a shared Conv, after a residual Add, after
    global pooling. Three fold forward into the Conv / Gemm after them; the one after the shared Conv
    feeds a Relu and a padded Conv and is left, named. No Mul or BN is left that no site names."""
    report = normfold.fold_file(DATA / name, tmp_path / "out.onnx")
    assert report.verification.status == "passed" and report.written
    bn = [s for s in report.sites if s.pass_name == "bn"]
    assert [s.status for s in bn].count("folded") == 3 and len(bn) == 4, report.to_text(True)
    [left] = [s for s in bn if s.status == "left"]
    assert left.reason == "intermediate-used-elsewhere"
    out = onnx.load(tmp_path / "out.onnx")
    assert sorted(n.op_type for n in out.graph.node if n.op_type in ("Mul", "BatchNormalization")) in (
        ["Mul"], ["BatchNormalization"])
    named = {n for s in bn for n in s.nodes}
    assert all(n.name in named for n in out.graph.node if n.op_type in ("Mul", "BatchNormalization"))
    assert report.nodes_after == report.nodes_before - (6 if name.startswith("keras3") else 4)


def test_paddle_decomposed_bns_with_identities_between_are_folded_or_reported(tmp_path):
    """paddle2onnx with dist_prim_all writes each BatchNorm as Sub -> Mul -> Mul -> Add with an
    Identity after every op (tests/data/export_paddle.py): after a Conv (folded into it), after a
    MaxPool and read by Max(., 0) (left, named), before a 1x1 Conv (folded forward). The chains
    broken by Identities were missed silently: 2 of the 3 BNs neither folded nor reported."""
    report = normfold.fold_file(DATA / "paddle_bn_prim_op17.onnx", tmp_path / "out.onnx")
    assert report.verification.status == "passed" and report.written
    [left] = sites(report, status="left")
    assert left.reason == "no-linear-producer" and left.detail.startswith(
        "Sub(C[8, 1, 1]) -> Mul(C[8, 1, 1]) -> Mul(C[8, 1, 1]) -> Add(C[8, 1, 1]) at Sub.2"), left.detail
    assert [n for n in left.nodes if n.startswith("Identity")] == ["Identity.15", "Identity.16", "Identity.18"]
    [forward] = [s for s in sites(report, status="folded") if "folded forward" in s.detail]
    assert "at Sub.4 folded forward into Conv Conv.1" in forward.detail
    out = onnx.load(tmp_path / "out.onnx")
    named = {n for s in report.sites for n in s.nodes}
    affine = [n.name for n in out.graph.node if n.op_type in ("Sub", "Mul", "Add")]
    assert affine == ["Sub.2", "Mul.4", "Mul.6", "Add.8"] and all(n in named for n in affine)


def test_gelu_attention_scales_masks_and_lone_channel_ops_are_no_bn_like_sites():
    """A transformer block's constants are no BatchNorm: GELU's (erf and tanh forms), the attention
    scale and mask, a lone per-channel LayerScale Mul, a bias Add, a positional table, and a scalar
    Mul -> Add (preprocessing-like, not per-channel)."""
    rng = np.random.default_rng(5)
    f = np.float32
    model = build("""g (float[2,4,8] x, float[2,4,4] mask) => (float[2,4,8] y) {
      q = MatMul (x, wq)
      k = MatMul (x, wk)
      kt = Transpose <perm=[0,2,1]> (k)
      s = MatMul (q, kt)
      ss = Div (s, sqrtd)
      inv = Sub (one, mask)
      neg = Mul (inv, big)
      sm = Add (ss, neg)
      p = Softmax <axis=-1> (sm)
      a = MatMul (p, x)
      pe = Add (a, pos)
      h = MatMul (pe, w1)
      hb = Add (h, b1)
      e = Div (hb, sqrt2)
      er = Erf (e)
      e1 = Add (er, one)
      hx = Mul (hb, e1)
      gelu = Mul (hx, half)
      c3 = Mul (gelu, gelu)
      c3b = Mul (c3, gelu)
      c3c = Mul (c3b, coef)
      inner = Add (gelu, c3c)
      th = Mul (inner, sqrt2pi)
      tt = Tanh (th)
      t1 = Add (tt, one)
      ls = Mul (t1, gamma)
      sc = Mul (ls, two)
      y = Add (sc, one)
    }""", wq=rng.standard_normal((8, 8)).astype(f), wk=rng.standard_normal((8, 8)).astype(f),
                  sqrtd=f(np.sqrt(8)), one=f(1), big=f(-1e4), pos=rng.standard_normal((4, 8)).astype(f),
                  w1=rng.standard_normal((8, 8)).astype(f), b1=rng.standard_normal(8).astype(f), sqrt2=f(np.sqrt(2)),
                  half=f(0.5), coef=f(0.044715), sqrt2pi=f(np.sqrt(2 / np.pi)), gamma=rng.standard_normal(8).astype(f),
                  two=f(2))
    folded, report = normfold.fold(model)
    assert report.sites == [] and ops(folded) == ops(model), report.to_text(True)


@pytest.mark.parametrize("name", ["tf/keras3_transformer_block_op13.onnx", "tf/kerashub_gemma_op13.onnx",
                                  "torch/hf_bert_fp16_op14.onnx", "torch/hf_vit_op14.onnx",
                                  "torch/transformer_block_op14.onnx"])
@pytest.mark.parametrize("target", [None, 23])
def test_real_transformers_gain_no_bn_like_sites(name, target):
    """Exported transformers (LayerNorm's gamma/beta as Mul(C[D]) -> Add(C[D]) after the normalized
    tensor where the exporter decomposed it; at their own opset those LayerNorms are left
    opset-too-old): no BatchNorm-like site at all, at the model's opset or with the LayerNorms
    fused at 23."""
    model = onnx.load(Path(__file__).parents[1] / "models" / name)
    _, report = normfold.fold(model, normfold.FoldOptions(target_opset=target))
    assert not [s for s in report.sites if s.kind.startswith("BatchNorm-like")], report.to_text(True)
