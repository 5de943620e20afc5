"""Decomposed LayerNorm -> LayerNormalization, in the spellings exporters write."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normfold
from builders import build, fold_and_compare, ops, sites

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
      ve = Add (var, eps)
      std = Sqrt (ve)
      {norm}
      {tail}
      {extra}
    }}"""
    consts.setdefault("gamma", GAMMA)
    consts.setdefault("beta", BETA)
    consts = {k: v for k, v in consts.items() if k in text.replace("(", " ").replace(")", " ").replace(",", " ").split()}
    if "two" in text:
        consts["two"] = np.float32(2.0)
    consts["eps"] = np.float32(eps)
    return build(text, opset=opset, **consts)


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("normalize", ["Div", "Reciprocal"])
@pytest.mark.parametrize("affine", ["both", "swapped", "scale", "none"])
def test_spellings_fuse_into_one_layernormalization(square, normalize, affine):
    model = torch_layernorm(square=square, normalize=normalize, affine=affine)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    expected = ["LayerNormalization"] + (["Identity"] if affine == "none" else [])
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
