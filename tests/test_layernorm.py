"""Decomposed LayerNorm -> LayerNormalization, in the spellings exporters write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normfold

MODELS = Path(__file__).parents[1] / "models"
from builders import build, fold_and_compare, ops, random_feeds, run, sites

D = 16
RNG = np.random.default_rng(4)
GAMMA = RNG.standard_normal(D).astype(np.float32)
BETA = RNG.standard_normal(D).astype(np.float32)


def torch_layernorm(square="Pow", normalize="Div", affine="both", axes_as_input=False, opset=17,
                    shape="2,5,16", axes="-1", eps=1e-5, extra="", extra_out="", **consts):
    """The TorchScript exporter's LayerNorm (opset 11-16 spelling), with variations."""
    if axes_as_input:
        red1, red2 = "mean = ReduceMean (x, ax)", "var = ReduceMean (sq, ax)"
        consts["ax"] = np.array([int(a) for a in axes.split(",")], np.int64)
    else:
        red1, red2 = f"mean = ReduceMean <axes=[{axes}]> (x)", f"var = ReduceMean <axes=[{axes}]> (sq)"
    sq = "sq = Pow (d, two)" if square == "Pow" else "sq = Mul (d, d)"
    norm = "n = Div (d, std)" if normalize == "Div" else "r = Reciprocal (std)\n n = Mul (d, r)"
    tail = {"both": "g = Mul (n, gamma)\n y = Add (g, beta)", "swapped": "g = Mul (gamma, n)\n y = Add (beta, g)",
            "scale": "y = Mul (n, gamma)", "none": "y = Identity (n)"}[affine]
    text = f"""g (float[{shape}] x) => (float[{shape}] y{extra_out}) {{
      {red1}
      d = Sub (x, mean)
      {sq}
      {red2}
      {"ve = Add (var, eps)" if eps is not None else ""}
      std = Sqrt ({"ve" if eps is not None else "var"})
      {norm}
      {tail}
      {extra}
    }}"""
    consts.setdefault("gamma", GAMMA)
    consts.setdefault("beta", BETA)
    consts = {k: v for k, v in consts.items() if k in text.replace("(", " ").replace(")", " ").replace(",", " ").split()}
    if "two" in text:
        consts["two"] = np.float32(2.0)
    if eps is not None:  # None: no epsilon Add, Sqrt reads the variance
        consts["eps"] = np.float32(eps)
    return build(text, opset=opset, **consts)


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("normalize", ["Div", "Reciprocal"])
@pytest.mark.parametrize("affine", ["both", "swapped", "scale", "none"])
def test_spellings_fuse_into_one_layernormalization(square, normalize, affine):
    model = torch_layernorm(square=square, normalize=normalize, affine=affine)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    expected = ["LayerNormalization"]  # without gamma and beta, the Identity after the norm joins the site
    assert ops(folded) == expected
    assert [s.status for s in report.sites] == ["fused"]


def test_axes_as_input_at_opset_18():
    folded, _, _ = fold_and_compare(torch_layernorm(axes_as_input=True, opset=18), atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 3), eps=st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3]), seed=st.integers(0, 1000),
       positive_axes=st.booleans(), scale=st.floats(1e-3, 1e3))
def test_trailing_axes_fuse(k, eps, seed, positive_axes, scale):
    dims = [2, 3, 4, 5][: 4]
    axes = list(range(4 - k, 4)) if positive_axes else list(range(-k, 0))
    rng = np.random.default_rng(seed)
    gamma = rng.standard_normal(dims[4 - k:]).astype(np.float32)
    beta = rng.standard_normal(dims[4 - k:]).astype(np.float32)
    model = torch_layernorm(shape=",".join(map(str, dims)), axes=",".join(map(str, axes)), eps=eps,
                            gamma=gamma * np.float32(scale), beta=beta)
    folded, report, _ = fold_and_compare(model, atol=1e-4 * scale, rtol=1e-4)
    assert ops(folded) == ["LayerNormalization"]


