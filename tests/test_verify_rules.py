"""The comparison rule itself: which tolerance applies (the lowest float type on an output's paths),
its exact boundary, several batches, site tensors a rewrite removed, and the input-shape retry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import normfold
from builders import build, load_report
from normfold.cli.main import main
from normfold.verify import RETRY_DIMS, RunOptions, compare_arrays, compare_models, lowest_float_types, run_reference

MODELS = Path(__file__).parents[1] / "models"
RNG = np.random.default_rng(3)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- the tolerance's dtype

def mixed_model(offset: float = 0.0) -> onnx.ModelProto:
    """float32 in and out, float16 in the middle (as Keras mixed_float16 exports compute), plus a
    float32 `offset` added at the end (a candidate that is off by that much)."""
    return build("""g (float[2,8] x) => (float[2,8] y) {
      h = Cast <to=10> (x)
      m = Mul (h, w)
      f = Cast <to=1> (m)
      y = Add (f, off)
    }""", w=np.random.default_rng(0).standard_normal(8).astype(np.float16), off=np.full(8, offset, np.float32))


def float_model(offset: float = 0.0) -> onnx.ModelProto:
    return build("""g (float[2,8] x) => (float[2,8] y) {
      m = Mul (x, w)
      y = Add (m, off)
    }""", w=np.random.default_rng(0).standard_normal(8).astype(np.float32), off=np.full(8, offset, np.float32))


def test_lowest_float_type_on_the_paths_sets_the_tolerance():
    model = mixed_model()
    assert lowest_float_types(model, ["y", "h", "x"]) == {"y": "float16", "h": "float16", "x": "float32"}
    assert lowest_float_types(float_model(), ["y"]) == {"y": "float32"}
    # an initializer type on the path counts too: a float32 model that reads float16 weights
    weights = build("""g (float[2,8] x) => (float[2,8] y) {
      wf = Cast <to=1> (w)
      y = Mul (x, wf)
    }""", w=RNG.standard_normal(8).astype(np.float16))
    weights.graph.node[0].attribute[0].i = 1  # (Cast's target is float32: only the initializer is fp16)
    assert lowest_float_types(weights, ["y"]) == {"y": "float16"}


def test_float32_output_computed_in_float16_gets_float16_tolerance():
    """5e-3 off: within float16's 1e-2 + 1e-2*|ref|, far outside float32's 1e-4."""
    v = compare_models(mixed_model().SerializeToString(), mixed_model(5e-3).SerializeToString())
    [out] = v.outputs
    assert v.status == "passed" and out.tolerance_dtype == "float16" and (out.atol, out.rtol) == (1e-2, 1e-2)
    v = compare_models(float_model().SerializeToString(), float_model(5e-3).SerializeToString())
    assert v.status == "failed" and v.outputs[0].tolerance_dtype == "float32"


def test_explicit_tolerances_win_over_the_path_dtype():
    v = compare_models(mixed_model().SerializeToString(), mixed_model(5e-3).SerializeToString(), atol=1e-4, rtol=1e-4)
    assert v.status == "failed" and v.outputs[0].tolerance_dtype is None and v.outputs[0].rule == "tolerance"


def test_mixed_precision_keras_export_folds_with_default_options(tmp_path):
    """A Keras mixed_float16 BN stack with its output cast to float32 (as Keras returns it): the
    report names float16 as the tolerance's dtype, and the fold is written."""
    model = onnx.load(MODELS / "tf" / "keras3_bn_stack_fp16_op13.onnx")
    out = model.graph.output[0]
    model.graph.node.append(onnx.helper.make_node("Cast", [out.name], ["y32"], to=onnx.TensorProto.FLOAT))
    out.name = "y32"
    out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.save(model, tmp_path / "mixed.onnx")
    result = invoke("fold", tmp_path / "mixed.onnx", "--report", tmp_path / "r.json", "-v")
    assert result.exit_code == 0, result.output
    [report] = load_report(tmp_path / "r.json")["models"]
    [cmp] = report["verification"]["outputs"]
    assert cmp["dtype"] == "float32" and cmp["tolerance_dtype"] == "float16" and cmp["atol"] == 1e-2
    assert "from float16 on its paths" in result.output
    assert report["written"] and sum(s["status"] == "folded" for s in report["sites"]) >= 1


