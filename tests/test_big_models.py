"""What keeps folding a multi-GB model at the cost of one read and one write: weights are never
read to answer a question about structure, external bytes are copied file to file (by the kernel
where it can), and the original already runs while the result is being written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import random_feeds, run
from normfold import api, watchdog
from normfold.api import FoldOptions, VerifyOptions, fold_file
from normfold.graph import GraphView
from normfold.io import external, read_model
from normfold.io.external import copy_range


def _matmul_model(folder: Path) -> Path:
    """x -> MatMul(W) -> BatchNormalization (a site) with W (and the BN's statistics) stored in an
    external data file, as every large export is."""
    rng = np.random.default_rng(3)
    k, n = 64, 48
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    for name, value in (("scale", rng.uniform(0.5, 2, n)), ("bias", rng.standard_normal(n)),
                        ("mean", rng.standard_normal(n)), ("var", rng.uniform(0.5, 2, n))):
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes.append(helper.make_node("Unsqueeze", ["h", "axes"], ["h3"]))
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
    nodes.append(helper.make_node("BatchNormalization", ["h3", "scale", "bias", "mean", "var"], ["y3"]))
    nodes.append(helper.make_node("Squeeze", ["y3", "axes"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    return path


@pytest.mark.parametrize("op, inputs", [("Gather", ["W", "ids"]), ("Mul", ["W", "x"]), ("Add", ["x", "W"])])
def test_asking_whether_a_layer_output_is_constant_reads_no_weight(tmp_path, op, inputs):
    """Gather(embedding, ids) or Mul(gamma, x) is not constant because its other input is not:
    the weight must not be read from its file to find that out (on a 2.75 GB Llama this read the
    embedding and every gamma: 2.6 s of a 2.7 s fold)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 48]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 48] if op == "Gather" else [64, 48])],
        [numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "W")])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx", save_as_external_data=True, location="m.onnx.data")
    model, _ = read_model(tmp_path / "m.onnx", lazy=True)
    (tmp_path / "m.onnx.data").unlink()  # any attempt to read W now fails
    view = GraphView(model.graph, base_dir=str(tmp_path))
    assert view.const("y") is None
    assert not view.is_const("y")


def test_a_constant_computed_from_a_small_weight_is_still_evaluated(tmp_path):
    """The other side of the short cut: a chain over constants small enough is still a constant."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["c"]), helper.make_node("Transpose", ["c"], ["d"])], "g", [],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "a"),
         numpy_helper.from_array(np.float32(2.0), "b")])
    view = GraphView(graph)
    np.testing.assert_array_equal(view.const("d"), (np.arange(6, dtype=np.float32).reshape(2, 3) * 2).T)


@pytest.mark.parametrize("kernel_copy", ["available", "refused", "absent"])
def test_external_bytes_are_copied_exactly_whichever_way(tmp_path, monkeypatch, kernel_copy):
    data = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "src.bin").write_bytes(data)
    if kernel_copy == "refused":  # as across file systems or in some sandboxes
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range")
    with open(tmp_path / "src.bin", "rb") as src, open(tmp_path / "out.bin", "wb") as out:
        out.write(b"head")  # bytes buffered before the copy must stay before it
        copy_range(src, out, 1000, len(data) - 2000, "t")
        copy_range(src, out, 0, 10, "t")
        out.write(b"tail")
    assert (tmp_path / "out.bin").read_bytes() == b"head" + data[1000:-1000] + data[:10] + b"tail"


def test_a_source_shorter_than_its_extent_is_an_error_not_a_short_copy(tmp_path):
    (tmp_path / "src.bin").write_bytes(b"x" * 100)
    with open(tmp_path / "src.bin", "rb") as src, open(tmp_path / "out.bin", "wb") as out:
        with pytest.raises(OSError, match="ends early"):
            copy_range(src, out, 50, 80, "t")


def test_the_original_runs_while_the_result_is_written(tmp_path, monkeypatch):
    """Verification of a multi-GB model costs two runs; writing the result costs about one more.
    The original's run (a child process) is started before the result is written, so the two
    overlap, and the fold still verifies and writes the right model."""
    path = _matmul_model(tmp_path)
    monkeypatch.setattr(api, "TOGETHER_BYTES", 0)  # the stand-in is small; a multi-GB model is not
    running_during_write = []
    write = external.write_external_data

    def spy(*args, **kwargs):
        running_during_write.append(len(watchdog._CHILDREN))
        return write(*args, **kwargs)

    monkeypatch.setattr("normfold.io.staging.write_external_data", spy)
    report = fold_file(path, tmp_path / "out.onnx", options=FoldOptions(), verify=VerifyOptions(local=False))
    assert report.exit_code == 0 and report.verification.status == "passed"
    assert running_during_write == [1]
    assert not watchdog._CHILDREN  # both children reaped
    feeds = random_feeds(onnx.load(path))
    np.testing.assert_allclose(run(onnx.load(tmp_path / "out.onnx"), feeds)[0], run(onnx.load(path), feeds)[0],
                               rtol=1e-5, atol=1e-5)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node}


def test_a_failed_write_stops_the_original_s_run_and_leaves_nothing(tmp_path, monkeypatch):
    path = _matmul_model(tmp_path)
    monkeypatch.setattr(api, "TOGETHER_BYTES", 0)
    before = sorted(p.name for p in tmp_path.iterdir())
    seen = []

    def full_disk(*args, **kwargs):
        seen.append(set(watchdog._CHILDREN))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("normfold.io.staging.write_external_data", full_disk)
    with pytest.raises(Exception, match="No space left"):
        fold_file(path, tmp_path / "out.onnx", options=FoldOptions(), verify=VerifyOptions(local=False))
    assert len(seen) == 1 and len(seen[0]) == 1  # the original was running when the write failed
    pid = next(iter(seen[0]))
    assert not watchdog._CHILDREN
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
