"""The norm recognisers (normfold/passes/norms.py) match what a subgraph computes: every spelling
exporters write is a case here, not a code path. README's spelling list is checked against
SPELLINGS (test_readme_lists_exactly_the_tested_spellings)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normfold
from builders import build, fold_and_compare, ops, run

D = 16
RNG = np.random.default_rng(11)
GAMMA = (1 + 0.5 * RNG.standard_normal(D)).astype(np.float32)
BETA = RNG.standard_normal(D).astype(np.float32)
CONSTS = dict(gamma=GAMMA, beta=BETA, eps=np.float32(1e-5), two=np.float32(2), half=np.float32(-0.5),
              one=np.float32(1), n=np.float32(D), inv_n=np.float32(1 / D), zero=np.float32(0), ax=np.array([-1]), ax2=np.array([-2]))
README = Path(__file__).parents[1] / "README.md"

# name -> (family, graph body computing y from x[2,5,16]); constants from CONSTS.
SPELLINGS = {
    "torchscript": ("layernorm", """
        m = ReduceMean (x, ax)
        d = Sub (x, m)
        sq = Pow (d, two)
        v = ReduceMean (sq, ax)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        nrm = Div (d, sd)
        g = Mul (nrm, gamma)
        y = Add (g, beta)"""),
    "keras-factored": ("layernorm", """
        m = ReduceMean (x, ax)
        d = Sub (x, m)
        sq = Mul (d, d)
        v = ReduceMean (sq, ax)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        r = Reciprocal (sd)
        g = Mul (r, gamma)
        xg = Mul (x, g)
        nm = Neg (m)
        mg = Mul (nm, g)
        sh = Add (mg, beta)
        y = Add (xg, sh)"""),
    "keras-moments-stopgradient": ("layernorm", """
        m = ReduceMean (x, ax)
        sg = Identity (m)
        d = Sub (x, sg)
        sq = Mul (d, d)
        v = ReduceMean (sq, ax)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        r = Reciprocal (sd)
        g = Mul (r, gamma)
        xg = Mul (x, g)
        nm = Neg (m)
        mg = Mul (nm, g)
        sh = Add (beta, mg)
        y = Add (xg, sh)"""),
    "keras-no-center": ("layernorm", """
        m = ReduceMean (x, ax)
        sg = Identity (m)
        d = Sub (x, sg)
        sq = Mul (d, d)
        v = ReduceMean (sq, ax)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        r = Reciprocal (sd)
        xr = Mul (x, r)
        nm = Neg (m)
        mr = Mul (nm, r)
        y = Add (xr, mr)"""),
    "tf-keras-nonfused": ("layernorm", """
        m = ReduceMean (x, ax)
        d = Sub (x, m)
        sq = Mul (d, d)
        v = ReduceMean (sq, ax)
        ve = Add (eps, v)
        sd = Sqrt (ve)
        r = Reciprocal (sd)
        g = Mul (gamma, r)
        xg = Mul (x, g)
        mg = Mul (m, g)
        sh = Sub (beta, mg)
        y = Add (xg, sh)"""),
    "raw-moments-clamped": ("layernorm", """
        m = ReduceMean (x, ax)
        xx = Mul (x, x)
        ex2 = ReduceMean (xx, ax)
        mm = Mul (m, m)
        v0 = Sub (ex2, mm)
        v = Max (v0, zero)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        d = Sub (x, m)
        nrm = Div (d, sd)
        g = Mul (nrm, gamma)
        y = Add (g, beta)"""),
    "sums-over-a-count": ("layernorm", """
        s = ReduceSum (x, ax)
        m = Div (s, n)
        d = Sub (x, m)
        ss = ReduceSumSquare <keepdims=1> (d, ax)
        v = Mul (ss, inv_n)
        ve = Add (v, eps)
        r = Pow (ve, half)
        nrm = Mul (d, r)
        g = Mul (gamma, nrm)
        y = Add (g, beta)"""),
    "weighted-moments-ones-mask": ("layernorm", """
        shp = Shape (x)
        mask = ConstantOfShape <value=float[1] {1.0}> (shp)
        zl = ConstantOfShape (shp)
        mx = Mul (mask, x)
        sx = ReduceSum (mx, ax)
        w = Add (mask, zl)
        sw = ReduceSum (w, ax)
        q = Div (sx, sw)
        nz = Equal (sw, zero)
        m = Where (nz, zero, q)
        d = Sub (x, m)
        sq = Mul (d, d)
        wsq = Mul (mask, sq)
        sv = ReduceSum (wsq, ax)
        q2 = Div (sv, sw)
        v = Where (nz, zero, q2)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        r = Div (one, sd)
        g = Mul (r, gamma)
        xg = Mul (x, g)
        mg = Mul (m, g)
        sh = Sub (beta, mg)
        y = Add (xg, sh)"""),
    "llama": ("rmsnorm", """
        sq = Pow (x, two)
        ms = ReduceMean (sq, ax)
        mse = Add (ms, eps)
        sd = Sqrt (mse)
        r = Div (one, sd)
        nrm = Mul (x, r)
        y = Mul (gamma, nrm)"""),
    "rms-reduce-sum-square": ("rmsnorm", """
        ss = ReduceSumSquare <keepdims=1> (x, ax)
        ms = Div (ss, n)
        mse = Add (ms, eps)
        r = Pow (mse, half)
        nrm = Mul (x, r)
        y = Mul (nrm, gamma)"""),
    "gemma-one-plus-weight": ("rmsnorm", """
        xx = Mul (x, x)
        ms = ReduceMean (xx, ax)
        mse = Add (ms, eps)
        sd = Sqrt (mse)
        r = Reciprocal (sd)
        w1 = Add (one, gamma)
        rg = Mul (r, w1)
        y = Mul (x, rg)"""),
}


def spelling_model(name: str) -> onnx.ModelProto:
    _, body = SPELLINGS[name]
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    return build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{{body}\n}}", opset=18, **used)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_is_one_fused_op_with_the_same_outputs(name):
    family, _ = SPELLINGS[name]
    model = spelling_model(name)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, target_opset=23)
    op = {"layernorm": "LayerNormalization", "rmsnorm": "RMSNormalization"}[family]
    assert ops(folded) == [op], report.to_text(verbose=True)
    [site] = report.sites
    assert site.pass_name == family and site.status == "fused"


def test_readme_lists_exactly_the_tested_spellings():
    """README's list of LayerNorm/RMSNorm spellings is this module's SPELLINGS, name for name."""
    section = README.read_text().split("<!-- spellings -->")[1].split("<!-- /spellings -->")[0]
    listed = set(re.findall(r"`([a-z0-9-]+)`", section))
    assert listed == set(SPELLINGS)


# ---- spellings composed at random: any mix is the same site ------------------------------------
MEANS = {"mean": "{o} = ReduceMean ({i}, ax)", "sum": "{o}_s = ReduceSum ({i}, ax)\n{o} = Div ({o}_s, n)",
         "sum-times": "{o}_s = ReduceSum ({i}, ax)\n{o} = Mul (inv_n, {o}_s)"}
INVERSE = {"div": "{o}_sd = Sqrt ({i})\n{o} = Div (one, {o}_sd)", "recip": "{o}_sd = Sqrt ({i})\n{o} = Reciprocal ({o}_sd)",
           "pow": "{o} = Pow ({i}, half)"}


@settings(max_examples=60, deadline=None)
@given(mean=st.sampled_from(sorted(MEANS)), var_mean=st.sampled_from(sorted(MEANS)),
       square=st.sampled_from(["pow", "mul", "sumsquare"]), inverse=st.sampled_from(sorted(INVERSE)),
       eps_first=st.booleans(), identity=st.booleans(), shift=st.sampled_from(["sub", "neg-add"]),
       affine=st.sampled_from(["after", "into-r", "factored"]), beta=st.booleans())
def test_any_mix_of_spellings_is_one_layernormalization(mean, var_mean, square, inverse, eps_first, identity, shift,
                                                       affine, beta):
    lines = [MEANS[mean].format(o="m", i="x")]
    mm = "m"
    if identity:
        lines.append("mi = Identity (m)")
        mm = "mi"
    lines.append(f"d = Sub (x, {mm})" if shift == "sub" else f"nm0 = Neg ({mm})\nd = Add (nm0, x)")
    if square == "sumsquare":
        lines.append("ss = ReduceSumSquare <keepdims=1> (d, ax)\nv = Div (ss, n)")
    else:
        lines.append("sq = Pow (d, two)" if square == "pow" else "sq = Mul (d, d)")
        lines.append(MEANS[var_mean].format(o="v", i="sq"))
    lines.append("ve = Add (eps, v)" if eps_first else "ve = Add (v, eps)")
    lines.append(INVERSE[inverse].format(o="r", i="ve"))
    tail = "yb" if beta else "y"
    if affine == "after":
        lines.append(f"nrm = Mul (d, r)\n{tail} = Mul (nrm, gamma)")
    elif affine == "into-r":
        lines.append(f"rg = Mul (gamma, r)\n{tail} = Mul (rg, d)")
    else:  # x * (r g) + (-m) * (r g)
        lines.append(f"rg = Mul (r, gamma)\nxg = Mul (x, rg)\nnm = Neg (m)\nmg = Mul (nm, rg)\n{tail} = Add (xg, mg)")
    if beta:
        lines.append("y = Add (yb, beta)")
    body = "\n".join(lines)
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n{body}\n}}", opset=18, **used)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"], report.to_text(verbose=True)


# ---- what is not a norm is never fused, and a norm-like computation is never silent -------------
def _variant(name: str, old: str, new: str, **extra) -> onnx.ModelProto:
    _, body = SPELLINGS[name]
    assert old in body
    body = body.replace(old, new)
    used = {k: v for k, v in {**CONSTS, **extra}.items() if re.search(rf"\b{k}\b", body)}
    return build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{{body}\n}}", opset=23, **used)


@pytest.mark.parametrize("name, old, new, why", [
    ("torchscript", "ve = Add (v, eps)", "ve = Max (v, eps)", "max(var, eps) is not var + eps"),
    ("torchscript", "v = ReduceMean (sq, ax)", "v = ReduceMean (sq, ax2)", "mean and variance over other axes"),
    ("llama", "sq = Pow (x, two)", "sq = Pow (x, three)", "a mean cube is no mean square"),
    ("llama", "r = Div (one, sd)", "r = Div (one, mse)", "1 / mean square, not its root"),
    ("keras-factored", "mg = Mul (nm, g)", "mg = Mul (nm, r)", "the shift without gamma"),
])
def test_a_near_norm_is_left_unrecognized_with_its_ops(name, old, new, why):
    model = _variant(name, old, new, three=np.float32(3))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model), why
    left = [s for s in report.sites if s.status == "left"]
    assert [s.reason for s in left] == ["unrecognized-pattern"], (why, report.to_text(verbose=True))
    assert " -> " in left[0].detail  # the op sequence, for the user


def test_a_norm_with_a_non_constant_gamma_is_reported():
    model = build(f"""g (float[2,5,{D}] x, float[{D}] w) => (float[2,5,{D}] y) {{
        sq = Pow (x, two)
        ms = ReduceMean (sq, ax)
        mse = Add (ms, eps)
        r = Pow (mse, half)
        nrm = Mul (x, r)
        y = Mul (nrm, w)
    }}""", opset=18, two=CONSTS["two"], eps=CONSTS["eps"], half=CONSTS["half"], ax=CONSTS["ax"])
    folded, report = normfold.fold(model, normfold.FoldOptions(target_opset=23))
    # the normalized part is an RMSNorm with gamma 1; the Mul by the graph input w stays after it
    assert ops(folded) == ["RMSNormalization", "Mul"]
    assert folded.graph.node[1].input[1] == "w"


@pytest.mark.parametrize("axes, fused", [("[2]", False), ("[-1]", True)])
def test_unknown_rank_fuses_only_axes_known_to_be_trailing(axes, fused):
    """With X's rank unknown, axis 2 may or may not be the last one: never read as trailing. A
    negative axis is trailing at any rank."""
    model = build(f"""g (float[2,5,{D}] x0) => (float[2,5,{D}] y) {{
        x = Identity (x0)
        m = ReduceMean <axes={axes}> (x)
        d = Sub (x, m)
        sq = Mul (d, d)
        v = ReduceMean <axes={axes}> (sq)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        nrm = Div (d, sd)
        y = Mul (nrm, gamma)
    }}""", opset=17, eps=CONSTS["eps"], gamma=GAMMA)
    model.graph.ClearField("value_info")
    # hide X's rank from shape inference: its input declared without a shape
    model.graph.input[0].type.tensor_type.ClearField("shape")
    folded, report = normfold.fold(model)
    if fused:
        assert ops(folded) == ["LayerNormalization"]  # the Identity in front joins the site
        feeds = {"x0": np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)}
        np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    else:
        assert "LayerNormalization" not in ops(folded)
        [site] = [s for s in report.sites if s.pass_name == "layernorm"]
        assert site.status == "left" and site.reason in ("unknown-shape", "unrecognized-pattern")


def test_norm_output_read_by_a_second_tensor_stops_the_site_before_it():
    """y = LN(x) + z with z a graph input: the LayerNorm is fused, the Add of z stays."""
    _, body = SPELLINGS["torchscript"]
    body = body.replace("y = Add (g, beta)", "yb = Add (g, beta)\n        y = Add (yb, z)")
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x, float[2,5,{D}] z) => (float[2,5,{D}] y) {{{body}\n}}", opset=18, **used)
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization", "Add"]


@pytest.mark.parametrize("name, old, new, pass_name", [
    ("torchscript", "ve = Add (v, eps)", "ve = Max (v, eps)", "layernorm"),
    ("llama", "r = Div (one, sd)", "r = Div (one, mse)", "rmsnorm"),
])
def test_a_near_norm_is_reported_by_the_catch_all_of_its_family(monkeypatch, name, old, new, pass_name):
    """NormLike(centered) reports the statistics no rule of its family explains, under that
    family's pass. The rules are built afresh here (passes.RULES is built at import)."""
    from normfold import api
    from normfold.passes import _rules

    monkeypatch.setattr(api, "RULES", _rules())
    folded, report = normfold.fold(_variant(name, old, new))
    [site] = report.sites
    assert (site.pass_name, site.status, site.reason) == (pass_name, "left", "unrecognized-pattern")
    assert site.kind == f"{ {'layernorm': 'LayerNorm', 'rmsnorm': 'RMSNorm'}[pass_name]}-like (unrecognized spelling)"
    assert site.output in {o for n in folded.graph.node for o in n.output}