@pytest.mark.parametrize("eps", [None, 0.0])
def test_no_epsilon_fuses_with_epsilon_zero(eps):
    """(x - mean) / sqrt(var) with no Add, or Add(0): LayerNormalization(epsilon=0) is exactly that."""
    folded, report, _ = fold_and_compare(torch_layernorm(eps=eps), atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"], report.to_text(verbose=True)
    assert onnx_attr(folded.graph.node[0], "epsilon") == 0.0


def test_negative_epsilon_is_left():
    model = torch_layernorm(eps=-1e-3)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert [s.reason for s in report.sites] == ["invalid-statistics"]


def test_bert_after_onnxscript_dropped_its_epsilon_fuses(tmp_path):
    """onnxscript's optimizer removes BERT's Add(var, 1e-12), leaving (x - mean) / sqrt(var); done
    here by hand on the real export. Every LayerNorm still fuses, with epsilon 0, and verifies."""
    model = onnx.load(MODELS / "torch" / "hf_bert_op14.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    dropped = 0
    for sqrt in [n for n in model.graph.node if n.op_type == "Sqrt"]:
        add = producers.get(sqrt.input[0])
        if add is not None and add.op_type == "Add" and producers.get(add.input[0], add).op_type == "ReduceMean":
            sqrt.input[0] = add.input[0]
            model.graph.node.remove(add)
            dropped += 1
    assert dropped == 5
    onnx.save(model, tmp_path / "no_eps.onnx")
    report = normfold.fold_file(tmp_path / "no_eps.onnx", tmp_path / "out.onnx",
                                options=normfold.FoldOptions(target_opset=17),
                                verify=normfold.VerifyOptions(shapes={"input_ids": [2, 8], "attention_mask": [2, 8]}))
    assert report.exit_code == 0 and report.verification.status == "passed", report.to_text()
    assert report.ops_after.get("LayerNormalization") == 5
    assert not [s for s in report.sites if s.status == "left"]


def test_opset_16_is_left_with_the_opset_that_would_allow_it():
    model = torch_layernorm(opset=16)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert site.reason == "opset-too-old" and "--target-opset 17" in site.detail


def test_target_opset_converts_then_fuses():
    model = torch_layernorm(opset=14)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, target_opset=17)
    assert ops(folded) == ["LayerNormalization"]
    assert (report.opset_before, report.opset_after) == (14, 17)


def test_non_trailing_axis_is_left():
    model = torch_layernorm(shape="2,16,5", axes="1", gamma=GAMMA.reshape(16, 1), beta=BETA.reshape(16, 1))
    folded, report = normfold.fold(model)
    assert "LayerNormalization" not in ops(folded)
    assert sites(report, "left", "unsupported-axis")


def test_intermediate_used_elsewhere_is_left():
    model = torch_layernorm(extra="z = Identity (std)", extra_out=", float[2,5,1] z")
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert sites(report, "left", "intermediate-used-elsewhere")


def test_non_constant_gamma_is_not_fused_into_scale():
    model = build("""g (float[2,5,16] x, float[16] gamma) => (float[2,5,16] y) {
      mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      sq = Pow (d, two)
      var = ReduceMean <axes=[-1]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      n = Div (d, std)
      y = Mul (n, gamma)
    }""", opset=17, two=np.float32(2), eps=np.float32(1e-5))
    folded, report = normfold.fold(model)
    # the core still fuses (scale = ones); the Mul by the runtime gamma stays after it
    assert ops(folded) == ["LayerNormalization", "Mul"]
    fold_and_compare(model)


def keras_layernorm(center=True, scale=True, tf_keras=False, mean_op="GlobalAveragePool", opset=17):
    """Keras 3 / tf_keras through tf2onnx: gamma folded into the inverse std, beta as a shift."""
    mean = ("mean = GlobalAveragePool (x)" if mean_op == "GlobalAveragePool" else "mean = ReduceMean <axes=[-1]> (x)")
    var = mean.replace("mean =", "var =").replace("(x)", "(sq)")
    g = "g = Mul (r, gamma)" if scale else "g = Identity (r)"
    if tf_keras:
        shift = "e = Mul (mean, g)\n c = Sub (beta, e)\n y = Add (a, c)" if center else "e = Mul (mean, g)\n y = Sub (a, e)"
    else:
        shift = ("neg = Neg (mean)\n b = Mul (neg, g)\n c = Add (b, beta)\n y = Add (a, c)" if center
                 else "neg = Neg (mean)\n b = Mul (neg, g)\n y = Add (a, b)")
    text = f"""g (float[2,5,16] x) => (float[2,5,16] y) {{
      {mean}
      d = Sub (x, mean)
      sq = Mul (d, d)
      {var}
      ve = Add (var, eps)
      std = Sqrt (ve)
      r = Reciprocal (std)
      {g}
      a = Mul (x, g)
      {shift}
    }}"""
    if not scale:  # no Identity in real exports: g is r itself
        text = text.replace("g = Identity (r)\n", "").replace("(x, g)", "(x, r)").replace(", g)", ", r)")
    consts = dict(eps=np.float32(1e-3), gamma=GAMMA.reshape(1, 1, D), beta=BETA.reshape(1, 1, D))
    used = text.replace("(", " ").replace(")", " ").replace(",", " ").split()
    return build(text, opset=opset, **{k: v for k, v in consts.items() if k in used})


@pytest.mark.parametrize("tf_keras", [False, True], ids=["keras3", "tf_keras"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("mean_op", ["GlobalAveragePool", "ReduceMean"])
def test_keras_factored_spellings_fuse(tf_keras, center, scale, mean_op):
    model = keras_layernorm(center=center, scale=scale, tf_keras=tf_keras, mean_op=mean_op)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]
    assert len(folded.graph.node[0].input) == (3 if center else 2)


@pytest.mark.parametrize("clamp", [True, False])
def test_raw_moments_spelling_fuses(clamp):
    model = build(f"""g (float[2,5,16] x) => (float[2,5,16] y) {{
      mean = ReduceMean <axes=[-1]> (x)
      x2 = Mul (x, x)
      ex2 = ReduceMean <axes=[-1]> (x2)
      m2 = Mul (mean, mean)
      v0 = Sub (ex2, m2)
      {"var = Max (v0, zero)" if clamp else "var = Identity (v0)"}
      ve = Add (var, eps)
      std = Sqrt (ve)
      d = Sub (x, mean)
      n = Div (d, std)
      g = Mul (n, gamma)
      y = Add (g, beta)
    }}""".replace("var = Identity (v0)", "").replace("Add (var, eps)", "Add (var, eps)" if clamp else "Add (v0, eps)"),
                  opset=17, eps=np.float32(1e-5), gamma=GAMMA, beta=BETA, **({"zero": np.float32(0)} if clamp else {}))
    folded, _, _ = fold_and_compare(model, atol=1e-4, rtol=1e-4)
    assert ops(folded) == ["LayerNormalization"]


MIXED_PRECISION_LN = """g (float16[2,5,16] x16) => (float16[2,5,16] y16) {{
      x = Cast <to=1> (x16)
      mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      sq = Pow (d, two)
      var = ReduceMean <axes=[-1]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      n = Div (d, std)
      {affine}
      y16 = Cast <to=10> ({last})
    }}"""


def test_mixed_precision_norm_with_float32_affine_stays_float32():
    """Keras mixed_float16: Cast(f32) -> LayerNorm with float32 gamma/beta -> Cast(f16). An fp16
    LayerNormalization would round gamma/beta to fp16 and apply them in fp16; the fused op stays in
    float32 between the Casts, with the model's own float32 parameters."""
    model = build(MIXED_PRECISION_LN.format(affine="g = Mul (n, gamma)\n      y = Add (g, beta)", last="y"),
                  opset=17, two=np.float32(2), eps=np.float32(1e-5), gamma=GAMMA, beta=BETA)
    folded, _, [comparison] = fold_and_compare(model)
    assert ops(folded) == ["Cast", "LayerNormalization", "Cast"]
    fused = folded.graph.node[1]
    scale, bias = (numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == name))
                   for name in fused.input[1:3])
    assert scale.dtype == np.float32 and np.array_equal(scale, GAMMA) and np.array_equal(bias, BETA)
    # Both compute in float32 and round once to fp16: at most one fp16 step apart, rarely at all.
    assert comparison.max_abs_error <= float(np.spacing(np.float16(np.max(np.abs(run(model, random_feeds(model))[0])))))


