"""Issue 14: a pipeline step must never damage what it was given. Every case the issue lists, run
through the installed command: paths that overlap are refused before any work, every file of a
run (the report included) is committed together or not at all, special files are never replaced,
interrupts and time limits end a run cleanly, and bad data or options give the right exit code
with one `normfold: error:` line."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import normfold
from builders import build
from test_cli import conv_bn_model, normfold_cmd
from test_robustness import assert_refused, files_under, save, with_external_data

SCRIPT = Path(sys.executable).with_name("normfold")


def net(d: Path, name: str = "net.onnx") -> Path:
    return save(conv_bn_model(), d / name)


def heavy_model() -> onnx.ModelProto:
    """Conv -> BatchNormalization with a 16x3x3x3 weight (1.7 KB): over EXTERNAL_THRESHOLD, so an
    external data file is really written (conv_bn_model's weights all stay inline, and a case
    built on it would show no damage even where the paths overlap)."""
    rng = np.random.default_rng(14)
    return build("""g (float[1,3,8,8] x) => (float[1,16,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      y = BatchNormalization (c, s, bb, m, v)
    }""", w=rng.standard_normal((16, 3, 3, 3)).astype(np.float32), s=rng.standard_normal(16).astype(np.float32),
                 bb=rng.standard_normal(16).astype(np.float32), m=rng.standard_normal(16).astype(np.float32),
                 v=(rng.random(16) + 0.5).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# refused before any work: exit 2, one line, the folder byte-identical (nothing new, nothing changed)

def case_report_is_the_input(d):
    m = net(d)
    return ["fold", m, "-o", d / "out.onnx", "--report", m], "would overwrite the input model"


def case_report_is_the_input_of_a_failing_run(d):
    (d / "bad.onnx").write_bytes(b"not a model at all")
    return ["fold", d / "bad.onnx", "-o", d / "out.onnx", "--report", d / "bad.onnx"], "input model"


def case_report_is_the_inputs_external_data(d):
    m = with_external_data(d / "model")
    return ["fold", m, "-o", d / "model" / "out.onnx", "--report", d / "model" / "ext.onnx.data"], "external data file"


def case_external_data_is_the_inputs_external_data(d):
    m = with_external_data(d / "model", model=heavy_model())
    return ["fold", m, "-o", d / "model" / "out.onnx", "--external-data", "ext.onnx.data"], "external data file"


def case_external_data_is_the_input_model(d):
    m = save(heavy_model(), d / "net.onnx")
    return ["fold", m, "-o", d / "out.onnx", "--external-data", "net.onnx"], "input model"


def case_default_output_is_the_next_input(d):
    a = net(d, "a.onnx")
    b = net(d, "a.folded.onnx")
    return ["fold", a, b], "input model"


def case_report_is_the_output(d):
    m = net(d)
    return ["fold", m, "-o", d / "out.onnx", "--report", d / "out.onnx"], "same file"


def case_report_is_the_outputs_data_file(d):
    m = with_external_data(d, "m.onnx", heavy_model())  # so the output has a data file: out.onnx.data
    return ["fold", m, "-o", d / "out.onnx", "--report", d / "out.onnx.data"], "same file"


def case_external_data_is_the_output_no_verify(d):
    m = save(heavy_model(), d / "net.onnx")
    return ["fold", m, "-o", d / "out.onnx", "--external-data", "out.onnx", "--no-verify"], "output file itself"


def case_output_is_a_hard_link_of_the_input(d):
    m = net(d)
    os.link(m, d / "alias.onnx")
    return ["fold", m, "-o", d / "alias.onnx"], "--in-place"


def case_output_is_a_symlink_to_another_file(d):
    m = net(d)
    (d / "target.onnx").write_bytes(b"someone else's file")
    (d / "link.onnx").symlink_to(d / "target.onnx")
    return ["fold", m, "-o", d / "link.onnx"], "symbolic link"


# Devices and /dev/stdout made in the test's folder: a regression must not replace the machine's own.
def _dev_null(d: Path) -> Path:
    try:
        os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return d / "null"


def case_output_is_dev_null(d):
    return ["fold", net(d), "-o", _dev_null(d)], "character device"


def case_report_is_dev_null(d):
    return ["fold", net(d), "-o", d / "out.onnx", "--report", _dev_null(d)], "character device"


def case_report_is_dev_stdout(d):
    (d / "stdout").symlink_to("/proc/self/fd/1")  # what /dev/stdout is
    return ["fold", net(d), "-o", d / "out.onnx", "--report", d / "stdout"], ("symbolic link", "--report -")


def case_report_of_verify_is_its_candidate(d):
    m = net(d)
    return ["verify", m, m, "--report", m], "input model"


def case_inputs_is_a_fifo(d):
    m = net(d)
    os.mkfifo(d / "feeds.npz")
    return ["fold", m, "-o", d / "out.onnx", "--inputs", d / "feeds.npz"], "not a regular file"


def _bad_option(*option):
    def case(d):
        return ["fold", net(d), "-o", d / "out.onnx", *option], option[0]
    return case


def case_inputs_wrong_dtype(d):
    m = net(d)
    np.savez(d / "feeds.npz", x=np.zeros((1, 3, 8, 8), np.float64))
    return ["fold", m, "-o", d / "out.onnx", "--inputs", d / "feeds.npz"], "float64"


def case_inputs_wrong_shape(d):
    m = net(d)
    np.savez(d / "feeds.npz", x=np.zeros((1, 3, 9, 8), np.float32))
    return ["fold", m, "-o", d / "out.onnx", "--inputs", d / "feeds.npz"], "shape [1, 3, 9, 8]"


def case_graph_without_outputs(d):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", T.FLOAT, [2])], [])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "no outputs"


def case_file_name_not_utf8(d):
    m = net(d, os.fsdecode(b"net\xff.onnx"))
    return ["fold", m, "-o", d / "out.onnx"], ("net\\xff.onnx", "not valid UTF-8")


def case_newline_in_the_file_name(d):
    return ["fold", d / "no\nsuch.onnx", "-o", d / "out.onnx"], "no\\nsuch.onnx"


def case_training_info_external_data_outside(d):
    model = conv_bn_model()
    init = numpy_helper.from_array(np.ones(4, np.float32), "step")
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../outside.bin"), ("offset", "0"), ("length", "16")):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    info = model.training_info.add()
    info.initialization.name = "init"
    info.initialization.initializer.append(init)
    (d / "model").mkdir()
    return ["fold", save(model, d / "model" / "m.onnx"), "-o", d / "model" / "out.onnx"], "outside the model's folder"


CASES = [pytest.param(f, id=f.__name__[5:].replace("_", "-")) for f in (
    case_report_is_the_input, case_report_is_the_input_of_a_failing_run, case_report_is_the_inputs_external_data,
    case_external_data_is_the_inputs_external_data, case_external_data_is_the_input_model,
    case_default_output_is_the_next_input, case_report_is_the_output, case_report_is_the_outputs_data_file,
    case_external_data_is_the_output_no_verify, case_output_is_a_hard_link_of_the_input,
    case_output_is_a_symlink_to_another_file, case_output_is_dev_null, case_report_is_dev_null,
    case_report_is_dev_stdout, case_report_of_verify_is_its_candidate, case_inputs_is_a_fifo,
    case_inputs_wrong_dtype, case_inputs_wrong_shape, case_graph_without_outputs, case_file_name_not_utf8,
    case_newline_in_the_file_name, case_training_info_external_data_outside)] + [
    pytest.param(_bad_option(*o), id=" ".join(o)) for o in (
        ("--seed", "-1"), ("--atol", "-1"), ("--atol", "nan"), ("--atol", "inf"), ("--rtol", "inf"),
        ("--atol", "y:-0.5"), ("--timeout", "0"), ("--timeout", "nan"))]


@pytest.mark.parametrize("case", CASES)
def test_refused_before_any_work(case, tmp_path):
    args, expect = case(tmp_path)
    before = files_under(tmp_path)  # a device or symlink is recorded by its kind: replacing it shows
    result = normfold_cmd(*args)
    assert_refused(result, tmp_path, before, expect)


# ---------------------------------------------------------------------------------------------
# all or nothing: the report is part of the run

def test_report_into_an_unwritable_folder_commits_nothing(tmp_path):
    report = Path("/proc") / f"normfold-test-{os.getpid()}.json"  # not even root can create a file there
    result = normfold_cmd("fold", net(tmp_path), "-o", tmp_path / "out.onnx", "--report", report)
    assert result.returncode == 2 and result.stderr.startswith("normfold: error: ")
    assert sorted(files_under(tmp_path)) == ["net.onnx"]


def test_report_on_a_full_disk_commits_nothing(tmp_path, monkeypatch):
    """The report is staged after the models; a failure there must leave the models uncommitted."""
    import normfold.io.staging as staging

    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if "w" in mode and "b" not in mode:  # the report (text); models are written in binary
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(staging, "open", full_disk_open, raising=False)
    from normfold.cli.main import main

    m = net(tmp_path)
    result = CliRunner().invoke(main, ["fold", str(m), "-o", str(tmp_path / "out.onnx"),
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert sorted(files_under(tmp_path)) == ["net.onnx"]


def test_report_past_the_file_size_limit_commits_nothing(tmp_path):
    """A write that really fails, in the installed command: a file size limit (RLIMIT_FSIZE, which
    any user may lower) that the folded model fits under and the report does not stands in for
    a disk that fills up between the two. Nothing may be committed."""
    import resource

    sizes = tmp_path / "sizes"
    sizes.mkdir()
    result = normfold_cmd("fold", net(sizes), "-o", sizes / "out.onnx", "--report", sizes / "r.json")
    model_size, report_size = ((sizes / name).stat().st_size for name in ("out.onnx", "r.json"))
    assert result.returncode == 0 and model_size < report_size // 2, (model_size, report_size)
    limit = (model_size + report_size) // 2

    def limit_file_size():  # EFBIG past the limit; Python ignores SIGXFSZ, so no kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    d = tmp_path / "run"
    d.mkdir()
    result = subprocess.run([str(SCRIPT), "fold", str(net(d)), "-o", str(d / "out.onnx"), "--report", str(d / "r.json")],
                            capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("normfold: error: ") and "File too large" in lines[0], result.stderr
    assert sorted(files_under(d)) == ["net.onnx"]


def test_printing_after_the_commit_cannot_fail_the_run(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([str(SCRIPT), "fold", str(net(tmp_path)), "-o", str(tmp_path / "out.onnx"), "-v"],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_report_dash_is_standard_output(tmp_path):
    # run from tmp_path: a command that took "-" for a file name would write ./- (fdd2c71 did)
    result = subprocess.run([str(SCRIPT), "fold", str(net(tmp_path)), "-o", str(tmp_path / "out.onnx"),
                             "--report", "-", "-v"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["command"] == "fold" and document["models"][0]["written"] is True
    assert "folded" in result.stderr  # the human text goes to stderr, so stdout stays JSON
    assert sorted(files_under(tmp_path)) == ["net.onnx", "out.onnx"]


def test_a_fifo_named_onnx_in_a_folder_is_reported(tmp_path):
    (tmp_path / "in").mkdir()
    net(tmp_path / "in", "a.onnx")
    os.mkfifo(tmp_path / "in" / "pipe.onnx")
    result = normfold_cmd("fold", tmp_path / "in", "-o", tmp_path / "out", "-j", "2")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("normfold: error: ")]
    assert len(errors) == 1 and "pipe.onnx" in errors[0] and "FIFO" in errors[0], result.stderr
    assert (tmp_path / "out" / "a.folded.onnx").exists() and not list((tmp_path / "out").glob("pipe*"))


def test_250_character_output_name(tmp_path):
    out = tmp_path / ("o" * 245 + ".onnx")
    result = normfold_cmd("fold", net(tmp_path), "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.exists() and sorted(files_under(tmp_path)) == sorted(["net.onnx", out.name])


def test_in_place_replaces_only_its_own_input(tmp_path):
    m = net(tmp_path)
    before = m.read_bytes()
    result = normfold_cmd("fold", m, "--in-place")
    assert result.returncode == 0, result.stderr
    assert m.read_bytes() != before and sorted(files_under(tmp_path)) == ["net.onnx"]


# ---------------------------------------------------------------------------------------------
# models onnx's checker accepts: never an internal error

def test_conv_bias_of_the_wrong_length_is_left_with_a_reason(tmp_path):
    rng = np.random.default_rng(0)
    model = build("""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w, cb)
      y = BatchNormalization (c, s, bb, m, v)
    }""", w=rng.standard_normal((4, 3, 3, 3)).astype(np.float32), cb=np.ones(3, np.float32),
                  s=np.ones(4, np.float32), bb=np.zeros(4, np.float32), m=np.zeros(4, np.float32),
                  v=np.ones(4, np.float32))
    folded, report = normfold.fold(model)
    assert [(s.status, s.reason) for s in report.sites] == [("left", "inconsistent-constants")]
    result = normfold_cmd("fold", save(model, tmp_path / "m.onnx"), "-o", tmp_path / "out.onnx")
    assert result.returncode == 3 and "internal error" not in result.stderr  # onnxruntime refuses the bias


def test_conv_bias_of_the_wrong_length_in_a_loop_body():
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"), (np.ones(5, np.float32), "cb"),
        (np.ones(4, np.float32), "s"), (np.zeros(4, np.float32), "bb"), (np.zeros(4, np.float32), "m"),
        (np.ones(4, np.float32), "v"))]
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "cb"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["o"]),
         helper.make_node("Identity", ["ci"], ["co"])], "body",
        [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("ci", T.BOOL, [])],
        [helper.make_tensor_value_info("co", T.BOOL, []), helper.make_tensor_value_info("o", T.FLOAT, [1, 4, 8, 8])],
        inits)
    graph = helper.make_graph([helper.make_node("Loop", ["n", "cond"], ["y"], body=body)], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8]),
                               helper.make_tensor_value_info("n", T.INT64, []),
                               helper.make_tensor_value_info("cond", T.BOOL, [])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [None, 1, 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    _, report = normfold.fold(model)
    assert [(s.status, s.reason) for s in report.sites] == [("left", "inconsistent-constants")]


def test_two_initializer_names_swapped_is_not_an_internal_error(tmp_path):
    """The biases of two Convs of 4 and 8 channels swapped: onnx's checker accepts the model (it
    does not relate a bias to the channels), the fold must leave both sites instead of crashing
    on the broadcast (it was exit 4 with a ValueError)."""
    rng = np.random.default_rng(2)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    model = build("""g (float[1,3,8,8] x) => (float[1,8,8,8] y) {
      c1 = Conv <pads=[1,1,1,1]> (x, w1, cb1)
      b1 = BatchNormalization (c1, s1, bb1, m1, v1)
      c2 = Conv <pads=[1,1,1,1]> (b1, w2, cb2)
      y = BatchNormalization (c2, s2, bb2, m2, v2)
    }""", w1=f32(4, 3, 3, 3), cb1=f32(4), s1=f32(4), bb1=f32(4), m1=f32(4), v1=np.ones(4, np.float32),
                  w2=f32(8, 4, 3, 3), cb2=f32(8), s2=f32(8), bb2=f32(8), m2=f32(8), v2=np.ones(8, np.float32))
    names = {t.name: t for t in model.graph.initializer}
    names["cb1"].name, names["cb2"].name = "cb2", "cb1"
    onnx.checker.check_model(model, full_check=True)
    _, report = normfold.fold(model)
    assert [(s.status, s.reason) for s in report.sites] == [("left", "inconsistent-constants")] * 2
    result = normfold_cmd("fold", save(model, tmp_path / "m.onnx"), "-o", tmp_path / "out.onnx")
    assert result.returncode == 3 and "internal error" not in result.stderr  # onnxruntime refuses the bias
    assert sorted(files_under(tmp_path)) == ["m.onnx"]


def test_function_constant_with_ref_attr_name_is_accepted(tmp_path):
    text = """<ir_version: 8, opset_import: ["" : 18, "local" : 1]>
    g (float[2] x) => (float[2] y) {
      y = local.AddK <k: tensor = float[2] {1.0, 2.0}> (x)
    }
    <domain: "local", opset_import: ["" : 18]>
    AddK <k> (x) => (y) {
      c = Constant <value: tensor = @k> ()
      y = Add (x, c)
    }"""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    result = normfold_cmd("fold", save(model, tmp_path / "m.onnx"), "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.onnx").exists()


def _overflowing_fp16_model() -> onnx.ModelProto:
    """Folds that overflow float16 or divide by zero, refused by their checks; an unused
    initializer is one of onnxruntime's own log warnings."""
    model = build("""g (float16[1,3,8,8] x) => (float16[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      d = Div (c, k)
      y = BatchNormalization (d, s, bb, m, v)
    }""", w=np.ones((4, 3, 3, 3), np.float16), k=np.array([0, 1, 2, 3], np.float16).reshape(1, 4, 1, 1),
                  s=np.array([6e4, 1, 1, 1], np.float16), bb=np.zeros(4, np.float16), m=np.zeros(4, np.float16),
                  v=np.array([1e-7, 1, 1, 1], np.float16))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    return model


