"""api.py's decisions in-process: exit codes from a verification, timeouts, where a model goes,
--inputs checks, the opset, and which options each verification step hands to its child process
(the child itself is replaced here: mutation testing never sees inside one)."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from builders import build
from normfold import api, exit_codes
from normfold.errors import NormfoldError, VerificationTimeout, VerificationUnavailable
from normfold.paths import PathConflict
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
    assert f1 == verify._compare_here and a1 == ("a.onnx", "b.onnx", ["s"], None) and k1 == {"timeout": 9.0}
    assert f2 == verify._compare_here and a2 == ("a.onnx", "b.onnx", None, run) and k2 == {"timeout": 2.0}
    compared = _Recorder(result="v")
    monkeypatch.setattr(api, "compare_models", compared)
    assert verify._compare_here("a.onnx", "b.onnx", ["s"], None) == "v"
    assert verify._compare_here("a.onnx", "b.onnx", None, run) == "v"
    (r1, a1, k1), (_, a2, k2) = compared.calls
    assert (r1, a1) == ("a.onnx", ("b.onnx",))
    assert k1 == {"seed": 3, "shapes": {"x": [1, 2]}, "dims": {"N": 4}, "int_ranges": {"i": (0, 5)},
                  "input_files": ["a.npz"], "batches": 2, "atol": 0.1, "rtol": {None: 0.2}, "opt_level": "basic",
                  "sites": ["s"], "reference_run": None, "isolate": None}
    assert (k2["reference_run"], k2["isolate"], k2["sites"]) == (run, False, None)


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
    verify.verify("a", "b", deadline=51.0, together=False)
    assert seen[0][3] == seen[1][4] == 51.0
    seen.clear()
    api.VerifyOptions().verify("a", "b", together=False)
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



def test_the_dry_pass_for_the_opset_stops_at_the_first_site_held_back():
    """Deciding the conversion needs one site left opset-too-old: the dry walk ends there (the whole
    recogniser ran twice per conversion before), also when the walk is inside a subgraph."""
    from normfold.passes import RULES, run_rules
    from normfold.shapes import infer_shapes

    model = _layernorm()  # one LayerNorm in the main graph, and the same one in each branch of an If
    model.graph.input.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []))
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4]))
    model.graph.node.append(onnx.helper.make_node("If", ["c"], ["z"], then_branch=_norm_branch(model, "t"),
                                                  else_branch=_norm_branch(model, "e")))
    ctx = api._context(model, api.FoldOptions(), "")
    every = run_rules(model.graph, RULES, ctx, infer_shapes(model), dry=True)
    first = run_rules(model.graph, RULES, ctx, infer_shapes(model), dry=True, stop_at="opset-too-old")
    assert [(s.reason, s.graph.count("/")) for s in every] == [("opset-too-old", 0)] * 1 + [("opset-too-old", 1)] * 2
    assert [(s.reason, s.graph) for s in first] == [("opset-too-old", "main")]
    del model.graph.node[:-1]  # only the If: the first such site is in the branch walked first
    inner = run_rules(model.graph, RULES, ctx, infer_shapes(model), dry=True, stop_at="opset-too-old")
    assert [s.reason for s in inner] == ["opset-too-old"] and inner[0].graph.startswith("main/")
    assert len(run_rules(model.graph, RULES, ctx, infer_shapes(model), dry=True, stop_at="no-such-reason")) == 2


def test_deciding_the_conversion_walks_only_to_the_first_site_held_back(monkeypatch):
    """needs_newer_opset's dry pass stops at the first site --target-opset would let through (here
    the first of two LayerNorms in the branches of an If)."""
    from normfold.passes import run_rules

    model = _layernorm()
    model.graph.input.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []))
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4]))
    branches = {"then_branch": _norm_branch(model, "t"), "else_branch": _norm_branch(model, "e")}
    del model.graph.node[:]
    model.graph.node.append(onnx.helper.make_node("If", ["c"], ["z"], **branches))
    walks = []
    monkeypatch.setattr(api, "run_rules", lambda *a, **k: walks.append(run_rules(*a, **k)) or walks[-1])
    assert api.needs_newer_opset(model, api.FoldOptions(target_opset=17)) and [len(w) for w in walks] == [1]


def _norm_branch(model: onnx.ModelProto, prefix: str) -> onnx.GraphProto:
    """The main graph's LayerNorm as an If branch reading the outer x, eps and g."""
    outer = {"x", "eps", "g"}
    nodes = []
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}_{node.name or node.op_type}"
        copy.input[:] = [i if i in outer else f"{prefix}_{i}" for i in node.input]
        copy.output[:] = [f"{prefix}_{o}" for o in node.output]
        nodes.append(copy)
    out = onnx.helper.make_tensor_value_info(f"{prefix}_y", onnx.TensorProto.FLOAT, [2, 4])
    return onnx.helper.make_graph(nodes, f"{prefix}_branch", [], [out])

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
    monkeypatch.setattr(api, "run_rules", _tripling_scale(api.run_rules))
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