def test_mixed_precision_norm_without_affine_is_fused_on_fp16():
    """Without gamma and beta the wrapped norm's only fp16 rounding is the last Cast, which the
    fp16 LayerNormalization (computing in float32, stash_type=1) does too: the Casts are absorbed."""
    model = build(MIXED_PRECISION_LN.format(affine="", last="n"), opset=17, two=np.float32(2),
                  eps=np.float32(1e-5))
    folded, _, _ = fold_and_compare(model)
    assert ops(folded) == ["LayerNormalization"]
    fused = folded.graph.node[0]
    assert fused.input[0] == "x16" and fused.output[0] == "y16"
    assert onnx_attr(fused, "stash_type") == 1


def test_norm_computed_in_float32_and_scaled_in_fp16_reads_the_fp16_input():
    """`x.float()` -> LayerNorm core -> `.half()` -> fp16 gamma/beta: the fp16 LayerNormalization
    rounds where the model does (spec: normalize in float32, cast, then scale and shift in fp16)."""
    model = build(MIXED_PRECISION_LN.format(
        affine="n16 = Cast <to=10> (n)\n      g = Mul (n16, gamma)\n      y = Add (g, beta)", last="y")
        .replace("y16 = Cast <to=10> (y)", "y16 = Identity (y)"),
        opset=17, two=np.float32(2), eps=np.float32(1e-5), gamma=GAMMA.astype(np.float16), beta=BETA.astype(np.float16))
    folded, _, _ = fold_and_compare(model)
    assert ops(folded) == ["LayerNormalization"]
    assert folded.graph.node[0].input[0] == "x16" and folded.graph.node[0].output[0] == "y16"


def test_norm_that_changes_type_with_a_shared_input_cast_fuses_its_float32_core():
    """As above, but the float32 X is also a graph output: its Cast must stay, and a LayerNormalization
    cannot read float32 and write fp16. The float32 core becomes one op, the model's Cast to fp16 and
    its fp16 affine stay (the rounding points are the model's)."""
    model = build(MIXED_PRECISION_LN.format(
        affine="n16 = Cast <to=10> (n)\n      g = Mul (n16, gamma)\n      y = Add (g, beta)", last="y")
        .replace("y16 = Cast <to=10> (y)", "y16 = Identity (y)")
        .replace("=> (float16[2,5,16] y16)", "=> (float16[2,5,16] y16, float[2,5,16] x)"),
        opset=17, two=np.float32(2), eps=np.float32(1e-5), gamma=GAMMA.astype(np.float16), beta=BETA.astype(np.float16))
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["Cast", "LayerNormalization", "Cast", "Mul", "Add", "Identity"]
    fused = folded.graph.node[1]
    assert fused.input[0] == "x" and fused.output[0] == "n"
    assert not sites(report, "left")


def test_fp16_export_with_double_variance_fuses():
    """PyTorch fp16 export: mean in fp16, variance in float64, gamma/beta in fp16."""
    model = build("""g (float16[2,5,16] x) => (float16[2,5,16] y) {
      mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      dd = Cast <to=11> (d)
      sq = Pow (dd, two)
      var = ReduceMean <axes=[-1]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      n = Div (dd, std)
      n16 = Cast <to=10> (n)
      g = Mul (n16, gamma)
      y = Add (g, beta)
    }""", opset=17, two=np.float64(2), eps=np.float64(1e-12), gamma=GAMMA.astype(np.float16),
                  beta=BETA.astype(np.float16))
    folded, _, _ = fold_and_compare(model)
    assert ops(folded) == ["LayerNormalization"]


def test_residual_reads_of_the_input_do_not_block_fusion():
    model = torch_layernorm(extra="z = Add (x, y)", extra_out=", float[2,5,16] z")
    folded, _, _ = fold_and_compare(model)
    assert ops(folded) == ["LayerNormalization", "Add"]