def _mul_by_zero_model() -> onnx.ModelProto:
    """A channel Mul with a 0 factor between Conv and BatchNormalization: a good fold (exit 0),
    during which the affine fold computed 1/k for every op type and numpy printed 'divide by zero'."""
    return build("""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      d = Mul (c, k)
      y = BatchNormalization (d, s, bb, m, v)
    }""", w=np.ones((4, 3, 3, 3), np.float32), k=np.array([0, 1, 2, 3], np.float32).reshape(1, 4, 1, 1),
                 s=np.ones(4, np.float32), bb=np.zeros(4, np.float32), m=np.zeros(4, np.float32),
                 v=np.ones(4, np.float32))


@pytest.mark.parametrize("make, codes", [(_overflowing_fp16_model, (0, 1)), (_mul_by_zero_model, (0,))],
                         ids=["fp16-overflow", "mul-by-zero"])
def test_no_numpy_or_onnxruntime_noise_on_stderr_of_a_good_run(tmp_path, make, codes):
    result = normfold_cmd("fold", save(make(), tmp_path / "m.onnx"), "-o", tmp_path / "out.onnx",
                          "--allow-unverified", "-q")
    assert result.returncode in codes, result.stderr
    assert "Warning" not in result.stderr and "onnxruntime" not in result.stderr.replace("normfold: error:", "")


