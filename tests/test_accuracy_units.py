"""normfold/accuracy.py in-process on tiny models: what the float64 copy upcasts (and what it
leaves), how the float64 original is run and refused, and which failed comparisons the accuracy
rule re-judges, with the note it leaves. tests/test_verify_accuracy.py has the deep CNN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold.accuracy as accuracy
import normfold.verify
from builders import build
from normfold.errors import VerificationUnavailable
from normfold.report import Verification
from normfold.verify import ModelRun, compare_arrays

DOUBLE = TensorProto.DOUBLE


# ---- the float64 copy ----------------------------------------------------------------------------
def test_initializers_of_every_float_type_become_double_with_their_values_and_doc():
    model = build("g (float[2] x) => (float[2] y) { y = Identity (x) }")
    values = {"f32": np.float32([1.5, -2.25]), "f16": np.float16([0.5, 3.0]), "i64": np.int64([7, 8])}
    for name, value in values.items():
        t = numpy_helper.from_array(value, name)
        t.doc_string = f"doc of {name}"
        model.graph.initializer.append(t)
    bf16 = helper.make_tensor("bf16", TensorProto.BFLOAT16, [1], [1.0])
    model.graph.initializer.append(bf16)
    up = accuracy.to_float64(model)
    got = {t.name: t for t in up.graph.initializer}
    for name in ("f32", "f16"):
        assert got[name].data_type == DOUBLE and got[name].doc_string == f"doc of {name}"
        assert np.array_equal(numpy_helper.to_array(got[name]), values[name].astype(np.float64))
    assert got["bf16"].data_type == DOUBLE and numpy_helper.to_array(got["bf16"]).tolist() == [1.0]
    assert got["i64"].data_type == TensorProto.INT64 and got["i64"].doc_string == "doc of i64"
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # a copy: the model itself unchanged


def test_types_upcast_inside_sequences_optionals_and_maps_but_not_integers():
    def tp(kind):
        t = onnx.TypeProto()
        if kind == "tensor":
            t.tensor_type.elem_type = TensorProto.FLOAT16
        elif kind == "sparse":
            t.sparse_tensor_type.elem_type = TensorProto.FLOAT
        elif kind == "int":
            t.tensor_type.elem_type = TensorProto.INT32
        elif kind == "sequence":
            t.sequence_type.elem_type.tensor_type.elem_type = TensorProto.BFLOAT16
        elif kind == "optional":
            t.optional_type.elem_type.sequence_type.elem_type.tensor_type.elem_type = TensorProto.FLOAT
        else:
            t.map_type.key_type = TensorProto.INT64
            t.map_type.value_type.tensor_type.elem_type = TensorProto.FLOAT
        return t

    def elem(t):
        while t.WhichOneof("value") != "tensor_type" and t.WhichOneof("value") != "sparse_tensor_type":
            t = {"sequence_type": lambda: t.sequence_type.elem_type, "optional_type": lambda: t.optional_type.elem_type,
                 "map_type": lambda: t.map_type.value_type}[t.WhichOneof("value")]()
        return getattr(t, t.WhichOneof("value")).elem_type

    for kind in ("tensor", "sparse", "sequence", "optional", "map"):
        t = tp(kind)
        accuracy._type(t)
        assert elem(t) == DOUBLE, kind
    t = tp("map")
    accuracy._type(t)
    assert t.map_type.key_type == TensorProto.INT64
    t = tp("int")
    accuracy._type(t)
    assert t.tensor_type.elem_type == TensorProto.INT32


def test_graph_inputs_outputs_and_sparse_initializers_upcast_and_value_info_dropped():
    model = build("""g (float16[2] x, int64[2] k) => (float[2] y, int64[2] j) {
        h = Cast <to = 1> (x)
        y = Neg (h)
        j = Identity (k) }""")
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [2]))
    values = numpy_helper.from_array(np.float32([4.0]), "sp_values")
    indices = numpy_helper.from_array(np.int64([1]), "sp_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [3]))
    up = accuracy.to_float64(model)
    g = up.graph
    assert [i.type.tensor_type.elem_type for i in g.input] == [DOUBLE, TensorProto.INT64]
    assert [o.type.tensor_type.elem_type for o in g.output] == [DOUBLE, TensorProto.INT64]
    assert len(g.value_info) == 0 and g.sparse_initializer[0].values.data_type == DOUBLE
    assert g.sparse_initializer[0].indices.data_type == TensorProto.INT64
    assert len(model.graph.value_info) == 1


@pytest.mark.parametrize("op, attr, domain, before, after", [
    ("Cast", "to", "", TensorProto.FLOAT, DOUBLE),
    ("Cast", "to", "", TensorProto.FLOAT16, DOUBLE),
    ("Cast", "to", "", TensorProto.BFLOAT16, DOUBLE),
    ("Cast", "to", "", TensorProto.INT64, TensorProto.INT64),       # not a float type
    ("Cast", "to", "ai.onnx", TensorProto.FLOAT, DOUBLE),
    ("Cast", "to", "x.custom", TensorProto.FLOAT, TensorProto.FLOAT),  # another domain's Cast
    ("Neg", "to", "", TensorProto.FLOAT, TensorProto.FLOAT),        # an int attribute of another op
    ("Cast", "saturate", "", TensorProto.FLOAT, TensorProto.FLOAT),  # another attribute of Cast
    ("EyeLike", "dtype", "", TensorProto.FLOAT, DOUBLE),
    ("RandomNormal", "dtype", "", TensorProto.FLOAT16, DOUBLE),
    ("DequantizeLinear", "output_dtype", "", TensorProto.FLOAT, DOUBLE),
])
def test_the_dtype_attributes_that_name_a_float_type_become_double(op, attr, domain, before, after):
    node = helper.make_node(op, ["x"], ["y"], domain=domain, **{attr: before})
    accuracy._node(node)
    assert node.attribute[0].i == after


def test_constants_tensors_and_subgraphs_in_attributes_upcast():
    body = build("b () => (float[1] out) { out = Constant <value = float[1] {3.0}> () }").graph
    node = helper.make_node("Custom", ["x"], ["y"], domain="x.custom",
                            t=numpy_helper.from_array(np.float32([1.0]), "t"),
                            ts=[numpy_helper.from_array(np.float16([2.0]), "a"), numpy_helper.from_array(np.int32([2]), "b")],
                            g=body, gs=[body, body])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.float32([5.0]), "v"),
                                       numpy_helper.from_array(np.int64([0]), "i"), [2])
    node.attribute.append(helper.make_attribute("sp", sparse))
    tp = onnx.TypeProto()
    tp.tensor_type.elem_type = TensorProto.FLOAT
    node.attribute.append(helper.make_attribute("tp", tp))
    accuracy._node(node)
    a = {x.name: x for x in node.attribute}
    assert a["t"].t.data_type == DOUBLE and [t.data_type for t in a["ts"].tensors] == [DOUBLE, TensorProto.INT32]
    assert a["sp"].sparse_tensor.values.data_type == DOUBLE and a["tp"].tp.tensor_type.elem_type == DOUBLE
    for g in [a["g"].g, *a["gs"].graphs]:
        assert g.output[0].type.tensor_type.elem_type == DOUBLE and g.node[0].attribute[0].t.data_type == DOUBLE


@pytest.mark.parametrize("attr, value, expected", [("value_float", 2.5, 2.5), ("value_floats", [1.0, 2.0], [1.0, 2.0])])
def test_a_float_constant_becomes_a_double_tensor(attr, value, expected):
    node = helper.make_node("Constant", [], ["c"], **{attr: value})
    accuracy._node(node)
    [a] = node.attribute
    assert a.name == "value" and a.t.data_type == DOUBLE
    assert numpy_helper.to_array(a.t).tolist() == expected and numpy_helper.to_array(a.t).shape == np.shape(value)
    spelled = helper.make_node("Constant", [], ["c"], domain="ai.onnx", **{attr: value})
    accuracy._node(spelled)
    assert spelled.attribute[0].name == "value"
    other = helper.make_node("Constant", [], ["c"], domain="x.custom", value_float=2.5)
    accuracy._node(other)
    assert other.attribute[0].name == "value_float"


def test_local_functions_upcast_too():
    model = build("g (float[2] x) => (float[2] y) { y = Identity (x) }")
    f = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT)],
                             [helper.make_opsetid("", 13)])
    f.value_info.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [2]))
    model.functions.append(f)
    up = accuracy.to_float64(model)
    assert up.functions[0].node[0].attribute[0].i == DOUBLE
    assert up.functions[0].value_info[0].type.tensor_type.elem_type == DOUBLE


def test_the_evaluators_batchnorm_uses_inference_statistics_and_the_default_epsilon():
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 2))
    s, b, m, v = rng.uniform(0.5, 2, 3), rng.standard_normal(3), rng.standard_normal(3), np.float64([1e-5, 0.5, 2.0])
    expected = (x - m[:, None]) / np.sqrt(v[:, None] + 1e-5) * s[:, None] + b[:, None]
    for attrs, eps in (({}, 1e-5), ({"epsilon": 1e-2}, 1e-2)):
        node = helper.make_node("BatchNormalization", list("xsbmv"), ["y"], **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, DOUBLE, None) for n in "xsbmv"],
                                  [helper.make_tensor_value_info("y", DOUBLE, None)])
        for opset in (9, 15):
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
            got = ReferenceEvaluator(model, new_ops=accuracy._evaluator_ops()).run(None, dict(zip("xsbmv", (x, s, b, m, v))))[0]
            want = (x - m[:, None]) / np.sqrt(v[:, None] + eps) * s[:, None] + b[:, None]
            assert got.dtype == np.float64 and np.allclose(got, want, rtol=1e-6, atol=0), (attrs, opset)
    assert not np.allclose(expected, (x - m[:, None]) / np.sqrt(v[:, None] + 1e-2) * s[:, None] + b[:, None])


# ---- running the float64 original ------------------------------------------------------------------
def _chain():
    return build("""g (float[2,3] x, int64[2] k) => (float[2,3] y) {
        h = Mul (x, c)
        y = Add (h, x)
        j = Identity (k) }""", c=np.float32(3.0))


@pytest.mark.parametrize("as_bytes", [True, False])
def test_the_float64_original_runs_on_widened_inputs_and_gives_intermediates(tmp_path, as_bytes):
    model = _chain()
    onnx.save(model, tmp_path / "m.onnx")
    x = np.float32([[0.1, 0.2, 0.3], [1e-4, 7.0, -1.0]])
    feeds = [{"x": x, "k": np.int64([4, 5])}, {"x": x * 2, "k": np.int64([1, 2])}]
    runs, engine = accuracy._run_float64(model.SerializeToString() if as_bytes else tmp_path / "m.onnx", feeds,
                                         ["y", "h"])
    assert engine == "onnxruntime" and len(runs) == 2
    for run, feed in zip(runs, feeds):
        wide = feed["x"].astype(np.float64)
        assert run["h"].dtype == np.float64 and np.array_equal(run["h"], wide * 3.0)
        assert np.array_equal(run["y"], wide * 3.0 + wide)
    runs, engine = accuracy._run_float64(model.SerializeToString(), feeds[:1], ["j"])  # an integer intermediate
    assert engine == "onnxruntime" and runs[0]["j"].dtype == np.int64 and runs[0]["j"].tolist() == [4, 5]


def test_what_onnxruntime_cannot_run_in_double_goes_to_onnx_reference():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    model = build("g (float[1,1,4,4] x) => (float[1,2,2,2] y) { y = Conv (x, w) }", w=w)
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    [run], engine = accuracy._run_float64(model.SerializeToString(), [{"x": x}], ["y"])
    expected = accuracy._conv(x.astype(np.float64), w.astype(np.float64), None, None, None, None, None, None)
    assert engine == "onnx.reference" and run["y"].dtype == np.float64 and np.allclose(run["y"], expected, atol=1e-12)


def test_a_float64_copy_that_would_not_fit_in_memory_is_refused(monkeypatch):
    monkeypatch.setattr(accuracy, "_available_memory", lambda: 100)
    model = _chain().SerializeToString()
    need = len(model) * accuracy.FLOAT64_MEMORY_FACTOR / 2**30
    with pytest.raises(VerificationUnavailable) as info:
        accuracy.run_float64(model, [], ["y"])
    assert str(info.value) == f"a float64 copy of the original would need about {need:.1f} GiB"
    monkeypatch.setattr(accuracy, "_available_memory", lambda: int(len(model) * accuracy.FLOAT64_MEMORY_FACTOR / 0.6) + 1)
    assert accuracy.run_float64(model, [{"x": np.ones((2, 3), np.float32), "k": np.int64([0, 0])}], ["y"])[1] == "onnxruntime"
    monkeypatch.setattr(accuracy, "_available_memory", lambda: None)  # unknown: tried
    assert accuracy.run_float64(model, [{"x": np.ones((2, 3), np.float32), "k": np.int64([0, 0])}], ["y"])[1] == "onnxruntime"


def test_a_large_original_runs_in_float64_in_a_child(monkeypatch):
    calls = []
    monkeypatch.setattr(normfold.verify, "ISOLATE_BYTES", 10)
    monkeypatch.setattr(normfold.verify, "isolated", lambda func, args, label: calls.append((func, args, label)) or "child")
    model = _chain().SerializeToString()
    assert accuracy.run_float64(model, ["feeds"], ["y"]) == "child"
    assert calls == [(accuracy._run_float64, (model, ["feeds"], ["y"]), "float64 original")]
    monkeypatch.setattr(normfold.verify, "ISOLATE_BYTES", len(model))  # not over it: here
    assert accuracy.run_float64(model, [{"x": np.ones((2, 3), np.float32), "k": np.int64([0, 0])}], ["y"])[1] == "onnxruntime"


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    def __enter__(self):
        return iter(self.lines)

    def __exit__(self, *exc):
        return False


def test_available_memory_is_memavailable_from_proc_meminfo(monkeypatch):
    def meminfo(path):
        return _Lines(["MemTotal: 9 kB\n", "MemAvailable:   2048 kB\n"] if path == "/proc/meminfo" else [])

    monkeypatch.setattr(accuracy, "open", meminfo, raising=False)
    assert accuracy._available_memory() == 2048 * 1024
    monkeypatch.setattr(accuracy, "open", lambda path: _Lines(["MemTotal: 9 kB\n"]), raising=False)
    assert accuracy._available_memory() is None

    def missing(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(accuracy, "open", missing, raising=False)
    assert accuracy._available_memory() is None


# ---- which comparisons the rule re-judges -----------------------------------------------------------
def _runs(ref_values: dict, got_values: dict, exposed=()):
    outputs = [n for n in ref_values if n not in exposed]
    ref = ModelRun("original", [{"x": np.zeros(1, np.float32)}], [ref_values], outputs, list(exposed))
    got = ModelRun("result", [], [got_values], outputs, list(exposed))
    return ref, got


def _judged(monkeypatch, result, ref, got, atols=None, rtols=None, exact=None, raises=None):
    asked = []

    def run_float64(reference, feeds, names):
        asked.append((reference, feeds, names))
        if raises:
            raise raises
        return [{n: exact[n] for n in names}], "onnxruntime"

    monkeypatch.setattr(accuracy, "run_float64", run_float64)
    accuracy.judge_by_accuracy(result, "ref.onnx", ref, got, atols or {}, rtols or {})
    return asked


def test_only_failed_default_tolerance_float_comparisons_are_rejudged(monkeypatch):
    r, g = np.float32([100.0]), np.float32([100.02])
    values = {"a": r, "b": r, "i": np.int64([1]), "s": r, "p": r}
    ref, got = _runs(values, {"a": g, "b": g, "i": np.int64([2]), "s": g, "p": r}, exposed=("s",))
    result = Verification("failed")
    result.outputs = [compare_arrays(n, values[n], got.outputs[0][n]) for n in ("a", "b", "i", "p")]
    result.sites = [compare_arrays("s", r, g)]
    asked = _judged(monkeypatch, result, ref, got, atols={"b": 0.1}, exact={"a": np.float64([100.01]), "s": np.float64([100.01])})
    assert asked == [("ref.onnx", ref.feeds, ["a", "s"])]  # not b (its own atol), i (an integer), p (passed)
    a, b, i, p = result.outputs
    assert (a.rule, a.passed, result.sites[0].rule, result.sites[0].passed) == ("accuracy", True, "accuracy", True)
    assert (b.rule, i.rule, p.rule) == ("tolerance", "tolerance", "tolerance") and not b.passed
    assert result.notes == ["judged by accuracy against the original run in float64 (onnxruntime)"]


def test_explicit_tolerances_for_every_output_or_by_name_keep_the_tolerance_rule(monkeypatch):
    r, g = np.float32([100.0]), np.float32([100.02])
    for atols, rtols in (({None: 1e-4}, {}), ({}, {None: 1e-4}), ({}, {"y": 0.0})):
        ref, got = _runs({"y": r}, {"y": g})
        result = Verification("failed", outputs=[compare_arrays("y", r, g)])
        assert _judged(monkeypatch, result, ref, got, atols, rtols, exact={"y": np.float64([100.0])}) == []
        assert result.outputs[0].rule == "tolerance" and result.notes == []
    ref, got = _runs({"y": r, "t": r}, {"y": g, "t": g}, exposed=("t",))  # a site takes the default's (None) entry
    for atols, rtols in (({"t": 0.5}, {}), ({}, {"t": 0.5})):
        result = Verification("failed", outputs=[compare_arrays("y", r, g)], sites=[compare_arrays("t", r, g)])
        asked = _judged(monkeypatch, result, ref, got, atols, rtols,
                        exact={"y": np.float64([100.01]), "t": np.float64([100.01])})
        assert asked[0][2] == ["y", "t"]


def test_a_comparison_the_result_cannot_match_by_name_or_shape_is_not_rejudged(monkeypatch):
    r = np.float32([100.0, 1.0])
    ref, got = _runs({"y": r, "z": r}, {"y": np.float32([100.02])})  # z missing, y of another shape
    result = Verification("failed", outputs=[compare_arrays("y", r, np.float32([100.02, 1.0])),
                                             compare_arrays("z", r, np.float32([100.02, 1.0]))])
    assert _judged(monkeypatch, result, ref, got, exact={}) == [] and result.notes == []


def test_without_a_float64_run_the_magnitude_rule_judges_and_says_why(monkeypatch):
    r, g = np.float32([100.0]), np.float32([100.015])  # beyond 1e-4 + 1e-4 * 100, within 1e-4 * 100 + 1e-4 * 100
    ref, got = _runs({"y": r}, {"y": g})
    result = Verification("failed", outputs=[compare_arrays("y", r, g)])
    _judged(monkeypatch, result, ref, got, raises=VerificationUnavailable("no double kernel"))
    assert result.notes == ["output magnitude scales atol (no double kernel)"]
    assert (result.outputs[0].rule, result.outputs[0].passed) == ("magnitude", True)


def test_the_accuracy_rule_takes_the_worst_batch_and_skips_empty_ones():
    c = compare_arrays("y", np.float32([100.0]), np.float32([100.02]))
    refs = [np.float32([100.0]), np.float32([]), np.float32([100.0])]
    gots = [np.float32([100.0]), np.float32([]), np.float32([100.006])]
    accuracy._by_accuracy(c, refs, gots, [np.float64([100.003]), np.float64([]), np.float64([100.001])])
    assert c.rule == "accuracy" and c.original_error == pytest.approx(0.003, abs=1e-5)
    assert c.candidate_error == pytest.approx(0.005, abs=1e-5)
    assert c.allowed_error == pytest.approx(2 * c.original_error + 4 * accuracy.EPSILON["float32"] * 100.003, rel=1e-6)
    assert c.passed
    other = compare_arrays("y", np.float32([100.0]), np.float32([100.02]), tolerance_dtype="float32")
    other.tolerance_dtype = "int4"  # no epsilon of its own: float32's
    accuracy._by_accuracy(other, [np.float32([100.0])], [np.float32([100.0])], [np.float64([100.0])])
    assert other.allowed_error == pytest.approx(4 * accuracy.EPSILON["float32"] * 100.0)


def test_the_magnitude_rule_with_nothing_to_scale_by_keeps_atol():
    c = compare_arrays("y", np.float32([0.5]), np.float32([0.5002]))
    assert accuracy._by_magnitude(c, [np.float32([])], [np.float32([])]) and c.atol == pytest.approx(1e-4)


def test_the_shapes_are_compared_on_the_first_batch_only(monkeypatch):
    """Batches from several --inputs files may differ in shape; each batch is compared with its own."""
    ref = ModelRun("original", [{}, {}], [{"y": np.float32([100.0, 1.0])}, {"y": np.float32([100.0, 1.0, 2.0])}], ["y"])
    got = ModelRun("result", [], [{"y": np.float32([100.02, 1.0])}, {"y": np.float32([100.0, 1.0, 2.0])}], ["y"])
    result = Verification("failed", outputs=[compare_arrays("y", ref.outputs[0]["y"], got.outputs[0]["y"])])
    asked = []

    def run_float64(reference, feeds, names):
        asked.append(names)
        return [{"y": np.float64([100.01, 1.0])}, {"y": np.float64([100.0, 1.0, 2.0])}], "onnxruntime"

    monkeypatch.setattr(accuracy, "run_float64", run_float64)
    accuracy.judge_by_accuracy(result, "r", ref, got, {}, {})
    assert asked == [["y"]] and result.outputs[0].rule == "accuracy" and result.outputs[0].passed


def _at(c, atol, rtol):
    c.atol, c.rtol = atol, rtol
    return c


def test_the_accuracy_rule_distrusts_the_float64_run_below_magnitude_one_by_atol_alone():
    """scale 1.5: the bound is atol * 1.5 + rtol * 1.5 (3e-4), not atol * 2 + rtol * 1.5."""
    c = _at(compare_arrays("y", np.float32([1.5]), np.float32([1.5])), 1e-4, 1e-4)
    accuracy._by_accuracy(c, [np.float32([1.5])], [np.float32([1.5])], [np.float64([1.5 + 3.2e-4])])
    assert c.rule == "magnitude"


def test_the_accuracy_rules_bounds_are_inclusive():
    c = _at(compare_arrays("y", np.float32([0.75]), np.float32([0.75])), 0.25, 0.0)
    accuracy._by_accuracy(c, [np.float32([0.75])], [np.float32([0.75])], [np.float64([0.5])])  # e_orig == bound
    assert c.rule == "accuracy" and c.original_error == 0.25
    c = _at(compare_arrays("y", np.float32([64.0]), np.float32([64.25]), tolerance_dtype="float16"), 1.0, 0.0)
    c.tolerance_dtype = "float16"
    accuracy._by_accuracy(c, [np.float32([64.0])], [np.float32([64.25])], [np.float64([64.0])])
    assert (c.candidate_error, c.allowed_error, c.passed) == (0.25, 0.25, True)  # 4 ulps of float16 at 64
    m = _at(compare_arrays("y", np.float32([0.5]), np.float32([0.75])), 0.25, 0.0)
    assert accuracy._by_magnitude(m, [np.float32([0.5])], [np.float32([0.75])])  # diff == atol


def test_the_float64_conv_defaults_and_padding_modes():
    """_conv against onnx's own Conv for what the attribute table of test_verify_accuracy leaves out:
    no strides or pads given, auto_pad as bytes (as the evaluator may pass it), SAME with a zero or
    an odd total padding."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 6, 6))
    for kernel, attrs in ((3, {}), (1, {"auto_pad": "SAME_UPPER"}), (2, {"auto_pad": "SAME_UPPER"}),
                          (4, {"auto_pad": "SAME_LOWER"}), (4, {"auto_pad": "SAME_UPPER"})):
        w = rng.standard_normal((3, 2, kernel, kernel))
        node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, DOUBLE, None) for n in "xw"],
                                  [helper.make_tensor_value_info("y", DOUBLE, None)])
        expected = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])).run(
            None, {"x": x, "w": w})[0]
        auto_pad = attrs.get("auto_pad")
        for given in ({auto_pad, auto_pad.encode()} if auto_pad else {None}):
            got = accuracy._conv(x, w, None, given, None, None, None, None)
            assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-12), (kernel, attrs, given)


