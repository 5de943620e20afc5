"""`normfold verify` and per-site checks: a wrong candidate is caught, and the culprit is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import normfold
from normfold.cli.main import main
from normfold.verify import compare_arrays, compare_models
from builders import load_report

MODELS = Path(__file__).parents[1] / "models"
BERT = MODELS / "torch" / "hf_bert_op14.onnx"
BERT_SHAPES = ["--shape", "input_ids:2x8", "--shape", "attention_mask:2x8"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def folded_bert(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bert") / "bert.folded.onnx"
    report = normfold.fold_file(BERT, out, options=normfold.FoldOptions(target_opset=17),
                                verify=normfold.VerifyOptions(shapes={"input_ids": [2, 8], "attention_mask": [2, 8]}))
    assert report.written and report.count("fused") == 5
    return out


def break_layernorm_epsilon(path: Path, dest: Path, index: int) -> str:
    """Copy of a folded model with the epsilon of its index-th LayerNormalization changed; returns
    the name of that node's output tensor."""
    model = onnx.load(path)
    node = [n for n in model.graph.node if n.op_type == "LayerNormalization"][index]
    for a in node.attribute:
        if a.name == "epsilon":
            a.f = 0.5
    onnx.save(model, dest)
    return node.output[0]


def test_matching_models_exit_0(folded_bert):
    result = invoke("verify", BERT, folded_bert, *BERT_SHAPES, "-v")
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "FAILED" not in result.output