def test_a_big_models_early_run_of_the_original_computes_the_sites_too(tmp_path, monkeypatch):
    """Above TOGETHER_BYTES the original starts while the result is written: with the site
    tensors asked for, so that each rewritten site still gets its error."""
    onnx.save(_conv_bn_relu(), tmp_path / "m.onnx")
    monkeypatch.setattr(api, "TOGETHER_BYTES", -1)  # stands in for a big model
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(sites=True, local=False))
    [site] = report.sites
    assert report.verification.status == "passed" and [s.name for s in report.verification.sites] == ["n"]
    assert site.max_abs_error is not None and site.max_abs_error < 1e-4


def test_a_job_measures_the_model_once(tmp_path, monkeypatch):
    """One size (model_bytes, which reads the model's protobuf) decides both whether a session
    fits in memory and whether the two runs share a child: nothing measures the model again."""
    import normfold.verify

    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    real, measured = normfold.verify.model_bytes, []
    counting = lambda path: measured.append(path) or real(path)  # noqa: E731
    monkeypatch.setattr(api, "model_bytes", counting)
    monkeypatch.setattr(normfold.verify, "model_bytes", counting)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions())
    assert report.written and report.verification.status == "passed" and report.verification.mode != "local"
    assert measured == [tmp_path / "m.onnx"]


def test_verify_local_does_not_measure_the_model(monkeypatch):
    """With --verify local neither the whole-model decision nor the one-child choice is made, so
    _Check never reads the model for its size (model_bytes parses a model under 256 MB); a
    whole-model verification still measures it once."""
    measured = []
    monkeypatch.setattr(api, "model_bytes", lambda path: measured.append(path) or 0)
    check = api._Check(api.VerifyOptions(local=True), "m.onnx", api.Report())
    assert measured == [] and check.local and check.pending is None
    check = api._Check(api.VerifyOptions(local=False), "m.onnx", api.Report())
    assert measured == ["m.onnx"] and check.together and check.pending is None


def test_a_left_site_gets_no_error_even_where_a_compared_tensor_has_its_output(monkeypatch):
    """finish gives each rewritten site the error of its tensor, and a left site none, by its
    status (not only because left sites' tensors are not compared)."""
    from normfold.report import SiteRecord
    from normfold.verify import compare_arrays

    left = SiteRecord("batchnorm", "BN", "left", ["BatchNormalization(y)"], "x", reason="excluded", output="y")
    fused = SiteRecord("batchnorm", "BN", "folded", ["BatchNormalization(n)"], "x", output="n")
    report = api.Report(sites=[left, fused])
    compared = Verification("passed", sites=[compare_arrays(name, np.zeros(2, np.float32), np.full(2, e, np.float32), 1.0, 0.0)
                                             for name, e in (("y", 0.5), ("n", 0.25))])
    handed = []
    monkeypatch.setattr(api, "model_bytes", lambda path: 0)
    monkeypatch.setattr(api, "_verified_with_conversion", lambda *a, **k: handed.append(a[3]) or (compared, None))
    check = api._Check(api.VerifyOptions(sites=True, local=False), "m.onnx", report)
    check.finish("r.onnx", None)
    assert handed == [["n"]] and (left.max_abs_error, fused.max_abs_error) == (None, 0.25)