def test_an_internal_error_line_starts_like_every_error(monkeypatch, capsys, tmp_path):
    import normfold.cli.fold
    import normfold.cli.main

    def broken(*args, **kwargs):
        raise RuntimeError("planted\nbug")

    monkeypatch.setattr(normfold.cli.fold, "fold_many", broken)
    monkeypatch.setattr(sys, "argv", ["normfold", "fold", str(net(tmp_path))])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:  # the console entry point, as the installed script calls it; it installs signal handlers
        with pytest.raises(SystemExit) as ended:
            normfold.cli.main.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert ended.value.code == 4
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("normfold: error: internal error: RuntimeError: planted bug")


# ---------------------------------------------------------------------------------------------
# interrupts and time limits

def endless_model() -> onnx.ModelProto:
    """A Loop of 2e9 iterations: onnxruntime would run it for hours."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["ci"], ["co"]), helper.make_node("Add", ["a", "one"], ["ao"])], "body",
        [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("ci", T.BOOL, []),
         helper.make_tensor_value_info("a", T.FLOAT, [1])],
        [helper.make_tensor_value_info("co", T.BOOL, []), helper.make_tensor_value_info("ao", T.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    graph = helper.make_graph([helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1])],
                              [numpy_helper.from_array(np.array(2_000_000_000, np.int64), "trips")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_timeout_stops_verification_and_writes_nothing(tmp_path):
    m = save(endless_model(), tmp_path / "loop.onnx")
    started = time.monotonic()
    result = normfold_cmd("fold", m, "-o", tmp_path / "out.onnx", "--timeout", "1.5", "--allow-unverified")
    assert time.monotonic() - started < 30
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("normfold: error: ")]
    assert len(errors) == 1 and "timed out" in errors[0] and "--timeout" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(files_under(tmp_path)) == ["loop.onnx"]


_STARTED: list[subprocess.Popen] = []


def _start(args, tmp_path, **kwargs):
    """The command in its own session, so that the fixture below can end its whole group."""
    process = subprocess.Popen([str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path, start_new_session=True, **kwargs)
    _STARTED.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A run that ignores its signal (the bug such a test looks for) would go on with a Loop of
    2e9 iterations for hours: its group gets SIGTERM, then SIGKILL, whatever the test's outcome."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is not None:  # only while it lives is its pid surely still our group's
                break
            os.killpg(process.pid, sig)
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _wait_for_staging(folder: Path, process, pattern="*/*/*.onnx", limit=60.0):
    deadline = time.time() + limit
    while not list(folder.glob(".normfold-staging-" + pattern)) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()


def test_sigterm_ends_a_run_promptly_while_onnxruntime_runs(tmp_path):
    m = save(endless_model(), tmp_path / "loop.onnx")
    process = _start(["fold", m, "-o", tmp_path / "out.onnx"], tmp_path)
    _wait_for_staging(tmp_path, process)
    time.sleep(0.5)  # onnxruntime is inside the Loop now
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5, "SIGTERM was not honoured while onnxruntime ran"
    assert process.returncode == 130 and stderr == "normfold: error: interrupted; nothing written\n", stderr
    assert sorted(files_under(tmp_path)) == ["loop.onnx"]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (verification children run in their own process group)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dies with its parent through prctl")
def test_sigkill_of_a_run_ends_its_verification_child(tmp_path):
    """SIGKILL reaches no handler: the child that runs onnxruntime must die with the run instead
    of going on alone with a Loop of 2e9 iterations."""
    process = _start(["fold", save(endless_model(), tmp_path / "loop.onnx"), "-o", tmp_path / "out.onnx"], tmp_path)
    _wait_for_staging(tmp_path, process)
    deadline = time.monotonic() + 30
    while not (children := _children(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children, "no verification child was started"
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while any(map(_running, children)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in children if _running(pid)]
    for pid in left:  # ours, orphaned: end them so that a failure costs no CPU for hours
        os.kill(pid, signal.SIGKILL)
    assert not left, f"verification children {left} outlived the killed run"


def _wait_for_handlers(process, limit: float = 30.0) -> bool:
    """Until the process catches SIGTERM (Linux: SigCgt in /proc/PID/status; Python itself catches
    only SIGINT): normfold's entry point has set its handlers, and the delays count from there.
    False if it ended first or never did."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            return True  # not Linux: the delay alone decides
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.1, 0.15, 0.2, 0.3, 0.45])
def test_interrupt_during_start_up_prints_no_traceback(tmp_path, delay, sig):
    """While onnx, numpy and onnxruntime are imported (counted from normfold's entry point: the
    interpreter's own start, before any normfold code runs, is out of reach): Ctrl-C gave a KeyboardInterrupt traceback, SIGTERM
    the default death (143 in a shell) instead of the interrupt line and 130."""
    process = _start(["fold", net(tmp_path), "-o", tmp_path / "out.onnx"], tmp_path)
    # Under load the interpreter's own start took over 0.1 s: the signal came before any handler.
    assert _wait_for_handlers(process), "normfold never caught SIGTERM"
    time.sleep(delay)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert process.returncode in (0, 130), (process.returncode, stderr)
    if process.returncode == 130:
        assert stderr == "normfold: error: interrupted; nothing written\n"
        assert sorted(files_under(tmp_path)) == ["net.onnx"]


