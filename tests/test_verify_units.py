"""verify.py's pure parts in-process, without onnxruntime where possible: option parsing, input
files, the comparison of two runs batch by batch and output by output, and the verdict. (The
command-line tests run much of this in a child process, which mutation testing cannot see.)"""

from __future__ import annotations

import numpy as np
import pytest

from builders import build
from normfold.errors import NormfoldError, VerificationUnavailable
from normfold.report import Verification
from normfold.verify import (ModelRun, _add_outputs, _conclude, _merge, compare_arrays, compare_runs,
                             load_input_file, lowest_float_types, parse_int_range, parse_shape, parse_tolerance)
from normfold.shapes import infer_shapes


# ---- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [
    ("input:1x3x224x224", ("input", [1, 3, 224, 224])),
    ("x:7", ("x", [7])),
    ("scope:x:2x3", ("scope:x", [2, 3])),   # the name may contain ':'
    ("scalar:", ("scalar", [])),            # a scalar input
])
def test_parse_shape(text, parsed):
    assert parse_shape(text) == parsed


@pytest.mark.parametrize("text", ["input", ":1x3", "x:1x", "x:ax3", "x:1,3", "x:-1"])
def test_parse_shape_rejects(text):
    with pytest.raises(NormfoldError, match="expected NAME:DIMS"):
        parse_shape(text)


@pytest.mark.parametrize("text, parsed", [
    ("input_ids:0:1000", ("input_ids", (0, 1000))), ("m:-3:-1", ("m", (-3, -1))),
    ("a:b:0:2", ("a:b", (0, 2))), ("t:0:1", ("t", (0, 1)))])
def test_parse_int_range(text, parsed):
    assert parse_int_range(text) == parsed


@pytest.mark.parametrize("text, message", [
    ("ids:5", "expected NAME:LOW:HIGH"), (":0:5", "expected NAME:LOW:HIGH"),
    ("ids:a:5", "must be integers"), ("ids:0:b", "must be integers"),
    ("ids:5:5", "HIGH must be greater"), ("ids:6:5", "HIGH must be greater")])
def test_parse_int_range_rejects(text, message):
    with pytest.raises(NormfoldError, match=message):
        parse_int_range(text)


def test_parse_tolerance():
    assert parse_tolerance(["1e-4", "logits:1e-2", "a:b:3"], "--atol") == {None: 1e-4, "logits": 1e-2, "a:b": 3.0}
    assert parse_tolerance([], "--rtol") == {}
    assert parse_tolerance(["1", "2"], "--rtol") == {None: 2.0}  # the last one given wins
    with pytest.raises(NormfoldError, match=r"--rtol 'logits:x': expected a number or OUTPUT:number"):
        parse_tolerance(["logits:x"], "--rtol")


# ---- input files ------------------------------------------------------------------------------
def test_input_files_npz_and_npy(tmp_path):
    a, b = np.arange(3, dtype=np.float32), np.ones((2, 2), np.int64)
    np.savez(tmp_path / "in.npz", b=b, a=a, extra=a)
    feeds = load_input_file(tmp_path / "in.npz", ["a", "b"])
    assert list(feeds) == ["a", "b"]  # in the model's order, extra arrays left out
    np.testing.assert_array_equal(feeds["a"], a)
    np.testing.assert_array_equal(feeds["b"], b)
    np.save(tmp_path / "one.npy", a)
    np.testing.assert_array_equal(load_input_file(tmp_path / "one.npy", ["x"])["x"], a)


def test_input_file_errors(tmp_path):
    np.savez(tmp_path / "in.npz", a=np.zeros(1))
    with pytest.raises(NormfoldError, match=r"no array for input\(s\) \['b', 'c'\]"):
        load_input_file(tmp_path / "in.npz", ["a", "c", "b"])
    np.save(tmp_path / "one.npy", np.zeros(1))
    with pytest.raises(NormfoldError, match=r"a .npy file fits a model with one input; this one has 2 \(a, b\)"):
        load_input_file(tmp_path / "one.npy", ["a", "b"])
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(NormfoldError, match="cannot read"):
        load_input_file(tmp_path / "bad.npz", ["a"])
    with pytest.raises(NormfoldError, match="cannot read"):
        load_input_file(tmp_path / "missing.npz", ["a"])


# ---- one tensor -------------------------------------------------------------------------------
def test_a_comparison_records_its_errors_and_the_tolerance_it_needed():
    ref = np.array([1.0, -2.0, 0.0], np.float32)
    got = np.array([1.5, -2.0, 0.25], np.float32)
    c = compare_arrays("y", ref, got, atol=0.1, rtol=0.1)
    assert (c.name, c.dtype, c.shape, c.passed) == ("y", "float32", [3], False)
    assert c.max_abs_error == 0.5
    assert c.max_rel_error == pytest.approx(0.25 / np.finfo(np.float64).tiny)  # |0.25| against a 0
    assert c.needed_atol == pytest.approx(0.5 - 0.1 * 1.0)  # what atol would have had to be
    assert (c.atol, c.rtol, c.tolerance_dtype) == (0.1, 0.1, None)  # both given: no default used
    d = compare_arrays("y", ref, ref.copy())
    assert d.passed and (d.max_abs_error, d.max_rel_error, d.needed_atol) == (0.0, 0.0, 0.0)
    assert (d.atol, d.rtol, d.tolerance_dtype) == (1e-4, 1e-4, "float32")


def test_a_comparison_takes_the_defaults_of_the_paths_lowest_float_type():
    ref = np.array([1.0], np.float32)
    c = compare_arrays("y", ref, ref + np.float32(5e-3), tolerance_dtype="float16")
    assert c.passed and (c.atol, c.rtol, c.tolerance_dtype) == (1e-2, 1e-2, "float16")
    c = compare_arrays("y", ref, ref, atol=0.5, tolerance_dtype="float16")  # only atol given
    assert (c.atol, c.rtol, c.tolerance_dtype) == (0.5, 1e-2, "float16")
    c = compare_arrays("y", ref.astype(np.float64), ref.astype(np.float64))
    assert (c.atol, c.rtol) == (1e-7, 1e-7)
    c = compare_arrays("y", np.array([3], np.int64), np.array([3], np.int64), tolerance_dtype="float16")
    assert c.passed and (c.atol, c.rtol, c.tolerance_dtype) == (0.0, 0.0, None)  # integers: equal


def test_an_unknown_float_type_gets_float32s_tolerance():
    ref = np.array([1.0], np.float32)
    c = compare_arrays("y", ref, ref, tolerance_dtype="float8")
    assert (c.atol, c.rtol) == (1e-4, 1e-4)


@pytest.mark.parametrize("got", [np.zeros(6, np.float32), np.zeros((3, 2), np.float32), np.zeros((2, 3), np.float64)])
def test_a_tensor_of_another_shape_or_type_fails_by_infinity(got):
    c = compare_arrays("y", np.zeros((2, 3), np.float32), got)
    assert not c.passed and c.max_abs_error == c.max_rel_error == c.needed_atol == float("inf")
    assert c.shape == [2, 3] and c.dtype == "float32"