# ---------------------------------------------------------------- the rule's edges (issue 13)

def test_relative_tolerance_is_measured_against_the_original():
    ref, big = np.array([1.0], np.float32), np.array([3.0], np.float32)
    # |3 - 1| = 2 > 0.9 * |1| although <= 0.9 * |3|: fails against the original
    assert not compare_arrays("y", ref, big, atol=0.0, rtol=0.9).passed
    # |1 - 3| = 2 <= 0.9 * |3| although > 0.9 * |1|: passes against the original
    assert compare_arrays("y", big, ref, atol=0.0, rtol=0.9).passed


def test_exact_tolerance_boundary_passes_and_just_above_fails():
    ref = np.array([1.0], np.float32)
    at = np.array([1.5], np.float32)  # |1.5 - 1| = 0.5 = 0.25 + 0.25 * 1, exactly
    assert compare_arrays("y", ref, at, atol=0.25, rtol=0.25).passed
    above = np.nextafter(at, np.float32(2))
    c = compare_arrays("y", ref, above, atol=0.25, rtol=0.25)
    assert not c.passed and 0.25 < c.needed_atol < 0.2501


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_outputs_equal_pass_and_unequal_fail(dtype):
    a = np.array([1, 0, 1], dtype)
    assert compare_arrays("y", a, a.copy()).passed
    assert not compare_arrays("y", a, np.array([1, 1, 1], dtype)).passed


def step_models(threshold: float):
    """y = x and a candidate y = x + 100 * Relu(x - threshold): equal unless some input exceeds it."""
    original = build("""g (float[1,64] x) => (float[1,64] y) {
      y = Identity (x)
    }""")
    candidate = build("""g (float[1,64] x) => (float[1,64] y) {
      d = Sub (x, t)
      r = Relu (d)
      s = Mul (r, k)
      y = Add (x, s)
    }""", t=np.array(threshold, np.float32), k=np.array(100.0, np.float32))
    return original, candidate


def test_a_difference_in_the_first_of_two_input_files_fails(tmp_path):
    original, candidate = step_models(10.0)
    onnx.save(original, tmp_path / "a.onnx")
    onnx.save(candidate, tmp_path / "b.onnx")
    np.save(tmp_path / "big.npy", np.full((1, 64), 20.0, np.float32))
    np.save(tmp_path / "small.npy", np.zeros((1, 64), np.float32))
    for files in (["big.npy", "small.npy"], ["small.npy", "big.npy"]):
        args = [a for f in files for a in ("--inputs", tmp_path / f)]
        result = invoke("verify", tmp_path / "a.onnx", tmp_path / "b.onnx", *args, "--report", tmp_path / "r.json")
        assert result.exit_code == 1, (files, result.output)
        assert load_report(tmp_path / "r.json")["models"][0]["verification"]["batches"] == 2
    assert invoke("verify", tmp_path / "a.onnx", tmp_path / "b.onnx", "--inputs", tmp_path / "small.npy").exit_code == 0


def test_a_difference_in_the_first_random_batch_fails(tmp_path):
    seed = next(s for s in range(20) if np.random.default_rng(s).standard_normal((1, 64)).max()
                > np.random.default_rng(s + 1).standard_normal((1, 64)).max())
    first, second = (np.random.default_rng(s).standard_normal((1, 64)).astype(np.float32).max() for s in (seed, seed + 1))
    original, candidate = step_models(float(first + second) / 2)  # only the first batch crosses it
    onnx.save(original, tmp_path / "a.onnx")
    onnx.save(candidate, tmp_path / "b.onnx")
    result = invoke("verify", tmp_path / "a.onnx", tmp_path / "b.onnx", "--batches", "2", "--seed", seed)
    assert result.exit_code == 1, result.output
    assert invoke("verify", tmp_path / "a.onnx", tmp_path / "b.onnx", "--seed", seed + 1).exit_code == 0