def _named(model: onnx.ModelProto, output: str, name: str) -> onnx.ModelProto:
    [node] = [n for n in model.graph.node if n.output[0] == output]
    node.name = name
    return model


@pytest.mark.parametrize("spelling, first, anchor, prefix", [
    ("torchscript", "m", "enc/blk/ReduceMean", "enc/blk"), ("torchscript", "m", "mean_op", "mean_op"),
    ("torchscript", "m", "", "LayerNorm"), ("llama", "ms", "", "RMSNorm"), ("llama", "ms", "a/b/c", "a/b"),
])
def test_the_fused_op_and_its_parameters_are_named_after_the_anchor_s_scope(spelling, first, anchor, prefix):
    """The first reduction's scope (its name up to the last '/') names the fused op and its
    parameters; an unscoped name is the prefix itself, no name the family's."""
    model = _named(spelling_model(spelling), first, anchor)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, target_opset=23)
    [node] = folded.graph.node
    assert node.name == f"{prefix}/{node.op_type}"
    assert list(node.input[1:]) == [f"{prefix}.scale"] + ([f"{prefix}.bias"] if spelling == "torchscript" else [])
    assert report.sites[0].created == [node.name]


TRANSPOSED = """
        t = Transpose <perm=[0, 2, 1]> (x)
        m = ReduceMean (t, ax)
        d = Sub (t, m)
        sq = Mul (d, d)
        v = ReduceMean (sq, ax)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        nrm = Div (d, sd)
        y = Mul (nrm, gamma)"""