def test_an_empty_tensor_passes_with_no_error():
    c = compare_arrays("y", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert c.passed and (c.max_abs_error, c.max_rel_error, c.needed_atol) == (0.0, 0.0, 0.0)


def test_two_batches_merge_to_the_worst_of_each():
    a = compare_arrays("y", np.array([1.0, 0.0], np.float32), np.array([1.5, 0.0], np.float32), 0.1, 0.1)
    b = compare_arrays("y", np.array([1.0, 0.0], np.float32), np.array([1.0, 0.3], np.float32), 0.1, 0.1)
    ok = compare_arrays("y", np.array([1.0], np.float32), np.array([1.0], np.float32), 0.1, 0.1)
    for first, second in ((a, b), (b, a)):
        m = _merge(first, second)
        assert m.max_abs_error == max(a.max_abs_error, b.max_abs_error)
        assert m.max_rel_error == max(a.max_rel_error, b.max_rel_error)
        assert m.needed_atol == max(a.needed_atol, b.needed_atol)
    assert not _merge(a, ok).passed and not _merge(ok, a).passed and _merge(ok, ok).passed
    assert _merge(None, a) is a


# ---- two runs ---------------------------------------------------------------------------------
def _run(label, outputs, names=("y",), exposed=(), feeds=None, float_types=None, notes=()):
    feeds = feeds or [{"x": np.zeros((2, 3), np.float32)} for _ in outputs]
    return ModelRun(label, feeds, [{k: np.asarray(v, np.float32) for k, v in o.items()} for o in outputs],
                    list(names), list(exposed), dict(float_types or {}), list(notes))


def test_runs_compare_every_batch():
    """A difference in the first of two batches fails the output, as one in the last does."""
    ref = _run("original", [{"y": [1.0]}, {"y": [2.0]}], notes=["retried"])
    for outputs in ([{"y": [8.0]}, {"y": [2.0]}], [{"y": [1.0]}, {"y": [9.0]}]):
        result = compare_runs(ref, _run("folded", outputs), seed=7)
        assert result.status == "failed" and result.detail == "outputs differ: y"
        assert result.outputs[0].max_abs_error == 7.0
        assert (result.batches, result.seed, result.inputs, result.notes) == (2, 7, {"x": [2, 3]}, ["retried"])
    assert compare_runs(ref, _run("folded", [{"y": [1.0]}, {"y": [2.0]}])).status == "passed"


def test_per_output_tolerances_apply_to_their_output_and_the_default_to_the_rest():
    ref = _run("original", [{"a": [1.0], "b": [1.0]}], names=("a", "b"))
    got = _run("folded", [{"a": [1.5], "b": [1.5]}], names=("a", "b"))
    result = compare_runs(ref, got, atol={"a": 1.0, None: 0.0}, rtol={None: 0.0})
    assert [(o.name, o.passed, o.atol) for o in result.outputs] == [("a", True, 1.0), ("b", False, 0.0)]
    assert result.detail == "outputs differ: b"
    result = compare_runs(ref, got, atol=1.0, rtol=0.0)  # a number: every output
    assert result.status == "passed"


def test_site_tensors_are_compared_under_the_default_and_the_first_failing_one_named():
    """Exposed site tensors take the default tolerance even when one is given for an output of
    that name; they are listed worst first, and the verdict names the first in graph order."""
    ref = _run("original", [{"y": [1.0], "s1": [1.0], "s2": [1.0], "s3": [1.0], "gone": [1.0]}],
               exposed=("s1", "s2", "s3", "gone"))
    got = _run("folded", [{"y": [1.0], "s1": [1.0], "s2": [1.2], "s3": [3.0]}], exposed=("s1", "s2", "s3"))
    result = compare_runs(ref, got, atol={None: 0.1, "s3": 5.0}, rtol=0.0)
    assert result.status == "passed"  # the outputs agree: sites explain, they do not fail
    assert [s.name for s in result.sites] == ["s3", "s2", "s1"]
    assert [s.passed for s in result.sites] == [False, False, True]
    assert result.first_failing_site == "s2" and result.removed_sites == ["gone"]
    got.outputs[0]["y"] = np.array([2.0], np.float32)
    result = compare_runs(ref, got, atol=0.1, rtol=0.0)
    assert result.detail == "outputs differ: y; first failing site (in graph order): s2"


def test_sites_in_a_tie_keep_graph_order():
    ref = _run("original", [{"y": [1.0], "b": [1.0], "a": [1.0]}], exposed=("b", "a"))
    got = _run("folded", [{"y": [1.0], "b": [2.0], "a": [2.0]}], exposed=("b", "a"))
    assert [s.name for s in compare_runs(ref, got, 0.0, 0.0).sites] == ["b", "a"]


def test_an_output_the_candidate_lacks_fails():
    ref = _run("original", [{"y": [1.0], "z": [1.0]}], names=("y", "z"))
    got = _run("folded", [{"y": [1.0]}], names=("y",))
    result = compare_runs(ref, got)
    [z] = [o for o in result.outputs if o.name == "z"]
    assert not z.passed and z.max_abs_error == float("inf") and result.status == "failed"


def test_the_path_float_type_of_the_reference_sets_the_default_tolerance():
    ref = _run("original", [{"y": [1.0]}], float_types={"y": "float16"})
    result = compare_runs(ref, _run("folded", [{"y": [1.005]}]))
    assert result.status == "passed" and result.outputs[0].tolerance_dtype == "float16"


def test_conclude_resets_a_verdict():
    v = Verification("failed", detail="old")
    v.outputs = [compare_arrays("y", np.ones(1, np.float32), np.ones(1, np.float32))]
    v.sites = [compare_arrays("s", np.ones(1, np.float32), np.zeros(1, np.float32))]
    _conclude(v, ["other", "s"])
    assert (v.status, v.detail, v.first_failing_site) == ("passed", "", "s")
    _conclude(v, [])
    assert v.first_failing_site is None


# ---- which tensors, which float types ----------------------------------------------------------
def test_exposed_tensors_are_those_produced_with_a_known_type():
    model = build("""g (float[2] x) => (float[2] y) {
        a = Neg (x)
        y = Neg (a) }""")
    shapes = infer_shapes(model)
    assert _add_outputs(model, ["a", "y", "x", "nowhere"], shapes) == ["a"]
    assert [o.name for o in model.graph.output] == ["y", "a"]
    assert model.graph.output[1].type.tensor_type.elem_type == 1


def test_lowest_float_type_on_the_paths():
    model = build("""g (float[2] x, double[2] d) => (float[2] y, double[2] z, float[2] w) {
        h = Cast <to=10> (x)
        h2 = Neg (h)
        y = Cast <to=1> (h2)
        z = Neg (d)
        w = Neg (x) }""")
    assert lowest_float_types(model, ["y", "z", "w"]) == {"y": "float16", "z": "float64", "w": "float32"}


# ---- the accuracy rule's arithmetic (normfold/accuracy.py) --------------------------------------
def _failed(ref, got, tolerance_dtype="float32"):
    c = compare_arrays("y", np.float32(ref), np.float32(got), tolerance_dtype=tolerance_dtype)
    assert not c.passed
    return c


def test_the_magnitude_rule_scales_atol_with_the_largest_original_value():
    from normfold.accuracy import _by_magnitude

    c = _failed([100.0, 0.0], [100.0, 0.005])
    assert _by_magnitude(c, [np.float32([100.0, 0.0])], [np.float32([100.0, 0.005])])
    assert (c.rule, c.passed) == ("magnitude", True) and c.atol == pytest.approx(1e-2)
    c = _failed([100.0, 0.0], [100.0, 0.02])  # at 0 only atol * 100 applies, not rtol * 100
    assert not _by_magnitude(c, [np.float32([100.0, 0.0])], [np.float32([100.0, 0.02])])
    c = _failed([0.5], [0.5003])  # below magnitude 1, atol stays atol
    assert not _by_magnitude(c, [np.float32([0.5])], [np.float32([0.5003])]) and c.atol == 1e-4
    c = _failed([100.0], [100.05])  # every batch counts: the second one fails
    assert not _by_magnitude(c, [np.float32([100.0]), np.float32([100.0])],
                             [np.float32([100.0]), np.float32([100.05])])


def _accuracy(x, r, g, tolerance_dtype="float32"):
    from normfold.accuracy import _by_accuracy

    c = compare_arrays("y", np.float32(r), np.float32(g), atol=None, rtol=None, tolerance_dtype=tolerance_dtype)
    c.passed = False
    _by_accuracy(c, [np.float32(r)], [np.float32(g)], [np.float64(x)])
    return c


def test_the_accuracy_rule_allows_twice_the_originals_error_plus_four_ulps():
    from normfold.accuracy import EPSILON

    c = _accuracy([100.0], [100.004], [99.993])  # |c - x| 0.007 <= 2 * 0.004 + 4 ulp(100)
    assert (c.rule, c.passed) == ("accuracy", True)
    assert c.original_error == pytest.approx(0.004, rel=1e-3) and c.candidate_error == pytest.approx(0.007, rel=1e-3)
    assert c.allowed_error == pytest.approx(2 * c.original_error + 4 * EPSILON["float32"] * 100.0)
    c = _accuracy([100.0], [100.004], [99.990])  # 0.010 > 0.008 + 4 ulp
    assert (c.rule, c.passed) == ("accuracy", False)
    ulp16 = EPSILON["float16"] * 64.0
    assert _accuracy([64.0], [64.0], [64.0 + 3 * ulp16], "float16").passed  # the original exact: ulps decide
    assert not _accuracy([64.0], [64.0], [64.0 + 5 * ulp16], "float16").passed


def test_the_accuracy_rule_never_trusts_a_reference_the_original_misses():
    """The original 1 away from the float64 run of magnitude 100 (beyond atol * 100 + rtol * 100):
    the float64 run is not trusted, and the magnitude rule decides."""
    c = _accuracy([100.0], [101.0], [101.005])
    assert (c.rule, c.passed) == ("magnitude", True)
    c = _accuracy([100.0], [101.0], [100.0])
    assert (c.rule, c.passed) == ("magnitude", False)


def test_the_accuracy_rule_is_never_looser_than_the_magnitude_bound():
    c = _accuracy([100.0], [100.015], [99.97])  # as accurate as allowed, but 0.045 from the original
    assert c.rule == "accuracy" and c.candidate_error <= c.allowed_error and not c.passed


# ---- generated inputs and their retries, on a stand-in for an onnxruntime session -----------------
class _Spec:
    def __init__(self, name, shape, type="tensor(float)"):
        self.name, self.shape, self.type = name, shape, type


class _FakeOrt:
    """get_inputs/get_outputs/run of an onnxruntime session; `accepts(feeds)` decides whether a
    run succeeds (else onnxruntime's error), every run is recorded."""

    def __init__(self, inputs, outputs=("y", "z"), accepts=lambda feeds: True):
        self.inputs, self.outputs, self.accepts, self.runs = inputs, [_Spec(n, []) for n in outputs], accepts, []

    def get_inputs(self):
        return self.inputs

    def get_outputs(self):
        return self.outputs

    def run(self, names, feeds):
        self.runs.append({k: v.shape for k, v in feeds.items()})
        if not self.accepts(feeds):
            raise RuntimeError(f"shape {[v.shape for v in feeds.values()]} rejected")
        known = [o.name for o in self.outputs]
        return [np.full(1, known.index(n), np.float32) for n in (names or known)]


def _session(*inputs, **kwargs):
    from normfold.verify import Session

    return Session("original", _FakeOrt(list(inputs), **kwargs))


def test_the_default_free_dimension_is_used_when_it_runs():
    from normfold.verify import RunOptions, _generate_and_run

    session = _session(_Spec("x", ["N", "T"]), _Spec("ids", ["N", 4], "tensor(int64)"))
    feeds, outputs, note = _generate_and_run(session, RunOptions(batches=2, int_ranges={"ids": (5, 6)}), ["z"])
    assert note == "" and len(feeds) == len(outputs) == 2 and session.session.runs == [{"x": (1, 1), "ids": (1, 4)}] * 2
    assert np.all(feeds[0]["ids"] == 5)  # the range given for it, not DEFAULT_INT_RANGE
    assert list(outputs[0]) == ["z"] and outputs[0]["z"][0] == 1  # only the outputs asked for, by name


def test_a_rejected_default_is_retried_and_the_shapes_that_ran_named():
    """Free dimensions are raised on the non-leading axes first; the note says what ran."""
    from normfold.verify import RunOptions, _generate_and_run

    session = _session(_Spec("x", ["N", "T"]), _Spec("m", ["N", "T"]), accepts=lambda f: f["x"].shape[1] >= 64)
    _, outputs, note = _generate_and_run(session, RunOptions(), ["y", "z"])
    assert note == ("onnxruntime rejected the default input shape (free dimensions 1); ran with free dimensions "
                    "at 64 (leading axis 1): x: 1x64, m: 1x64")
    assert [r["x"] for r in session.session.runs] == [(1, 1), (1, 16), (1, 64)] and list(outputs[0]) == ["y", "z"]


def test_the_leading_axis_is_raised_last_and_an_attempt_that_changes_nothing_is_skipped(monkeypatch):
    import normfold.verify as verify

    monkeypatch.setattr(verify, "MAX_INPUT_BYTES", 2000)  # 1x1024 floats and up are too large: skipped
    session = _session(_Spec("x", ["N", "T"]), _Spec("c", ["N", 3]), accepts=lambda f: f["c"].shape[0] >= 16)
    _, _, note = verify._generate_and_run(session, verify.RunOptions(), ["y"])
    assert note.endswith("ran with free dimensions at 16: x: 16x16, c: 16x3")
    assert [r["x"] for r in session.session.runs] == [(1, 1), (1, 16), (1, 64), (1, 256), (16, 16)]
    fixed = _session(_Spec("c", ["N", 3]), accepts=lambda f: f["c"].shape[0] >= 16)
    verify._generate_and_run(fixed, verify.RunOptions(), ["y"])
    assert fixed.session.runs == [{"c": (1, 3)}, {"c": (16, 3)}]  # the same shape is never run twice


def test_when_no_free_dimension_helps_the_first_error_is_raised_with_what_was_tried():
    from normfold.verify import RunOptions, _generate_and_run

    session = _session(_Spec("x", ["N"]), accepts=lambda f: False)
    with pytest.raises(VerificationUnavailable) as info:
        _generate_and_run(session, RunOptions(), ["y"])
    assert str(info.value) == ("onnxruntime failed to run the original model: shape [(1,)] rejected (also with free "
                               "dimensions raised to 16, 64, 256, 1024, 4096; give --shape or --dim)")


@pytest.mark.parametrize("options", [{}, {"shapes": {"x": [2, 3]}}, {"dims": {"T": 3}}])
def test_a_model_without_free_dimensions_fails_at_once(options):
    from normfold.verify import RunOptions, _generate_and_run

    session = _session(_Spec("x", [2, "T"]) if options else _Spec("x", [2, 3]), accepts=lambda f: False)
    with pytest.raises(VerificationUnavailable) as info:
        _generate_and_run(session, RunOptions(**options), ["y"])
    assert str(info.value) == "onnxruntime failed to run the original model: shape [(2, 3)] rejected"
    assert len(session.session.runs) == 1


def test_an_input_too_large_at_the_default_is_refused_at_once():
    from normfold.verify import RunOptions, _generate_and_run

    session = _session(_Spec("x", [1 << 16, 1 << 16]))
    with pytest.raises(VerificationUnavailable, match=r"input 'x' of shape \[65536, 65536\] would take 16.0 GiB"):
        _generate_and_run(session, RunOptions(), ["y"])


@pytest.mark.parametrize("specs, options, free", [
    ([_Spec("x", [2, 3])], {}, False),
    ([_Spec("x", [0, 3])], {}, False),                       # a dimension of size 0 is a size
    ([_Spec("x", ["N", 3])], {}, True),
    ([_Spec("x", [None])], {}, True),
    ([_Spec("x", [-1])], {}, True),
    ([_Spec("x", ["T"])], {"dims": {"T": 4}}, False),         # given by --dim
    ([_Spec("x", ["N"]), _Spec("y", ["M"])], {"shapes": {"x": [2]}}, True),  # y still has one
])
def test_free_dimensions_are_those_no_option_fixes(specs, options, free):
    from normfold.verify import RunOptions, _has_free_dims

    assert _has_free_dims(_session(*specs), RunOptions(**options)) is free


def test_benchmark_times_each_model_at_both_levels_on_every_core(monkeypatch):
    """On a clock that moves 123.456 µs per reading: each figure is one tick, rounded to 4 places
    (seconds for the session, milliseconds for the median run); 3 warm-up runs and 20 timed ones."""
    import time

    import normfold.verify as verify

    clock = iter(np.arange(10_000) * 123.456e-6)
    opened, runs = [], []
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(verify, "open_session", lambda *a, **k: opened.append((a, k)) or a[1])
    monkeypatch.setattr(verify, "_run", lambda session, feeds: runs.append(session))
    result = verify.benchmark_models({"original": "a.onnx", "folded": "b.onnx"}, {"x": np.zeros(1)})
    tick = {"session_s": 0.0001, "latency_ms": 0.1235}
    assert result == {"original": {"disabled": tick, "all": tick}, "folded": {"disabled": tick, "all": tick}}
    assert opened == [(("a.onnx", "original", "disabled"), {"threads": 0}), (("a.onnx", "original", "all"), {"threads": 0}),
                      (("b.onnx", "folded", "disabled"), {"threads": 0}), (("b.onnx", "folded", "all"), {"threads": 0})]
    assert runs == ["original"] * 46 + ["folded"] * 46


def test_an_unreadable_input_file_says_why(tmp_path):
    with pytest.raises(NormfoldError, match=r"^--inputs .*missing.npz: cannot read \(.*No such file or directory"):
        load_input_file(tmp_path / "missing.npz", ["a"])


def test_exposed_tensors_keep_the_order_asked_and_skip_what_cannot_be_exposed():
    model = build("""g (float[2] x) => (float[2] y) {
        a = Neg (x)
        b = Neg (a)
        y = Neg (b) }""")
    assert _add_outputs(model, ["y", "nowhere", "b", "a"], infer_shapes(model)) == ["b", "a"]
    assert [o.name for o in model.graph.output] == ["y", "b", "a"]


def test_with_outputs_serializes_the_model_with_the_tensors_it_could_expose(tmp_path):
    import onnx

    from normfold.verify import with_outputs

    model = build("""g (float[2] x) => (float[2] y) {
        a = Neg (x)
        y = Neg (a) }""")
    onnx.save(model, tmp_path / "m.onnx")
    for source in (tmp_path / "m.onnx", model.SerializeToString()):
        data, exposed = with_outputs(source, ["a", "x"])
        assert exposed == ["a"]
        assert [o.name for o in onnx.load_from_string(data).graph.output] == ["y", "a"]
    assert [o.name for o in onnx.load(tmp_path / "m.onnx").graph.output] == ["y"]  # the file is untouched


# ---- a run in a child process -----------------------------------------------------------------
def test_an_isolated_call_returns_its_result_or_raises_its_error_here():
    from normfold.verify import Session, _run, isolated, parse_shape

    assert isolated(parse_shape, ("x:2x3",), "original") == ("x", [2, 3])
    with pytest.raises(NormfoldError, match=r"^--shape 'bad': expected NAME:DIMS") as info:
        isolated(parse_shape, ("bad",), "original")
    assert type(info.value) is NormfoldError
    with pytest.raises(VerificationUnavailable, match=r"^onnxruntime failed to run the folded model: "):
        isolated(_run, (Session("folded", None), {}, ["y"]), "folded")  # no session: unavailable
    with pytest.raises(RuntimeError, match=r"(?s)^Traceback .*ValueError: invalid literal for int"):
        isolated(int, ("x",), "original")


def test_a_child_that_ends_without_a_result_is_named_with_its_exit_code():
    import os

    from normfold.verify import isolated

    with pytest.raises(VerificationUnavailable) as info:
        isolated(os._exit, (3,), "float64 original")
    assert str(info.value) == ("the process running the float64 original model ended without a result "
                               "(exit code 3; out of memory?)")


class _Sender:
    def __init__(self):
        self.sent, self.closed = [], False

    def send(self, value):
        self.sent.append(value)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("func, args, kind, payload", [
    (parse_shape, ("x:4",), "ok", ("x", [4])),
    (parse_shape, ("bad",), "error", "--shape 'bad': expected NAME:DIMS such as input:1x3x224x224"),
    (lambda: (_ for _ in ()).throw(VerificationUnavailable("no run")), (), "unavailable", "no run"),
])
def test_the_child_sends_its_result_or_error_by_kind(monkeypatch, func, args, kind, payload):
    """What the child process runs, called here (mutation testing never sees inside a child)."""
    import normfold.watchdog
    from normfold.verify import _child

    parents = []
    monkeypatch.setattr(normfold.watchdog, "die_with_parent", parents.append)
    sender = _Sender()
    _child(sender, func, args, 1234)
    assert sender.sent == [(kind, payload)] and sender.closed and parents == [1234]


def test_the_child_sends_an_unexpected_error_with_its_traceback(monkeypatch):
    import normfold.watchdog
    from normfold.verify import _child

    monkeypatch.setattr(normfold.watchdog, "die_with_parent", lambda parent: None)
    sender = _Sender()
    _child(sender, int, ("x",), 1)
    [(kind, text)] = sender.sent
    lines = text.splitlines()
    assert kind == "internal" and lines[0] == "Traceback (most recent call last):" and lines[1].startswith("  File ")
    assert lines[-1] == "ValueError: invalid literal for int() with base 10: 'x'"


# ---- float types inside subgraphs ---------------------------------------------------------------
def _if_model(then_body: str, **consts):
    return build(f"""g (bool c, float[2] x) => (float[2] y) {{
        y = If (c) <then_branch = t () => (float[2] ty) {{ {then_body} }},
                    else_branch = e () => (float[2] ey) {{ ey = Neg (x) }}> }}""", **consts)


def test_a_cast_inside_a_branch_lowers_the_float_type_of_the_if():
    model = _if_model("h = Cast <to=10> (x)\n ty = Cast <to=1> (h)")
    assert lowest_float_types(model, ["y"]) == {"y": "float16"}
    assert lowest_float_types(model, ["y"], shapes={}) == {"y": "float16"}  # from the Cast alone


def test_an_inferred_type_inside_a_branch_lowers_the_float_type_of_the_if():
    model = _if_model("ty = Neg (x)")
    assert lowest_float_types(model, ["y"], shapes={"ty": (10, [2])}) == {"y": "float16"}


def test_a_branch_initializer_lowers_the_float_type_of_the_if():
    import onnx

    model = _if_model("ty = Neg (x)")
    then = model.graph.node[0].attribute[0].g
    then.initializer.append(onnx.numpy_helper.from_array(np.zeros(2, np.float16), "unused"))
    assert lowest_float_types(model, ["y"], shapes={}) == {"y": "float16"}


def test_a_cast_in_a_nested_branch_counts_too():
    inner = ("ty = If (c) <then_branch = t2 () => (float[2] u) { h = Cast <to=10> (x)\n u = Cast <to=1> (h) }, "
             "else_branch = e2 () => (float[2] v) { v = Neg (x) }>")
    assert lowest_float_types(_if_model(inner), ["y"], shapes={}) == {"y": "float16"}
    assert lowest_float_types(_if_model("ty = Neg (x)"), ["y"], shapes={}) == {}


# ---- one model's run, in this process ------------------------------------------------------------
def _neg_model():
    return build("""g (float[N,2] x) => (float[N,2] y) {
        a = Neg (x)
        y = Neg (a) }""")


def test_a_session_is_made_with_the_options_asked():
    from normfold.verify import open_session

    data = _neg_model().SerializeToString()
    for optimize, level in ((False, "ORT_DISABLE_ALL"), (True, "ORT_ENABLE_BASIC"), ("extended", "ORT_ENABLE_EXTENDED"),
                            ("all", "ORT_ENABLE_ALL"), ("disabled", "ORT_DISABLE_ALL"), ("basic", "ORT_ENABLE_BASIC")):
        session = open_session(data, "original", optimize)
        options = session.session.get_session_options()
        assert (session.label, options.graph_optimization_level.name) == ("original", level)
        assert (options.log_severity_level, options.intra_op_num_threads) == (4, 1)
        assert session.session.get_providers() == ["CPUExecutionProvider"]
    options = open_session(data, "x", threads=3, external_folder="/some/where").session.get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level.name == "ORT_DISABLE_ALL"  # by default: no optimization
    assert options.get_session_config_entry("session.model_external_initializers_file_folder_path") == "/some/where"


def test_a_model_onnxruntime_cannot_load_is_unavailable_with_the_reason(tmp_path):
    from normfold.verify import open_session

    with pytest.raises(VerificationUnavailable, match=r"^onnxruntime cannot load the folded model: .*protobuf"):
        open_session(b"not a model", "folded")
    (tmp_path / "m.onnx").write_bytes(_neg_model().SerializeToString())
    assert open_session(tmp_path / "m.onnx", "original").session.get_inputs()[0].name == "x"  # a path works too


def test_run_model_runs_here_unless_the_model_is_large(monkeypatch, tmp_path):
    """Only a model over ISOLATE_BYTES (or isolate=True) runs in a child, named by its label."""
    import normfold.verify as verify

    calls = []
    monkeypatch.setattr(verify, "isolated", lambda func, args, label: calls.append(label) or func(*args))
    path = tmp_path / "m.onnx"
    path.write_bytes(_neg_model().SerializeToString())
    size = path.stat().st_size
    monkeypatch.setattr(verify, "ISOLATE_BYTES", size)
    run = verify.run_model(path, "original", verify.RunOptions())
    assert calls == [] and run.label == "original" and run.float_types == {}  # analyse is off by default
    monkeypatch.setattr(verify, "ISOLATE_BYTES", size - 1)
    run = verify.run_model(path, "folded", verify.RunOptions(seed=3), expose=["a"])
    assert calls == ["folded"] and run.exposed == ["a"] and run.output_names == ["y"]
    np.testing.assert_array_equal(run.outputs[0]["a"], -run.feeds[0]["x"])
    verify.run_model(path, "original", verify.RunOptions(), isolate=False)
    verify.run_model(path.read_bytes(), "float64", verify.RunOptions(), isolate=True)
    assert calls == ["folded", "float64"]


def test_exposing_tensors_never_reads_external_weights_into_this_process(monkeypatch, tmp_path):
    import onnx

    import normfold.verify as verify

    model = build("g (float[300] x) => (float[300] y) { a = Add (x, w)\n y = Neg (a) }",
                  w=np.arange(300, dtype=np.float32))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)

    def refuse(*args, **kwargs):
        raise AssertionError("external data loaded into Python")

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", refuse)
    monkeypatch.setattr(onnx, "load_external_data_for_model", refuse, raising=False)
    run = verify.run_model(tmp_path / "m.onnx", "original", verify.RunOptions(), expose=["a"], analyse=True)
    np.testing.assert_allclose(run.outputs[0]["a"], run.feeds[0]["x"] + np.arange(300))
    assert run.float_types == {"y": "float32", "a": "float32"}


