"""README's first command, `normfold fold MODEL`, with no other option, on every committed sample:
each must fold, verify and be written (exit 0). tests/test_corpus.py passes the manifest's input
shapes; this one relies on the defaults, as a first-time user does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from normfold.cli.main import main

MODELS = Path(__file__).parents[1] / "models"
SAMPLES = sorted(p for p in MODELS.glob("*/*.onnx") if not p.name.endswith(".folded.onnx"))


def test_every_sample_is_found():
    assert len(SAMPLES) >= 90


@pytest.mark.parametrize("sample", SAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in SAMPLES])
def test_readme_command_folds_every_sample(sample, tmp_path):
    model = tmp_path / sample.name  # a copy: the command writes <stem>.folded.onnx beside its model
    shutil.copy(sample, model)
    result = CliRunner().invoke(main, ["fold", str(model)])
    assert result.exit_code == 0, result.output
    assert model.with_name(f"{model.stem}.folded.onnx").exists()