def test_one_differing_and_one_unverifiable_model_exit_1(tmp_path):
    """Outputs differ (1) is more severe than unverified (3), whichever model comes first."""
    folder = tmp_path / "in"
    folder.mkdir()
    for prefix in ("a", "b"):
        case = folder / prefix
        case.mkdir()
        shutil.copy(MODELS / "torch" / "cnn_bn_op13.onnx", case / f"{prefix}_differs.onnx")
        model = onnx.load(MODELS / "torch" / "cnn_bn_op13.onnx")
        out = model.graph.output[0].name
        model.graph.node.append(onnx.helper.make_node("Frob", [out], ["frobbed"], domain="com.example"))
        model.graph.output[0].name = "frobbed"
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
        onnx.save(model, case / f"{'b' if prefix == 'a' else 'a'}_custom.onnx")
        result = invoke("fold", case, "-o", tmp_path / f"out_{prefix}", "--atol", "0", "--rtol", "0",
                        "--report", tmp_path / "r.json")
        codes = sorted(m["exit_code"] for m in load_report(tmp_path / "r.json")["models"])
        assert codes == [1, 3] and result.exit_code == 1, result.output


# ---------------------------------------------------------------- site tensors

def forward_fold_model() -> onnx.ModelProto:
    """Relu -> BN -> Conv without padding: the BN folds forward, and its output tensor is gone."""
    c = 4
    return build("""g (float[1,4,6,6] x) => (float[1,3,6,6] y) {
      r = Relu (x)
      b = BatchNormalization (r, s, bb, m, v)
      y = Conv (b, w)
    }""", s=RNG.standard_normal(c).astype(np.float32), bb=RNG.standard_normal(c).astype(np.float32),
                 m=RNG.standard_normal(c).astype(np.float32), v=(RNG.random(c) + 0.5).astype(np.float32),
                 w=RNG.standard_normal((3, c, 1, 1)).astype(np.float32))


def chain_model() -> onnx.ModelProto:
    """Conv -> BN -> BN -> Relu: both BN fold into the Conv, so the first BN's output is gone."""
    c = 4
    stats = {f"{k}{i}": (RNG.random(c) + 0.5 if k == "v" else RNG.standard_normal(c)).astype(np.float32)
             for i in (1, 2) for k in "sbmv"}
    return build("""g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      c = Conv (x, w)
      b1 = BatchNormalization (c, s1, b1c, m1, v1)
      b2 = BatchNormalization (b1, s2, b2c, m2, v2)
      y = Relu (b2)
    }""", w=RNG.standard_normal((c, 3, 1, 1)).astype(np.float32),
                 s1=stats["s1"], b1c=stats["b1"], m1=stats["m1"], v1=stats["v1"],
                 s2=stats["s2"], b2c=stats["b2"], m2=stats["m2"], v2=stats["v2"])


def test_site_tensors_the_rewrite_removed_are_listed_not_failed(tmp_path):
    onnx.save(chain_model(), tmp_path / "m.onnx")
    result = invoke("fold", tmp_path / "m.onnx", "--verify", "sites", "--report", tmp_path / "r.json", "-v")
    assert result.exit_code == 0, result.output
    [report] = load_report(tmp_path / "r.json")["models"]
    v = report["verification"]
    assert [s["status"] for s in report["sites"]] == ["folded", "folded"]
    assert v["removed_sites"] == ["b1"] and [c["name"] for c in v["sites"]] == ["b2"] and v["sites"][0]["passed"]
    assert "FAILED" not in result.output and "removed by the rewrite (not compared): 1 site tensor(s): b1" in result.output


def test_verify_sites_compares_only_tensors_in_both(tmp_path):
    original = forward_fold_model()
    folded, _ = normfold.fold(original)
    v = compare_models(original.SerializeToString(), folded.SerializeToString(), sites=["r", "b", "nope"])
    assert v.status == "passed" and [c.name for c in v.sites] == ["r"] and v.removed_sites == ["b"]


# ---------------------------------------------------------------- dynamic dimensions

def conv1d_model(kernel: int) -> onnx.ModelProto:
    """A 1-D Conv on [batch, samples]: onnxruntime rejects fewer samples than the kernel."""
    return build("""g (float[batch, samples] x) => (float[batch, 1, n] y) {
      e = Unsqueeze (x, one)
      y = Conv (e, w)
    }""", one=np.array([1], np.int64), w=RNG.standard_normal((1, 1, kernel)).astype(np.float32))