def test_changed_epsilon_is_caught_and_the_site_named(folded_bert, tmp_path):
    broken = tmp_path / "broken.onnx"
    site = break_layernorm_epsilon(folded_bert, broken, 1)
    result = invoke("verify", BERT, broken, *BERT_SHAPES, "--sites", "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    [report] = load_report(tmp_path / "r.json")["models"]
    assert report["verification"]["first_failing_site"] == site
    assert report["verification"]["sites"][0]["passed"] is False
    assert f"first site that differs, in graph order: {site}" in result.output


def test_changed_weight_is_caught(folded_bert, tmp_path):
    model = onnx.load(folded_bert)
    weight = next(t for t in model.graph.initializer if t.name.endswith("output.dense.weight")
                  or (len(t.dims) == 2 and t.dims[0] == t.dims[1]))
    value = numpy_helper.to_array(weight).copy()
    value.flat[0] += 0.5
    weight.CopyFrom(numpy_helper.from_array(value, weight.name))
    onnx.save(model, tmp_path / "w.onnx")
    assert invoke("verify", BERT, tmp_path / "w.onnx", *BERT_SHAPES).exit_code == 1


def test_fold_verify_sites_reports_every_site_error(tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("fold", BERT, "-o", tmp_path / "out.onnx", "--target-opset", "17", "--verify", "sites",
                    *BERT_SHAPES, "--report", report_path)
    assert result.exit_code == 0, result.output
    [report] = load_report(report_path)["models"]
    fused = [s for s in report["sites"] if s["status"] == "fused"]
    assert len(fused) == 5
    # four sites write intermediate tensors (the last one writes a graph output, compared anyway)
    assert sum(s["max_abs_error"] is not None for s in fused) == 4
    assert all(s["max_abs_error"] < 1e-5 for s in fused if s["max_abs_error"] is not None)


def test_npz_and_npy_inputs(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, size=(3, 5)).astype(np.int64)
    np.savez(tmp_path / "batch.npz", input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=0 * ids)
    v = compare_models(BERT, BERT, input_files=[str(tmp_path / "batch.npz")])
    assert v.status == "passed" and v.inputs["input_ids"] == [3, 5]
    image = MODELS / "torch" / "cnn_bn_op13.onnx"
    np.save(tmp_path / "x.npy", rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    result = invoke("verify", image, image, "--inputs", tmp_path / "x.npy", "--report", tmp_path / "r.json")
    assert result.exit_code == 0
    assert load_report(tmp_path / "r.json")["models"][0]["verification"]["inputs"] == {"x": [4, 3, 32, 32]}
    result = invoke("verify", BERT, BERT, "--inputs", tmp_path / "x.npy")
    assert result.exit_code == 2 and "one input" in result.output


def test_dynamic_dims_int_ranges_and_batches():
    v = compare_models(BERT, BERT, dims={"batch": 3, "sequence": 7}, int_ranges={"input_ids": (5, 50)}, batches=3)
    assert v.status == "passed" and v.batches == 3
    assert v.inputs == {"input_ids": [3, 7], "attention_mask": [3, 7], "token_type_ids": [3, 7]}
    v = compare_models(BERT, BERT, shapes={"input_ids": [2, 6]})  # the symbols carry over to the others
    assert v.inputs == {"input_ids": [2, 6], "attention_mask": [2, 6], "token_type_ids": [2, 6]}


def test_bad_int_range_and_unknown_input_exit_2():
    assert invoke("verify", BERT, BERT, "--int-range", "input_ids:9:1").exit_code == 2
    assert invoke("verify", BERT, BERT, "--shape", "nope:1x2").exit_code == 2
    assert invoke("verify", BERT, BERT, "--atol", "nope:1e-3").exit_code == 2


def test_per_output_tolerance_override(folded_bert, tmp_path):
    broken = tmp_path / "broken.onnx"
    break_layernorm_epsilon(folded_bert, broken, 4)  # the last LayerNorm feeds output 0 directly
    outputs = [o.name for o in onnx.load(BERT).graph.output]
    assert invoke("verify", BERT, broken, *BERT_SHAPES).exit_code == 1
    loose = [f"--atol={name}:100" for name in outputs] + [f"--rtol={name}:1" for name in outputs]
    assert invoke("verify", BERT, broken, *BERT_SHAPES, *loose).exit_code == 0


def test_custom_op_cannot_be_verified(tmp_path):
    model = onnx.load(MODELS / "torch" / "cnn_bn_op13.onnx")
    out = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Frob", [out], ["frobbed"], domain="com.example"))
    model.graph.output[0].name = "frobbed"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, tmp_path / "custom.onnx")
    result = invoke("verify", tmp_path / "custom.onnx", tmp_path / "custom.onnx")
    assert result.exit_code == 3 and "cannot load" in result.output


def test_same_seed_same_report(folded_bert):
    a = compare_models(BERT, folded_bert, seed=7, shapes={"input_ids": [2, 8], "attention_mask": [2, 8]})
    b = compare_models(BERT, folded_bert, seed=7, shapes={"input_ids": [2, 8], "attention_mask": [2, 8]})
    assert a == b


def test_benchmark_reports_both_models(folded_bert):
    result = invoke("verify", BERT, folded_bert, *BERT_SHAPES, "--benchmark", "-v")
    assert result.exit_code == 0
    assert "latency original: disabled:" in result.output and "latency candidate" not in result.output
    assert "latency folded: disabled:" in result.output


@pytest.mark.parametrize("ref, got, passed", [
    ([1.0, np.nan], [1.0, np.nan], True),
    ([1.0, 2.0], [1.0, np.nan], False),
    ([1.0, np.inf], [1.0, np.inf], True),
    ([1.0, 2.0], [1.0, np.inf], False),
    ([1.0, -np.inf], [1.0, np.inf], False),
    ([1000.0, 0.0], [1000.05, 0.0], True),   # within rtol 1e-4 of 1000
    ([1.0, 0.0], [1.0, 2e-4], False),        # beyond atol 1e-4 at 0
])
def test_comparison_rule(ref, got, passed):
    assert compare_arrays("y", np.array(ref, np.float32), np.array(got, np.float32)).passed is passed


def test_fp16_outputs_get_fp16_tolerance():
    ref = np.array([1.0, 2.0], np.float16)
    assert compare_arrays("y", ref, ref + np.float16(0.005)).passed
    assert not compare_arrays("y", ref.astype(np.float32), ref.astype(np.float32) + 0.005).passed


def test_integer_outputs_must_be_equal():
    assert not compare_arrays("y", np.array([1, 2]), np.array([1, 3])).passed