def test_a_small_model_runs_the_original_and_the_result_in_one_child(monkeypatch):
    monkeypatch.setattr(api.time, "monotonic", lambda: 50.0)
    recorder = _Recorder(result=("run", "v"))
    monkeypatch.setattr(api, "run_in_child", recorder)
    sizes = []
    monkeypatch.setattr(api, "model_bytes", lambda path: sizes.append(path) or api.TOGETHER_BYTES)
    verify = _verify_options(timeout=4.0)
    assert verify.verify("a", "b", ["s"], deadline=51.0) == ("run", "v")  # sized here: at the limit
    assert verify.verify("a", "b", together=True) == ("run", "v")
    assert sizes == ["a"]
    assert recorder.calls == [(verify._both_here, ("a", "b", ["s"]), {"timeout": 1.0}),
                              (verify._both_here, ("a", "b", None), {"timeout": 4.0})]
    monkeypatch.setattr(api, "run_in_child", _Recorder(raises=VerificationUnavailable("crashed")))
    original, result = verify.verify("a", "b", together=True)
    assert original is result and (result.status, result.seed, result.detail) == ("unavailable", 3, "crashed")
    monkeypatch.setattr(api, "run_in_child", _Recorder(raises=VerificationTimeout("t")))
    with pytest.raises(VerificationTimeout):
        verify.verify("a", "b", together=True)
    seen = []
    monkeypatch.setattr(api, "model_bytes", lambda path: api.TOGETHER_BYTES + 1)
    monkeypatch.setattr(api.VerifyOptions, "reference", lambda self, *a, **k: seen.append("ref") or "run")
    monkeypatch.setattr(api.VerifyOptions, "compare", lambda self, *a, **k: seen.append("cmp") or "v")
    assert verify.verify("a", "b") == ("run", "v") and seen == ["ref", "cmp"]  # bigger: two children


def test_the_one_child_runs_the_original_then_compares_with_that_run(monkeypatch):
    verify = _verify_options()
    run = api.ModelRun("original", [], [], [])
    references, compared = _Recorder(result=run), []
    monkeypatch.setattr(api, "run_reference", references)
    monkeypatch.setattr(api.VerifyOptions, "_compare_here", lambda self, *a: compared.append(a) or "v")
    assert verify._both_here("a", "b", ["s"]) == (run, "v")
    assert references.calls == [("a", (verify.run_options(),), {"sites": ["s"], "isolate": False})]
    assert compared == [("a", "b", ["s"], run)]
    monkeypatch.setattr(api, "run_reference", _Recorder(raises=VerificationUnavailable("custom op")))
    original, result = verify._both_here("a", "b", None)
    assert original is result and (result.status, result.seed, result.detail) == ("unavailable", 3, "custom op")
    assert len(compared) == 1


def test_a_small_models_fold_starts_one_child_process(tmp_path, monkeypatch):
    import normfold.watchdog

    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    real, started = normfold.watchdog.start_in_child, []
    monkeypatch.setattr(normfold.watchdog, "start_in_child", lambda func, *a, **k: started.append(func) or real(func, *a, **k))
    monkeypatch.setattr(api, "start_in_child", normfold.watchdog.start_in_child)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(local=False))
    assert report.written and report.verification.status == "passed" and len(started) == 1


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
    monkeypatch.setattr(normfold.verify_local, "whole_model_too_big", lambda src, size: (True, "the model needs 9 GiB"))
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
    monkeypatch.setattr(api, "TOGETHER_BYTES", -1)  # as a big model: the original starts before the write
    with pytest.raises(NormfoldError, match="No space left"):
        api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(local=False))
    assert child.cancelled == 1 and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    check = api._Check(api.VerifyOptions(enabled=False), tmp_path / "m.onnx", api.Report())
    check.pending = child
    check.cancel()
    check.cancel()  # a second cancel (or a finish) finds nothing pending
    assert child.cancelled == 2 and check.pending is None


# ---- what fold() hands to the passes: the options, the folder of external weights, the notes ------
def _rmsnorm():
    return build("""g (float[2,4] x) => (float[2,4] y) {
        q = Mul (x, x)
        v = ReduceMean <axes = [-1]> (q)
        e = Add (v, eps)
        s = Sqrt (e)
        n = Div (x, s)
        y = Mul (n, g) }""", opset=13, eps=np.float32(1e-6), g=np.float32([1.0, 2.0, 3.0, 4.0]))