@pytest.mark.parametrize("residual", [False, True])
def test_a_norm_of_a_transposed_input_reads_that_transpose_once(residual):
    """The statistics read X through a Transpose: the fused op reads a Transpose of X, the model's
    own when something else reads it too (a residual), else a new one named after the site."""
    body = TRANSPOSED + ("\n        z = Add (t, y)" if residual else "")
    out = "z" if residual else "y"
    model = build(f"g (float[2,{D},5] x) => (float[2,5,{D}] {out}) {{{body}\n}}", opset=18,
                  ax=CONSTS["ax"], eps=CONSTS["eps"], gamma=GAMMA)
    model = _named(model, "m", "blk/ReduceMean")
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Transpose", "LayerNormalization"] + (["Add"] if residual else [])
    transpose, ln = folded.graph.node[:2]
    assert ln.input[0] == transpose.output[0]
    assert transpose.name == ("" if residual else "blk/Transpose")
    moved = "" if residual else ", on the input's Transpose [0, 2, 1] moved in front of it"
    assert report.sites[0].detail == f"{8 if residual else 9} nodes fused into LayerNormalization (axis=-1, epsilon=1e-05{moved})"


@pytest.mark.parametrize("spelling, options, detail, rounding", [
    ("torchscript", {}, "9 nodes fused into LayerNormalization (axis=-1, epsilon=1e-05)", None),
    ("llama", {"target_opset": 23}, "7 nodes fused into RMSNormalization (axis=-1, epsilon=1e-05)", 0.0),
    ("llama", {"allow_contrib": True},
     "7 nodes fused into com.microsoft.SimplifiedLayerNormalization (axis=-1, epsilon=1e-05)", 0.0),
])
def test_the_report_says_what_the_site_became(spelling, options, detail, rounding):
    """The detail names the op (with its domain), its axis and epsilon; the parameters' rounding is
    reported for every RMSNorm and for a LayerNorm only when there was any (a float32 gamma is exact)."""
    # onnxruntime without optimizations has no kernel for the contrib op: the report only
    _, report = normfold.fold(spelling_model(spelling), normfold.FoldOptions(**options))
    [site] = report.sites
    assert site.detail == detail and site.max_rounding == rounding
    assert (site.kind, site.output) == ({"torchscript": "LayerNorm", "llama": "RMSNorm"}[spelling] + " (decomposed)", "y")
    contrib = ["uses com.microsoft.SimplifiedLayerNormalization: the model needs the opset import com.microsoft:1"]
    assert site.notes == (contrib if "allow_contrib" in options else [])


def test_a_double_layernorm_normalizes_with_stash_type_1():
    """LayerNormalization's stash_type is 1 whatever the input type (RMSNormalization's follows it)."""
    body = SPELLINGS["torchscript"][1]
    consts = {k: np.asarray(v, np.float64) if v.dtype == np.float32 else v for k, v in CONSTS.items()
              if re.search(rf"\b{k}\b", body)}
    model = build(f"g (double[2,5,{D}] x) => (double[2,5,{D}] y) {{{body}\n}}", opset=18, **consts)
    folded, _, _ = fold_and_compare(model, atol=1e-7, rtol=1e-7)
    [ln] = folded.graph.node
    assert [onnx.helper.get_attribute_value(a) for a in ln.attribute if a.name == "stash_type"] == [1]


def test_the_fused_op_stands_where_the_norm_s_last_node_stood():
    model = spelling_model("torchscript")
    model.graph.node.insert(len(model.graph.node) - 1, onnx.helper.make_node("Relu", ["x"], ["side"], name="side"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [2, 5, D]))
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Relu", "LayerNormalization"]


def test_a_transposed_input_normalized_over_a_middle_axis_says_both_transposes():
    body = TRANSPOSED.replace("ax)", "ax2)")
    model = build(f"g (float[2,{D},5] x) => (float[2,5,{D}] y) {{{body}\n}}", opset=18,
                  ax2=CONSTS["ax2"], eps=CONSTS["eps"], gamma=GAMMA[:5].reshape(5, 1))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, allow_transpose=True)
    assert ops(folded) == ["Transpose", "Transpose", "LayerNormalization", "Transpose"]
    assert report.sites[0].detail.endswith("between Transposes [0, 2, 1] and back, on the input's Transpose "
                                           "[0, 2, 1] moved in front of it)")


def _torchscript(out_dims: str = f"2,5,{D}", x_dims: str = f"2,5,{D}", opset: int = 18, **consts):
    """The TorchScript LayerNorm (SPELLINGS) with other constants or shapes."""
    body = SPELLINGS["torchscript"][1]
    used = {k: v for k, v in {**CONSTS, **consts}.items() if re.search(rf"\b{k}\b", body)}
    return build(f"g (float[{x_dims}] x) => (float[{out_dims}] y) {{{body}\n}}", opset=opset, **used)


@pytest.mark.parametrize("model, options, reason, detail", [
    (lambda: _torchscript(f"2,2,5,{D}", gamma=np.stack([GAMMA, 2 * GAMMA]).reshape(2, 1, 1, D)), {},
     "not-per-channel", f"gamma of shape [2, 1, 1, {D}] has more axes than the input"),
    (lambda: _torchscript(f"2,2,5,{D}", beta=np.stack([BETA, 2 * BETA]).reshape(2, 1, 1, D)), {},
     "not-per-channel", f"beta of shape [2, 1, 1, {D}] has more axes than the input"),
    (lambda: _torchscript(ax=np.array([-2]), gamma=GAMMA[:5].reshape(5, 1), beta=BETA[:5].reshape(5, 1)), {},
     "unsupported-axis", "reduction over axes [1] of a rank-3 tensor: the fused op normalizes trailing axes only "
     "(--allow-transpose wraps it in a Transpose pair)"),
    (lambda: _variant("llama", "ax)", "ax2)", gamma=GAMMA[:5].reshape(5, 1)), {"target_opset": 23},
     "unsupported-axis", "reduction over axes [1] of a rank-3 tensor: the fused op normalizes trailing axes only"),
    (lambda: _torchscript(f"2,5,{D}", f"2,5,{D}", gamma=np.float32(1.5), beta=np.float32(0.5)), {}, None, None),
    (lambda: _torchscript(gamma=np.resize(GAMMA, (5, D))), {}, "not-per-channel",
     f"gamma of shape [5, {D}] varies along axes that are not normalized ([-1])"),
    (lambda: _torchscript("2,5,d", "2,5,d", ax=np.array([-2, -1]), gamma=GAMMA[:5].reshape(5, 1),
                          beta=BETA[:5].reshape(5, 1)), {}, "unknown-shape",
     "the size of the normalized axes could not be inferred"),
    (lambda: _torchscript("2,5,d", "2,5,d", gamma=np.float32(1.5), beta=np.float32(0.5)), {}, "unknown-shape",
     "the size of the normalized axes could not be inferred"),
    (lambda: _torchscript("2,5,d", "2,5,d", gamma=np.float32([1.5]), beta=np.float32([0.5])), {}, "unknown-shape",
     "the size of the normalized axes could not be inferred"),
])
def test_a_norm_the_fused_op_cannot_express_is_left_with_its_reason(model, options, reason, detail):
    folded, report = normfold.fold(model(), normfold.FoldOptions(**options))
    [site] = report.sites
    assert (site.reason, site.detail if reason else None) == (reason, detail), report.to_text(verbose=True)