# ---- two runs: the remaining rules ---------------------------------------------------------------
def test_an_output_the_candidate_lacks_fails_by_infinity_whatever_its_place():
    ref = _run("original", [{"z": np.ones((2, 1)), "y": [1.0]}], names=("z", "y"))
    got = _run("folded", [{"y": [3.0]}], names=("y",))
    result = compare_runs(ref, got, atol=0.5, rtol=0.5)
    z, y = result.outputs
    assert (z.name, z.dtype, z.shape, z.max_abs_error, z.max_rel_error, z.atol, z.rtol, z.passed, z.needed_atol) == (
        "z", "float32", [2, 1], float("inf"), float("inf"), 0.0, 0.0, False, float("inf"))
    assert (y.name, y.passed, y.max_abs_error) == ("y", False, 2.0)  # compared even after a missing one
    assert result.detail == "outputs differ: z, y" and result.seed == 0


def test_per_output_rtol_applies_to_its_output_and_never_to_a_site_of_that_name():
    ref = _run("original", [{"a": [1.0], "b": [1.0], "s": [1.0]}], names=("a", "b"), exposed=("s",))
    got = _run("folded", [{"a": [1.5], "b": [1.5], "s": [1.5]}], names=("a", "b"), exposed=("s",))
    result = compare_runs(ref, got, atol=0.0, rtol={"a": 1.0, "s": 1.0, None: 0.1})
    assert [(o.name, o.passed, o.rtol) for o in result.outputs] == [("a", True, 1.0), ("b", False, 0.1)]
    assert [(s.name, s.passed, s.rtol) for s in result.sites] == [("s", False, 0.1)]