def _listed(model, names=None):
    """Every initializer (or those named) also listed as a graph input, as IR < 4 requires."""
    for t in model.graph.initializer:
        if names is None or t.name in names:
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def test_fold_options_reach_the_passes():
    folded, report = api.fold(_rmsnorm(), api.FoldOptions(allow_contrib=True))
    assert [(n.op_type, n.domain) for n in folded.graph.node] == [("SimplifiedLayerNormalization", "com.microsoft")]
    _, report = api.fold(_rmsnorm())
    assert [(s.status, s.reason) for s in report.sites] == [("left", "opset-too-old")]
    over_channels = build("""g (float[2,4,3] x) => (float[2,4,3] y) {
        m = ReduceMean <axes = [1]> (x)
        d = Sub (x, m)
        q = Mul (d, d)
        v = ReduceMean <axes = [1]> (q)
        e = Add (v, eps)
        s = Sqrt (e)
        y = Div (d, s) }""", opset=17, eps=np.float32(1e-5))
    folded, _ = api.fold(over_channels, api.FoldOptions(allow_transpose=True))
    assert [n.op_type for n in folded.graph.node] == ["Transpose", "LayerNormalization", "Transpose"]
    _, report = api.fold(over_channels)
    assert [(s.status, s.reason) for s in report.sites] == [("left", "unsupported-axis")]
    model = _conv_bn()
    model.graph.node[1].name = "bn0"
    folded, report = api.fold(model, api.FoldOptions(exclude_nodes=frozenset({"bn0"})))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization"]
    assert [(s.status, s.reason) for s in report.sites] == [("left", "excluded")]


def _lazy(model, folder, opset_target=None):
    """`model` saved with every weight in an external file in `folder`, read back without them."""
    from normfold.io import read_model

    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    lazy, files = read_model(folder / "m.onnx", lazy=True)
    assert files == ["m.data"] and all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    return lazy


def test_weights_still_in_their_files_are_read_from_base_dir(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    lazy = _lazy(_layernorm(), folder)
    monkeypatch.chdir(tmp_path)  # not the model's folder
    options = api.FoldOptions(target_opset=17)
    assert api.needs_newer_opset(lazy, options, base_dir=folder)
    folded, report = api.fold(lazy, options, base_dir=folder)  # converted, then fused
    assert [n.op_type for n in folded.graph.node] == ["LayerNormalization"] and report.count("fused") == 1
    [scale] = folded.graph.initializer
    assert np.array_equal(onnx.numpy_helper.to_array(scale), [1.0, 2.0, 3.0, 4.0])
    _, report = api.fold(_lazy(_rmsnorm(), tmp_path / "rms"), api.FoldOptions(allow_contrib=True),
                         base_dir=tmp_path / "rms")  # not converted
    assert report.count("fused") == 1
    monkeypatch.chdir(folder)  # by default, relative to the working directory
    assert api.needs_newer_opset(lazy, options)
    assert api.fold(lazy, options)[1].count("fused") == 1


def test_fold_reports_what_preparing_the_model_did():
    ir3 = _listed(_conv_bn())
    ir3.ir_version = 3
    folded, report = api.fold(ir3)
    assert report.notes == ["5 initializer(s) listed as graph inputs treated as constants and removed from the inputs "
                            "(IR version 3 requires the listing; raised to 4, which does not; --initializer-inputs "
                            "input keeps them as inputs)"]
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and folded.ir_version == 4
    folded, report = api.fold(_listed(_layernorm()), api.FoldOptions(target_opset=17, initializer_inputs="constant"))
    assert report.notes == ["2 initializer(s) listed as graph inputs treated as constants and removed from the "
                            "inputs (--initializer-inputs constant)"]
    assert [n.op_type for n in folded.graph.node] == ["LayerNormalization"] and report.opset_after == 17
    folded, report = api.fold(_listed(_conv_bn()), api.FoldOptions(initializer_inputs="constant"))
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and len(report.notes) == 1
    _, report = api.fold(_listed(_conv_bn()))  # IR 8: listed initializers are defaults a caller may override
    assert report.notes == [] and [s.reason for s in report.sites] == ["non-constant-parameters"]


def test_a_site_left_for_a_listed_initializer_names_the_option():
    model = _listed(build("""g (float[1,3,4] x) => (float[1,3,4] y) {
        n = InstanceNormalization (x, s, b)
        y = Mul (n, g) }""", s=np.ones(3, np.float32), b=np.zeros(3, np.float32), g=np.float32([[1], [2], [3]])),
                    names={"s", "b"})
    _, report = api.fold(model)
    [site] = report.sites
    assert (site.status, site.reason) == ("left", "non-constant-parameters")
    assert site.detail.endswith("scale or bias is not a constant ('b', 's': initializer(s) also listed as graph "
                                "inputs, so a caller may override them; --initializer-inputs constant treats such "
                                "initializers as constants)")


def test_a_fold_that_overflows_the_weights_type_warns_nothing(recwarn):
    model = _conv_bn()
    scale = next(t for t in model.graph.initializer if t.name == "s")
    scale.CopyFrom(onnx.numpy_helper.from_array(np.full(3, 3e38, np.float32), "s"))
    _, report = api.fold(model)  # 3e38 * w overflows float32: the site is left with its reason
    assert [s.status for s in report.sites] == ["left"]
    assert [str(w.message) for w in recwarn] == []


# ---- fold_file's paths: in place, the data file's name, the run's plan --------------------------------
def test_in_place_replaces_the_input_and_writes_nothing_else(tmp_path):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", in_place=True, verify=api.VerifyOptions(enabled=False))
    assert report.written and report.output == str(tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node] == ["Conv"]


def test_the_external_data_file_takes_the_name_asked_for(tmp_path):
    onnx.save(_conv_bn(out=16), tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", tmp_path / "o.onnx", options=api.FoldOptions(external_data="w.bin"),
                           verify=api.VerifyOptions(enabled=False))
    assert report.written and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "w.bin"]
    out = onnx.load(tmp_path / "o.onnx", load_external_data=False)
    assert {e.value for t in out.graph.initializer for e in t.external_data if e.key == "location"} == {"w.bin"}


