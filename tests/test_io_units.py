"""normfold/io's small pure parts in-process: what kind of file a path names, protobuf varints."""

from __future__ import annotations

import io
import os
import socket

import numpy as np
import onnx
import pytest

from builders import build
from normfold.io.files import regular_file_problem
from normfold.io.protobuf import _varint, write_model


def test_a_regular_file_has_no_problem(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    assert regular_file_problem(path) is None
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    assert regular_file_problem(link) is None  # a symlink to a regular file is one


def test_what_is_not_a_regular_file_is_named(tmp_path):
    assert regular_file_problem(tmp_path / "missing.onnx") == "no such file"
    (tmp_path / "f").write_text("")
    assert regular_file_problem(tmp_path / "f" / "below") == "no such file"  # a file as a folder
    assert regular_file_problem(tmp_path) == "is a directory, not a model file; a model must be a regular file"
    os.mkfifo(tmp_path / "fifo")
    assert regular_file_problem(tmp_path / "fifo") == "is a FIFO (named pipe); a model must be a regular file"
    assert regular_file_problem("/dev/null") == "is a character device; a model must be a regular file"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert regular_file_problem(loop).startswith("cannot read (") and "symbolic links" in regular_file_problem(loop)
    assert regular_file_problem(tmp_path / ("x" * 300)).startswith("cannot read (File name too long")


def test_a_socket_is_named(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        assert regular_file_problem(path) == "is a socket; a model must be a regular file"


@pytest.mark.parametrize("n, encoded", [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"),
                                        (300, b"\xac\x02"), (16384, b"\x80\x80\x01")])
def test_varints_are_protobufs(n, encoded):
    assert _varint(n) == encoded


def test_a_model_without_a_graph_writes_its_header_only():
    model = onnx.ModelProto(ir_version=8, producer_name="p")
    out = io.BytesIO()
    write_model(model, out)
    assert out.getvalue() == model.SerializeToString()


def test_the_written_model_reads_back_equal():
    model = build("g (float[3] x) => (float[3] y) { y = Add (x, w) }", w=np.arange(3, dtype=np.float32))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(200, np.float32), "big"))
    out = io.BytesIO()
    write_model(model, out)
    assert onnx.load_from_string(out.getvalue()) == model
