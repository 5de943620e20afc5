"""External data: which tensors a model keeps in other files, the policy on where those files may
be (inside the model's folder, regular files, within their size), and writing a model's weights
to one external file, copying the source's external bytes file to file."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PureWindowsPath

import onnx

from normfold.errors import NormfoldError, show_path
from normfold.graph import subgraphs
from normfold.io.files import regular_file_problem
from normfold.shapes import data_bytes


def _top_graphs(model: onnx.ModelProto):
    """The graphs a model holds directly: the main graph and those of its training_info (which
    carry initializers of their own)."""
    yield model.graph
    for info in model.training_info:
        if info.HasField("initialization"):
            yield info.initialization
        if info.HasField("algorithm"):
            yield info.algorithm


def _all_graphs(model: onnx.ModelProto):
    """The main graph and every subgraph, also those inside model-local functions and training_info."""
    def walk(graph):
        yield graph
        for node in graph.node:
            for _, sub in subgraphs(node):
                yield from walk(sub)

    for graph in _top_graphs(model):
        yield from walk(graph)
    for function in model.functions:
        for node in function.node:
            for _, sub in subgraphs(node):
                yield from walk(sub)


def _node_tensors(nodes):
    for node in nodes:
        for a in node.attribute:
            if a.ref_attr_name:  # a function's reference to the caller's attribute: holds no tensor
                continue
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            elif a.type == onnx.AttributeProto.SPARSE_TENSORS:
                for sparse in a.sparse_tensors:
                    yield from (sparse.values, sparse.indices)


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)
    for node in graph.node:
        for _, sub in subgraphs(node):
            yield from _all_tensors(sub)


def _model_tensors(model: onnx.ModelProto):
    for graph in _top_graphs(model):
        yield from _all_tensors(graph)
    for function in model.functions:
        yield from _node_tensors(function.node)
        for node in function.node:
            for _, sub in subgraphs(node):
                yield from _all_tensors(sub)


def external_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in _model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            locations.append(info.get("location", ""))
    return locations


def check_external_location(path: Path, base: Path, location: str) -> None:
    """Refuse a location outside the model's folder before anything is opened, then require a
    regular file (a FIFO or device would block or never end)."""
    if not location:
        raise NormfoldError(f"{show_path(path)}: external data of a tensor has no location")
    if "\0" in location or os.path.isabs(location) or PureWindowsPath(location).drive:
        raise NormfoldError(f"{show_path(path)}: external data location {location!r} points outside the model's folder; refused")
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
        raise NormfoldError(f"{show_path(path)}: external data location {location!r} cannot be resolved; refused") from None
    if base not in target.parents:
        raise NormfoldError(f"{show_path(path)}: external data location {location!r} points outside the model's folder; refused")
    problem = regular_file_problem(target)
    if problem == "no such file":
        raise NormfoldError(f"{show_path(path)}: external data file {location!r} not found")
    if problem:
        raise NormfoldError(f"{show_path(path)}: external data file {location!r}: {problem.split(';')[0]}; refused")


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _check_external_extents(path: Path, base: Path, model: onnx.ModelProto) -> None:
    """Without reading them: every external tensor's bytes must lie inside its file and be as many
    as its type and shape need."""
    sizes: dict[str, int] = {}
    for tensor in _model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        if location not in sizes:
            sizes[location] = (base / location).stat().st_size
        try:
            offset = int(info.get("offset", 0))
            needed = data_bytes(tensor)
            length = int(info["length"]) if "length" in info else (needed if needed is not None else
                                                                   sizes[location] - offset)
        except ValueError:
            raise NormfoldError(f"{show_path(path)}: cannot read external data: tensor {tensor.name!r} has an offset or "
                                "length that is not a number") from None
        if offset < 0 or length < 0 or offset + length > sizes[location] or (needed is not None and length != needed):
            raise NormfoldError(f"{show_path(path)}: cannot read external data: tensor {tensor.name!r} ({location!r}, offset "
                                f"{offset}, length {length}) does not fit the file ({sizes[location]} bytes) or "
                                f"the tensor's {needed} bytes")


def approximate_size(model: onnx.ModelProto) -> int:
    """The serialized size of a model, within a few percent: its tensors' data plus a margin for
    the graph. ByteSize() would be exact but costs about as much as serializing the whole model."""
    data = sum(data_bytes(t) or t.ByteSize() for t in _model_tensors(model))  # header arithmetic: no copy
    return data + 64 * (len(model.graph.node) + 1) * 16


EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay in the model file, as onnx.save does


def copy_range(src, out, start: int, length: int, name: str) -> None:
    """`length` bytes of `src` from `start` appended to `out`, by the kernel where it can
    (copy_file_range: no trip through Python's buffers, which halves the time of writing a
    multi-GB model), else through 16 MB reads."""
    out.flush()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), out.fileno(), length - done, start + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    src.seek(start + done)
    while done < length:
        chunk = src.read(min(length - done, 1 << 24))
        if not chunk:
            raise OSError(f"external data of {name!r} ends early")
        out.write(chunk)
        done += len(chunk)


# copy_file_range is refused across some file systems, by old kernels and in some sandboxes:
# those fall back to reads and writes.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}


def write_external_data(model: onnx.ModelProto, data_path: Path, location: str,
                         source_dir: str | os.PathLike | None) -> bool:
    """Move every tensor of `model` of EXTERNAL_THRESHOLD bytes or more into `data_path` and point
    it there. Tensors still in the source's external files are copied file to file, never loaded.
    Returns whether anything was written."""
    offset = 0
    # Tensors already external (in the source's files) move, whatever holds them; inline ones
    # move when they are initializers (Constant attributes stay inline, as with onnx.save).
    moving = [t for t in _model_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    moving += [t for g in _all_graphs(model) for t in g.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data")
               and len(t.raw_data) >= EXTERNAL_THRESHOLD]
    with open(data_path, "wb") as out:
        for tensor in moving:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = _external_info(tensor)
                start, length = int(info.get("offset", 0)), int(info.get("length", -1))
                with open(Path(source_dir or ".") / info["location"], "rb") as src:
                    if length < 0:
                        length = os.fstat(src.fileno()).st_size - start
                    copy_range(src, out, start, length, tensor.name)
            else:
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += length
    if offset == 0:
        data_path.unlink()
    return offset > 0