def test_free_dimensions_are_raised_until_onnxruntime_accepts_them():
    model = conv1d_model(40).SerializeToString()
    run = run_reference(model, RunOptions())
    assert {k: list(v.shape) for k, v in run.feeds[0].items()} == {"x": [1, 64]}  # 1 and 16 are rejected
    assert "ran with free dimensions at 64 (leading axis 1): x: 1x64" in run.notes[0]
    v = compare_models(model, model)
    assert v.status == "passed" and v.inputs == {"x": [1, 64]} and v.notes == run.notes
    # dimensions given by the user are kept; only the free ones are raised
    assert compare_models(model, model, dims={"batch": 2}).inputs == {"x": [2, 64]}


def test_the_retry_gives_up_with_one_line():
    model = conv1d_model(RETRY_DIMS[-1] + 1).SerializeToString()
    v = normfold.VerifyOptions().compare(model, model)
    assert v.status == "unavailable" and "also with free dimensions raised to 16, 64, 256, 1024, 4096" in v.detail
    assert "\n" not in v.detail


def test_no_retry_when_the_user_fixed_every_dimension():
    model = conv1d_model(40).SerializeToString()
    v = normfold.VerifyOptions(shapes={"x": [1, 8]}).compare(model, model)
    assert v.status == "unavailable" and "raised" not in v.detail


def test_wav2vec2_sample_folds_with_readme_command(tmp_path):
    shutil.copy(MODELS / "torch" / "hf_wav2vec2_op14.onnx", tmp_path / "w.onnx")
    result = invoke("fold", tmp_path / "w.onnx", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    v = load_report(tmp_path / "r.json")["models"][0]["verification"]
    assert v["status"] == "passed" and v["inputs"]["input_values"][1] > 1
    assert any("ran with free dimensions" in n for n in v["notes"])


# ---------------------------------------------------------------- --target-opset: who changed the outputs

BERT = MODELS / "torch" / "hf_bert_op14.onnx"


def corrupt_first_layernorm_scale(model: onnx.ModelProto) -> None:
    node = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    scale = next(t for t in model.graph.initializer if t.name == node.input[1])
    value = onnx.numpy_helper.to_array(scale).copy() * 3
    scale.CopyFrom(onnx.numpy_helper.from_array(value, scale.name))


def test_converted_model_runs_only_when_the_result_differs(tmp_path, monkeypatch):
    report = normfold.fold_file(BERT, tmp_path / "ok.onnx", options=normfold.FoldOptions(target_opset=17))
    assert report.written and report.conversion is None  # passed: the converter was not run on its own

    real = normfold.api.run_rules

    def corrupting(graph, *args, **kwargs):  # a wrong rewrite
        records = real(graph, *args, **kwargs)
        if not kwargs.get("dry"):
            model = onnx.ModelProto()
            model.graph.CopyFrom(graph)
            corrupt_first_layernorm_scale(model)
            graph.CopyFrom(model.graph)
        return records

    monkeypatch.setattr(normfold.api, "run_rules", corrupting)
    report = normfold.fold_file(BERT, tmp_path / "bad.onnx", options=normfold.FoldOptions(target_opset=17))
    assert report.exit_code == 1 and not report.written
    assert report.conversion.status == "passed" and "converting" not in report.verification.detail


def test_a_converter_that_changes_the_outputs_is_named(tmp_path, monkeypatch):
    real = normfold.api.convert_opset

    def bad_converter(model, target):
        converted = real(model, target)
        mul = next(n for n in converted.graph.node if n.op_type == "Mul")
        mul.input[1] = mul.input[0]  # squares instead of scaling
        return converted

    monkeypatch.setattr(normfold.api, "convert_opset", bad_converter)
    report = normfold.fold_file(BERT, tmp_path / "bad.onnx", options=normfold.FoldOptions(target_opset=17))
    assert report.exit_code == 1 and not report.written
    assert report.conversion.status == "failed"
    assert report.verification.detail.startswith("converting the opset alone changed the outputs")