@pytest.mark.parametrize("size", [2, D])
def test_a_dynamic_normalized_axis_takes_its_size_from_gamma(size):
    """The last axis is dynamic: gamma's own shape, all of it larger than 1, is the normalized shape."""
    model = _torchscript("2,5,d", "2,5,d", gamma=GAMMA[:size], beta=BETA[:size])
    folded, report = normfold.fold(model)
    assert ops(folded) == ["LayerNormalization"], report.to_text(verbose=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, size)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_an_unknown_rank_with_a_middle_axis_is_left_unknown_shape():
    model = _torchscript(ax=np.array([-2]), gamma=GAMMA[:5].reshape(5, 1), beta=BETA[:5].reshape(5, 1))
    model.graph.ClearField("value_info")
    model.graph.input[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    _, report = normfold.fold(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("unknown-shape", "the rank of 'x' could not be inferred")


def test_a_norm_over_two_axes_takes_a_gamma_of_the_last_one():
    model = _torchscript(ax=np.array([-2, -1]))
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"]


def test_parameters_computed_in_float64_report_their_rounding():
    """gamma multiplied in twice: the product is computed exactly, then stored in float32, and the
    report gives that rounding."""
    model = _variant("llama", "y = Mul (gamma, nrm)", "yg = Mul (gamma, nrm)\n        y = Mul (yg, gamma)")
    _, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    [site] = report.sites
    exact = GAMMA.astype(np.float64) ** 2
    assert site.max_rounding == float(np.max(np.abs(exact.astype(np.float32).astype(np.float64) - exact))) > 0


def _with_reader(nodes: list, outputs: list = (), value_info: list = ()) -> onnx.ModelProto:
    """The TorchScript LayerNorm with extra nodes reading its tensors (and extra graph outputs)."""
    model = spelling_model("torchscript")
    model.graph.node.extend(nodes)
    model.graph.output.extend(outputs)
    model.graph.value_info.extend(value_info)
    return model


INT64 = onnx.TensorProto.INT64


@pytest.mark.parametrize("domain", ["", "ai.onnx"])
def test_a_shape_of_an_intermediate_that_nothing_reads_does_not_stop_the_fusion(domain):
    """Shape(d) computes an integer that goes nowhere: no reader of d's value (either spelling of
    the default domain)."""
    model = _with_reader([onnx.helper.make_node("Shape", ["d"], ["shp"], domain=domain)],
                         value_info=[onnx.helper.make_tensor_value_info("shp", INT64, [3])])
    folded, report = normfold.fold(model)
    assert [s.status for s in report.sites] == ["fused"], report.to_text(verbose=True)


@pytest.mark.parametrize("case", ["graph-output", "to-float", "custom-domain"])
def test_an_integer_reader_of_an_intermediate_whose_result_escapes_keeps_the_norm(case):
    """Shape(d) whose result is a graph output, or becomes a float, or an op of another domain
    (its output declared int64): d's value is read outside the norm, which stays as it was."""
    shape = onnx.helper.make_tensor_value_info("shp", INT64, [3])
    nodes, outputs, value_info = [onnx.helper.make_node("Shape", ["d"], ["shp"])], [], []
    if case == "graph-output":
        outputs = [shape]
    elif case == "to-float":
        nodes.append(onnx.helper.make_node("Cast", ["shp"], ["shf"], to=onnx.TensorProto.FLOAT))
        outputs = [onnx.helper.make_tensor_value_info("shf", onnx.TensorProto.FLOAT, [3])]
    else:
        nodes = [onnx.helper.make_node("Size2", ["d"], ["shp"], domain="custom")]
        value_info = [shape]  # an integer nothing reads, but what the op does with d is unknown
    model = _with_reader(nodes, outputs, value_info)
    if case == "custom-domain":
        model.opset_import.append(onnx.helper.make_opsetid("custom", 1))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    reader = "Size2(shp)" if case == "custom-domain" else "Shape(shp)"
    assert (site.reason, site.detail) == ("intermediate-used-elsewhere",
                                          f"'d' inside the norm is also used outside it (read by {reader})")


@pytest.mark.parametrize("length, fused", [(16, True), (17, False)])
def test_integer_readers_of_an_intermediate_are_followed_16_deep(length, fused):
    """Shape(d) then a chain of integer Identities that ends nowhere: followed up to 16 readers
    deep (then it counts as a reader of d's value)."""
    chain = [onnx.helper.make_node("Shape", ["d"], ["i0"])]
    chain += [onnx.helper.make_node("Identity", [f"i{k}"], [f"i{k + 1}"]) for k in range(length)]
    folded, report = normfold.fold(_with_reader(chain))
    assert [s.status for s in report.sites] == ["fused" if fused else "left"], report.to_text(verbose=True)


def test_a_layernorm_reports_the_rounding_of_gamma_when_it_has_a_beta():
    model = _variant("torchscript", "g = Mul (nrm, gamma)", "g0 = Mul (nrm, gamma)\n        g = Mul (g0, gamma)")
    _, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    exact = GAMMA.astype(np.float64) ** 2
    assert report.sites[0].max_rounding == float(np.max(np.abs(exact.astype(np.float32) - exact))) > 0


def test_a_negative_epsilon_is_left_invalid_statistics():
    _, report = normfold.fold(_torchscript(eps=np.float32(-1e-5)))
    [site] = report.sites
    assert site.reason == "invalid-statistics"
    assert re.fullmatch(r"epsilon -[0-9.e-]+ is negative or not finite", site.detail), site.detail


# ---- what a refused site names: its reason, its detail and its nodes ------------------------------
def _labels(model: onnx.ModelProto, outputs: list[str]) -> list[str]:
    """The report's names of the nodes writing `outputs` (unnamed nodes: `Op(output)`), in graph order."""
    return [f"{n.op_type}({n.output[0]})" for n in model.graph.node if n.output[0] in outputs]


TORCHSCRIPT_TENSORS = ["m", "d", "sq", "v", "ve", "sd", "nrm", "g", "y"]


def test_a_refused_norm_names_all_its_nodes():
    """A LayerNorm left because an intermediate is read outside it is reported with every node of
    the norm (so that no other rule offers them again), not only its first reduction."""
    model = spelling_model("torchscript")
    model.graph.output.append(onnx.helper.make_tensor_value_info("sq", onnx.TensorProto.FLOAT, [2, 5, D]))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("intermediate-used-elsewhere", "'sq' inside the norm is also used outside it (a graph output)")
    assert site.nodes == _labels(model, TORCHSCRIPT_TENSORS)
    assert (site.kind, site.output) == ("LayerNorm (decomposed)", "m")  # a refusal is placed at its reduction


@pytest.mark.parametrize("where", ["normalized", "everything"])
def test_a_norm_that_reads_another_tensor_it_cancels_is_not_fused(where):
    """z added then subtracted again: the algebra cancels it (the value is a norm of x alone), but
    the nodes still read z. After the centering only ("normalized"), the norm is found through the
    variance and left, naming x; across the whole norm ("everything") the walk stops at d + z, the
    first tensor that reads z, and what is left is the mean subtracted."""
    body = SPELLINGS["torchscript"][1]
    if where == "normalized":
        body = body.replace("nrm = Div (d, sd)", "dz = Add (d, z)\n        dd = Sub (dz, z)\n        nrm = Div (dd, sd)")
    else:
        body = body.replace("sq = Pow (d, two)", "dz = Add (d, z)\n        dd = Sub (dz, z)\n        sq = Pow (dd, two)")
        body = body.replace("nrm = Div (d, sd)", "nrm = Div (dd, sd)")
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x, float[2,5,{D}] z) => (float[2,5,{D}] y) {{{body}\n}}", opset=18, **used)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    if where == "normalized":
        assert (site.kind, site.reason, site.detail) == (
            "LayerNorm (decomposed)", "unrecognized-pattern", "the norm at ReduceMean(m) reads tensors other than 'x'")
    else:
        assert (site.kind, site.reason) == ("LayerNorm-like (unrecognized spelling)", "unrecognized-pattern")
        assert site.detail.startswith("ReduceMean(m) subtracts a mean like a LayerNorm"), site.detail


def _identity_chain(n: int, outputs: int) -> onnx.ModelProto:
    """x -> i1 -> ... -> in (Identities) -> the TorchScript LayerNorm of in; the first `outputs`
    Identities' results are graph outputs as well."""
    body = SPELLINGS["torchscript"][1].replace("(x,", f"(i{n},")
    chain = "\n".join(f"        i{k} = Identity ({'x' if k == 1 else f'i{k - 1}'})" for k in range(1, n + 1))
    outs = "".join(f", float[2,5,{D}] i{k}" for k in range(1, outputs + 1))
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    return build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y{outs}) {{\n{chain}{body}\n}}", opset=18, **used)


