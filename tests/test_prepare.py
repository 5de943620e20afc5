"""What normfold does to a model before the passes (normfold/prepare.py): initializers that old IR
versions list as graph inputs, and value_info that contradicts shape inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import normfold
from builders import build, fold_and_compare, load_report, ops, random_feeds, run, sites
from normfold.api import FoldOptions, fold_file
from normfold.cli.main import main
from normfold.errors import NormfoldError
from normfold.io import read_model

DATA = Path(__file__).parent / "data"
IR3 = DATA / "torch_bn_ir3_op7.onnx"  # TorchScript at opset 7: IR 3, all 12 initializers in graph.input


# ---- initializers listed as graph inputs (issue 15, item 8) ---------------------------------------

def test_ir3_export_folds_with_its_initializers_as_constants(tmp_path):
    original = onnx.load(IR3)
    assert original.ir_version == 3 and len(original.graph.input) == 13
    report = fold_file(IR3, tmp_path / "out.onnx")
    assert report.exit_code == 0 and report.written and report.verification.status == "passed"
    assert [(s.status, s.kind) for s in report.sites] == [("folded", "BatchNormalization after Conv"),
                                                          ("folded", "BatchNormalization after Gemm")]
    [note] = report.notes
    assert "12 initializer(s)" in note and "IR version 3" in note
    folded = onnx.load(tmp_path / "out.onnx")
    assert folded.ir_version == 4 and [i.name for i in folded.graph.input] == ["x"]
    assert "BatchNormalization" not in ops(folded)
    onnx.checker.check_model(folded, full_check=True)
    feeds = random_feeds(original, seed=3)
    expected, got = run(original, feeds), run(folded, feeds)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_ir3_export_keeps_its_inputs_when_asked(tmp_path):
    report = fold_file(IR3, tmp_path / "out.onnx", options=FoldOptions(initializer_inputs="input"))
    assert report.exit_code == 0 and not report.notes
    left = sites(report, "left", "non-constant-parameters")
    assert len(left) == 2 and all("--initializer-inputs constant" in s.detail for s in left)
    assert len(onnx.load(tmp_path / "out.onnx").graph.input) == 13


def _listed(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every initializer also listed as a graph input (IR >= 4 allows, not requires it)."""
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def conv_bn_model():
    rng = np.random.default_rng(1)
    return build("""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      y = BatchNormalization (c, s, bb, m, v)
    }""", w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32), s=rng.standard_normal(4).astype(np.float32),
                 bb=rng.standard_normal(4).astype(np.float32), m=rng.standard_normal(4).astype(np.float32),
                 v=(rng.random(4) + 0.5).astype(np.float32))


def test_listed_initializers_of_a_newer_ir_stay_overridable_unless_asked():
    model = _listed(conv_bn_model())
    folded, report = normfold.fold(model)
    assert ops(folded) == ["Conv", "BatchNormalization"] and not report.notes
    [site] = report.sites
    assert site.reason == "non-constant-parameters" and "--initializer-inputs constant" in site.detail
    folded, report, _ = fold_and_compare(model, initializer_inputs="constant")
    assert ops(folded) == ["Conv"] and [i.name for i in folded.graph.input] == ["x"]
    [note] = report.notes
    assert "5 initializer(s)" in note and "--initializer-inputs constant" in note
    assert folded.ir_version == 8


def test_hand_built_ir3_model_folds_automatically():
    model = _listed(conv_bn_model())
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    folded, report, _ = fold_and_compare(model)
    assert ops(folded) == ["Conv"] and folded.ir_version == 4 and len(report.notes) == 1


def test_cli_option_and_report_note(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_listed(conv_bn_model()), path)
    runner = CliRunner()
    result = runner.invoke(main, ["fold", str(path), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"),
                                  "--initializer-inputs", "constant", "-v"])
    assert result.exit_code == 0, result.output
    assert "note: 5 initializer(s)" in result.output
    [entry] = load_report(tmp_path / "r.json")["models"]
    assert entry["notes"] and entry["sites"][0]["status"] == "folded"
    result = runner.invoke(main, ["fold", str(path), "-o", str(tmp_path / "o.onnx"), "--initializer-inputs", "no"])
    assert result.exit_code == 2


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        normfold.fold(conv_bn_model(), FoldOptions(initializer_inputs="sometimes"))


# ---- value_info that contradicts shape inference (issue 15, item 9) ------------------------------

def nhwc_annotated(shape=(1, 8, 8, 4)) -> onnx.ModelProto:
    """Conv -> Mul(per-channel) whose Conv output value_info says NHWC [1, 8, 8, 4] (as jax2onnx
    writes after its layout changes) where shape inference says NCHW [1, 4, 8, 8]."""
    rng = np.random.default_rng(2)
    model = build("""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      y = Mul (c, k)
    }""", w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                  k=(rng.random((1, 4, 1, 1)) + 0.5).astype(np.float32))
    model.graph.value_info.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, list(shape)))
    return model


def test_contradicting_value_info_is_refused_by_onnx_itself():
    with pytest.raises(Exception):
        onnx.checker.check_model(nhwc_annotated(), full_check=True)


@pytest.mark.parametrize("shape", [(1, 8, 8, 4), (1, 4, 8)])  # other dims; another rank (the same leading dims)
def test_contradicting_value_info_is_dropped_with_a_note(tmp_path, shape):
    path = tmp_path / "jax.onnx"
    onnx.save(nhwc_annotated(shape), path)
    read_model(path)  # not refused
    report = fold_file(path, tmp_path / "out.onnx")
    assert report.exit_code == 0 and report.verification.status == "passed"
    [note] = report.notes
    assert f"'c' recorded FLOAT{list(shape)}, inferred FLOAT[1, 4, 8, 8]" in note
    [site] = report.sites
    assert site.status == "folded"
    folded = onnx.load(tmp_path / "out.onnx")
    assert ops(folded) == ["Conv"] and not folded.graph.value_info


def test_value_info_that_agrees_is_kept():
    model = nhwc_annotated(shape=(1, 4, 8, 8))
    onnx.checker.check_model(model, full_check=True)
    model.graph.node[1].op_type = "Relu"  # keep the annotated tensor
    del model.graph.node[1].input[1:]
    folded, report = normfold.fold(model)
    assert not report.notes and [v.name for v in folded.graph.value_info] == ["c"]


def test_a_model_wrong_beyond_its_value_info_is_still_refused(tmp_path):
    model = nhwc_annotated()
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT64  # the output type is no annotation
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(NormfoldError, match="invalid model"):
        read_model(path)


def test_every_pass_names_the_option_when_a_parameter_is_a_listed_initializer():
    """An InstanceNormalization -> Mul(gamma) whose scale is an initializer listed as a graph input
    is left as non-constant-parameters by the groupnorm pass, which does not know about listed
    initializers; the detail names the cause and the option, and with the option it folds."""
    rng = np.random.default_rng(0)
    model = build("""g (float[2,4,6] x) => (float[2,4,6] y) {
      n = InstanceNormalization (x, s, b)
      y = Mul (n, k)
    }""", s=rng.standard_normal(4).astype(np.float32), b=rng.standard_normal(4).astype(np.float32),
                  k=rng.standard_normal((4, 1)).astype(np.float32))
    model.graph.input.append(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [4]))
    _, report = normfold.fold(model)
    [site] = report.sites
    assert site.reason == "non-constant-parameters"
    assert "'s'" in site.detail and "--initializer-inputs constant" in site.detail
    folded, report, _ = fold_and_compare(model, initializer_inputs="constant")
    assert ops(folded) == ["InstanceNormalization"]
