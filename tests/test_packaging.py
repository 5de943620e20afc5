"""A non-editable install must ship normfold.cli and must not install a top-level `cli` module."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, timeout=300, cwd=tmp_path)
    [wheel] = tmp_path.glob("normfold-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "normfold/cli/main.py" in names
    assert "normfold/passes/batchnorm.py" in names
    assert not any(n.startswith("cli/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "normfold = normfold.cli.main:run" in zipfile.ZipFile(wheel).read(entry_points).decode()
