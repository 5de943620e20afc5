"""Decomposed RMSNorm -> RMSNormalization (opset 23) or com.microsoft.SimplifiedLayerNormalization,
in the spellings exporters write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normfold
from builders import build, fold_and_compare, ops, sites
from normfold.api import FoldOptions, VerifyOptions, fold_file
from normfold.passes.norms import add_contrib_opset_import
from normfold.verify import compare_models

D = 16
GAMMA = np.random.default_rng(5).standard_normal(D).astype(np.float32)
MODELS = Path(__file__).parents[1] / "models"
TYPES = {"float": np.float32, "float16": np.float16, "double": np.float64}


def rms_model(square="Pow", reduce="input", normalize="DivOne", affine="first", casts="none", dtype="float",
              shape="2,5,16", axes="-1", opset=23, eps=1e-6, exponent=2.0, extra="", extra_out="", **consts):
    """An RMSNorm graph: [Cast] -> square -> mean -> Add(eps) -> inverse RMS -> Mul(x) -> [Cast] -> [gamma].

    casts: "none"; "lead" (a no-op Cast(to=FLOAT) whose output also feeds a residual Add outside the
    norm: TorchScript T5/Gemma); "llama" (lead plus a trailing no-op Cast); "fp16" (fp16 X, Cast to
    float, Cast back to float16, fp16 gamma; the residual reads the fp16 X)."""
    if casts == "fp16":
        dtype = "float16"
    compute = "float" if casts != "none" else dtype
    v = "x" if casts == "none" else "v"
    lines = [] if casts == "none" else [("v", "Cast <to=1> (x)")]
    lines.append(("sq", f"Pow ({v}, two)" if square == "Pow" else f"Mul ({v}, {v})"))
    lines.append(("ms", {"attr": f"ReduceMean <axes=[{axes}], keepdims=1> (sq)",
                         "input": "ReduceMean <keepdims=1> (sq, ax)",
                         "gap": "GlobalAveragePool (sq)"}[reduce]))
    lines.append(("mse", "Add (ms, eps)") if eps is not None else ("mse", None))  # None: no epsilon Add
    if normalize == "Rsqrt":
        lines.append(("r", "Pow (mse, mhalf)"))
    else:
        lines.append(("std", "Sqrt (mse)"))
        if normalize != "Div":
            lines.append(("r", "Reciprocal (std)" if normalize == "Reciprocal" else "Div (one, std)"))
    if normalize == "Div":
        lines.append(("n", f"Div ({v}, std)"))
    elif affine == "folded":
        lines += [("rg", "Mul (r, gamma)"), ("n", f"Mul ({v}, rg)")]
    else:
        lines.append(("n", f"Mul ({v}, r)"))
    if casts in ("llama", "fp16"):
        lines.append(("nc", f"Cast <to={10 if casts == 'fp16' else 1}> (n)"))
    last = lines[-1][0]
    if affine == "first":
        lines.append(("g", f"Mul (gamma, {last})"))
    elif affine == "second":
        lines.append(("g", f"Mul ({last}, gamma)"))
    lines[-1] = ("y", lines[-1][1])
    if eps is None:  # the inverse RMS reads the mean square itself
        lines = [(out, rhs.replace("(mse", "(ms")) for out, rhs in lines if rhs is not None]
    residual = casts != "none"
    if residual:
        lines.append(("z", f"Add ({'x' if casts == 'fp16' else 'v'}, y)"))
    body = "\n      ".join(f"{out} = {rhs}" for out, rhs in lines)
    result = "z" if residual else "y"
    text = f"""g ({dtype}[{shape}] x) => ({dtype}[{shape}] {result}{extra_out}) {{
      {body}
      {extra}
    }}"""
    ctype = TYPES[compute]
    norm_shape = [int(d) for d in shape.split(",")][-len(axes.split(",")):]
    defaults = {"two": np.array(exponent, ctype), "eps": np.array(eps or 0, ctype), "one": np.array(1.0, ctype),
                "mhalf": np.array(-0.5, ctype), "ax": np.array([int(a) for a in axes.split(",")], np.int64),
                "gamma": np.resize(GAMMA, norm_shape).astype(TYPES[dtype] if affine != "folded" else ctype)}
    words = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    consts = {k: v for k, v in {**defaults, **consts}.items() if k in words}
    return build(text, opset=opset, ir_version=10 if opset >= 21 else 8, **consts)


def rms_sites(report, status=None, reason=None):
    return [s for s in sites(report, status, reason) if s.pass_name == "rmsnorm"]


def tolerance(dtype):
    # double: the epsilon attribute is a float32, so eps=1e-3 moves the result by ~1e-10 relative
    return {"float": (1e-5, 1e-5), "float16": (1e-2, 1e-2), "double": (1e-7, 1e-7)}[dtype]


SPELLINGS = {
    # TorchScript Llama/Qwen2 at opset 14: axes attribute; the leading Cast also feeds the residual Add.
    "torchscript_llama_op14": dict(casts="llama", reduce="attr", opset=14),
    "torchscript_llama_op18": dict(casts="llama", reduce="input", opset=18),
    "torchscript_t5": dict(casts="lead", reduce="attr", opset=14),
    "torchscript_gemma": dict(casts="lead", reduce="attr", affine="second", opset=14),
    "torchscript_llama_fp16": dict(casts="fp16", reduce="attr", opset=14),
    "dynamo_llama": dict(normalize="Reciprocal", opset=18),
    "dynamo_nn_rmsnorm_positive_axes": dict(normalize="Reciprocal", affine="second", axes="2", opset=18),
    "dynamo_nn_rmsnorm_no_affine": dict(normalize="Reciprocal", affine="none", opset=18),
    "keras3_gap_op13": dict(square="Mul", reduce="gap", normalize="Reciprocal", affine="second", opset=13),
    "keras3_op18": dict(square="Mul", reduce="input", normalize="Reciprocal", affine="second", opset=18),
    "keras_gamma_into_rsqrt": dict(square="Mul", normalize="Reciprocal", affine="folded", opset=18),
    "flax_div": dict(square="Mul", normalize="Div", affine="second", opset=18),
    "rsqrt_pow": dict(normalize="Rsqrt", opset=18),
}


@pytest.mark.parametrize("spelling", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_exporter_spellings_fuse_into_one_rmsnormalization(spelling):
    model = rms_model(**spelling)
    atol, rtol = tolerance("float16" if spelling.get("casts") == "fp16" else "float")
    folded, report, _ = fold_and_compare(model, atol=atol, rtol=rtol, target_opset=23)
    casts = spelling.get("casts", "none")
    # The leading Cast stays when the residual reads it; fp16's Casts disappear into the fused op.
    expected = {"none": ["RMSNormalization"], "fp16": ["RMSNormalization", "Add"]}.get(
        casts, ["Cast", "RMSNormalization", "Add"])
    assert ops(folded) == expected
    assert [s.status for s in report.sites] == ["fused"]
    [node] = [n for n in folded.graph.node if n.op_type == "RMSNormalization"]
    assert node.domain == "" and node.input[0] == ("v" if casts in ("llama", "lead") else "x")
    assert [i.type.tensor_type.elem_type for i in folded.graph.input] == \
        [i.type.tensor_type.elem_type for i in model.graph.input]
    # Only a site whose Casts stay around the fused op says so (fp16 rounds before gamma: the op is fp16).
    assert not any("Casts stay" in note for note in report.sites[0].notes), report.sites[0].notes


def test_fp16_norm_with_gamma_applied_in_float32_keeps_its_casts():
    """Cast(f32) -> x * (r * gamma32) -> Cast(f16): gamma is applied in float32, so the fused op is
    float32 between the model's Casts, with the float32 gamma as it was (an fp16 op would round it
    and scale in fp16)."""
    model = rms_model(casts="fp16", affine="folded", reduce="input", opset=23)
    folded, report, _ = fold_and_compare(model, atol=1e-2, rtol=1e-2)
    assert ops(folded) == ["Cast", "RMSNormalization", "Cast", "Add"]
    [node] = [n for n in folded.graph.node if n.op_type == "RMSNormalization"]
    assert any("Casts stay around the fused op" in note for note in report.sites[0].notes)
    scale = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.name == node.input[1])
    assert scale.dtype == np.float32 and np.array_equal(scale, GAMMA)


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("normalize, affine", [
    (normalize, affine) for normalize in ["Div", "Reciprocal", "DivOne", "Rsqrt"]
    for affine in ["first", "second", "folded", "none"]
    if not (normalize == "Div" and affine == "folded")])  # Div(x, std) has no inverse RMS to take gamma
def test_every_combination_of_square_normalize_and_gamma(square, normalize, affine):
    folded, report, _ = fold_and_compare(rms_model(square=square, normalize=normalize, affine=affine),
                                         atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["RMSNormalization"]
    [node] = folded.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and attrs["stash_type"] == 1 and attrs["epsilon"] == pytest.approx(1e-6)


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(2, 4), data=st.data(), eps=st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3]),
       dtype=st.sampled_from(["float", "float16", "double"]), positive_axes=st.booleans(),
       affine=st.sampled_from(["first", "second", "folded", "none"]), seed=st.integers(0, 1000))
def test_trailing_axes_any_rank_eps_and_dtype(rank, data, eps, dtype, positive_axes, affine, seed):
    assume(TYPES[dtype](eps) > 0)  # 1e-12 is 0 in float16: that site is left (invalid-statistics)
    k = data.draw(st.integers(1, rank), label="k")
    dims = [2, 3, 4, 5][:rank]
    axes = list(range(rank - k, rank)) if positive_axes else list(range(-k, 0))
    g = np.random.default_rng(seed).standard_normal(dims[rank - k:])
    model = rms_model(dtype=dtype, shape=",".join(map(str, dims)), axes=",".join(map(str, axes)), eps=eps,
                      gamma=g.astype(TYPES[dtype]), normalize=data.draw(st.sampled_from(["Reciprocal", "Div"]))
                      if affine != "folded" else "Reciprocal", affine=affine)
    atol, rtol = tolerance(dtype)
    folded, report, _ = fold_and_compare(model, atol=atol, rtol=rtol)
    assert ops(folded) == ["RMSNormalization"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in folded.graph.node[0].attribute}
    assert attrs["axis"] == -k
    assert attrs["stash_type"] == (onnx.TensorProto.DOUBLE if dtype == "double" else onnx.TensorProto.FLOAT)
    scale = {t.name: t for t in folded.graph.initializer}[folded.graph.node[0].input[1]]
    assert list(scale.dims) == dims[rank - k:]
    assert scale.data_type == folded.graph.input[0].type.tensor_type.elem_type


def test_opset_too_old_is_left_with_the_opset_that_would_allow_it():
    model = rms_model(casts="llama", reduce="attr", opset=14)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert site.reason == "opset-too-old"
    assert "RMSNormalization needs opset 23; the model has opset 14 (rerun with --target-opset 23" in site.detail
    assert "--allow-contrib" in site.detail


def test_allow_contrib_below_opset_23_emits_com_microsoft_simplified_layernormalization():
    model = rms_model(casts="fp16", reduce="attr", opset=14)
    folded, report = normfold.fold(model, normfold.FoldOptions(allow_contrib=True))
    assert ops(folded) == ["SimplifiedLayerNormalization", "Add"]
    node = folded.graph.node[0]
    assert node.domain == "com.microsoft" and node.input[0] == "x"
    assert {a.name for a in node.attribute} == {"axis", "epsilon", "stash_type"}
    [site] = report.sites
    assert site.status == "fused" and any("com.microsoft:1" in note for note in site.notes)
    assert report.opset_after == 14
    assert add_contrib_opset_import(folded) is False  # fold() added the import already
    onnx.checker.check_model(folded, full_check=True)
    assert_same_as_default_domain_kernel(model, folded)


def test_fold_adds_the_com_microsoft_opset_import():
    folded, _ = normfold.fold(rms_model(opset=18), normfold.FoldOptions(allow_contrib=True))
    assert ("com.microsoft", 1) in [(i.domain, i.version) for i in folded.opset_import]


def test_add_contrib_opset_import_only_when_needed_and_once():
    plain = rms_model(opset=18)
    assert add_contrib_opset_import(plain) is False
    folded, _ = normfold.fold(plain, normfold.FoldOptions(allow_contrib=True))
    add_contrib_opset_import(folded)
    assert add_contrib_opset_import(folded) is False
    assert [i.domain for i in folded.opset_import].count("com.microsoft") == 1


def assert_same_as_default_domain_kernel(original, folded, shapes=None):
    """onnxruntime 1.32 registers SimplifiedLayerNormalization only in the default domain
    (microsoft/onnxruntime#7573), so it cannot load the com.microsoft node we emit. To check the node's
    inputs and attributes numerically, run a test-only copy with the node moved to that domain."""
    probe = onnx.ModelProto()
    probe.CopyFrom(folded)
    for node in probe.graph.node:
        if node.domain == "com.microsoft" and node.op_type == "SimplifiedLayerNormalization":
            node.domain = ""
    result = compare_models(original.SerializeToString(), probe.SerializeToString(), shapes=shapes)
    assert result.status == "passed", result
    return result


@pytest.mark.parametrize("variant", ["torchscript", "keras", "fp16_double_cast"])
def test_layernorm_with_mean_subtraction_is_not_rmsnorm(variant):
    """Trap: x * 1/sqrt(mean((x - mean)^2) + eps) is LayerNorm. Not even a site of this pass."""
    if variant == "torchscript":
        text = """mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      sq = Pow (d, two)
      var = ReduceMean <axes=[-1]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      y = Div (d, std)"""
    elif variant == "keras":
        text = """mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      sq = Mul (d, d)
      var = ReduceMean <axes=[-1]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      r = Reciprocal (std)
      y = Mul (d, r)"""
    else:
        text = """mean = ReduceMean <axes=[-1]> (x)
      d = Sub (x, mean)
      dd = Cast <to=11> (d)
      sq = Pow (dd, two)
      var = ReduceMean <axes=[-1]> (sq)
      ve = Add (var, eps)
      std = Sqrt (ve)
      y = Div (dd, std)"""
    ctype, out_type = (np.float64, "double") if variant == "fp16_double_cast" else (np.float32, "float")
    two, eps = np.array(2.0, ctype), np.array(1e-5, ctype)
    model = build(f"g (float[2,5,16] x) => ({out_type}[2,5,16] y) {{\n      {text}\n    }}", opset=14,
                  two=two, eps=eps)
    for options in (normfold.FoldOptions(allow_contrib=True), normfold.FoldOptions(passes=("rmsnorm",)),
                    normfold.FoldOptions(passes=("rmsnorm",), target_opset=23)):
        folded, report = normfold.fold(model, options)
        assert rms_sites(report) == []
        assert "RMSNormalization" not in ops(folded) and "SimplifiedLayerNormalization" not in ops(folded)


@pytest.mark.parametrize("tensor", ["ms", "mse", "std", "r", "sq"])
def test_intermediate_used_elsewhere_is_left(tensor):
    model = rms_model(extra=f"extra = Identity ({tensor})",
                      extra_out=f", float[{'2,5,16' if tensor == 'sq' else '2,5,1'}] extra")
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert site.reason == "intermediate-used-elsewhere" and repr(tensor) in site.detail


def test_non_trailing_axis_is_left():
    model = rms_model(shape="2,16,5", axes="1", gamma=GAMMA.reshape(16, 1))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert [s.reason for s in report.sites] == ["unsupported-axis"]


def test_global_average_pool_over_rank_4_is_an_rmsnorm_over_the_last_two_axes():
    """GlobalAveragePool over [N, C, H, W] averages H and W: x / sqrt(mean_HW(x^2)) is RMSNorm(axis=-2)."""
    model = rms_model(square="Mul", reduce="gap", normalize="Reciprocal", shape="2,3,4,16", affine="none")
    folded, report, _ = fold_and_compare(model, target_opset=23)
    assert ops(folded) == ["RMSNormalization"]
    assert [a.i for a in folded.graph.node[0].attribute if a.name == "axis"] == [-2]


@pytest.mark.parametrize("change, reason", [
    (dict(exponent=3.0), "unrecognized-pattern"),  # mean(x^3): not a norm statistic, but reported
    (dict(eps=-1e-6), "invalid-statistics"),
    (dict(normalize="Rsqrt", mhalf=np.array(-1.0, np.float32)), "unrecognized-pattern"),  # 1 / mean square
    (dict(gamma=np.ones((2, 1, 16), np.float32)), "not-per-channel"),
])
def test_wrong_constants_are_left_with_their_reason(change, reason):
    model = rms_model(**change)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert [s.reason for s in report.sites] == [reason]


def test_a_numerator_other_than_one_scales_gamma():
    """2 / sqrt(ms + eps) is the inverse RMS times 2: the fold multiplies it into gamma (float64)."""
    model = rms_model(normalize="DivOne", one=np.array(2.0, np.float32))
    folded, report, _ = fold_and_compare(model, target_opset=23)
    assert ops(folded) == ["RMSNormalization"]


@pytest.mark.parametrize("eps", [None, 0.0])
@pytest.mark.parametrize("normalize", ["DivOne", "Rsqrt", "Div"])
def test_no_epsilon_fuses_with_epsilon_zero(eps, normalize):
    """x / sqrt(mean(x^2)) with no Add, or Add(0): RMSNormalization(epsilon=0) computes exactly that
    (onnxscript's optimizer drops a tiny epsilon Add)."""
    model = rms_model(eps=eps, normalize=normalize)
    assert ("Add" in ops(model)) == (eps is not None)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["RMSNormalization"], report.to_text(verbose=True)
    assert onnx.helper.get_attribute_value(next(a for a in folded.graph.node[0].attribute
                                                 if a.name == "epsilon")) == 0.0


def test_non_constant_gamma_stays_after_the_fused_op():
    model = build("""g (float[2,5,16] x, float[16] gamma) => (float[2,5,16] y) {
      sq = Mul (x, x)
      ms = ReduceMean <keepdims=1> (sq, ax)
      mse = Add (ms, eps)
      std = Sqrt (mse)
      n = Div (x, std)
      y = Mul (n, gamma)
    }""", opset=23, ir_version=10, ax=np.array([-1], np.int64), eps=np.float32(1e-6))
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["RMSNormalization", "Mul"]


# ---- the real-export corpus ------------------------------------------------------------------

CORPUS = ["torch/hf_llama_op14.onnx", "torch/hf_llama_op18.onnx", "torch/hf_t5enc_op14.onnx",
          "torch/hf_qwen2_op14.onnx", "torch/hf_gemma_op14.onnx", "torch/hf_llama_fp16_op14.onnx",
          "torch/hf_llama_dynamo_op18.onnx", "torch/linear_rmsnorm_dynamo_op18.onnx",
          "tf/keras3_rmsnorm_op13.onnx", "tf/keras3_rmsnorm_op18.onnx", "tf/keras3_rmsnorm_hand_op13.onnx"]


def manifest_entry(rel: str) -> dict:
    folder, name = rel.split("/")
    entries = json.loads((MODELS / folder / "manifest.json").read_text())["models"]
    return next(e for e in entries if e["file"] == name)


@pytest.mark.parametrize("rel", CORPUS)
def test_corpus_rmsnorms_become_rmsnormalization_at_opset_23(rel, tmp_path):
    entry = manifest_entry(rel)
    shapes = {name: spec["shape"] for name, spec in entry["inputs"].items()}
    report = fold_file(MODELS / rel, tmp_path / "out.onnx", options=FoldOptions(target_opset=23),
                       verify=VerifyOptions(shapes=shapes))
    assert report.verification.status == "passed", report.to_text()
    assert report.exit_code == 0 and report.written
    truth = entry["ground_truth"]["rmsnorm"]
    assert report.ops_after.get("RMSNormalization", 0) == truth
    assert len(rms_sites(report, "fused")) == truth and rms_sites(report, "left") == []
    folded = onnx.load(tmp_path / "out.onnx")
    assert [i.type.tensor_type.elem_type for i in folded.graph.output] == \
        [i.type.tensor_type.elem_type for i in onnx.load(MODELS / rel).graph.output]


@pytest.mark.parametrize("rel", CORPUS)
def test_corpus_rmsnorms_become_simplified_layernormalization_with_allow_contrib(rel):
    entry = manifest_entry(rel)
    model = onnx.load(MODELS / rel)
    folded, report = normfold.fold(model, FoldOptions(allow_contrib=True))
    truth = entry["ground_truth"]["rmsnorm"]
    assert report.ops_after.get("com.microsoft::SimplifiedLayerNormalization", 0) == truth
    assert "SimplifiedLayerNormalization" not in report.ops_after  # never in the default domain
    assert report.opset_after == report.opset_before == entry["opset"]
    add_contrib_opset_import(folded)
    onnx.checker.check_model(folded)
    assert_same_as_default_domain_kernel(model, folded, {n: spec["shape"] for n, spec in entry["inputs"].items()})


def test_corpus_model_without_target_opset_leaves_rmsnorms_with_opset_too_old():
    _, report = normfold.fold(onnx.load(MODELS / "torch/hf_llama_op14.onnx"))
    left = rms_sites(report, "left")
    assert len(left) == 5 and {s.reason for s in left} == {"opset-too-old"}


def test_already_fused_dynamo_op23_export_has_no_sites():
    _, report = normfold.fold(onnx.load(MODELS / "torch/hf_llama_dynamo_op23.onnx"))
    assert rms_sites(report) == []


def _contrib_model(where: str) -> onnx.ModelProto:
    """A model without the com.microsoft import whose only node of that domain stands in the graph,
    in an If branch, or nowhere (a local function of the default domain)."""
    helper, FLOAT = onnx.helper, onnx.TensorProto.FLOAT
    contrib = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], domain="com.microsoft")
    graph_nodes = [contrib]
    if where == "if-branch":
        branch = helper.make_graph([contrib], "branch", [], [helper.make_tensor_value_info("y", FLOAT, [4])])
        graph_nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    elif where == "function-of-default-domain":
        graph_nodes = [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(graph_nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [4]),
                                                 helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if where == "function-of-default-domain":
        model.functions.append(helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                    [helper.make_opsetid("", 18)]))
    return model


@pytest.mark.parametrize("where, added", [("graph", True), ("if-branch", True), ("function-of-default-domain", False)])
def test_add_contrib_opset_import_looks_into_subgraphs_and_functions(where, added):
    """The import is added (and the call says so) for a com.microsoft node anywhere, a subgraph too;
    a local function whose nodes are all of the default domain needs none."""
    model = _contrib_model(where)
    assert add_contrib_opset_import(model) is added
    assert [i.domain for i in model.opset_import].count("com.microsoft") == int(added)