def test_sites_of_equal_needed_tolerance_are_listed_by_their_error():
    """With rtol 1, every site passes (needed_atol 0): the larger absolute error comes first."""
    ref = _run("original", [{"y": [1.0], "a": [1.0], "b": [4.0]}], exposed=("a", "b"))
    got = _run("folded", [{"y": [1.0], "a": [1.5], "b": [6.0]}], exposed=("a", "b"))
    sites = compare_runs(ref, got, atol=0.0, rtol=1.0).sites
    assert [(s.name, s.needed_atol, s.max_abs_error) for s in sites] == [("b", 0.0, 2.0), ("a", 0.0, 0.5)]


def test_bfloat16_tensors_are_floats_with_bfloat16s_tolerance():
    import ml_dtypes

    ref = np.array([1.0, 2.0], ml_dtypes.bfloat16)
    c = compare_arrays("y", ref, (ref.astype(np.float32) + 0.03).astype(ml_dtypes.bfloat16))
    assert c.passed and (c.dtype, c.atol, c.rtol, c.tolerance_dtype) == ("bfloat16", 6e-2, 6e-2, "bfloat16")


def test_a_tensor_of_another_shape_keeps_its_name_and_tolerances():
    c = compare_arrays("y", np.zeros(2, np.float32), np.zeros(3, np.float32), tolerance_dtype="float16")
    assert (c.name, c.atol, c.rtol, c.passed, c.tolerance_dtype) == ("y", 1e-2, 1e-2, False, "float16")
    c = compare_arrays("y", np.zeros(2, np.float32), np.zeros(3, np.float32), atol=0.5, rtol=0.25)
    assert (c.atol, c.rtol, c.passed, c.tolerance_dtype) == (0.5, 0.25, False, None)