def onnx_attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_channels_first_layernorm_fuses_between_transposes_on_request():
    model = torch_layernorm(shape="2,16,5", axes="1", gamma=GAMMA.reshape(16, 1), beta=BETA.reshape(16, 1))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, allow_transpose=True)
    assert ops(folded) == ["Transpose", "LayerNormalization", "Transpose"]
    assert [s.status for s in report.sites] == ["fused"]
    t_in, ln, t_out = folded.graph.node
    assert [n.name for n in folded.graph.node] == ["LayerNorm/Transpose_in", "LayerNorm/LayerNormalization",
                                                   "LayerNorm/Transpose_out"]
    assert onnx_attr(t_in, "perm") == [0, 2, 1] and onnx_attr(t_out, "perm") == [0, 2, 1]
    assert list(t_in.input) == ["x"] and ln.input[0] == t_in.output[0] and t_out.output[0] == "y"
    assert report.sites[0].detail.endswith("(axis=-1, epsilon=1e-05, between Transposes [0, 2, 1] and back)")


@pytest.mark.parametrize("name, fused", [("torch/cf_layernorm_op14.onnx", 2), ("tf/keras3_conv_ln_c_op17.onnx", 1)])
def test_real_channels_first_layernorms(tmp_path, name, fused):
    path = MODELS / name
    report = normfold.fold_file(path, tmp_path / "out.onnx", options=normfold.FoldOptions(target_opset=17))
    assert [s.reason for s in report.sites if s.pass_name == "layernorm"] == ["unsupported-axis"] * fused
    report = normfold.fold_file(path, tmp_path / "out.onnx",
                                options=normfold.FoldOptions(target_opset=17, allow_transpose=True))
    assert report.verification.status == "passed"
    assert report.ops_after.get("LayerNormalization") == fused
    assert not [s for s in report.sites if s.status == "left"]


def test_unknown_continuation_of_a_mean_subtraction_is_reported():
    model = build("""g (float[2,5,16] x) => (float[2,5,16] y) {
      mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      y = Abs (d)
    }""", opset=17)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert site.reason == "unrecognized-pattern"


def test_target_opset_is_not_applied_when_no_site_needs_it():
    """The version converter copies the whole model; a BN-only model at opset 13 needs no newer op."""
    model = onnx.load(MODELS / "torch" / "cnn_bn_op13.onnx")
    folded, report = normfold.fold(model, normfold.FoldOptions(target_opset=23))
    assert (report.opset_before, report.opset_after) == (13, 13)
    assert report.count("folded") == 7  # 6 into the layer before, bn9 forward into the Linear head


@pytest.mark.parametrize("form", ["divide", "factored"])
def test_reciprocal_square_root_as_pow(form):
    tail = ("n = Mul (d, r)\n g = Mul (n, gamma)\n y = Add (g, beta)" if form == "divide" else
            "gr = Mul (r, gamma)\n a = Mul (x, gr)\n neg = Neg (mean)\n b = Mul (neg, gr)\n c = Add (b, beta)\n"
            " y = Add (a, c)")
    model = build(f"""g (float[2,5,16] x) => (float[2,5,16] y) {{
      mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      sq = Mul (d, d)
      var = ReduceMean <axes=[-1]> (sq)
      ve = Add (var, eps)
      r = Pow (ve, half)
      {tail}
    }}""", opset=17, eps=np.float32(1e-5), half=np.float32(-0.5), gamma=GAMMA, beta=BETA)
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]


@pytest.mark.parametrize("perm, fused", [([0, 2, 3, 1], True), ([0, 1, 3, 2], True), ([1, 0, 2, 3], False)])
def test_factored_form_applied_to_a_transposed_input(perm, fused):
    """tf2onnx's Keras LayerNorm over (H, W, C): statistics over NCHW X, result built on Transpose(X)."""
    rng = np.random.default_rng(21)
    t_shape = [[1, 8, 4, 4][i] for i in perm]
    model = build(f"""g (float[1,8,4,4] x) => (float[{','.join(map(str, t_shape))}] y) {{
      mean = ReduceMean <axes=[2,3,1]> (x)
      d = Sub (x, mean)
      sq = Mul (d, d)
      var = ReduceMean <axes=[2,3,1]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      r = Reciprocal (std)
      r1 = Reshape (r, one)
      g = Mul (r1, gamma)
      neg = Neg (mean)
      n1 = Reshape (neg, one)
      b = Mul (n1, g)
      c = Add (b, beta)
      xt = Transpose <perm=[{','.join(map(str, perm))}]> (x)
      a = Mul (xt, g)
      y = Add (a, c)
    }}""", opset=17, eps=np.float32(1e-3), one=np.array([1, 1, 1, 1], np.int64),
                  gamma=rng.standard_normal([1] + t_shape[1:]).astype(np.float32),
                  beta=rng.standard_normal([1] + t_shape[1:]).astype(np.float32))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    if fused:
        assert ops(folded) == ["Transpose", "LayerNormalization"]
    else:
        assert "LayerNormalization" not in ops(folded)
        assert sites(report, "left")