def test_ctrl_c_on_a_parallel_run_prints_no_worker_tracebacks(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.onnx", "b.onnx"):
        save(endless_model(), tmp_path / "in" / name)
    process = _start(["fold", tmp_path / "in", "-o", tmp_path / "out", "-j", "2"], tmp_path)
    _wait_for_staging(tmp_path / "out", process)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr == "normfold: error: interrupted; nothing written\n", stderr
    assert sorted(files_under(tmp_path)) == ["in", "in/a.onnx", "in/b.onnx"]


def test_stale_staging_folders_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".normfold-staging-{dead.pid}-0badc0de"
    alive = tmp_path / f".normfold-staging-{os.getpid()}-0badc0de"  # this test's process: still running
    for folder in (stale, alive):
        (folder / "m1").mkdir(parents=True)
        (folder / "m1" / "out.onnx").write_bytes(b"left by a killed run")
    result = normfold_cmd("fold", net(tmp_path), "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and alive.exists()


# ---------------------------------------------------------------------------------------------
# issue 13: behaviour the mutation run showed no test for

def test_external_data_is_moved_into_place_before_the_model(tmp_path, monkeypatch):
    """A reader that sees the new model must find its weights: data file first, model last."""
    moved = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    source = Path(__file__).parents[1] / "models" / "torch" / "cnn_bn_op13.onnx"  # weights over 1 KB
    report = normfold.fold_file(source, tmp_path / "out.onnx", options=normfold.FoldOptions(external_data=""))
    assert report.written and moved == ["out.onnx.data", "out.onnx"]


def test_models_of_a_folder_run_come_in_path_order(tmp_path):
    from normfold.batch import find_models

    for rel in ("b.onnx", "a.onnx", "sub/c.onnx", "a.folded.onnx", "Z.onnx"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        net(tmp_path, rel)
    jobs = find_models([tmp_path], tmp_path / "out")
    assert [str(j.source.relative_to(tmp_path)) for j in jobs] == ["Z.onnx", "a.onnx", "b.onnx", "sub/c.onnx"]
    result = normfold_cmd("fold", tmp_path, "-o", tmp_path / "out", "-j", "2", "--report", tmp_path / "r.json")
    reports = json.loads((tmp_path / "r.json").read_text())["models"]
    assert result.returncode == 0 and [Path(r["input"]).name for r in reports] == ["Z.onnx", "a.onnx", "b.onnx", "c.onnx"]


def test_batch_exit_code_is_the_most_severe(tmp_path):
    """One model whose outputs differ (exit 1) and one onnxruntime cannot run (exit 3): 1."""
    model = conv_bn_model()
    custom = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Op", ["x"], ["y"], domain="custom")], "g",
                               [onnx.helper.make_tensor_value_info("x", T.FLOAT, [2])],
                               [onnx.helper.make_tensor_value_info("y", T.FLOAT, [2])]),
        opset_imports=[onnx.helper.make_opsetid("", 13), onnx.helper.make_opsetid("custom", 1)])
    custom.ir_version = 8
    save(model, tmp_path / "a_differs.onnx")
    save(custom, tmp_path / "b_unverifiable.onnx")
    result = normfold_cmd("fold", tmp_path / "a_differs.onnx", tmp_path / "b_unverifiable.onnx",
                          "--atol", "0", "--rtol", "0")
    assert result.returncode == 1, result.stderr
    assert sorted(files_under(tmp_path)) == ["a_differs.onnx", "b_unverifiable.onnx"]


# ---------------------------------------------------------------------------------------------
# bounded fuzz of the paths of a run: seeded choices of -o, --report and --external-data among the
# run's own files and new names. Whatever the choice: exit 0 or 2, one error line, every input
# byte-identical, and nothing written unless the run succeeded.

PATH_FUZZ_CASES = 40


def _path_fuzz_case(index: int, d: Path) -> list[str]:
    import random

    rng = random.Random(index)
    model = with_external_data(d, "m.onnx") if rng.random() < 0.5 else net(d, "m.onnx")
    names = ["m.onnx", "m.onnx.data", "out.onnx", "out.onnx.data", "r.json", "w.bin", "m.folded.onnx",
             "m.folded.onnx.data"]
    args = ["fold", str(model)]
    if rng.random() < 0.7:
        args += ["-o", str(d / rng.choice(names))]
    if rng.random() < 0.6:
        args += ["--report", str(d / rng.choice(names))]
    if rng.random() < 0.4:
        args += ["--external-data", rng.choice(names)]
    if rng.random() < 0.3:
        args += ["--no-verify"]
    return args


def test_path_fuzz_never_damages_an_input(tmp_path):
    from normfold.cli.main import main

    codes = {}
    for index in range(PATH_FUZZ_CASES):
        d = tmp_path / f"case{index}"
        d.mkdir()
        args = _path_fuzz_case(index, d)
        before = files_under(d)
        result = CliRunner().invoke(main, args)
        label = f"case {index}: normfold {' '.join(a.replace(str(d) + '/', '') for a in args[1:])}"
        codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
        assert result.exit_code in (0, 2), f"{label}: exit {result.exit_code}: {result.output}"
        assert "Traceback" not in result.output, label
        after = files_under(d)
        assert {k: v for k, v in after.items() if k in before} == before, \
            f"{label}: an input changed: {[k for k in before if after.get(k) != before[k]]}"
        if result.exit_code != 0:
            assert after == before, f"{label}: exit {result.exit_code} but wrote {sorted(after.keys() - before.keys())}"
            errors = [line for line in result.output.splitlines() if line.startswith("normfold: error: ")]
            assert len(errors) == 1, f"{label}: {result.output!r}"
        else:
            assert not [k for k in after if ".normfold-staging-" in k], label
    assert codes.get(0, 0) >= 5 and codes.get(2, 0) >= 5, codes  # both outcomes are reached


BERT = Path(__file__).parents[1] / "models" / "torch" / "hf_bert_op14.onnx"


@pytest.mark.parametrize("delay", [0.03, 0.07, 0.11])
def test_sigterm_while_onnxruntime_is_first_imported_is_not_lost(tmp_path, delay):
    """Right after the opset-converted model is staged, the command imports onnxruntime; a
    SIGTERM then used to be swallowed by that import (pybind turned it into an ImportError) and
    the run went on to write its output with exit 0."""
    out = tmp_path / "o.onnx"
    process = _start(["fold", BERT, "-o", out, "--target-opset", "17", "--batches", "1000",
                      "--shape", "input_ids:8x32"], tmp_path)
    _wait_for_staging(tmp_path, process, pattern="*/*/o.onnx")
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.endswith("normfold: error: interrupted; nothing written\n") and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []
