"""Every model of the real-export corpus (models/*/manifest.json): fold, verify in onnxruntime, and
compare what remains with the source framework's ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normfold.api import FoldOptions, VerifyOptions, fold_file

MODELS = Path(__file__).parents[1] / "models"


def corpus():
    for manifest in sorted(MODELS.glob("*/manifest.json")):
        for entry in json.loads(manifest.read_text())["models"]:
            yield pytest.param(manifest.parent / entry["file"], entry, id=f"{manifest.parent.name}/{entry['file']}")


def foldable_bn_left(report) -> list[str]:
    """BN sites (real BatchNormalization nodes or TF's per-channel Mul/Add) still foldable: those
    left for a reason other than the layer's output being shared or there being no layer."""
    structural = {"intermediate-used-elsewhere", "no-linear-producer"}
    return [f"{s.nodes[-1]}: {s.reason}" for s in report.sites
            if s.pass_name == "bn" and s.status == "left" and s.reason not in structural]


@pytest.mark.parametrize("path, entry", list(corpus()))
def test_corpus_model_folds_and_matches(path, entry, tmp_path):
    shapes = {name: spec["shape"] for name, spec in entry["inputs"].items()}
    report = fold_file(path, tmp_path / "out.onnx", options=FoldOptions(),
                       verify=VerifyOptions(shapes=shapes))
    assert report.verification.status == "passed", (path.name, report.to_text())
    assert report.exit_code == 0 and report.written
    truth = entry["ground_truth"]
    bn_nodes_left = report.ops_after.get("BatchNormalization", 0)
    assert bn_nodes_left <= truth["batchnorm"] - truth["batchnorm_after_linear"] or truth["batchnorm"] == 0, \
        f"{path.name}: {bn_nodes_left} BatchNormalization nodes remain; foldable ones: {foldable_bn_left(report)}"