def test_fold_file_plans_its_paths_before_any_work(tmp_path):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    with pytest.raises(PathConflict, match="output is the input file; pass --in-place to overwrite it"):
        api.fold_file(tmp_path / "m.onnx", tmp_path / "m.onnx", verify=api.VerifyOptions(enabled=False))
    # the output's data file would be the input's own external data: known once the model is read
    onnx.save(_conv_bn(out=16), tmp_path / "e.onnx", save_as_external_data=True, location="o.onnx.data",
              size_threshold=0)
    data = (tmp_path / "o.onnx.data").read_bytes()
    with pytest.raises(PathConflict, match="external data file of .*e.onnx"):
        api.fold_file(tmp_path / "e.onnx", tmp_path / "o.onnx", verify=api.VerifyOptions(enabled=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.onnx", "m.onnx", "o.onnx.data"]
    assert (tmp_path / "o.onnx.data").read_bytes() == data


def test_a_file_name_onnxruntime_cannot_open_is_refused_only_when_verifying(tmp_path):
    import os

    name = os.fsdecode(b"m\xff.onnx")  # not UTF-8
    onnx.save(_conv_bn(), str(tmp_path / name))
    with pytest.raises(NormfoldError, match="the input's file name is not valid UTF-8"):
        api.fold_file(tmp_path / name, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    report = api.fold_file(tmp_path / name, tmp_path / "o.onnx", verify=api.VerifyOptions(enabled=False))
    assert report.written and (tmp_path / "o.onnx").exists()


def test_the_total_time_counts_the_planning_too(tmp_path, monkeypatch):
    import time

    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    real = api.plan_run

    def slow_plan(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "plan_run", slow_plan)
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(enabled=False))
    steps = sum(v for k, v in report.timings.items() if k != "total")
    assert report.timings["total"] - steps >= 0.5


def test_the_timings_are_rounded_to_a_tenth_of_a_millisecond():
    import time

    report = api._finish(api.Report(), {"load": 0.123456789, "fold": 2.0}, time.perf_counter() - 1.0)
    assert report.timings["load"] == 0.1235 and report.timings["fold"] == 2.0
    assert isinstance(report.timings["load"], float) and 1.0 <= report.timings["total"] < 60
    assert report.timings["total"] == round(report.timings["total"], 4)


def test_a_converted_models_timings_include_the_conversion(tmp_path):
    onnx.save(_layernorm(), tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", options=api.FoldOptions(target_opset=17))
    assert report.written and set(report.timings) == {"load", "convert", "fold", "save", "verify", "total"}
    assert all(0 <= v < 60 for v in report.timings.values())
    assert report.timings["convert"] + report.timings["fold"] <= report.timings["total"]


def test_weights_the_passes_leave_alone_are_copied_from_the_models_folder(tmp_path, monkeypatch):
    model = _conv_bn()
    rng = np.random.default_rng(1)
    model.graph.node[1].output[0] = "n"
    model.graph.node.append(onnx.helper.make_node("Conv", ["n", "w2"], ["y"], pads=[1, 1, 1, 1]))
    w2 = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(w2, "w2"))
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(model, src / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    monkeypatch.chdir("/")
    report = api.fold_file(src / "m.onnx", tmp_path / "o.onnx", verify=api.VerifyOptions(enabled=False))
    assert report.written and [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node] == ["Conv", "Conv"]
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert np.array_equal(onnx.numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w2")), w2)


# ---- the verification a job runs: --inputs, --timeout, the original run once, the conversion's check --
def test_input_files_are_checked_before_anything_is_written_unless_not_verifying(tmp_path):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.ones((1, 2, 5, 5), np.float32))
    verify = api.VerifyOptions(input_files=[str(tmp_path / "x.npy")])
    with pytest.raises(NormfoldError, match=r"'x' has shape \[1, 2, 5, 5\], the model's input is \[1, 2, 4, 4\]"):
        api.fold_file(tmp_path / "m.onnx", verify=verify)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "x.npy"]
    verify.enabled = False  # --no-verify: the inputs are not used
    assert api.fold_file(tmp_path / "m.onnx", verify=verify).written


def test_a_verification_within_its_timeout_passes(tmp_path):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(timeout=60.0, local=False))
    assert (report.exit_code, report.written, report.verification.status) == (exit_codes.OK, True, "passed")
    assert 0 <= report.timings["verify"] < 60


def test_a_timeout_keeps_the_seed_in_the_report(monkeypatch):
    def slow(self, *args, **kwargs):
        raise VerificationTimeout("after 1 s")

    monkeypatch.setattr(api.VerifyOptions, "verify", slow)
    v, conversion = api._verified_with_conversion(api.VerifyOptions(seed=7, timeout=1.0), "a", "b", None, None,
                                                  pending="p")
    assert (v.status, v.seed, v.detail, conversion) == ("unavailable", 7, "timed out: after 1 s", None)


class _Staged:
    path = "conv.onnx"

    def __init__(self):
        self.discarded = 0

    def discard(self):
        self.discarded += 1


def test_the_conversions_check_shares_the_deadline_and_the_originals_run(monkeypatch):
    """--timeout counts from the start of verification over every step: the original's run (here
    3 s), the result's comparison and the converted original's own comparison."""
    clock = [100.0]
    monkeypatch.setattr(api.time, "monotonic", lambda: clock[0])
    timeouts = []

    def reference(self, ref, sites, deadline, pending):
        timeouts.append(("reference", api._remaining(deadline, self.timeout), pending))
        clock[0] += 3.0
        return "the original's run"

    def compare(self, ref, cand, reference_run, deadline):
        timeouts.append((cand, api._remaining(deadline, self.timeout), reference_run))
        return Verification("failed" if cand == "b.onnx" else "passed", detail="outputs differ: y")

    monkeypatch.setattr(api.VerifyOptions, "reference", reference)
    monkeypatch.setattr(api.VerifyOptions, "compare", compare)
    staged = _Staged()
    v, conversion = api._verified_with_conversion(api.VerifyOptions(timeout=5.0), "a.onnx", "b.onnx", None,
                                                  lambda: staged, pending="pending")
    assert (v.status, conversion.status, staged.discarded) == ("failed", "passed", 1)
    assert timeouts == [("reference", 5.0, "pending"), ("b.onnx", 2.0, "the original's run"),
                        ("conv.onnx", 2.0, "the original's run")]
    timeouts.clear()
    api._verified_with_conversion(api.VerifyOptions(), "a.onnx", "b.onnx", None, lambda: staged, pending="p")
    assert [t[1] for t in timeouts] == [None, None, None]


def test_the_original_runs_once_for_the_result_and_the_conversion(tmp_path, monkeypatch):
    """A job starts the original's run while it writes the result; both comparisons use it."""
    onnx.save(_layernorm(), tmp_path / "m.onnx")
    real_start, real_compare, starts, runs = api.VerifyOptions.start_reference, api.VerifyOptions.compare, [], []

    def start(self, reference, sites=None):
        starts.append(reference)
        return real_start(self, reference, sites)

    def compare(self, reference, candidate, sites=None, reference_run=None, *, deadline=None):
        runs.append(reference_run)
        return real_compare(self, reference, candidate, sites, reference_run, deadline=deadline)

    monkeypatch.setattr(api.VerifyOptions, "start_reference", start)
    monkeypatch.setattr(api.VerifyOptions, "compare", compare)
    monkeypatch.setattr(api, "run_rules", _tripling_scale(api.run_rules))
    fold = functools.partial(api.fold_file, tmp_path / "m.onnx", options=api.FoldOptions(target_opset=17),
                             verify=api.VerifyOptions(local=False))
    monkeypatch.setattr(api, "TOGETHER_BYTES", (tmp_path / "m.onnx").stat().st_size)
    report = fold()  # small: the original and the result run in one child; the conversion reuses the run
    assert (report.verification.status, report.conversion.status) == ("failed", "passed")
    assert starts == [] and len(runs) == 1 and isinstance(runs[0], api.ModelRun)
    runs.clear()
    monkeypatch.setattr(api, "TOGETHER_BYTES", api.TOGETHER_BYTES - 1)  # big: it starts while the result is written
    report = fold()
    assert (report.verification.status, report.conversion.status) == ("failed", "passed")
    assert starts == [tmp_path / "m.onnx"] and len(runs) == 2
    assert isinstance(runs[0], api.ModelRun) and runs[1] is runs[0]


def _tripling_scale(real):
    def corrupting(graph, *args, **kwargs):  # a wrong rewrite: the LayerNorm's scale tripled
        records = real(graph, *args, **kwargs)
        if not kwargs.get("dry"):
            node = next(n for n in graph.node if n.op_type == "LayerNormalization")
            scale = next(t for t in graph.initializer if t.name == node.input[1])
            scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 3, scale.name))
        return records

    return corrupting