@pytest.mark.parametrize("outputs, detail", [
    (2, "['i1', 'i2'] inside the norm are also used outside it"),
    (4, "tensors inside the norm at ReduceMean(m) are used outside it"),
])
def test_a_norm_whose_input_is_read_at_several_points_of_an_identity_chain_is_left(outputs, detail):
    """X read elsewhere through Identities at several points: each such tensor is X, and the norm
    could read any; with two of them the report lists both, and after four it stops looking."""
    model = _identity_chain(4, outputs)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("intermediate-used-elsewhere", detail)


# ---- a mean subtracted that no norm explains is said, with the ops after it ----------------------
def _centering_model(mean: str, after: list[str], shape: str = f"2,5,{D}") -> onnx.ModelProto:
    """x - (a mean of x spelled `mean`, written into m), then the unary ops `after` in a chain."""
    lines = [mean, "d = Sub (x, m)"]
    last = "d"
    for k, op in enumerate(after):
        lines.append(f"a{k} = {op} ({last})")
        last = f"a{k}"
    lines.append(f"y = Identity ({last})")
    body = "\n        ".join(lines)
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    return build(f"g (float[{shape}] x) => (float[{shape}] y) {{\n        {body}\n}}", opset=18, **used)


@pytest.mark.parametrize("mean, shape, ops_before", [
    ("m = ReduceMean (x, ax)", f"2,5,{D}", "ReduceMean -> Sub"),
    ("s = ReduceSum (x, ax)\n        m = Div (s, n)", f"2,5,{D}", "ReduceSum -> Sub"),
    ("m = GlobalAveragePool (x)", "2,3,4,4", "GlobalAveragePool -> Sub"),
    ("xx = Mul (x, x)\n        m = ReduceMean (xx, ax)", f"2,5,{D}", "ReduceMean -> Sub"),  # x - mean(x^2)
])
def test_a_mean_subtracted_from_x_then_no_norm_is_reported_with_the_ops_after_it(mean, shape, ops_before):
    """Every reduction a mean is spelled with, also a mean of what x squares: the centering is
    reported with the value-flow ops after the Sub (each once), up to eleven of them."""
    model = _centering_model(mean, ["Neg", "Cast <to=1>"], shape)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.kind, site.reason) == ("LayerNorm-like (unrecognized spelling)", "unrecognized-pattern")
    reduction = next(n for n in model.graph.node if n.op_type in ("ReduceMean", "ReduceSum", "GlobalAveragePool"))
    assert site.detail == (f"{reduction.op_type}({reduction.output[0]}) subtracts a mean like a LayerNorm, but the "
                           f"nodes after it are not a norm normfold can prove ({ops_before} -> Neg -> Cast -> Identity)")


def test_the_ops_listed_after_a_mean_subtraction_stop_at_eleven():
    _, report = normfold.fold(_centering_model("m = ReduceMean (x, ax)", ["Neg"] * 13))
    [site] = report.sites
    assert site.detail.endswith("(ReduceMean -> Sub" + " -> Neg" * 11 + ")"), site.detail


@pytest.mark.parametrize("case", ["mean-times-x", "relu-of-mean", "mean-read-25th"])
def test_what_is_no_mean_subtraction_is_not_reported(case):
    """x * mean(x) subtracts nothing; x - relu(mean(x)) subtracts no mean (Relu is no value-flow op
    the walk follows); a mean subtracted from the 25th tensor after its reduction is past the first
    24 the centering looks at."""
    if case == "mean-times-x":
        body = "m = ReduceMean (x, ax)\n y = Mul (x, m)"
    elif case == "relu-of-mean":
        body = "m = ReduceMean (x, ax)\n r = Relu (m)\n y = Sub (x, r)"
    else:  # m's 24th reader is the Identity the Sub reads: the 25th tensor after the reduction
        readers = "\n".join(f" n{k} = Neg (m)" for k in range(1, 24))
        body = f"m = ReduceMean (x, ax)\n{readers}\n j = Identity (m)\n y = Sub (x, j)"
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n {body}\n}}", opset=18, ax=CONSTS["ax"])
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and report.sites == [], report.to_text(verbose=True)


def test_a_statistic_reached_through_diamonds_counts_each_tensor_once():
    """m - m... computed through five diamonds (Neg and Identity of the same tensor, added): each
    tensor is one step of the walk, so the Sub after them is within its reach and reported."""
    lines, last = ["m = ReduceMean (x, ax)"], "m"
    for k in range(5):
        lines += [f"p{k} = Neg ({last})", f"q{k} = Identity ({last})", f"s{k} = Add (p{k}, q{k})", f"t{k} = Add (s{k}, {last})"]
        last = f"t{k}"
    body = "\n ".join(lines + [f"y = Sub (x, {last})"])
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n {body}\n}}", opset=18, ax=CONSTS["ax"])
    _, report = normfold.fold(model)
    assert [s.reason for s in report.sites] == ["unrecognized-pattern"], report.to_text(verbose=True)


@pytest.mark.parametrize("readers, reason", [(254, "intermediate-used-elsewhere"), (255, "unrecognized-pattern")])
def test_the_walk_after_a_reduction_stops_past_256_tensors(readers, reason):
    """The mean read by the norm's Sub and by `readers` Negs outside it: with 256 tensors after the
    reduction the walk goes on and finds the norm (left: its mean is read outside); 257 end the walk
    there, and what is seen is a mean subtracted."""
    model = spelling_model("torchscript")
    extra = [onnx.helper.make_node("Neg", ["m"], [f"side{k}"]) for k in range(readers)]
    nodes = list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes[:2] + extra + nodes[2:])  # after the Sub: the Sub is the mean's first reader
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert [s.reason for s in report.sites] == [reason], report.to_text(verbose=True)


@pytest.mark.parametrize("name, op", [("torchscript", "LayerNormalization"), ("llama", "RMSNormalization")])
def test_a_bfloat16_norm_with_an_epsilon_fuses_with_its_parameters_in_bfloat16(name, op):
    """bfloat16 constants (numpy kind "V", ml_dtypes) are read like any float: the epsilon is one,
    so the norm is a site (it was `unrecognized-pattern`), and gamma, beta and epsilon are the model's
    own bfloat16 values. (onnxruntime's CPU has no bfloat16 kernels for these ops: no run here.)"""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    body = SPELLINGS[name][1]
    used = {k: (v.astype(bf16) if v.dtype == np.float32 else v) for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : 23]>\n'
                                    f"g (bfloat16[2,5,{D}] x) => (bfloat16[2,5,{D}] y) {{{body}\n}}")
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in used.items())
    onnx.checker.check_model(model, full_check=True)
    folded, report = normfold.fold(model)
    assert ops(folded) == [op], report.to_text(verbose=True)
    [node] = folded.graph.node
    eps = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "epsilon"))
    assert eps == np.float32(float(used["eps"]))
    params = {t.name: t for t in folded.graph.initializer}
    scale = params[node.input[1]]
    assert scale.data_type == onnx.TensorProto.BFLOAT16
    assert np.array_equal(onnx.numpy_helper.to_array(scale).astype(np.float32), used["gamma"].astype(np.float32))
    if op == "LayerNormalization":
        assert np.array_equal(onnx.numpy_helper.to_array(params[node.input[2]]).astype(np.float32),
                              used["beta"].astype(np.float32))


