"""The accuracy rule (normfold/accuracy.py) on a deep CNN with realistic BN statistics: the old
fixed-tolerance rule refuses an exact fold there, the accuracy rule passes it, and planted wrong
folds (a wrong epsilon, a dropped bias) still fail."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import normfold
import normfold.accuracy
from builders import load_report
from deep_cnn import deep_cnn
from normfold.accuracy import to_float64
from normfold.cli.main import main
from normfold.errors import VerificationUnavailable
from normfold.verify import compare_models


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return deep_cnn()


@pytest.fixture(scope="module")
def folded(model) -> onnx.ModelProto:
    result, report = normfold.fold(model)
    assert report.count("folded") == 26 and "BatchNormalization" not in report.ops_after
    return result


def variant(model: onnx.ModelProto, index: int, epsilon: float | None = None, drop_bias: bool = False) -> bytes:
    """The model folded as if BN number `index` had another epsilon or no bias: a wrong fold."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    bn = [n for n in copy.graph.node if n.op_type == "BatchNormalization"][index]
    if epsilon is not None:
        next(a for a in bn.attribute if a.name == "epsilon").f = epsilon
    if drop_bias:
        beta = next(t for t in copy.graph.initializer if t.name == bn.input[2])
        beta.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(beta)), beta.name))
    wrong, _ = normfold.fold(copy)
    return wrong.SerializeToString()


def test_the_model_is_deep_and_its_statistics_realistic(model):
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 26 and ops.count("HardSigmoid") == 8  # squeeze-excite
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute) for n in model.graph.node)
    variances = np.concatenate([numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("var")])
    assert variances.min() < 1e-2 < 1 < variances.max()  # measured: tiny and large channels alike


def test_old_rule_refuses_the_exact_fold_and_accuracy_passes_it(model, folded):
    a, b = model.SerializeToString(), folded.SerializeToString()
    old = compare_models(a, b, accuracy=False)
    assert old.status == "failed" and old.outputs[0].max_abs_error > 2e-4
    new = compare_models(a, b)
    [out] = new.outputs
    assert new.status == "passed" and out.rule == "accuracy"
    # both errors are reported; the folded model is as accurate as the original
    assert 0 < out.candidate_error <= out.allowed_error and 0 < out.original_error < 1e-3
    assert out.allowed_error == pytest.approx(2 * out.original_error + 4 * 2.0**-23 * _scale(a, new), rel=1e-6)


def _scale(model: bytes, verification) -> float:
    """max |float64 original| on the verification's inputs."""
    from onnx.reference import ReferenceEvaluator

    feeds = {"x": np.random.default_rng(verification.seed).standard_normal(verification.inputs["x"]).astype(np.float32)}
    up = to_float64(onnx.load_from_string(model))
    out = ReferenceEvaluator(up, new_ops=normfold.accuracy._evaluator_ops()).run(None, {"x": feeds["x"].astype(np.float64)})
    return float(np.abs(out[0]).max())


def test_fold_writes_the_deep_cnn_with_default_options(model, tmp_path):
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["fold", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json"), "-v"])
    assert result.exit_code == 0, result.output
    [report] = load_report(tmp_path / "r.json")["models"]
    [out] = report["verification"]["outputs"]
    assert report["written"] and out["rule"] == "accuracy" and out["candidate_error"] <= out["allowed_error"]
    assert "by accuracy against float64" in result.output


def test_explicit_tolerances_win(model, tmp_path):
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["fold", str(tmp_path / "m.onnx"), "--atol", "1e-4", "--rtol", "1e-4"])
    assert result.exit_code == 1


@pytest.mark.parametrize("index", [0, 5, 12, 20])
@pytest.mark.parametrize("mistake", ["epsilon 1e-3", "epsilon 0", "dropped bias"])
def test_a_wrong_fold_still_fails(model, index, mistake):
    wrong = variant(model, index, epsilon=None if mistake == "dropped bias" else float(mistake.split()[1]),
                    drop_bias=mistake == "dropped bias")
    v = compare_models(model.SerializeToString(), wrong)
    [out] = v.outputs
    assert v.status == "failed" and out.rule == "accuracy" and out.candidate_error > out.allowed_error


def test_without_a_float64_run_atol_scales_with_magnitude(model, folded, monkeypatch):
    def unavailable(*args, **kwargs):
        raise VerificationUnavailable("no float64 run here")

    monkeypatch.setattr(normfold.accuracy, "run_float64", unavailable)
    v = compare_models(model.SerializeToString(), folded.SerializeToString())
    [out] = v.outputs
    assert v.status == "passed" and out.rule == "magnitude" and out.atol > 1e-4
    assert any("output magnitude scales atol (no float64 run here)" in n for n in v.notes)
    wrong = variant(model, 5, drop_bias=True)
    assert compare_models(model.SerializeToString(), wrong).status == "failed"


