"""What build pipelines rely on: inspect, check, many models at once, one JSON schema, idempotence,
determinism, nothing half-written, quiet output without a terminal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from builders import load_report
from normfold.cli.main import main
from test_cli import normfold_cmd

MODELS = Path(__file__).parents[1] / "models"
CNN = MODELS / "torch" / "cnn_bn_op13.onnx"
BERT = MODELS / "torch" / "hf_bert_op14.onnx"


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_inspect_lists_every_site_and_writes_nothing(tmp_path):
    model = tmp_path / "cnn.onnx"
    shutil.copy(CNN, model)
    result = invoke("inspect", model)
    assert result.exit_code == 0
    assert result.output.count("would fold:") == 7 and result.output.count("left (") == 2
    assert "BatchNormalization x9" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]
    document = json.loads(invoke("inspect", model, "--json").output)
    (tmp_path / "inspect.json").write_text(json.dumps(document))
    load_report(tmp_path / "inspect.json")
    assert document["command"] == "inspect"
    assert [s["status"] for s in document["models"][0]["sites"]].count("folded") == 7


def test_check_fails_on_foldable_sites_and_passes_on_folded_models(tmp_path):
    result = invoke("check", CNN, "--report", tmp_path / "c.json")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 7
    assert lines[0] == (f"{CNN}: node /bn1/BatchNormalization: BatchNormalization after Conv /conv1/Conv "
                        "can be folded")
    assert load_report(tmp_path / "c.json")["exit_code"] == 1
    folded = tmp_path / "cnn.folded.onnx"
    assert invoke("fold", CNN, "-o", folded).exit_code == 0
    result = invoke("check", folded)
    assert result.exit_code == 0 and result.output == ""
    # LayerNorms that need a newer opset only count when the opset may be raised
    assert invoke("check", BERT).exit_code == 0
    assert invoke("check", BERT, "--target-opset", "17").output.count("can be fused") == 5
    assert invoke("check", tmp_path / "missing.onnx").exit_code == 2


def test_batch_fold_keeps_layout_and_reports_every_model(tmp_path):
    src = tmp_path / "in"
    (src / "cnn").mkdir(parents=True)
    (src / "text").mkdir()
    shutil.copy(CNN, src / "cnn" / "a.onnx")
    shutil.copy(MODELS / "torch" / "hf_resnet_op13.onnx", src / "cnn" / "b.onnx")
    shutil.copy(BERT, src / "text" / "bert.onnx")
    (src / "text" / "broken.onnx").write_bytes(b"not a model")
    out = tmp_path / "out"
    result = normfold_cmd("fold", src, "-o", out, "-j", "2", "--target-opset", "17", "--report", tmp_path / "r.json")
    assert result.returncode == 2  # the worst: one bad input
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.onnx")) == [
        "cnn/a.folded.onnx", "cnn/b.folded.onnx", "text/bert.folded.onnx"]
    document = load_report(tmp_path / "r.json")
    codes = {Path(m["input"]).name: m["exit_code"] for m in document["models"]}
    assert codes == {"a.onnx": 0, "b.onnx": 0, "bert.onnx": 0, "broken.onnx": 2}
    assert document["exit_code"] == 2
    assert result.stderr.count("normfold: error:") == 1 and "broken.onnx" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_summary_table_with_verbose(tmp_path):
    for name in ("a", "b"):
        shutil.copy(CNN, tmp_path / f"{name}.onnx")
    result = normfold_cmd("fold", tmp_path / "a.onnx", tmp_path / "b.onnx", "-v")
    assert result.returncode == 0
    assert "2 of 2 models done; 14 folded" in result.stdout
    assert (tmp_path / "a.folded.onnx").exists() and (tmp_path / "b.folded.onnx").exists()


def test_folding_a_folded_model_changes_nothing(tmp_path):
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    options = ["--target-opset", "17"]
    assert invoke("fold", BERT, "-o", once, *options).exit_code == 0
    assert invoke("fold", once, "-o", twice, *options, "--report", tmp_path / "r.json").exit_code == 0
    [report] = load_report(tmp_path / "r.json")["models"]
    assert not [s for s in report["sites"] if s["status"] != "left"]
    assert report["nodes_before"] == report["nodes_after"]
    assert digest(once) == digest(twice)


def test_same_input_same_output_and_report(tmp_path):
    reports = []
    for name in ("a", "b"):
        assert invoke("fold", BERT, "-o", tmp_path / f"{name}.onnx", "--target-opset", "17",
                      "--report", tmp_path / f"{name}.json").exit_code == 0
        document = load_report(tmp_path / f"{name}.json")
        for model in document["models"]:
            model.pop("timings")
            model["output"] = None
        reports.append(document)
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")
    assert reports[0] == reports[1]


def test_quiet_without_a_terminal_and_no_colour(tmp_path):
    result = normfold_cmd("fold", CNN, "-o", tmp_path / "o.onnx")
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    result = normfold_cmd("fold", CNN, "-o", tmp_path / "o.onnx", "-v")
    assert "PASSED" in result.stdout and "\x1b[" not in result.stdout


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path):
    from normfold.cli.render import colour

    class Tty:
        def isatty(self):
            return True

    os.environ.pop("NO_COLOR", None)
    assert "\x1b[" in colour("PASSED y", Tty())
    os.environ["NO_COLOR"] = "1"
    try:
        assert colour("PASSED y", Tty()) == "PASSED y"
    finally:
        del os.environ["NO_COLOR"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_no_output(tmp_path, sig):
    """Stop the process while it verifies (after the staged write, before the rename)."""
    out = tmp_path / "o.onnx"
    script = Path(sys.executable).with_name("normfold")
    process = subprocess.Popen([str(script), "fold", str(BERT), "-o", str(out), "--target-opset", "17",
                                "--batches", "1000", "--shape", "input_ids:8x32"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".normfold-staging-*/*/o.onnx")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.2)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
        assert list(tmp_path.iterdir()) == []  # the staging folder is removed too


def test_every_command_writes_the_same_schema(tmp_path):
    folded = tmp_path / "f.onnx"
    invoke("fold", CNN, "-o", folded, "--report", tmp_path / "fold.json", "--verify", "sites", "--benchmark")
    invoke("check", CNN, folded, "--report", tmp_path / "check.json")
    invoke("verify", CNN, folded, "--sites", "--report", tmp_path / "verify.json")
    invoke("fold", tmp_path / "nope.onnx", "--report", tmp_path / "bad.json")
    commands = [load_report(tmp_path / f"{name}.json")["command"] for name in ("fold", "check", "verify", "bad")]
    assert commands == ["fold", "check", "verify", "fold"]