def test_the_evaluator_runs_the_vectorised_conv(monkeypatch):
    calls = []
    real = accuracy._conv
    monkeypatch.setattr(accuracy, "_conv", lambda *args: calls.append(args[1].shape) or real(*args))
    w = np.ones((2, 1, 3, 3), np.float32)
    model = build("g (float[1,1,4,4] x) => (float[1,2,2,2] y) { y = Conv (x, w) }", w=w)
    _, engine = accuracy._run_float64(model.SerializeToString(), [{"x": np.ones((1, 1, 4, 4), np.float32)}], ["y"])
    assert engine == "onnx.reference" and calls == [(2, 1, 3, 3)]


def test_the_evaluator_returns_the_tensors_asked_for_by_name():
    w = np.ones((2, 1, 3, 3), np.float32)
    model = build("""g (float[1,1,4,4] x) => (float[1,2,2,2] y) {
        c = Conv (x, w)
        y = Neg (c) }""", w=w)
    x = np.ones((1, 1, 4, 4), np.float32)
    [run], engine = accuracy._run_float64(model.SerializeToString(), [{"x": x}], ["c"])
    assert engine == "onnx.reference" and np.array_equal(run["c"], np.full((1, 2, 2, 2), 9.0))


def test_bfloat16_inputs_are_widened_too():
    import ml_dtypes

    model = build("g (bfloat16[2] x) => (float[2] y) { y = Cast <to = 1> (x) }")
    x = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    [run], engine = accuracy._run_float64(model.SerializeToString(), [{"x": x}], ["y"])
    assert engine == "onnxruntime" and run["y"].dtype == np.float64 and run["y"].tolist() == [1.5, -2.0]


