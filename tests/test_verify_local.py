"""--verify local: every rewritten site checked on its own, with inputs whose variance is near
and below epsilon, so that mistakes whole-model inputs cannot see are caught."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import normfold
import normfold.accuracy
from builders import load_report
from normfold.cli.main import main
from normfold.verify import compare_models
from normfold.verify_local import verify_locally

MODELS = Path(__file__).parents[1] / "models"
BERT = MODELS / "torch" / "hf_bert_op14.onnx"          # 5 decomposed LayerNorms, epsilon 1e-12
LLAMA = MODELS / "torch" / "hf_llama_fp16_op14.onnx"   # fp16 RMSNorms in the TorchScript spelling


@pytest.fixture(scope="module")
def bert_sites():
    _, report = normfold.fold(onnx.load(BERT), normfold.FoldOptions(target_opset=17))
    assert report.count("fused") == 5
    return report.sites


def edited(path: Path, dest: Path, edit) -> Path:
    model = onnx.load(path)
    edit(model)
    onnx.save(model, dest)
    return dest


def test_local_verification_passes_real_folds(tmp_path):
    for path, options in ((BERT, normfold.FoldOptions(target_opset=17)), (LLAMA, normfold.FoldOptions(target_opset=23)),
                          (MODELS / "torch" / "cnn_bn_op13.onnx", None)):
        report = normfold.fold_file(path, tmp_path / "out.onnx", options=options,
                                    verify=normfold.VerifyOptions(local=True))
        v = report.verification
        assert report.written and v.status == "passed" and v.mode == "local", report.to_text(True)
        assert len(v.sites) == sum(s.status != "left" for s in report.sites)
        assert all(s.max_abs_error is not None for s in report.sites if s.status != "left")


def test_max_of_variance_and_epsilon_is_caught_locally_not_whole(tmp_path, bert_sites):
    """A 'result' whose second LayerNorm takes max(var, eps) for var + eps: on N(0, 1) inputs the
    whole model cannot tell (var is about 1, eps 1e-12); the site's inputs near epsilon can."""
    changed = []

    def use_max(model):
        adds = [n for n in model.graph.node if n.op_type == "Add" and "LayerNorm/Add" in n.name and "Add_1" not in n.name]
        adds[1].op_type = "Max"
        changed.append(adds[1].name.rsplit("/", 1)[0])
    broken = edited(BERT, tmp_path / "max.onnx", use_max)
    shapes = {"input_ids": [2, 8], "attention_mask": [2, 8]}
    assert compare_models(BERT, broken, shapes=shapes).status == "passed"
    v = verify_locally(BERT, broken, bert_sites)
    failing = [c.name for c in v.sites if not c.passed]
    assert v.status == "failed" and len(failing) == 1 and changed[0] + "/" in failing[0], v
    assert v.first_failing_site == failing[0]


@pytest.mark.parametrize("epsilon", [1e-6, 0.0])
def test_a_wrong_epsilon_is_caught_locally(tmp_path, bert_sites, epsilon):
    folded = tmp_path / "folded.onnx"
    normfold.fold_file(BERT, folded, options=normfold.FoldOptions(target_opset=17), verify=normfold.VerifyOptions(enabled=False))

    def wrong_epsilon(model):
        node = [n for n in model.graph.node if n.op_type == "LayerNormalization"][3]
        next(a for a in node.attribute if a.name == "epsilon").f = epsilon
    broken = edited(folded, tmp_path / "eps.onnx", wrong_epsilon)
    v = verify_locally(BERT, broken, bert_sites)
    assert v.status == "failed" and sum(not c.passed for c in v.sites) == 1


def test_fold_chooses_local_verification_when_the_model_would_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: 1 << 10)  # 1 KiB "available"
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fold", str(LLAMA), "-o", str(out), "--target-opset", "23",
                                       "--report", str(tmp_path / "r.json"), "-v"])
    assert result.exit_code == 0, result.output
    v = load_report(tmp_path / "r.json")["models"][0]["verification"]
    assert v["mode"] == "local" and v["status"] == "passed" and len(v["sites"]) >= 5
    assert "whole-model verification would need about" in v["notes"][0] and "as --verify local" in v["notes"][0]
    # an explicit --verify outputs runs the whole model anyway
    result = CliRunner().invoke(main, ["fold", str(LLAMA), "-o", str(tmp_path / "o2.onnx"), "--target-opset", "23",
                                       "--verify", "outputs", "--report", str(tmp_path / "r2.json")])
    assert result.exit_code == 0 and load_report(tmp_path / "r2.json")["models"][0]["verification"]["mode"] == "whole"


def test_verify_local_option(tmp_path):
    result = CliRunner().invoke(main, ["fold", str(BERT), "-o", str(tmp_path / "o.onnx"), "--target-opset", "17",
                                       "--verify", "local", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    [report] = load_report(tmp_path / "r.json")["models"]
    assert report["verification"]["mode"] == "local" and report["verification"]["outputs"] == []
    assert all(c["passed"] for c in report["verification"]["sites"]) and len(report["verification"]["sites"]) == 5
