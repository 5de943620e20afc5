"""api.py's decisions in-process: exit codes from a verification, timeouts, where a model goes,
--inputs checks, the opset, and which options each verification step hands to its child process
(the child itself is replaced here: mutation testing never sees inside one)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import build
from normfold import api, exit_codes
from normfold.errors import NormfoldError, VerificationTimeout, VerificationUnavailable
from normfold.report import Verification


# ---- exit codes --------------------------------------------------------------------------------
@pytest.mark.parametrize("status, detail, allow, code", [
    ("passed", "", False, exit_codes.OK),
    ("skipped", "--no-verify", False, exit_codes.OK),
    ("failed", "outputs differ: y", True, exit_codes.OUTPUTS_DIFFER),
    ("unavailable", "custom op", False, exit_codes.UNVERIFIED),
    ("unavailable", "custom op", True, exit_codes.OK),
    ("unavailable", "timed out: after 5 s", True, exit_codes.UNVERIFIED),  # a timeout is never allowed
    ("unavailable", "it timed out: after 5 s", True, exit_codes.OK),      # only the prefix says so
])
def test_the_exit_code_follows_the_verification(status, detail, allow, code):
    verify = api.VerifyOptions(allow_unverified=allow)
    assert api._exit_code(Verification(status, detail=detail), verify) == code


def test_only_an_unavailable_verification_can_have_timed_out():
    assert api._timed_out(Verification("unavailable", detail="timed out: x"))
    assert not api._timed_out(Verification("failed", detail="timed out: x"))
    assert not api._timed_out(None)


def test_what_is_left_of_the_timeout(monkeypatch):
    monkeypatch.setattr(api.time, "monotonic", lambda: 100.0)
    assert api._remaining(None, 7.0) == 7.0 and api._remaining(None, None) is None
    assert api._remaining(103.5, 7.0) == 3.5 and api._remaining(99.0, 7.0) == 0.0


# ---- where a model goes ------------------------------------------------------------------------
def test_the_target_of_a_model(tmp_path):
    src = tmp_path / "m.onnx"
    t = api.make_target(src)
    assert (t.source, t.dest, t.data_name, t.in_place) == (src, tmp_path / "m.folded.onnx", "m.folded.onnx.data", False)
    t = api.make_target(src, tmp_path / "o.onnx", external_data="w.bin")
    assert (t.dest, t.data_name) == (tmp_path / "o.onnx", "w.bin")
    t = api.make_target(src, in_place=True)
    assert (t.dest, t.in_place, t.data_name) == (src, True, "m.onnx.data")
    assert api.make_target(src, tmp_path / "." / "m.onnx", in_place=True).dest == src
    with pytest.raises(NormfoldError) as info:
        api.make_target(src, tmp_path / "o.onnx", in_place=True)
    assert str(info.value) == "--in-place and -o name different files; use one of them"


# ---- the opset ---------------------------------------------------------------------------------
def test_the_opset_is_the_default_domains():
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }", opset=13)
    model.opset_import.insert(0, onnx.helper.make_opsetid("com.microsoft", 1))
    assert api.model_opset(model) == 13
    model.opset_import[1].domain = "ai.onnx"
    assert api.model_opset(model) == 13
    del model.opset_import[1]
    assert api.model_opset(model) == 0


def test_an_opset_conversion_up_only_and_within_what_onnx_knows():
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }", opset=13)
    assert api.convert_opset(model, 13) is model and api.convert_opset(model, 11) is model
    assert api.model_opset(api.convert_opset(model, 17)) == 17
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(NormfoldError) as info:
        api.convert_opset(model, newest + 1)
    assert str(info.value) == f"--target-opset {newest + 1}: the installed onnx knows opsets up to {newest}"
    assert api.model_opset(api.convert_opset(model, newest)) == newest


def test_a_conversion_onnx_refuses_is_one_line(monkeypatch):
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }", opset=13)

    def refuse(model, target):
        raise RuntimeError("no adapter\nfor Neg")

    monkeypatch.setattr(api.version_converter, "convert_version", refuse)
    with pytest.raises(NormfoldError) as info:
        api.convert_opset(model, 17)
    assert str(info.value) == "cannot convert the model from opset 13 to 17: no adapter for Neg"


def test_unknown_passes_are_named():
    with pytest.raises(NormfoldError) as info:
        api._check_passes(api.FoldOptions(passes=("zap", "layernorm", "bad")))
    assert str(info.value) == f"unknown pass(es) ['bad', 'zap']; known: {list(api.PASS_NAMES)}"
    api._check_passes(api.FoldOptions())


# ---- --inputs against the model ------------------------------------------------------------------
def _inputs_model():
    model = build("g (float[2,N] x, int64[3] ids, float[2] w) => (float[2,N] y) { y = Identity (x) }",
                  w=np.zeros(2, np.float32))
    return model


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 5), np.float32), "ids": np.zeros(3, np.int64)}, None),
    ({"x": np.zeros((2, 5), np.float64), "ids": np.zeros(3, np.int64)}, "'x' is float64, the model's input is float32"),
    ({"x": np.zeros((3, 5), np.float32), "ids": np.zeros(3, np.int64)}, r"'x' has shape \[3, 5\], the model's input is \[2, '\?'\]"),
    ({"x": np.zeros((2,), np.float32), "ids": np.zeros(3, np.int64)}, r"'x' has shape \[2\]"),
    ({"x": np.zeros((2, 5), np.float32), "ids": np.zeros(4, np.int64)}, r"'ids' has shape \[4\], the model's input is \[3\]"),
])
def test_input_files_must_fit_the_models_inputs(tmp_path, arrays, message):
    np.savez(tmp_path / "in.npz", **arrays)
    files = [str(tmp_path / "in.npz")]
    if message is None:
        api.check_input_files(_inputs_model(), files)
        return
    with pytest.raises(NormfoldError, match=rf"^--inputs {tmp_path / 'in.npz'}: {message}"):
        api.check_input_files(_inputs_model(), files)


def test_inputs_of_types_that_cannot_be_checked_are_let_through(tmp_path):
    model = _inputs_model()
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED  # no numpy type to compare
    del model.graph.input[0].type.tensor_type.shape.dim[:]
    model.graph.input[0].type.tensor_type.ClearField("shape")  # no shape: any rank
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 1, 1), np.float32), ids=np.zeros(9, np.int64))
    api.check_input_files(model, [str(tmp_path / "in.npz")])
    api.check_input_files(model, [])


# ---- what each verification step hands to its child process ---------------------------------------
class _Recorder:
    def __init__(self, result=None, raises=None):
        self.calls, self.result, self.raises = [], result, raises

    def __call__(self, func, *args, **kwargs):
        self.calls.append((func, args, kwargs))
        if self.raises is not None:
            raise self.raises
        return self.result


def _verify_options(**kwargs):
    return api.VerifyOptions(seed=3, shapes={"x": [1, 2]}, dims={"N": 4}, int_ranges={"i": (0, 5)},
                             input_files=["a.npz"], batches=2, atol=0.1, rtol={None: 0.2}, opt_level="basic",
                             **kwargs)


def test_run_options_carry_the_verify_options():
    options = _verify_options().run_options()
    assert (options.seed, options.shapes, options.dims, options.int_ranges, options.input_files, options.batches,
            options.opt_level) == (3, {"x": [1, 2]}, {"N": 4}, {"i": (0, 5)}, ["a.npz"], 2, "basic")


def test_compare_hands_every_option_to_compare_models_in_a_child(monkeypatch):
    recorder = _Recorder(result=Verification("passed"))
    monkeypatch.setattr(api, "run_in_child", recorder)
    monkeypatch.setattr(api.time, "monotonic", lambda: 10.0)
    verify = _verify_options(timeout=9.0)
    assert verify.compare("a.onnx", "b.onnx", sites=["s"]).status == "passed"
    run = api.ModelRun("original", [], [], [])
    verify.compare("a.onnx", "b.onnx", reference_run=run, deadline=12.0)
    (f1, a1, k1), (f2, a2, k2) = recorder.calls
    assert f1 is api.compare_models and a1 == ("a.onnx", "b.onnx")
    assert k1 == {"timeout": 9.0, "seed": 3, "shapes": {"x": [1, 2]}, "dims": {"N": 4}, "int_ranges": {"i": (0, 5)},
                  "input_files": ["a.npz"], "batches": 2, "atol": 0.1, "rtol": {None: 0.2}, "opt_level": "basic",
                  "sites": ["s"], "reference_run": None, "isolate": None}
    assert (k2["timeout"], k2["reference_run"], k2["isolate"], k2["sites"]) == (2.0, run, False, None)


def test_compare_with_an_unavailable_original_or_child_is_unavailable(monkeypatch):
    verify = _verify_options()
    original = Verification("unavailable", detail="custom op")
    assert verify.compare("a", "b", reference_run=original) is original
    monkeypatch.setattr(api, "run_in_child", _Recorder(raises=VerificationUnavailable("cannot run")))
    v = verify.compare("a", "b")
    assert (v.status, v.seed, v.detail) == ("unavailable", 3, "cannot run")
    monkeypatch.setattr(api, "run_in_child", _Recorder(raises=VerificationTimeout("after 1 s")))
    with pytest.raises(VerificationTimeout):
        verify.compare("a", "b")


class _Child:
    def __init__(self, value=None, raises=None):
        self.value, self.raises, self.timeouts = value, raises, []

    def result(self, timeout):
        self.timeouts.append(timeout)
        if self.raises is not None:
            raise self.raises
        return self.value


def test_the_reference_starts_in_a_child_with_the_run_options(monkeypatch):
    started = _Recorder(result=_Child(value="the run"))
    monkeypatch.setattr(api, "start_in_child", started)
    verify = _verify_options(timeout=5.0)
    assert verify.reference("a.onnx", ["s"]) == "the run"
    [(func, args, kwargs)] = started.calls
    assert func is api.run_reference and args[0] == "a.onnx" and args[1] == verify.run_options()
    assert kwargs == {"sites": ["s"], "isolate": False}
    assert started.result.timeouts == [5.0]
    pending = _Child(raises=VerificationUnavailable("no kernel"))
    v = verify.reference("a.onnx", pending=pending)
    assert (v.status, v.seed, v.detail) == ("unavailable", 3, "no kernel") and len(started.calls) == 1
    with pytest.raises(VerificationTimeout):
        verify.reference("a.onnx", pending=_Child(raises=VerificationTimeout("t")))


def test_verify_runs_the_original_then_the_comparison_within_one_deadline(monkeypatch):
    monkeypatch.setattr(api.time, "monotonic", lambda: 50.0)
    seen = []
    verify = _verify_options(timeout=4.0)
    monkeypatch.setattr(api.VerifyOptions, "reference",
                        lambda self, ref, sites, deadline, pending: seen.append(("ref", ref, sites, deadline, pending)) or "run")
    monkeypatch.setattr(api.VerifyOptions, "compare",
                        lambda self, ref, cand, reference_run, deadline: seen.append(("cmp", ref, cand, reference_run, deadline)) or "v")
    assert verify.verify("a", "b", ["s"], pending="p") == ("run", "v")
    assert seen == [("ref", "a", ["s"], 54.0, "p"), ("cmp", "a", "b", "run", 54.0)]
    seen.clear()
    verify.verify("a", "b", deadline=51.0)
    assert seen[0][3] == seen[1][4] == 51.0
    seen.clear()
    api.VerifyOptions().verify("a", "b")
    assert seen[0][3] is None


def test_verify_local_runs_in_a_child_and_is_unavailable_in_local_mode(monkeypatch):
    from normfold.verify_local import verify_locally

    recorder = _Recorder(result=Verification("passed", mode="local"))
    monkeypatch.setattr(api, "run_in_child", recorder)
    verify = _verify_options(timeout=6.0)
    assert verify.verify_local("a", "b", ["sites"]).status == "passed"
    [(func, args, kwargs)] = recorder.calls
    assert func is verify_locally and args == ("a", "b", ["sites"])
    assert kwargs == {"timeout": 6.0, "seed": 3, "atol": 0.1, "rtol": {None: 0.2}}
    monkeypatch.setattr(api, "run_in_child", _Recorder(raises=VerificationUnavailable("no")))
    v = verify.verify_local("a", "b", [])
    assert (v.status, v.seed, v.detail, v.mode) == ("unavailable", 3, "no", "local")
    monkeypatch.setattr(api, "run_in_child", _Recorder(raises=VerificationTimeout("t")))
    with pytest.raises(VerificationTimeout):
        verify.verify_local("a", "b", [])
    v = api._verified_locally(verify, "a", "b", [])
    assert (v.status, v.detail, v.mode, v.seed) == ("unavailable", "timed out: t", "local", 3)


# ---- the whole job, on a tiny Conv + BatchNormalization --------------------------------------------
def _conv_bn(opset: int = 13, out: int = 3):
    rng = np.random.default_rng(0)
    return build(f"""g (float[1,2,4,4] x) => (float[1,{out},4,4] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = BatchNormalization (c, s, b, m, v) }}""", opset=opset, w=rng.standard_normal((out, 2, 3, 3)).astype(np.float32),
                 s=rng.uniform(0.5, 2, out).astype(np.float32), b=rng.standard_normal(out).astype(np.float32),
                 m=rng.standard_normal(out).astype(np.float32), v=rng.uniform(0.5, 2, out).astype(np.float32))


def test_fold_rewrites_a_copy_and_reports_before_and_after():
    model = _conv_bn()
    folded, report = api.fold(model)
    assert [n.op_type for n in model.graph.node] == ["Conv", "BatchNormalization"]  # the caller's model untouched
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert (report.nodes_before, report.nodes_after, report.opset_before, report.opset_after) == (2, 1, 13, 13)
    assert report.ops_before == {"Conv": 1, "BatchNormalization": 1} and report.ops_after == {"Conv": 1}
    assert report.count("folded") == 1 and report.input is None and report.output is None
    in_place, _ = api.fold(model, copy=False)
    assert in_place is model and [n.op_type for n in model.graph.node] == ["Conv"]
    with pytest.raises(NormfoldError, match="unknown pass"):
        api.fold(_conv_bn(), api.FoldOptions(passes=("nope",)))
    _, report = api.fold(_conv_bn(), api.FoldOptions(passes=("layernorm",)))
    assert report.count("folded") == 0 and report.nodes_after == 2


def test_fold_file_without_verification_writes_the_result_and_says_so(tmp_path):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(enabled=False))
    assert report.written and report.exit_code == exit_codes.OK and report.verification.status == "skipped"
    assert report.verification.detail == "--no-verify" and (tmp_path / "m.onnx").read_bytes() == before
    assert (report.input, report.output) == (str(tmp_path / "m.onnx"), str(tmp_path / "m.folded.onnx"))
    assert [n.op_type for n in onnx.load(tmp_path / "m.folded.onnx").graph.node] == ["Conv"]
    assert set(report.timings) == {"load", "fold", "save", "total"} and "verify" not in report.timings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.folded.onnx", "m.onnx"]  # no staging left
    assert report.sites[0].max_abs_error is None


def test_fold_file_verifies_in_a_child_and_writes_when_it_passes(tmp_path):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "o.onnx", verify=api.VerifyOptions())
    assert report.written and report.exit_code == exit_codes.OK and report.verification.status == "passed"
    assert "verify" in report.timings and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]


def test_fold_file_refuses_a_bad_input_and_writes_nothing(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"junk")
    with pytest.raises(NormfoldError, match="not a readable ONNX model"):
        api.fold_file(tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_verification_that_fails_writes_nothing_and_exits_1(tmp_path, monkeypatch):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    real = api.StagedModel

    def corrupting(model, *args, **kwargs):  # a wrong rewrite: the written weights changed
        w = model.graph.initializer[0]
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 2, w.name))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(api, "StagedModel", corrupting)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(local=False))
    assert (report.exit_code, report.written, report.verification.status) == (exit_codes.OUTPUTS_DIFFER, False, "failed")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_model_that_cannot_be_verified_exits_3_unless_allowed(tmp_path, monkeypatch):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    unavailable = Verification("unavailable", detail="no kernel")
    monkeypatch.setattr(api, "_verified_with_conversion", lambda *a, **k: (unavailable, None))
    monkeypatch.setattr(api.VerifyOptions, "start_reference", lambda self, ref, sites=None: None)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(local=False))
    assert (report.exit_code, report.written) == (exit_codes.UNVERIFIED, False)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(local=False, allow_unverified=True))
    assert (report.exit_code, report.written) == (exit_codes.OK, True)


def test_an_opset_conversion_happens_only_when_a_site_needs_it():
    norm = _layernorm()
    assert api.needs_newer_opset(norm, api.FoldOptions(target_opset=17))
    assert not api.needs_newer_opset(norm, api.FoldOptions())  # no target: nothing held back
    assert not api.needs_newer_opset(norm, api.FoldOptions(target_opset=13))
    assert not api.needs_newer_opset(norm, api.FoldOptions(target_opset=17, passes=("batchnorm",)))
    assert not api.needs_newer_opset(_conv_bn(), api.FoldOptions(target_opset=17))  # BN needs no newer opset
    folded, report = api.fold(norm, api.FoldOptions(target_opset=17))
    assert report.opset_before == 13 and report.opset_after == 17 and report.count("fused") == 1
    assert [n.op_type for n in folded.graph.node] == ["LayerNormalization"]
    _, report = api.fold(_conv_bn(), api.FoldOptions(target_opset=17))
    assert report.opset_after == 13  # nothing needed it: not converted


# ---- the job's details: timings, benchmark, external data, the opset conversion's own check --------
def test_the_timings_are_durations_and_the_total_counts_from_started(tmp_path):
    import time

    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    target = api.make_target(tmp_path / "m.onnx")
    staging = tmp_path / "s"
    staging.mkdir()
    report, moves = api.fold_job(target, staging, api.FoldOptions(), api.VerifyOptions(enabled=False),
                                 started=time.perf_counter() - 100)
    assert set(report.timings) == {"load", "fold", "save", "total"} and moves
    assert all(0 <= v < 60 for k, v in report.timings.items() if k != "total")
    assert 100 <= report.timings["total"] < 160
    report, _ = api.fold_job(target, staging, api.FoldOptions(), api.VerifyOptions(enabled=False))
    assert 0 <= report.timings["total"] < 60


def test_the_benchmark_times_both_models_unless_verification_was_unavailable(tmp_path, monkeypatch):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 2, 4, 4), np.float32))
    for inputs in ([], [str(tmp_path / "x.npy")]):
        report = api.fold_file(tmp_path / "m.onnx", tmp_path / "o.onnx",
                               verify=api.VerifyOptions(benchmark=True, input_files=inputs))
        assert report.written and sorted(report.benchmark) == ["folded", "original"]
        assert sorted(report.benchmark["folded"]) == ["all", "disabled"]
        assert report.benchmark["original"]["all"]["latency_ms"] > 0 and 0 <= report.timings["benchmark"] < 60
    monkeypatch.setattr(api, "_verified_with_conversion", lambda *a, **k: (Verification("unavailable", detail="x"), None))
    monkeypatch.setattr(api.VerifyOptions, "start_reference", lambda self, ref, sites=None: None)  # (no child left)
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "p.onnx",
                           verify=api.VerifyOptions(benchmark=True, allow_unverified=True, local=False))
    assert report.written and not report.benchmark and "benchmark" not in report.timings


def test_external_weights_stay_external_and_are_read_from_the_models_folder(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(_conv_bn(out=16), src / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    monkeypatch.chdir("/")
    report = api.fold_file(src / "m.onnx", tmp_path / "o.onnx", verify=api.VerifyOptions(enabled=False))
    assert report.written and sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "o.onnx.data", "src"]
    assert sorted(p.name for p in src.iterdir()) == ["m.data", "m.onnx"]
    onnx.save(_conv_bn(out=16), tmp_path / "inline.onnx")
    api.fold_file(tmp_path / "inline.onnx", tmp_path / "i.onnx", verify=api.VerifyOptions(enabled=False))
    assert not (tmp_path / "i.onnx.data").exists()  # inline stays inline
    api.fold_file(tmp_path / "inline.onnx", tmp_path / "e.onnx", options=api.FoldOptions(external_data=""),
                  verify=api.VerifyOptions(enabled=False))
    assert (tmp_path / "e.onnx.data").exists()  # forced


def _layernorm(opset: int = 13):
    return build("""g (float[2,4] x) => (float[2,4] y) {
        m = ReduceMean <axes = [-1]> (x)
        d = Sub (x, m)
        q = Mul (d, d)
        v = ReduceMean <axes = [-1]> (q)
        e = Add (v, eps)
        s = Sqrt (e)
        n = Div (d, s)
        y = Mul (n, g) }""", opset=opset, eps=np.float32(1e-5), g=np.float32([1.0, 2.0, 3.0, 4.0]))


def test_a_converted_model_is_checked_on_its_own_only_when_the_result_fails(tmp_path, monkeypatch):
    onnx.save(_layernorm(), tmp_path / "m.onnx")
    options = api.FoldOptions(target_opset=17)
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "ok.onnx", options=options)
    assert report.written and report.conversion is None and report.opset_after == 17
    real = api.run_rules

    def corrupting(graph, *args, **kwargs):  # a wrong rewrite: the LayerNorm's scale tripled
        records = real(graph, *args, **kwargs)
        if not kwargs.get("dry"):
            node = next(n for n in graph.node if n.op_type == "LayerNormalization")
            scale = next(t for t in graph.initializer if t.name == node.input[1])
            scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 3, scale.name))
        return records

    monkeypatch.setattr(api, "run_rules", corrupting)
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "bad.onnx", options=options)
    assert (report.exit_code, report.written) == (exit_codes.OUTPUTS_DIFFER, False)
    assert report.conversion.status == "passed" and report.verification.detail.startswith("outputs differ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "ok.onnx"]


def test_a_converter_that_changes_the_outputs_is_named_as_such(tmp_path, monkeypatch):
    onnx.save(_layernorm(), tmp_path / "m.onnx")
    real = api.convert_opset

    def bad_converter(model, target):
        converted = real(model, target)
        g = next(t for t in converted.graph.initializer if t.name == "g")
        g.CopyFrom(onnx.numpy_helper.from_array(np.float32([5.0, 5.0, 5.0, 5.0]), "g"))
        return converted

    monkeypatch.setattr(api, "convert_opset", bad_converter)
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "bad.onnx", options=api.FoldOptions(target_opset=17))
    assert (report.exit_code, report.written, report.conversion.status) == (exit_codes.OUTPUTS_DIFFER, False, "failed")
    assert report.verification.detail == report.conversion.detail
    assert report.conversion.detail.startswith("converting the opset alone changed the outputs: outputs differ: y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_timeout_is_unverified_and_never_written(tmp_path, monkeypatch):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")

    def slow(self, *args, **kwargs):
        raise VerificationTimeout("after 1 s")

    monkeypatch.setattr(api.VerifyOptions, "verify", slow)
    monkeypatch.setattr(api.VerifyOptions, "start_reference", lambda self, ref, sites=None: None)  # (no child left)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(allow_unverified=True, local=False, timeout=1.0))
    assert (report.exit_code, report.written) == (exit_codes.UNVERIFIED, False)
    assert (report.verification.status, report.verification.detail) == ("unavailable", "timed out: after 1 s")


# ---- which verification a job runs, and each site's error ------------------------------------------
def _conv_bn_relu():
    model = _conv_bn()
    model.graph.node[1].output[0] = "n"
    model.graph.node.append(onnx.helper.make_node("Relu", ["n"], ["y"]))
    return model


def test_sites_are_compared_in_the_whole_model_and_each_gets_its_error(tmp_path):
    onnx.save(_conv_bn_relu(), tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(sites=True, local=False))
    assert report.written and report.verification.mode != "local"
    [site] = report.sites
    assert [s.name for s in report.verification.sites] == [site.output] == ["n"]
    assert site.max_abs_error == report.verification.sites[0].max_abs_error and site.max_abs_error < 1e-4
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "o.onnx", verify=api.VerifyOptions(local=False))
    assert report.verification.sites == [] and report.sites[0].max_abs_error is None


def test_local_verification_checks_each_site_and_says_why_it_was_chosen(tmp_path, monkeypatch):
    """The local check itself is replaced (normfold.verify_local has its own tests): which one runs,
    on what, and how its per-site results reach the report's sites (by site id)."""
    import normfold.verify_local
    from normfold.verify import compare_arrays

    onnx.save(_conv_bn_relu(), tmp_path / "m.onnx")
    started, calls = [], []
    monkeypatch.setattr(api.VerifyOptions, "start_reference", lambda self, *a: started.append(a))

    def local(self, reference, candidate, sites):
        calls.append((reference, candidate.name, [s.id for s in sites]))
        v = Verification("passed", mode="local", notes=["checked"])
        v.sites = [compare_arrays(sites[0].id, np.zeros(2, np.float32), np.full(2, 0.25, np.float32), 1.0, 0.0)]
        return v

    monkeypatch.setattr(api.VerifyOptions, "verify_local", local)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(local=True))
    assert report.written and report.verification.mode == "local" and started == []  # no whole-model run
    assert calls == [(tmp_path / "m.onnx", "m.folded.onnx", ["main:n"])]
    assert report.sites[0].max_abs_error == 0.25 and report.verification.notes == ["checked"]
    monkeypatch.setattr(normfold.verify_local, "whole_model_too_big", lambda src: (True, "the model needs 9 GiB"))
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "o.onnx", verify=api.VerifyOptions())
    assert report.verification.mode == "local" and started == []
    assert report.verification.notes == ["the model needs 9 GiB: verified each rewritten site on its own (as --verify local)",
                                         "checked"]


def test_a_job_that_fails_while_writing_cancels_the_originals_run(tmp_path, monkeypatch):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    child = _Child()
    child.cancelled = 0
    child.cancel = lambda: setattr(child, "cancelled", child.cancelled + 1)
    monkeypatch.setattr(api.VerifyOptions, "start_reference", lambda self, *a: child)

    def full(*args, **kwargs):
        raise NormfoldError("out.onnx: cannot write (No space left on device)")

    monkeypatch.setattr(api, "StagedModel", full)
    with pytest.raises(NormfoldError, match="No space left"):
        api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(local=False))
    assert child.cancelled == 1 and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