def test_a_converted_model_with_external_weights_is_checked_without_loading_them(tmp_path, monkeypatch):
    """The converted original is staged from the weights' own files (never loaded whole, copied
    file to file from the model's folder, whatever the working directory)."""
    from normfold.io import validate

    src = tmp_path / "src"
    src.mkdir()
    onnx.save(_layernorm(), src / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)

    def never(*args, **kwargs):
        raise AssertionError("external weights loaded whole")

    monkeypatch.setattr(validate.external_data_helper, "load_external_data_for_model", never)
    monkeypatch.setattr(api, "run_rules", _tripling_scale(api.run_rules))
    monkeypatch.chdir(tmp_path)
    report = api.fold_file(src / "m.onnx", tmp_path / "o.onnx", options=api.FoldOptions(target_opset=17),
                           verify=api.VerifyOptions(local=False))
    assert (report.exit_code, report.verification.status) == (exit_codes.OUTPUTS_DIFFER, "failed")
    assert report.conversion.status == "passed", report.conversion.detail
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---- the benchmark's inputs, --inputs checks past an input they cannot check, long messages ----------
def test_the_benchmark_runs_on_the_inputs_verification_uses(tmp_path, monkeypatch):
    import normfold.verify

    model = build("""g (float[N,4] x, float[2,K] z, int64[3] ids) => (float[N,4] y, float[2,K] u, int64[3] i) {
        y = Neg (x)
        u = Neg (z)
        i = Identity (ids) }""")
    onnx.save(model, tmp_path / "m.onnx")
    seen = []
    monkeypatch.setattr(normfold.verify, "benchmark_models", lambda models, feeds: seen.append((models, feeds)) or {})
    verify = api.VerifyOptions(seed=4, shapes={"z": [2, 5]}, dims={"N": 3}, int_ranges={"ids": (5, 9)})
    api.benchmark_files(tmp_path / "m.onnx", tmp_path / "f.onnx", verify)
    [(models, feeds)] = seen
    assert models == {"original": tmp_path / "m.onnx", "folded": tmp_path / "f.onnx"}
    assert (feeds["x"].shape, feeds["z"].shape) == ((3, 4), (2, 5)) and set(feeds["ids"]) <= {5, 6, 7, 8}
    probe = normfold.verify.open_session(tmp_path / "m.onnx", "original")
    expected = normfold.verify.make_inputs(probe, 4, {"z": [2, 5]}, {"N": 3}, {"ids": (5, 9)})
    assert all(np.array_equal(feeds[k], expected[k]) for k in expected)
    arrays = {"x": np.ones((6, 4), np.float32), "z": np.ones((2, 1), np.float32), "ids": np.arange(3)}
    np.savez(tmp_path / "in.npz", **arrays)
    verify.input_files = [str(tmp_path / "in.npz")]
    api.benchmark_files(tmp_path / "m.onnx", tmp_path / "f.onnx", verify)
    assert all(np.array_equal(seen[1][1][k], arrays[k]) for k in arrays)