def test_no_float64_run_names_the_float64_original_and_skips_tensors_of_no_known_type():
    graph = helper.make_graph([helper.make_node("Foo", ["x"], ["t"], domain="x.custom"), helper.make_node("Neg", ["t"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("x.custom", 1)])
    with pytest.raises(VerificationUnavailable) as info:
        accuracy._run_float64(model.SerializeToString(), [{"x": np.ones(2, np.float32)}], ["t"])
    assert str(info.value).startswith("no float64 run of the original: onnxruntime: onnxruntime cannot load the "
                                      "float64 original model: ")


def test_the_memory_refusal_says_how_much_and_is_strict(monkeypatch):
    monkeypatch.setattr(normfold.verify, "model_bytes", lambda model: 2**30)
    monkeypatch.setattr(accuracy, "_available_memory", lambda: 2**30)
    with pytest.raises(VerificationUnavailable, match=r"^a float64 copy of the original would need about 6\.0 GiB$"):
        accuracy.run_float64(b"", [], ["y"])
    model = _chain().SerializeToString()
    monkeypatch.setattr(normfold.verify, "model_bytes", lambda model: 1)
    monkeypatch.setattr(accuracy, "_available_memory", lambda: 10)  # 1 * 6 == 0.6 * 10: not more than allowed
    feeds = [{"x": np.ones((2, 3), np.float32), "k": np.int64([0, 0])}]
    assert accuracy.run_float64(model, feeds, ["y"])[1] == "onnxruntime"