def _tf_keras_fused_with_constant_count(count: float) -> onnx.ModelProto:
    """tf_keras' fused LayerNorm (the real export) with its count Cast(ReduceProd(Gather(Shape)))
    constant-folded into one number, as onnxscript's and onnxsim's constant folding leave it."""
    model = onnx.load(MODELS / "tf" / "tfkeras_ln_fused_op17.onnx")
    div = next(n for n in model.graph.node if n.op_type == "Div")
    chain = {"Shape", "Gather", "ReduceProd", "Cast"}
    for node in [n for n in model.graph.node if n.op_type in chain]:
        model.graph.node.remove(node)
    model.graph.initializer.append(numpy_helper.from_array(np.array(count, np.float32), div.input[1]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_tf_keras_fused_layernorm_with_a_constant_count_fuses(tmp_path):
    onnx.save(_tf_keras_fused_with_constant_count(32.0), tmp_path / "folded_count.onnx")
    report = normfold.fold_file(tmp_path / "folded_count.onnx", tmp_path / "out.onnx",
                                verify=normfold.VerifyOptions(shapes={"input_1": [2, 16, 32]}))
    assert report.exit_code == 0 and report.verification.status == "passed", report.to_text()
    assert report.ops_after.get("LayerNormalization") == 1 and "BatchNormalization" not in report.ops_after


def test_tf_keras_fused_layernorm_with_a_wrong_constant_count_is_left():
    model = _tf_keras_fused_with_constant_count(31.0)
    folded, report = normfold.fold(model)
    assert "LayerNormalization" not in ops(folded) and "BatchNormalization" in ops(folded)
    [site] = [s for s in report.sites if s.pass_name == "layernorm"]
    assert site.reason == "non-constant-parameters" and "count 32" in site.detail


def moved_transpose_layernorm(shape=(2, 6, 4, 3), perm=(0, 2, 3, 1), mean_axis=1, var_axis=-1):
    """What onnxruntime's transpose optimizer leaves of Transpose(X) -> LayerNorm(last axis): the mean
    on X (over the axis the Transpose moves last), the rest on Transpose(X - mean)."""
    t_shape = [shape[i] for i in perm]
    rng = np.random.default_rng(7)
    text = f"""g (float[{",".join(map(str, shape))}] x) => (float[{",".join(map(str, t_shape))}] y) {{
      mean = ReduceMean <axes=[{mean_axis}]> (x)
      d = Sub (x, mean)
      dt = Transpose <perm=[{",".join(map(str, perm))}]> (d)
      sq = Pow (dt, two)
      var = ReduceMean <axes=[{var_axis}]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      n = Div (dt, std)
      g = Mul (n, gamma)
      y = Add (g, beta)
    }}"""
    return build(text, opset=17, two=np.float32(2), eps=np.float32(1e-5),
                 gamma=rng.standard_normal(t_shape[-1]).astype(np.float32),
                 beta=rng.standard_normal(t_shape[-1]).astype(np.float32))


@pytest.mark.parametrize("shape, perm, mean_axis", [((2, 6, 4, 3), (0, 2, 3, 1), 1), ((2, 6, 5), (0, 2, 1), 1),
                                                    ((2, 6, 5), (0, 2, 1), -2)])
def test_layernorm_with_the_input_transpose_moved_inside_fuses(shape, perm, mean_axis):
    model = moved_transpose_layernorm(shape, perm, mean_axis)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Transpose", "LayerNormalization"], report.to_text(verbose=True)
    assert list(folded.graph.node[0].attribute[0].ints) == list(perm) and folded.graph.node[0].input[0] == "x"


def test_layernorm_with_a_moved_transpose_over_other_axes_is_left():
    """The mean over axis 2 of X ends up on axis 1 of Transpose(X): not the axis the variance reduces."""
    model = moved_transpose_layernorm(mean_axis=2)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    # the mean and the variance are taken over different axes: no norm, but reported with its ops
    [site] = [s for s in report.sites if s.pass_name == "layernorm"]
    assert site.reason == "unrecognized-pattern" and "ReduceMean -> Sub -> Transpose" in site.detail


@pytest.mark.parametrize("name, fused, shapes", [("hf_wav2vec2_op14.onnx", 6, {"input_values": [1, 400]}),
                                                 ("hf_convnext_op14.onnx", 3, {"pixel_values": [1, 3, 32, 32]})])
def test_corpus_layernorms_after_onnxruntime_offline_optimization_fuse(name, fused, shapes, tmp_path):
    """onnxruntime's transpose optimizer moves the Transpose in front of these LayerNorms between
    X - mean and the variance; every LayerNorm normfold fuses in the export it still fuses after."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(MODELS / "torch" / name), options, providers=["CPUExecutionProvider"])
    report = normfold.fold_file(tmp_path / "ort.onnx", tmp_path / "out.onnx",
                                options=normfold.FoldOptions(target_opset=23),
                                verify=normfold.VerifyOptions(shapes=shapes))
    assert report.exit_code == 0 and report.verification.status == "passed", report.to_text()
    ln = [s for s in report.sites if s.pass_name == "layernorm"]
    assert len([s for s in ln if s.status == "fused"]) == fused, report.to_text(verbose=True)
    assert any("moved in front" in s.detail for s in ln)
    assert not [s for s in ln if s.reason == "unrecognized-pattern"]


# ---- tf_keras' fused LayerNorm, through a BatchNormalization (layernorm.py) ------------------------

def tf_keras_bn_layernorm(shape=(2, 4, 8), k=1, eps=1e-3, affine="both", count="chain", opset=17, xr=None,
                          axes=(0, 2, 3), names=True, bn_scale=None, bn_attrs="", extra="", extra_out="",
                          gamma=None, beta=None, seed=0, axes_input=False, squeeze_attr=False):
    """tf_keras' LayerNormalization over the last k axes of X: X reshaped to [1, prod(leading),
    prod(normalized), 1], moments over axes 0, 2, 3 into a BatchNormalization, reshaped back.
    `count` is how the variance divisor is written: "chain" (Cast(ReduceProd(Gather(Shape(Xr))))) or
    a number (constant-folded)."""
    rng = np.random.default_rng(seed)
    lead, norm = int(np.prod(shape[:-k])), int(np.prod(shape[-k:]))
    xr = xr or [1, lead, norm, 1]
    dims = ",".join(map(str, shape))
    ax = ",".join(map(str, axes))
    if axes_input:  # opset 18: the axes of the reductions are an input
        reductions = ["mean = ReduceMean <keepdims=1> (xr, ax)", "d = Sub (xr, mean)",
                      "rss = ReduceSumSquare <keepdims=0> (d, ax)"]
    else:
        reductions = [f"mean = ReduceMean <axes=[{ax}], keepdims=1> (xr)", "d = Sub (xr, mean)",
                      f"rss = ReduceSumSquare <axes=[{ax}], keepdims=0> (d)"]
    squeeze = f"m = Squeeze <axes=[{ax}]> (mean)" if squeeze_attr else "m = Squeeze (mean, ax)"  # opset < 13: an attribute
    lines = ["xr = Reshape (x, to4)"] + reductions + [squeeze]
    consts = {"to4": np.array(xr, np.int64), "back": np.array(shape, np.int64), "ax": np.array(axes, np.int64),
              "ax0": np.array([0], np.int64),
              "ones": np.ones(xr[1], np.float32) if bn_scale is None else bn_scale, "zeros": np.zeros(xr[1], np.float32),
              "gamma": rng.standard_normal(shape[-k:]).astype(np.float32) if gamma is None else gamma,
              "beta": rng.standard_normal(shape[-k:]).astype(np.float32) if beta is None else beta}
    if count == "chain":
        prod = "rp = ReduceProd <keepdims=0> (ga, ax0)" if axes_input else "rp = ReduceProd <axes=[0], keepdims=0> (ga)"
        lines += ["sh = Shape (xr)", "ga = Gather (sh, ax)", prod, "n = Cast <to=1> (rp)", "v = Div (rss, n)"]
    else:
        consts["n"] = np.array(count, np.float32)
        lines.append("v = Div (rss, n)")
    bn_attrs = ", ".join(([f"epsilon={eps!r}"] if eps is not None else []) + ([bn_attrs] if bn_attrs else []))
    lines += [f"bn = BatchNormalization {f'<{bn_attrs}>' if bn_attrs else ''} (xr, ones, zeros, m, v)",
              "r = Reshape (bn, back)"]
    tail = {"both": ["g = Mul (r, gamma)", "y = Add (g, beta)"], "scale": ["y = Mul (r, gamma)"],
            "bias": ["y = Add (r, beta)"], "none": ["y = Identity (r)"]}[affine]
    body = "\n      ".join(lines + tail + ([extra] if extra else []))
    text = f"""g (float[{dims}] x) => (float[{dims}] y{extra_out}) {{
      {body}
    }}"""
    used = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    model = build(text, opset=opset, **{k: v for k, v in consts.items() if k in used})
    if names:  # tf2onnx names every node after its Keras layer
        for node in model.graph.node:
            node.name = f"model/ln/{node.op_type}_{node.output[0]}"
    return model


def ln_sites(report, status=None, reason=None):
    return [s for s in sites(report, status, reason) if s.pass_name == "layernorm"]


@pytest.mark.parametrize("shape, k", [((2, 4, 8), 1), ((2, 3, 4, 5), 2), ((3, 8), 1)])
@pytest.mark.parametrize("affine", ["both", "scale", "bias", "none"])
def test_tf_keras_batchnorm_layernorm_fuses(shape, k, affine):
    model = tf_keras_bn_layernorm(shape=shape, k=k, affine=affine)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"] + (["Identity"] if affine == "none" else [])
    [site] = ln_sites(report)
    assert site.status == "fused" and site.kind == "LayerNorm (tf_keras fused, through BatchNormalization)"
    node = folded.graph.node[0]
    assert node.name == "model/ln/LayerNormalization" and site.created == [node.name]
    assert (onnx_attr(node, "axis"), onnx_attr(node, "stash_type")) == (-k, 1)
    assert onnx_attr(node, "epsilon") == pytest.approx(1e-3)
    assert site.detail == f"{len(site.nodes)} nodes fused into LayerNormalization (axis={-k}, epsilon=0.001)"
    # gamma and beta are read where they stand when they already have the normalized shape
    want = [["x", "gamma", "beta"], ["x", "gamma"], ["x", "model/ln.scale", "beta"], ["x", "model/ln.scale"]]
    assert list(node.input) == want[["both", "scale", "bias", "none"].index(affine)]


def test_tf_keras_batchnorm_layernorm_with_a_constant_count_fuses():
    folded, report, _ = fold_and_compare(tf_keras_bn_layernorm(count=8.0), atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]
    assert "Shape" not in "".join(ln_sites(report)[0].nodes)


@pytest.mark.parametrize("options, reason, detail", [
    ({"count": 7.0}, "non-constant-parameters",
     "model/ln/Div_v: the divisor [7.] is not the count 8 of the normalized axes"),
    ({"xr": [1, 4, 16, 1]}, "unsupported-axis", "the reshape to [1, 4, 16, 1] does not normalize trailing axes of [2, 4, 8]"),
    ({"bn_scale": np.full(8, 2, np.float32)}, "non-constant-parameters",
     "model/ln/BatchNormalization_bn: scale and bias must be the constants 1 and 0"),
    ({"eps": 0.0}, "invalid-statistics", "epsilon 0.0 is not positive"),
    ({"gamma": np.ones((4, 1), np.float32)}, "not-per-channel",
     "gamma of shape [4, 1] does not broadcast like the normalized shape [8]"),
    ({"beta": np.ones((4, 1), np.float32), "affine": "bias"}, "not-per-channel",
     "beta of shape [4, 1] does not broadcast like the normalized shape [8]"),
    ({"opset": 16}, "opset-too-old",
     "LayerNormalization needs opset 17; the model has opset 16 (rerun with --target-opset 17)"),
    ({"extra": "z = Identity (v)", "extra_out": ", float[8] z"}, "intermediate-used-elsewhere",
     "'v' inside the LayerNorm is also used outside it"),
])
def test_tf_keras_batchnorm_layernorm_left_says_why(options, reason, detail):
    model = tf_keras_bn_layernorm(**options)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = ln_sites(report)
    assert (site.status, site.reason, site.detail) == ("left", reason, detail)
    assert site.kind == "LayerNorm (tf_keras fused, through BatchNormalization)"


def test_tf_keras_batchnorm_layernorm_without_an_epsilon_attribute_uses_its_default():
    folded, _, _ = fold_and_compare(tf_keras_bn_layernorm(eps=None), atol=1e-5, rtol=1e-5)
    assert onnx_attr(folded.graph.node[0], "epsilon") == pytest.approx(1e-5)


def _axes_input(model, op, index, value):
    node = next(n for n in model.graph.node if n.op_type == op)
    model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), f"{op}_axes"))
    node.input[index] = f"{op}_axes"


def _axes_attribute(model, op, value):
    node = next(n for n in model.graph.node if n.op_type == op)
    node.attribute.remove(next(a for a in node.attribute if a.name == "axes"))
    node.attribute.append(onnx.helper.make_attribute("axes", value))


@pytest.mark.parametrize("what, change", [
    ("mean", lambda m: _axes_attribute(m, "ReduceMean", [0, 2])),
    ("sum of squares", lambda m: _axes_attribute(m, "ReduceSumSquare", [0, 1, 2])),
    ("count", lambda m: _axes_input(m, "Gather", 1, [0, 2])),
    ("count", lambda m: _axes_input(m, "Gather", 1, 2)),  # a scalar index
    ("squeeze", lambda m: _axes_input(m, "Squeeze", 1, [0, 3])),
])
def test_tf_keras_batchnorm_layernorm_over_other_axes_is_left(what, change):
    """Each of the four places the axes are written must say 0, 2, 3 (the shapes no longer agree
    after such a change; the check reads the axes, not the shapes)."""
    model = tf_keras_bn_layernorm()
    change(model)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 4, 8]))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = ln_sites(report)
    assert (site.reason, site.detail) == ("unsupported-axis",
                                          f"the {what} does not run over axes [0, 2, 3] of the reshaped input")


def test_tf_keras_batchnorm_layernorm_with_negative_axes_fuses():
    model = tf_keras_bn_layernorm()
    _axes_attribute(model, "ReduceMean", [0, -2, -1])
    _axes_input(model, "Squeeze", 1, [-4, 2, -1])
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]


@pytest.mark.parametrize("training_mode, outputs", [(1, []), (None, ["rm"]), (None, ["", "rv"])])
def test_tf_keras_batchnorm_layernorm_in_training_mode_is_left(training_mode, outputs):
    """training_mode=1 (its optional outputs omitted), or a running statistic written."""
    model = tf_keras_bn_layernorm()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.output.extend(outputs)
    if training_mode:
        bn.attribute.append(onnx.helper.make_attribute("training_mode", training_mode))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 4, 8]))
    folded, report = normfold.fold(model)
    [site] = ln_sites(report)
    assert (site.reason, site.detail) == ("training-mode", "model/ln/BatchNormalization_bn runs in training mode")


@pytest.mark.parametrize("tail", ["y = Mul (r, w)", "y = Mul (r, r)"])
def test_tf_keras_batchnorm_layernorm_followed_by_a_mul_of_no_constant_keeps_it(tail):
    model = tf_keras_bn_layernorm(affine="none")
    ident = next(n for n in model.graph.node if n.op_type == "Identity")
    model.graph.node.remove(ident)
    model.graph.node.append(onnx.helper.make_node("Mul", ["r", tail.split("(")[1].split(", ")[1].rstrip(")")], ["y"]))
    model.graph.input.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [2, 4, 8]))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization", "Mul"]
    assert [n.op_type for n in folded.graph.node if "r" in n.input] == ["Mul"]


@pytest.mark.parametrize("dims", [None, ["N", 4, 8]])
def test_tf_keras_batchnorm_layernorm_on_an_input_of_unknown_shape_is_left(dims):
    model = tf_keras_bn_layernorm()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.ClearField("shape")
        if dims is not None:
            value.type.tensor_type.shape.CopyFrom(onnx.helper.make_tensor_type_proto(1, dims).tensor_type.shape)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = ln_sites(report)
    assert (site.reason, site.detail) == ("unknown-shape", "the shapes around the tf_keras LayerNorm could not be inferred")


@pytest.mark.parametrize("anchor, prefix", [("", "LayerNorm"), ("mean_op", "mean_op"), ("a/b/ReduceMean", "a/b")])
def test_tf_keras_batchnorm_layernorm_is_named_after_its_mean_and_stands_where_its_add_stood(anchor, prefix):
    affine = (1, 1, 8)  # not the normalized shape [8]: new initializers, named after the prefix
    model = tf_keras_bn_layernorm(names=False, gamma=np.full(affine, 2, np.float32), beta=np.ones(affine, np.float32),
                                  extra="u = Relu (x)", extra_out=", float[2,4,8] u")
    next(n for n in model.graph.node if n.op_type == "ReduceMean").name = anchor
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.node.remove(relu)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    model.graph.node.insert(list(model.graph.node).index(add), relu)  # between the Mul and the Add
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Relu", "LayerNormalization"]
    node = folded.graph.node[1]
    assert node.name == f"{prefix}/LayerNormalization"
    assert list(node.input) == ["x", f"{prefix}.scale", f"{prefix}.bias"]


def test_tf_keras_batchnorm_layernorm_with_axes_as_inputs_fuses():
    folded, _, _ = fold_and_compare(tf_keras_bn_layernorm(axes_input=True, opset=18), atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]


def test_tf_keras_batchnorm_layernorm_with_squeeze_axes_as_an_attribute_is_read():
    """Squeeze-11 takes its axes as an attribute: at opset 12 they are read (right: only the opset is
    the reason), and after --target-opset 17 the site fuses."""
    model = tf_keras_bn_layernorm(squeeze_attr=True, opset=12)
    _, report = normfold.fold(model)
    assert [s.reason for s in ln_sites(report)] == ["opset-too-old"]
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, target_opset=17)
    assert ops(folded) == ["LayerNormalization"]


def test_tf_keras_batchnorm_layernorm_with_a_count_of_several_values_is_left():
    model = tf_keras_bn_layernorm(count=8.0)
    n = next(t for t in model.graph.initializer if t.name == "n")
    n.CopyFrom(numpy_helper.from_array(np.full(5, 8.0, np.float32), "n"))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 4, 8]))
    folded, report = normfold.fold(model)
    [site] = ln_sites(report)
    assert (site.reason, site.detail) == ("non-constant-parameters", "model/ln/Div_v: the divisor [8. 8. 8. 8.] is "
                                                                     "not the count 8 of the normalized axes")


def test_tf_keras_batchnorm_layernorm_over_the_batch_too_is_left():
    """Reshape to [1, 1, N*T*D, 1]: no leading axes left, not tf_keras' LayerNorm (its axes never
    include the batch)."""
    model = tf_keras_bn_layernorm(xr=[1, 1, 64, 1])
    folded, report = normfold.fold(model)
    [site] = ln_sites(report)
    assert (site.reason, site.detail) == ("unsupported-axis", "the reshape to [1, 1, 64, 1] does not normalize "
                                                              "trailing axes of [2, 4, 8]")


def test_tf_keras_batchnorm_layernorm_with_a_gamma_of_more_axes_than_x_is_left():
    model = tf_keras_bn_layernorm(affine="scale")
    gamma = next(t for t in model.graph.initializer if t.name == "gamma")
    gamma.CopyFrom(numpy_helper.from_array(np.ones((1, 1, 1, 8), np.float32), "gamma"))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = ln_sites(report)
    assert (site.reason, site.detail) == ("not-per-channel", "gamma of shape [1, 1, 1, 8] does not broadcast like "
                                                             "the normalized shape [8]")


def _rewritten(model, **replace):
    """`model` with node outputs renamed by `replace` (old output -> new node text) applied in place."""
    for old, (op, inputs) in replace.items():
        node = next(n for n in model.graph.node if n.output[0] == old)
        i = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(i, onnx.helper.make_node(op, inputs, [old]))
    return model


@pytest.mark.parametrize("case", ["reduceprod of a cast", "shape of another tensor", "divisor not a count",
                                  "no squeeze", "no reshape", "no batchnorm", "batchnorm of other statistics",
                                  "an add for the sub"])
def test_tf_keras_batchnorm_layernorm_lookalikes_are_computed_as_they_are(case):
    """Moments and a BatchNormalization that are not tf_keras' LayerNorm: no such site, and the model
    computes what it did (a count of another tensor's shape divides by 4, not 8)."""
    extra_inputs = []
    model = tf_keras_bn_layernorm()
    if case == "reduceprod of a cast":  # the Cast before the ReduceProd: a spelling the matcher does not read
        _rewritten(model, rp=("Cast", ["ga"]), n=("ReduceProd", ["rp"]))
        next(n for n in model.graph.node if n.output[0] == "rp").attribute.append(onnx.helper.make_attribute("to", 1))
        next(n for n in model.graph.node if n.output[0] == "n").attribute.extend(
            [onnx.helper.make_attribute("axes", [0]), onnx.helper.make_attribute("keepdims", 0)])
    elif case == "shape of another tensor":
        _rewritten(model, sh=("Shape", ["z"]))
        extra_inputs.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 8, 4, 1]))
    elif case == "divisor not a count":
        _rewritten(model, n=("Relu", ["w"]))
        extra_inputs.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [1]))
    elif case == "no squeeze":
        _rewritten(model, m=("Reshape", ["mean", "m_shape"]))
        model.graph.initializer.append(numpy_helper.from_array(np.array([8], np.int64), "m_shape"))
    elif case == "no reshape":
        model = tf_keras_bn_layernorm(shape=(1, 8, 8, 1), xr=[1, 8, 8, 1], k=2)
        _rewritten(model, xr=("Identity", ["x"]))
    elif case == "no batchnorm":
        _rewritten(model, bn=("Add", ["xr", "xr"]))
    elif case == "an add for the sub":
        _rewritten(model, d=("Add", ["xr", "mean"]))
    else:
        _rewritten(model, bn=("BatchNormalization", ["xr", "ones", "zeros", "zeros", "ones"]))
    model.graph.input.extend(extra_inputs)
    onnx.checker.check_model(model, full_check=True)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert not [s for s in report.sites if s.kind == "LayerNorm (tf_keras fused, through BatchNormalization)"]


def test_tf_keras_batchnorm_layernorm_with_one_gamma_for_every_value_fuses():
    model = tf_keras_bn_layernorm(gamma=np.full(1, 2, np.float32), beta=np.full(1, 0.5, np.float32))
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]