def test_a_benchmark_of_an_original_onnxruntime_cannot_load_says_which_model(tmp_path):
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }")
    model.graph.node[0].op_type, model.graph.node[0].domain = "Nope", "x.custom"
    model.opset_import.append(onnx.helper.make_opsetid("x.custom", 1))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(VerificationUnavailable, match="^onnxruntime cannot load the original model: "):
        api.benchmark_files(tmp_path / "m.onnx", tmp_path / "m.onnx", api.VerifyOptions())


@pytest.mark.parametrize("first", ["sequence", "undefined type"])
def test_an_input_that_cannot_be_checked_does_not_stop_the_checks_of_the_next(tmp_path, first):
    model = _inputs_model()
    if first == "sequence":
        model.graph.input[0].CopyFrom(onnx.helper.make_tensor_sequence_value_info("x", onnx.TensorProto.FLOAT, None))
    else:
        model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED
    np.savez(tmp_path / "in.npz", x=np.zeros((2, 5), np.float32), ids=np.zeros(3, np.int32))
    with pytest.raises(NormfoldError, match="'ids' is int32, the model's input is int64"):
        api.check_input_files(model, [str(tmp_path / "in.npz")])


def test_a_long_conversion_error_is_cut_at_200_characters(monkeypatch):
    def refuse(model, target):
        raise RuntimeError("x" * 300)

    monkeypatch.setattr(api.version_converter, "convert_version", refuse)
    with pytest.raises(NormfoldError) as info:
        api.convert_opset(build("g (float[2] x) => (float[2] y) { y = Neg (x) }", opset=13), 17)
    assert str(info.value) == "cannot convert the model from opset 13 to 17: " + "x" * 197 + "..."