def test_a_reference_the_original_itself_misses_is_not_trusted(model, monkeypatch):
    """An evaluator bug (a float64 'reference' far from the original) must not excuse a candidate."""
    real = normfold.accuracy._run_float64

    def skewed(reference, feeds, names):
        runs, engine = real(reference, feeds, names)
        return [{k: v + 5.0 for k, v in r.items()} for r in runs], engine

    monkeypatch.setattr(normfold.accuracy, "_run_float64", skewed)
    wrong = variant(model, 12, epsilon=1e-3)
    v = compare_models(model.SerializeToString(), wrong)
    assert v.status == "failed" and v.outputs[0].rule == "magnitude"


def test_float64_copy_upcasts_every_float_place():
    from builders import build

    model = build("""g (float16[2,4] x) => (float[2,4] y) {
      c = Constant <value_float = 2.0> ()
      h = Cast <to=1> (x)
      m = Mul (h, c)
      w16 = Cast <to=10> (m)
      y = Cast <to=1> (w16)
    }""")
    up = to_float64(model)
    assert up.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert up.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert {a.i for n in up.graph.node if n.op_type == "Cast" for a in n.attribute} == {onnx.TensorProto.DOUBLE}
    const = next(n for n in up.graph.node if n.op_type == "Constant").attribute[0]
    assert const.name == "value" and const.t.data_type == onnx.TensorProto.DOUBLE
    onnx.checker.check_model(up, full_check=True)


@pytest.mark.parametrize("dims, group, kernel, stride, dilation, pads, auto_pad", [
    (2, 1, 3, 1, 1, [1, 1, 1, 1], None),
    (2, 4, 3, 2, 1, [1, 0, 1, 2], None),       # depthwise, asymmetric pads
    (2, 2, 3, 1, 2, None, "SAME_UPPER"),
    (2, 1, 2, 2, 1, None, "SAME_LOWER"),
    (1, 1, 5, 3, 1, None, "VALID"),
    (3, 2, 3, 1, 1, [1, 1, 1, 1, 1, 1], None),
])
def test_float64_conv_matches_onnx_reference(dims, group, kernel, stride, dilation, pads, auto_pad):
    """The vectorised float64 Conv computes what onnx's own (slow) implementation does, in double."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(dims * 10 + group)
    x = rng.standard_normal((2, 4) + (7,) * dims)
    w = rng.standard_normal((8, 4 // group) + (kernel,) * dims)
    b = rng.standard_normal(8)
    attrs = {"group": group, "strides": [stride] * dims, "dilations": [dilation] * dims}
    if pads is not None:
        attrs["pads"] = pads
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    node = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.DOUBLE, None)
                                                 for n in "xwb"],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)])
    conv = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    feeds = {"x": x, "w": w, "b": b}
    expected = ReferenceEvaluator(conv).run(None, feeds)[0]
    got = ReferenceEvaluator(conv, new_ops=normfold.accuracy._evaluator_ops()).run(None, feeds)[0]
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_accuracy_never_passes_what_the_magnitude_bound_refuses():
    """Errors on opposite sides: the candidate is within 2x the original's error of the exact
    result, yet 3x the original's error away from the original: more than atol allows."""
    from normfold.report import OutputComparison

    b = 0.9e-4
    exact, original, candidate = np.zeros(2), np.array([b, -b], np.float32), np.array([-2 * b, 0.0], np.float32)
    c = OutputComparison("y", "float32", [2], 3 * b, 1.0, 1e-4, 1e-4, False, 2 * b, tolerance_dtype="float32")
    normfold.accuracy._by_accuracy(c, [original], [candidate], [exact])
    assert c.rule == "accuracy" and c.candidate_error <= c.allowed_error and not c.passed
    ok = OutputComparison("y", "float32", [2], b, 1.0, 1e-4, 1e-4, False, 0.0, tolerance_dtype="float32")
    normfold.accuracy._by_accuracy(ok, [original], [np.array([b, -b / 2], np.float32)], [exact])
    assert ok.passed


def test_no_float64_run_is_said_on_one_line(monkeypatch):
    """Both runners' errors (onnxruntime's and onnx.reference's, often several lines) are flattened
    and cut by the one formatter, errors.one_line."""
    import onnx.reference

    import normfold.verify

    def fails(*args, **kwargs):
        raise RuntimeError("first line\n  second line " + "x" * 400)

    monkeypatch.setattr(normfold.verify, "open_session", fails)
    monkeypatch.setattr(onnx.reference, "ReferenceEvaluator", fails)
    identity = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => (float[2] y) '
                                       '{ y = Identity(x) }')
    with pytest.raises(VerificationUnavailable) as caught:
        normfold.accuracy._run_float64(identity.SerializeToString(), [{"x": np.zeros(2, np.float32)}], ["y"])
    message = str(caught.value)
    assert "\n" not in message and message.count("first line second line x") == 2
    onnxruntime_part, reference_part = message.split("; onnx.reference: ")
    assert len(onnxruntime_part.split("onnxruntime: ", 1)[1]) == 150 and len(reference_part) == 150
    assert reference_part.endswith("...")