# ---- the recogniser's bounds and guards, one case each (tests/mutation/SURVIVORS.md) ---------------
def _chain(op: str, n: int, body_input: str = "x") -> str:
    """x -> c1 -> ... -> cn through `op` nodes (each a node of its own), as ONNX text lines."""
    return "\n".join(f"        c{k} = {op} ({'x' if k == 1 else f'c{k - 1}'})" for k in range(1, n + 1))


@pytest.mark.parametrize("n, fused_input", [(16, "x"), (17, "c1")])
def test_x_is_read_through_at_most_sixteen_identities(n, fused_input):
    """The tensor a reduction takes statistics of is found behind up to eight Identities, and the
    tensor behind that one behind eight more: with seventeen, the first stays and the fused op reads it."""
    body = SPELLINGS["torchscript"][1].replace("(x,", f"(c{n},")
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n{_chain('Identity', n)}{body}\n}}", opset=18, **used)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Identity"] * (n - 16) + ["LayerNormalization"], report.to_text(verbose=True)
    assert folded.graph.node[-1].input[0] == fused_input
    assert report.sites[0].detail == "25 nodes fused into LayerNormalization (axis=-1, epsilon=1e-05)"


@pytest.mark.parametrize("n, fused_input", [(8, "x"), (9, "c1")])
def test_x_is_read_through_at_most_eight_transposes(n, fused_input):
    """Behind up to eight Transposes (here eight swaps: X itself): with nine, the tensor behind
    the first stays the fused op's input."""
    body = SPELLINGS["torchscript"][1].replace("(x,", f"(c{n},")
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    chain = _chain("Transpose <perm=[1, 0, 2]>", n)
    model = build(f"g (float[5,5,{D}] x) => (float[5,5,{D}] y) {{\n{chain}{body}\n}}", opset=18, **used)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Transpose"] * (n - 8) + ["LayerNormalization"], report.to_text(verbose=True)
    assert folded.graph.node[-1].input[0] == fused_input


def test_a_norm_whose_input_is_doubled_thirty_times_is_read_in_linear_time():
    """x added to itself thirty times, then scaled back by 2^-30 (exact in float32): the nodes computing
    the norm from x are collected once each, not once per path to them (2^30 paths)."""
    chain = "\n".join(f"        x{k} = Add ({'x' if k == 1 else f'x{k - 1}'}, {'x' if k == 1 else f'x{k - 1}'})"
                      for k in range(1, 31))
    body = SPELLINGS["torchscript"][1].replace("d = Sub (x, m)", "xs = Mul (x30, back)\n        d = Sub (xs, m)")
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n{chain}{body}\n}}", opset=18,
                  back=np.float32(2.0 ** -30), **used)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"], report.to_text(verbose=True)
    assert report.sites[0].detail == "40 nodes fused into LayerNormalization (axis=-1, epsilon=1e-05)"


def test_a_norm_that_cancels_an_earlier_fused_norm_is_fused_with_the_op_that_rewrite_wrote():
    """x2 = -x's LayerNorm is fused first; the second norm adds and subtracts its result. Its nodes
    include the op the first rewrite wrote (in no node list of the model yet): they are ordered too."""
    first = SPELLINGS["torchscript"][1].replace("(x,", "(nx,")
    for t in TORCHSCRIPT_TENSORS:
        first = re.sub(rf"\b{t}\b", f"{t}1", first)
    second = SPELLINGS["torchscript"][1].replace("nrm = Div (d, sd)",
                                                 "dz = Add (d, y1)\n        dd = Sub (dz, y1)\n        nrm = Div (dd, sd)")
    body = f"\n        nx = Neg (x){first}{second}"
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{{body}\n}}", opset=18, **used)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"], report.to_text(verbose=True)
    assert [s.status for s in report.sites] == ["fused", "fused"]
    assert report.sites[1].detail == "13 nodes fused into LayerNormalization (axis=-1, epsilon=1e-05)"


def test_a_mean_subtracted_from_a_refused_norm_s_centered_tensor_is_reported_too():
    """d = x - mean(x) is read outside the LayerNorm by d - mean(d): the LayerNorm is left (d is used
    elsewhere), and the second centering, whose reduction reads d itself, is reported as one."""
    body = SPELLINGS["torchscript"][1] + "\n        m2 = ReduceMean (d, ax)\n        e = Sub (d, m2)\n        z = Neg (e)"
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y, float[2,5,{D}] z) {{{body}\n}}", opset=18, **used)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert [(s.kind, s.reason, s.detail) for s in report.sites] == [
        ("LayerNorm (decomposed)", "intermediate-used-elsewhere",
         "'d' inside the norm is also used outside it (read by ReduceMean(m2), Sub(e))"),
        ("LayerNorm-like (unrecognized spelling)", "unrecognized-pattern",
         "ReduceMean(m2) subtracts a mean like a LayerNorm, but the nodes after it are not a norm normfold can "
         "prove (ReduceMean -> Sub -> Neg)")]


@pytest.mark.parametrize("tail", ["y = Div (x, ms)", "y = Div (x, mse)"])
def test_x_divided_by_its_mean_square_without_a_root_is_reported(tail):
    """x / mean(x^2) (or + eps): a mean square under a negative power, next to x in the same product,
    is a norm's statistic in a spelling no form explains."""
    body = f"sq = Mul (x, x)\n        ms = ReduceMean (sq, ax)\n        mse = Add (ms, eps)\n        {tail}"
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n        {body}\n}}", opset=18, **used)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.kind, site.reason) == ("RMSNorm-like (unrecognized spelling)", "unrecognized-pattern")
    assert site.detail.startswith("ReduceMean(ms) takes a mean square and its inverse square root like a norm"), site.detail


def test_a_statistic_of_a_statistic_of_x_is_reported():
    """mean(x * rms(x))^-1/2 (the inner rms over another axis, its epsilon under the root): the mean
    square of x sits inside the root inside the outer mean. Both reductions are reported, the inner
    one at its root, the outer one for the moment nested in it."""
    body = """sq = Mul (x, x)
        ms = ReduceMean (sq, ax2)
        mse = Add (ms, eps)
        rms = Sqrt (mse)
        xr = Mul (x, rms)
        m2 = ReduceMean (xr, ax)
        r2 = Pow (m2, half)
        y = Mul (x, r2)"""
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n        {body}\n}}", opset=18, **used)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert [(s.reason, s.nodes, s.output) for s in report.sites] == [
        ("unrecognized-pattern", ["ReduceMean(ms)", "Add(mse)", "Sqrt(rms)"], "rms"),
        ("unrecognized-pattern", ["ReduceMean(m2)", "Pow(r2)"], "r2")]
    assert report.sites[1].detail == ("ReduceMean(m2) takes a mean square and its inverse square root like a norm, "
                                      "but what it computes is not a LayerNorm or RMSNorm normfold can prove "
                                      "(ReduceMean -> Pow)")


# ---- mixed precision: which type the fused op runs in, and which Casts stay ------------------------
def _used(body: str) -> dict:
    return {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}


def test_a_norm_whose_input_type_is_unknown_is_left_unknown_shape():
    """X written by an op of another domain (no type for it, nor for what the norm computes from it):
    the fused op's type cannot be chosen."""
    body = SPELLINGS["torchscript"][1].replace("(x,", "(x2,")
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : 18, "custom": 1]>\n'
                                    f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n x2 = custom.Foo (x){body}\n}}")
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in _used(body).items())
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.kind, site.reason, site.detail) == (
        "LayerNorm (decomposed)", "unknown-shape", "the element types around the norm at ReduceMean(m) could not be inferred")


def test_a_cast_of_x_to_its_own_type_joins_the_fused_op():
    """Cast(to=FLOAT) of a float32 X rounds nothing: no rounding point to keep, so it goes with the
    norm (no Cast stays, no note)."""
    body = SPELLINGS["torchscript"][1].replace("(x,", "(c,")
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n c = Cast <to=1> (x){body}\n}}", opset=18, **_used(body))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["LayerNormalization"] and folded.graph.node[0].input[0] == "x"
    assert report.sites[0].notes == []