def test_the_originals_run_gets_what_is_left_of_the_deadline(monkeypatch):
    monkeypatch.setattr(api.time, "monotonic", lambda: 10.0)
    child = _Child(value="the run")
    assert api.VerifyOptions(timeout=5.0).reference("a.onnx", deadline=12.5, pending=child) == "the run"
    assert child.timeouts == [2.5]


# ---- which sites are compared, and a job with no verification that fails while writing ------------------
def test_only_the_rewritten_sites_are_compared(tmp_path):
    model = _conv_bn_relu()  # Conv -> BN (folded) -> Relu -> BN whose scale is a graph input (left) -> Relu
    model.graph.node[2].output[0] = "r"
    model.graph.node.append(onnx.helper.make_node("BatchNormalization", ["r", "s2", "b", "m", "v"], ["t"]))
    model.graph.node.append(onnx.helper.make_node("Relu", ["t"], ["y"]))
    model.graph.input.append(onnx.helper.make_tensor_value_info("s2", onnx.TensorProto.FLOAT, [3]))
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((1, 2, 4, 4), np.float32), s2=np.ones(3, np.float32))
    report = api.fold_file(tmp_path / "m.onnx", verify=api.VerifyOptions(sites=True, local=False,
                                                                          input_files=[str(tmp_path / "in.npz")]))
    assert report.written and [(s.status, s.output) for s in report.sites] == [("folded", "n"), ("left", "t")]
    assert [s.name for s in report.verification.sites] == ["n"]
    assert report.sites[0].max_abs_error is not None and report.sites[1].max_abs_error is None


def test_a_job_without_verification_that_fails_while_writing_says_why(tmp_path, monkeypatch):
    onnx.save(_conv_bn(), tmp_path / "m.onnx")

    def full(*args, **kwargs):
        raise NormfoldError("out.onnx: cannot write (No space left on device)")

    monkeypatch.setattr(api, "StagedModel", full)
    for verify in (api.VerifyOptions(enabled=False), api.VerifyOptions(local=True)):
        with pytest.raises(NormfoldError, match="No space left"):
            api.fold_file(tmp_path / "m.onnx", verify=verify)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_fold_refuses_a_base_dir_without_the_models_external_data(tmp_path, monkeypatch):
    """fold() on a model loaded without its external weights reads them from base_dir when a rule
    needs one: a folder that lacks the file (or a location outside it) is a NormfoldError naming
    both, before anything is folded, not onnx's checker error at the first weight read."""
    model = _conv_bn()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(NormfoldError, match=f"^{tmp_path.parent}: external data file 'm.data' not found$"):
        api.fold(lazy, base_dir=tmp_path.parent)
    with pytest.raises(NormfoldError, match="'m.data' not found"):
        api.fold(lazy)  # base_dir "" is the working directory
    folded, report = api.fold(lazy, base_dir=tmp_path)
    assert [s.status for s in report.sites] == ["folded"]
    for tensor in lazy.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.data"
    with pytest.raises(NormfoldError, match="points outside the model's folder; refused"):
        api.fold(lazy, base_dir=tmp_path)