def test_huge_errors_and_tolerances_warn_about_nothing():
    """A relative error against 0 overflows to inf, and so does a difference of opposite huge
    values; equal infinities subtract to NaN: no RuntimeWarning on stderr of a run (numpy would
    print one per call)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = compare_arrays("y", np.array([0.0, 1.0]), np.array([1e10, 1.0]))
        assert not c.passed and c.max_rel_error == float("inf") and c.max_abs_error == 1e10
        c = compare_arrays("y", np.array([-1e308]), np.array([1e308]))
        assert not c.passed and c.max_abs_error == float("inf")
        c = compare_arrays("y", np.array([np.inf, -np.inf]), np.array([np.inf, -np.inf]))
        assert c.passed and c.max_abs_error == 0.0


# ---- generated inputs ----------------------------------------------------------------------------
def test_inputs_are_seeded_normal_floats_and_integers_in_their_range():
    from normfold.verify import make_inputs

    session = _session(_Spec("x", [2, 3]), _Spec("ids", [4], "tensor(int32)"), _Spec("m", [5], "tensor(bool)"),
                       _Spec("t", [6], "tensor(int64)"))
    feeds = make_inputs(session, seed=5, int_ranges={"t": (7, 9)})
    assert list(feeds) == ["x", "ids", "m", "t"]
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(feeds["x"], rng.standard_normal([2, 3]).astype(np.float32))
    assert feeds["x"].dtype == np.float32
    assert feeds["ids"].dtype == np.int32 and set(feeds["ids"].tolist()) <= {0, 1}  # DEFAULT_INT_RANGE
    np.testing.assert_array_equal(feeds["ids"], rng.integers(0, 2, size=[4]).astype(np.int32))
    assert feeds["m"].dtype == np.bool_ and feeds["m"].shape == (5,)
    np.testing.assert_array_equal(feeds["m"], rng.integers(0, 2, size=[5]).astype(np.bool_))
    assert feeds["t"].dtype == np.int64 and set(feeds["t"].tolist()) <= {7, 8}
    np.testing.assert_array_equal(feeds["t"], rng.integers(7, 9, size=[6]))
    assert not np.array_equal(make_inputs(session, seed=6)["x"], feeds["x"])
    np.testing.assert_array_equal(make_inputs(session)["x"], np.random.default_rng(0).standard_normal([2, 3]).astype(np.float32))


def test_half_and_bfloat16_inputs_are_generated_in_their_type():
    import ml_dtypes

    from normfold.verify import make_inputs

    feeds = make_inputs(_session(_Spec("h", [3], "tensor(float16)"), _Spec("b", [3], "tensor(bfloat16)"),
                                 _Spec("d", [3], "tensor(double)")))
    assert (feeds["h"].dtype, feeds["b"].dtype, feeds["d"].dtype) == (np.float16, ml_dtypes.bfloat16, np.float64)
    assert len(set(feeds["b"].astype(np.float32).tolist())) == 3  # normal values, not 0s and 1s


def test_an_input_of_a_type_that_cannot_be_generated_is_unavailable():
    from normfold.verify import make_inputs

    with pytest.raises(VerificationUnavailable) as info:
        make_inputs(_session(_Spec("x", [2]), _Spec("s", [2], "tensor(string)")))
    assert str(info.value) == "input 's' has type tensor(string), which normfold cannot generate"


def test_shapes_and_ranges_must_name_inputs_and_shapes_fit_their_rank():
    from normfold.verify import make_inputs

    session = _session(_Spec("x", ["N", 3]), _Spec("a", [2]))
    with pytest.raises(NormfoldError) as info:
        make_inputs(session, shapes={"q": [1], "x": [1, 3], "p": [2]})
    assert str(info.value) == "--shape names ['p', 'q'] that are not model inputs (inputs: ['a', 'x'])"
    with pytest.raises(NormfoldError) as info:
        make_inputs(session, int_ranges={"ids": (0, 5)})
    assert str(info.value) == "--int-range names ['ids'] that are not model inputs (inputs: ['a', 'x'])"
    with pytest.raises(NormfoldError) as info:
        make_inputs(session, shapes={"x": [4]})
    assert str(info.value) == "--shape x: rank 1 but the model input has rank 2"
    assert make_inputs(session, shapes={"x": [4, 5]})["x"].shape == (4, 5)  # a whole shape, taken as given


def test_dynamic_dimensions_take_dim_then_a_shape_given_for_another_input_then_the_free_value():
    from normfold.verify import make_inputs

    session = _session(_Spec("x", ["N", "T", "C"]), _Spec("m", ["N", "T", "C", None]), _Spec("y", [None, "T", -1]))
    feeds = make_inputs(session, shapes={"x": [3, 4, 5]}, dims={"C": 2}, free=(7, 9))
    assert feeds["x"].shape == (3, 4, 5)
    assert feeds["m"].shape == (3, 4, 2, 7)   # --dim wins over the shape of x; an unnamed one is free
    assert feeds["y"].shape == (9, 4, 7)      # the leading axis takes the leading value
    feeds = make_inputs(session, free=(7, None))
    assert feeds["m"].shape == (7, 7, 7, 7) and feeds["y"].shape == (7, 7, 7)


def test_a_symbol_on_some_inputs_leading_axis_takes_the_leading_value_everywhere():
    from normfold.verify import make_inputs

    feeds = make_inputs(_session(_Spec("x", ["B", "T"]), _Spec("m", ["T", "B"]), _Spec("z", [2, "S"])), free=(5, 1))
    assert feeds["x"].shape == (1, 1) and feeds["m"].shape == (1, 1) and feeds["z"].shape == (2, 5)
    feeds = make_inputs(_session(_Spec("x", ["B", "T"]), _Spec("s", [])), free=(5, 1))  # a scalar has no axis
    assert feeds["x"].shape == (1, 5) and feeds["s"].shape == ()


def test_a_shape_of_another_rank_names_no_symbol():
    from normfold.verify import make_inputs

    session = _session(_Spec("x", ["N", "T"]), _Spec("y", ["N", "T"]))
    with pytest.raises(NormfoldError, match="rank 3"):
        make_inputs(session, shapes={"x": [2, 3, 4]})
    from normfold.verify import _free_dims

    free_dim = _free_dims(session.session.get_inputs(), {"x": [2, 3, 4]}, {}, (6, None))
    assert (free_dim(0, "N"), free_dim(1, "T")) == (6, 6)
    free_dim = _free_dims(session.session.get_inputs(), {"x": [2, 3]}, {}, (6, None))
    assert (free_dim(0, "N"), free_dim(1, "T")) == (2, 3)


def test_run_model_opens_its_session_as_asked_and_names_the_model_in_errors(monkeypatch):
    import normfold.verify as verify

    opened = []
    real = verify.open_session
    monkeypatch.setattr(verify, "open_session", lambda *a, **k: opened.append((a[1:], k)) or real(*a, **k))
    verify.run_model(_neg_model().SerializeToString(), "folded", verify.RunOptions(opt_level="extended"))
    assert opened == [(("folded", "extended"), {"external_folder": None})]
    with pytest.raises(VerificationUnavailable, match=r"^onnxruntime cannot load the folded model: .*protobuf"):
        verify.run_model(b"not a model", "folded", verify.RunOptions())
    with pytest.raises(VerificationUnavailable, match=r"^cannot read the float64 model: .*onnx.ModelProto"):
        verify.run_model(b"not a model", "float64", verify.RunOptions(), expose=["a"])


def test_the_reference_run_is_the_original_on_the_feeds_given(monkeypatch):
    import normfold.verify as verify

    calls = []
    monkeypatch.setattr(verify, "isolated", lambda func, args, label: calls.append(label) or func(*args))
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    run = verify.run_reference(_neg_model().SerializeToString(), sites=["a"], feeds={"x": x}, isolate=True)
    assert calls == ["original"] and run.label == "original" and run.exposed == ["a"]
    assert len(run.feeds) == 1 and run.feeds[0]["x"] is x
    np.testing.assert_array_equal(run.outputs[0]["y"], x)
    with pytest.raises(VerificationUnavailable, match=r"^cannot read the original model: "):
        verify.run_reference(b"not a model", isolate=False)
    assert calls == ["original"]


# ---- compare_models, on tiny models in this process ----------------------------------------------
def _shifted(offset: float, rank: str = "N,2"):
    """y = x + offset, through an exposed tensor `a` (= x + offset too)."""
    return build(f"""g (float[{rank}] x) => (float[{rank}] y) {{
        a = Add (x, off)
        y = Identity (a) }}""", off=np.float32(offset)).SerializeToString()


def test_compare_models_runs_both_on_the_options_inputs():
    from normfold.verify import compare_models

    v = compare_models(_shifted(0.0), _shifted(0.0), seed=4, shapes={"x": [3, 2]}, batches=2, sites=["a"],
                       opt_level="basic", accuracy=False)
    assert (v.status, v.seed, v.batches, v.inputs) == ("passed", 4, 2, {"x": [3, 2]})
    assert [s.name for s in v.sites] == ["a"] and [o.name for o in v.outputs] == ["y"]
    v = compare_models(_shifted(0.0, "N,T"), _shifted(0.0, "N,T"), dims={"T": 5}, accuracy=False)
    assert v.inputs == {"x": [1, 5]}
    v = compare_models(_shifted(0.0), _shifted(0.0), feeds={"x": np.zeros((7, 2), np.float32)})
    assert v.inputs == {"x": [7, 2]} and v.status == "passed"  # the candidate runs on the same feeds


def test_compare_models_reads_input_files_and_ints_in_their_range(tmp_path):
    from normfold.verify import compare_models

    np.save(tmp_path / "a.npy", np.ones((4, 2), np.float32))
    np.save(tmp_path / "b.npy", np.ones((5, 2), np.float32))
    v = compare_models(_shifted(0.0), _shifted(1e-3), input_files=[str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
                       accuracy=False)
    assert (v.batches, v.inputs, v.status) == (2, {"x": [4, 2]}, "failed")
    ids = build("g (int64[3] i) => (int64[3] y) { y = Identity (i) }").SerializeToString()
    assert compare_models(ids, ids, int_ranges={"i": (5, 6)}).status == "passed"
    with pytest.raises(NormfoldError, match="--int-range names"):
        compare_models(ids, ids, int_ranges={"j": (5, 6)})


def test_compare_models_applies_the_tolerances_given():
    from normfold.verify import compare_models

    v = compare_models(_shifted(0.0), _shifted(1e-3), accuracy=False)
    assert v.status == "failed" and v.outputs[0].atol == 1e-4
    v = compare_models(_shifted(0.0), _shifted(1e-3), atol=2e-3, rtol=0.0)
    assert v.status == "passed" and (v.outputs[0].atol, v.outputs[0].rtol) == (2e-3, 0.0)
    v = compare_models(_shifted(0.0), _shifted(1e-3), atol={"y": 2e-3}, rtol={"y": 0.5})
    assert v.status == "passed" and (v.outputs[0].atol, v.outputs[0].rtol) == (2e-3, 0.5)
    with pytest.raises(NormfoldError) as info:
        compare_models(_shifted(0.0), _shifted(0.0), atol={"q": 1.0, None: 1.0}, rtol={"p": 1.0})
    assert str(info.value) == "tolerance given for ['p', 'q'], which are not outputs (outputs: ['y'])"


def test_compare_models_reuses_the_reference_run_and_judges_failures_by_accuracy(monkeypatch):
    import normfold.accuracy
    from normfold.verify import compare_models, run_reference

    ref = run_reference(_shifted(0.0), sites=["a"])
    v = compare_models(b"never read", _shifted(0.0), reference_run=ref, accuracy=False)
    assert v.status == "passed" and [s.name for s in v.sites] == ["a"]  # the candidate's `a` compared too
    judged = []

    def judge(result, reference, ref_run, got_run, atols, rtols):
        judged.append((reference, ref_run is ref, got_run.label, atols, rtols))
        for c in result.outputs + result.sites:
            c.passed = True

    monkeypatch.setattr(normfold.accuracy, "judge_by_accuracy", judge)
    v = compare_models(b"the original", _shifted(1.0), reference_run=ref, rtol=0.5)
    assert judged == [(b"the original", True, "folded", {None: None}, {None: 0.5})]
    assert v.status == "passed" and v.first_failing_site is None  # concluded again after the judging
    assert compare_models(b"x", _shifted(1.0), reference_run=ref, accuracy=False).status == "failed"
    assert compare_models(b"x", _shifted(0.0), reference_run=ref).status == "passed" and len(judged) == 1


def test_compare_models_isolates_both_runs_when_asked(monkeypatch):
    import normfold.verify as verify

    calls = []
    monkeypatch.setattr(verify, "isolated", lambda func, args, label: calls.append(label) or func(*args))
    assert verify.compare_models(_shifted(0.0), _shifted(0.0), isolate=True).status == "passed"
    assert calls == ["original", "folded"]
    verify.compare_models(_shifted(0.0), _shifted(0.0), isolate=False)
    assert calls == ["original", "folded"]


# ---- what the run of verify's mutants left alive --------------------------------------------------
def test_model_bytes_counts_the_external_data_files_it_names(tmp_path, monkeypatch):
    import onnx

    import normfold.verify as verify

    model = build("g (float[300] x) => (float[300] y) { a = Add (x, w)\n y = Add (a, v) }",
                  w=np.arange(300, dtype=np.float32), v=np.ones(300, np.float32))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    size = (tmp_path / "m.onnx").stat().st_size
    assert verify.model_bytes(tmp_path / "m.onnx") == size + 2400  # one file counted once
    assert verify.model_bytes(b"12345") == 5
    monkeypatch.chdir("/")
    assert verify.model_bytes(str(tmp_path / "m.onnx")) == size + 2400  # the data beside the model, not here
    monkeypatch.setattr(verify, "ISOLATE_BYTES", size)  # not below it: not parsed, the file alone
    assert verify.model_bytes(tmp_path / "m.onnx") == size
    monkeypatch.setattr(verify, "ISOLATE_BYTES", size + 1)
    assert verify.model_bytes(tmp_path / "m.onnx") == size + 2400
    (tmp_path / "m.data").unlink()
    assert verify.model_bytes(tmp_path / "m.onnx") == size  # a missing data file counts nothing
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff")
    assert verify.model_bytes(tmp_path / "junk.onnx") == 2


def test_the_float_type_of_a_cast_alone_and_a_path_reached_twice():
    """The inputs are walked last first: x is reached through Neg, then again beside the Cast."""
    model = build("""g (float[2] x) => (float[2] y) {
        h = Cast <to=10> (x)
        r = Cast <to=1> (h)
        p = Neg (x)
        q = Add (r, x)
        y = Add (q, p) }""")
    assert lowest_float_types(model, ["y"], shapes={}) == {"y": "float16"}


def test_bool_inputs_are_0_or_1_whatever_the_int_range():
    from normfold.verify import make_inputs

    feeds = make_inputs(_session(_Spec("m", [200], "tensor(bool)")), int_ranges={"m": (1, 2)})
    expected = np.random.default_rng(0).integers(0, 2, size=[200]).astype(np.bool_)
    np.testing.assert_array_equal(feeds["m"], expected)
    assert 0 < feeds["m"].sum() < 200


def test_a_nan_on_one_side_is_an_infinite_error():
    c = compare_arrays("y", np.array([1.0, np.nan], np.float32), np.array([np.nan, np.nan], np.float32))
    assert not c.passed and c.max_abs_error == float("inf") and c.needed_atol == float("inf")


def test_sizes_0_stay_0_and_the_input_size_limit_is_inclusive(monkeypatch):
    import normfold.verify as verify

    assert verify.make_inputs(_session(_Spec("x", [0, 3])))["x"].shape == (0, 3)
    monkeypatch.setattr(verify, "MAX_INPUT_BYTES", 24)
    assert verify.make_inputs(_session(_Spec("x", [2, 3])))["x"].shape == (2, 3)  # 24 bytes: allowed
    with pytest.raises(VerificationUnavailable) as info:
        verify.make_inputs(_session(_Spec("x", [5, 5])))
    assert str(info.value) == ("input 'x' of shape [5, 5] would take 0.0 GiB; give smaller dimensions with --shape "
                               "or --dim")


def test_a_shape_whose_element_count_overflows_int64_is_still_too_large():
    from normfold.verify import make_inputs

    with pytest.raises(VerificationUnavailable, match=r"would take \d+\.\d GiB"):
        make_inputs(_session(_Spec("x", [1 << 32, 1 << 32])))


def test_too_large_at_the_default_names_the_default_shape():
    from normfold.verify import RunOptions, _generate_and_run

    session = _session(_Spec("x", ["N", "T", 1 << 16, 1 << 16]))
    with pytest.raises(VerificationUnavailable, match=r"^input 'x' of shape \[1, 1, 65536, 65536\] would take"):
        _generate_and_run(session, RunOptions(), ["y"])


def test_after_the_accuracy_rule_the_verdict_names_the_first_failing_site(monkeypatch):
    import normfold.accuracy
    from normfold.verify import compare_models, run_reference

    ref = run_reference(_shifted(0.0), sites=["a"])
    monkeypatch.setattr(normfold.accuracy, "judge_by_accuracy", lambda *args: None)  # judges nothing
    v = compare_models(b"x", _shifted(1.0), reference_run=ref)
    assert v.status == "failed" and v.first_failing_site == "a"
    assert v.detail == "outputs differ: y; first failing site (in graph order): a"


def test_compare_models_runs_both_at_the_optimization_level_asked(monkeypatch):
    import normfold.verify as verify

    levels = []
    real = verify.open_session
    monkeypatch.setattr(verify, "open_session", lambda model, label, level=False, **k: levels.append((label, level))
                        or real(model, label, level, **k))
    verify.compare_models(_shifted(0.0), _shifted(0.0), opt_level="basic")
    assert levels == [("original", "basic"), ("folded", "basic")]


# ---- the child's start, the session's providers, numpy's error state ---------------------------------
_STATE_OF_THE_PARENT = {"changed": False}


def _state_of_the_process():
    import multiprocessing

    return _STATE_OF_THE_PARENT["changed"], multiprocessing.current_process().daemon


def test_an_isolated_call_runs_in_a_fresh_daemon_child(monkeypatch):
    """Spawned, not forked: the child imports the modules anew and sees nothing the parent changed
    since (a fork would also copy a parent's threads, onnxruntime's among them, in whatever state
    they are). A daemon: multiprocessing ends it when the run exits."""
    from normfold.verify import isolated

    monkeypatch.setitem(_STATE_OF_THE_PARENT, "changed", True)
    assert isolated(_state_of_the_process, (), "original") == (False, True)


def test_a_session_runs_on_the_cpu_provider_without_a_warning(capfd):
    """The provider is named as onnxruntime spells it: a misspelled one would still end on the CPU,
    after a UserWarning and an 'EP Error' on the console."""
    import warnings

    from normfold.verify import open_session

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = open_session(_neg_model().SerializeToString(), "original")
    assert session.session.get_providers() == ["CPUExecutionProvider"]
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr() == ("", "")


def test_an_overflowing_relative_tolerance_is_infinite_under_any_numpy_error_state():
    """rtol * |ref| past float64's range is an infinite tolerance: an infinite error passes it, and
    neither a warning nor a caller's np.seterr(all="raise") interrupts the comparison."""
    import warnings

    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        c = compare_arrays("y", np.array([1e308, 1.0]), np.array([np.inf, 1.0]), atol=0.0, rtol=10.0)
    assert c.passed and c.max_abs_error == float("inf") and c.needed_atol == 0.0