def test_a_float16_norm_without_gamma_rounding_its_inverse_rms_is_one_float16_op():
    """float16 X widened for the statistics, the inverse RMS cast back before x * r, no gamma: there
    is nothing to scale after the rounding, so the fused op is float16 (no Casts stay, no note)."""
    body = """xf = Cast <to=1> (x)
        sq = Mul (xf, xf)
        ms = ReduceMean (sq, ax)
        mse = Add (ms, eps)
        r = Pow (mse, half)
        r16 = Cast <to=10> (r)
        y = Mul (x, r16)"""
    model = build(f"g (float16[2,5,{D}] x) => (float16[2,5,{D}] y) {{\n {body}\n}}", opset=23, **_used(body))
    folded, report, _ = fold_and_compare(model, atol=1e-2, rtol=1e-2)
    assert ops(folded) == ["RMSNormalization"] and folded.graph.node[0].input[0] == "x"
    [scale] = folded.graph.initializer
    assert scale.data_type == onnx.TensorProto.FLOAT16
    assert report.sites[0].notes == []


@pytest.mark.parametrize("last_cast", [False, True])
def test_a_norm_that_reads_float16_and_writes_float32_runs_in_float32_after_the_model_s_cast(last_cast):
    """Cast(f32) of a float16 X, then a float32 LayerNorm (and a Cast to float32 of its float32
    result, which rounds nothing): the model's widening Cast stays, the op reads it and writes y."""
    body = SPELLINGS["torchscript"][1].replace("(x,", "(xf,")
    if last_cast:
        body = body.replace("y = Add (g, beta)", "yb = Add (g, beta)\n        y = Cast <to=1> (yb)")
    model = build(f"g (float16[2,5,{D}] x) => (float[2,5,{D}] y) {{\n xf = Cast <to=1> (x){body}\n}}", opset=18,
                  **_used(body))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Cast", "LayerNormalization"]
    assert list(folded.graph.node[1].input[:1]) == ["xf"] and folded.graph.node[1].output[0] == "y"
    [site] = report.sites
    assert site.detail == f"{10 if last_cast else 9} nodes fused into LayerNormalization (axis=-1, epsilon=1e-05)"
    assert site.notes == ["the model's Casts stay around the fused op: it normalizes and scales in FLOAT"]


def test_a_norm_that_reads_float32_and_writes_float16_keeps_its_last_cast():
    body = SPELLINGS["torchscript"][1].replace("y = Add (g, beta)", "yb = Add (g, beta)\n        y = Cast <to=10> (yb)")
    model = build(f"g (float[2,5,{D}] x) => (float16[2,5,{D}] y) {{{body}\n}}", opset=18, **_used(body))
    folded, report, _ = fold_and_compare(model, atol=1e-3, rtol=1e-3)
    assert ops(folded) == ["LayerNormalization", "Cast"] and folded.graph.node[0].input[0] == "x"
    assert report.sites[0].notes == ["the model's Casts stay around the fused op: it normalizes and scales in FLOAT"]


def test_a_float16_norm_widened_behind_an_identity_is_left_with_its_types():
    """float16 X -> Identity -> Cast(f32) -> the norm in float32 -> Cast(f16): the widening Cast does
    not read X itself, so no op can start at the model's rounding point; left, saying the types."""
    body = SPELLINGS["torchscript"][1].replace("(x,", "(xf,").replace(
        "y = Add (g, beta)", "yb = Add (g, beta)\n        y = Cast <to=10> (yb)")
    model = build(f"g (int32[2,5,{D}] xi) => (float16[2,5,{D}] y) {{\n x = Cast <to=10> (xi)\n xid = Identity (x)\n"
                  f" xf = Cast <to=1> (xid){body}\n}}", opset=18, **_used(body))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("unsupported-dtype", "the norm at ReduceMean(m) reads FLOAT16 and writes "
                                          "FLOAT16 with rounding points the fused op cannot reproduce")


STATS_OF_X_REST_OF_ITS_TRANSPOSE = """
        t = Transpose <perm=[0, 2, 1]> (x)
        m = ReduceMean (x, ax1)
        mt = Transpose <perm=[0, 2, 1]> (m)
        d = Sub (t, mt)
        sq = Mul (d, d)
        v = ReduceMean (sq, ax)
        ve = Add (v, eps)
        sd = Sqrt (ve)
        nrm = Div (d, sd)
        y = Mul (nrm, gamma)
        z = Add (t, y)"""


@pytest.mark.parametrize("also_out", ["", "d"])
def test_a_norm_whose_mean_reads_x_and_the_rest_its_transpose_read_elsewhere(also_out):
    """The mean is taken of X, everything else reads Transpose(X), which a residual Add reads too:
    that Transpose is X read through the norm's own permutation, so the fused op reads it (it stays).
    Another tensor of the norm read outside (d) still leaves the norm."""
    outs = f"float[2,5,{D}] z" + (f", float[2,5,{D}] {also_out}" if also_out else "")
    model = build(f"g (float[2,{D},5] x) => ({outs}) {{{STATS_OF_X_REST_OF_ITS_TRANSPOSE}\n}}", opset=18,
                  ax=CONSTS["ax"], ax1=np.array([1]), eps=CONSTS["eps"], gamma=GAMMA)
    if also_out:
        folded, report = normfold.fold(model)
        assert ops(folded) == ops(model)
        [site] = report.sites
        assert (site.reason, site.detail) == ("intermediate-used-elsewhere",
                                              "'d' inside the norm is also used outside it (a graph output)")
        return
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Transpose", "LayerNormalization", "Add"]
    assert [list(n.input[:1]) for n in folded.graph.node] == [["x"], ["t"], ["t"]]
    assert report.sites[0].detail == "9 nodes fused into LayerNormalization (axis=-1, epsilon=1e-05)"


def test_an_intermediate_read_inside_a_subgraph_keeps_the_norm():
    """An If whose branch takes Shape(d): its int64 output goes nowhere, but what a subgraph does with
    d is not followed, so d counts as read outside the norm (fusing would leave the branch without d)."""
    model = spelling_model("torchscript")
    branch = onnx.helper.make_graph([onnx.helper.make_node("Shape", ["d"], ["s"])], "branch", [],
                                    [onnx.helper.make_tensor_value_info("s", INT64, [3])])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(onnx.helper.make_node("If", ["cond"], ["shp"], then_branch=branch, else_branch=branch))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("shp", INT64, [3]))
    onnx.checker.check_model(model, full_check=True)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("intermediate-used-elsewhere",
                                          "'d' inside the norm is also used outside it (read by If(shp))")


def test_an_rmsnorm_followed_by_a_bias_is_fused_without_it():
    """RMSNorm has no bias: x * r * gamma + b is an RMSNorm, then an Add that stays."""
    model = _variant("llama", "y = Mul (gamma, nrm)", "yg = Mul (gamma, nrm)\n        y = Add (yg, beta)")
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["RMSNormalization", "Add"]
    assert len(folded.graph.node[0].input) == 2 and report.sites[0].output == "yg"


@pytest.mark.parametrize("name, old, new, options", [
    ("torchscript", "g = Mul (nrm, gamma)", "g0 = Mul (nrm, big)\n        g = Mul (g0, big)", {}),
    # the dry run that decides whether to convert the opset checks the site too (outside fold's own
    # numpy error state): --allow-contrib writes an RMSNorm below opset 23
    ("llama", "y = Mul (gamma, nrm)", "y0 = Mul (big, nrm)\n        y = Mul (y0, big)",
     {"target_opset": 23, "allow_contrib": True}),
])
def test_a_float16_gamma_that_overflows_is_stored_as_inf_without_a_warning(name, old, new, options):
    """gamma multiplied in twice (300 * 300 > 65504): the product, exact in float64, is infinite in
    float16 (as the model's own second Mul is); stored so, the rounding reported infinite, and no
    numpy overflow warning escapes fold()."""
    import warnings

    body = SPELLINGS[name][1].replace(old, new)
    consts = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in _used(body).items()}
    model = build(f"g (float16[2,5,{D}] x) => (float16[2,5,{D}] y) {{{body}\n}}", opset=18,
                  big=np.full(D, 300, np.float16), **consts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded, report = normfold.fold(model, normfold.FoldOptions(**options))
    assert ops(folded) == [{"torchscript": "LayerNormalization", "llama": "SimplifiedLayerNormalization"}[name]]
    scale = onnx.numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1]))
    assert scale.dtype == np.float16 and np.all(np.isposinf(scale))
    assert report.sites[0].max_rounding == float("inf")


