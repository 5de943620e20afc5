"""Loading and saving models safely: external data, atomic writes, one-line errors.

A model is written into a fresh temporary folder beside its destination (with its final file
names, so external-data locations are already right), checked there, and only then moved into
place with os.replace: data file first, model last, so a reader never sees a half-written model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from normfold.errors import NormfoldError
from normfold.graph import subgraphs

TWO_GB = 2**31


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
        for _, sub in subgraphs(node):
            yield from _all_tensors(sub)


def external_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            locations.append(info.get("location", ""))
    return locations


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read, check and return a model, with its external data loaded. Raises NormfoldError."""
    return read_model(path)[0]


def read_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, list[str]]:
    """Like load_model, and also the external data files the model's weights came from."""
    path = Path(path)
    if not path.exists():
        raise NormfoldError(f"{path}: no such file")
    if path.is_dir():
        raise NormfoldError(f"{path}: is a directory, not a model file")
    if path.stat().st_size == 0:
        raise NormfoldError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise NormfoldError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise NormfoldError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise NormfoldError(f"{path}: not an ONNX model (no opset import)")
    base = path.resolve().parent
    for location in dict.fromkeys(external_locations(model)):
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or base not in target.parents:
            raise NormfoldError(f"{path}: external data location {location!r} points outside the model's folder; refused")
        if not target.is_file():
            raise NormfoldError(f"{path}: external data file {location!r} not found")
    try:
        # The checker sees the graph before external weights are read in. With external data it
        # must be given the path, so that it resolves data locations against the model's folder.
        if external_locations(model):
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise NormfoldError(f"{path}: invalid model: {_first_line(exc)}") from None
    except Exception as exc:  # the checker raises several C++-mapped types
        raise NormfoldError(f"{path}: invalid model: {_first_line(exc)}") from None
    locations = list(dict.fromkeys(external_locations(model)))
    if locations:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except (OSError, ValueError) as exc:
            raise NormfoldError(f"{path}: cannot read external data: {_first_line(exc)}") from None
    return model, locations


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class StagedModel:
    """A model written to a temporary folder beside `dest`, waiting to be moved into place."""

    def __init__(self, model: onnx.ModelProto, dest: str | os.PathLike, external_data: bool | None = None,
                 data_name: str | None = None):
        self.dest = Path(dest)
        parent = self.dest.parent
        if not parent.is_dir():
            raise NormfoldError(f"{self.dest}: output folder {str(parent)!r} does not exist")
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=parent))
        except OSError as exc:
            raise NormfoldError(f"{self.dest}: cannot write to {str(parent)!r} ({exc.strerror})") from None
        self.path = self.folder / self.dest.name
        self.files: list[str] = [self.dest.name]
        try:
            size = model.ByteSize()
            if external_data is None:
                external_data = size >= TWO_GB - 2**20
            if external_data:
                data_name = data_name or f"{self.dest.name}.data"
                onnx.save_model(model, str(self.path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024, convert_attribute=False)
                # save_model converts tensors in place; turn them back so the caller's model is unchanged.
                external_data_helper.load_external_data_for_model(model, str(self.folder))
                if (self.folder / data_name).exists():  # absent when every tensor is under the threshold
                    self.files.insert(0, data_name)
            else:
                with open(self.path, "wb") as f:
                    f.write(model.SerializeToString())
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Move the staged files into place, data first and model last."""
        try:
            for name in self.files:
                os.replace(self.folder / name, self.dest.parent / name)
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise NormfoldError(f"{path}: folder {str(path.parent)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise NormfoldError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