def test_a_norm_over_an_empty_axis_has_no_rounding():
    """x of shape [2, 5, 0]: the normalized parameters are empty, and so is their rounding (none to report)."""
    model = _torchscript("2,5,0", "2,5,0", gamma=np.float32(2.0), beta=np.float32(1.0))
    folded, report = normfold.fold(model)
    assert ops(folded) == ["LayerNormalization"]
    [site] = report.sites
    assert (site.status, site.max_rounding) == ("fused", None)
    assert [onnx.numpy_helper.to_array(t).shape for t in folded.graph.initializer if t.name in folded.graph.node[0].input] \
        == [(0,), (0,)]


SHARED_CENTERING = """g (float[2,5,{D}] x) => (float[2,5,{D}] y1, float[2,5,{D}] y2) {{
        m = ReduceMean (x, ax)
        nm = Neg (m)
        d = Add (x, nm)
        q1 = Mul (d, d)
        v1 = ReduceMean (q1, ax)
        a1 = Add (v1, eps)
        s1 = Sqrt (a1)
        n1 = Div (d, s1)
        t1 = Mul (n1, gamma)
        y1 = Add (t1, beta)
        q2 = Mul (d, d)
        v2 = ReduceMean (q2, ax)
        a2 = Add (v2, eps2)
        s2 = Sqrt (a2)
        n2 = Div (d, s2)
        t2 = Mul (n2, gamma2)
        y2 = Add (t2, beta2)
}}"""


@pytest.mark.parametrize("centering, source", [
    ("d = Add (x, nm)", ""), ("d = Add (nm, x)", ""), ("d = Sub (x, m)", ""),
    ("d = Add (x, nm)", "x = Mul (inp, k)")], ids=["x+(-m)", "(-m)+x", "x-m", "x-computed"])
def test_two_layernorms_sharing_their_centering_are_both_reported(centering, source):
    """Two LayerNorms of one x (epsilons, gammas and betas of their own) whose mean and x - mean(x)
    a simplifier merged: neither can be fused without the other's nodes, and each is reported, naming
    the other's readers of d. (The second one's reduction, v2, reads d, which centers x: it is a
    LayerNorm of x, not an RMSNorm of d, and none of the first one's nodes. x may be computed by an op
    the algebra reads through: the centering is still of x.)"""
    rng = np.random.default_rng(5)
    text = SHARED_CENTERING.format(D=D).replace("d = Add (x, nm)", centering)
    if "nm" not in centering:
        text = text.replace("        nm = Neg (m)\n", "")
    if source:
        text = text.replace(f"g (float[2,5,{D}] x)", f"g (float[2,5,{D}] inp)").replace(
            "        m = ReduceMean (x, ax)", f"        {source}\n        m = ReduceMean (x, ax)")
    model = build(text, opset=18, ax=CONSTS["ax"], eps=CONSTS["eps"], k=np.array(1.5, np.float32),
                  eps2=np.array(1e-3, np.float32), gamma=GAMMA, beta=BETA,
                  gamma2=rng.uniform(0.5, 2, D).astype(np.float32), beta2=rng.standard_normal(D).astype(np.float32))
    folded, report = normfold.fold(model, normfold.FoldOptions(target_opset=23))
    assert ops(folded) == ops(model)
    readers = ["Mul(q1), Div(n1)", "Mul(q2), Div(n2)"]
    assert sorted((s.kind, s.status, s.reason, s.detail) for s in report.sites) == [
        ("LayerNorm (decomposed)", "left", "intermediate-used-elsewhere",
         f"'d' inside the norm is also used outside it (read by {r})") for r in readers]
    # each names its own statistics: the shared centering and one variance
    assert sorted(tuple(n for n in s.nodes if n.startswith("ReduceMean")) for s in report.sites) == [
        ("ReduceMean(m)", "ReduceMean(v1)"), ("ReduceMean(m)", "ReduceMean(v2)")]


@pytest.mark.parametrize("readers, output, said", [
    (1, False, "read by Relu(r0)"), (3, False, "read by Relu(r0), Relu(r1), Relu(r2)"),
    (4, False, "read by Relu(r0), Relu(r1), Relu(r2), ..."), (0, True, "a graph output"),
    (2, True, "a graph output and read by Relu(r0), Relu(r1)")])
def test_an_escaping_tensor_is_told_with_who_else_reads_it(readers, output, said):
    from normfold.graph import GraphView
    from normfold.passes.norms import _outside_use

    inside = onnx.helper.make_node("Neg", ["x"], ["d"])
    nodes = [inside, onnx.helper.make_node("Neg", ["d"], ["y"])] + [
        onnx.helper.make_node("Relu", ["d"], [f"r{i}"]) for i in range(readers)]
    outs = ["y"] + [f"r{i}" for i in range(readers)] + (["d"] if output else [])
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                   [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [2]) for o in outs])
    view = GraphView(graph)
    assert _outside_use(view, view.nodes[:2], "d") == said


@pytest.mark.parametrize("square", ["u = Mul (r, r)", "u = Pow (r, two)"])
def test_a_layernorm_of_a_square_fuses(square):
    """Primer's squared ReLU before a LayerNorm: the norm's X is the square itself (its reduction reads
    a square, like a variance's, but of nothing centered)."""
    body = f"r = Relu (x)\n        {square}\n" + SPELLINGS["torchscript"][1].replace("(x,", "(u,").replace("Sub (x,", "Sub (u,")
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n        {body}\n}}", opset=18, **used)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Relu", square.split()[2], "LayerNormalization"]
    assert [list(n.input[:1]) for n in folded.graph.node][-1] == ["u"]


def test_a_refused_norm_whose_cone_reads_another_tensor_names_the_nodes_up_to_its_output():
    """z added then subtracted inside the norm, and a residual Add of z after it: the norm is left
    once (its variance's reduction says nothing more), naming the nodes from its mean's reduction up
    to its output y, not the residual after it."""
    body = SPELLINGS["torchscript"][1].replace(
        "nrm = Div (d, sd)", "dz = Add (d, z)\n        dd = Sub (dz, z)\n        nrm = Div (dd, sd)") + "\n        w = Add (y, z)"
    used = {k: v for k, v in CONSTS.items() if re.search(rf"\b{k}\b", body)}
    model = build(f"g (float[2,5,{D}] x, float[2,5,{D}] z) => (float[2,5,{D}] w) {{{body}\n}}", opset=18, **used)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("unrecognized-pattern", "the norm at ReduceMean(m) reads tensors other than 'x'")
    assert site.nodes == ["ReduceMean(m)", "Sub(d)", "Pow(sq)", "Add(dz)", "ReduceMean(v)", "Add(ve)", "Sqrt(sd)",
                          "Div(nrm)", "Mul(g)", "Add(y)"]


def test_a_norm_of_a_constant_is_no_site():
    """An RMSNorm whose X is an initializer computes a constant: it is not a layer of the model but
    a job for constant folding (onnxruntime does it at load), so normfold neither fuses nor reports it."""
    body = """sq = Mul (c, c)
        ms = ReduceMean (sq, ax)
        mse = Add (ms, eps)
        rms = Sqrt (mse)
        n = Div (c, rms)
        y = Add (x, n)"""
    c = np.random.default_rng(9).standard_normal((1, 1, D)).astype(np.float32)
    model = build(f"g (float[2,5,{D}] x) => (float[2,5,{D}] y) {{\n        {body}\n}}", opset=23,
                  c=c, ax=CONSTS["ax"], eps=CONSTS["eps"])
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and report.sites == []
