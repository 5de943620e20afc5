"""Loading and saving models safely: external data, atomic writes, one-line errors.

A model is written into a fresh temporary folder beside its destination (with its final file
names, so external-data locations are already right), checked there, and only then moved into
place with os.replace: data file first, model last, so a reader never sees a half-written model.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path, PureWindowsPath

import onnx
from onnx import external_data_helper, numpy_helper

from normfold.errors import NormfoldError
from normfold.graph import subgraphs
from normfold.shapes import data_bytes, light_model

TWO_GB = 2**31


def _all_graphs(model: onnx.ModelProto):
    """The main graph and every subgraph, also those inside model-local functions."""
    def walk(graph):
        yield graph
        for node in graph.node:
            for _, sub in subgraphs(node):
                yield from walk(sub)

    yield from walk(model.graph)
    for function in model.functions:
        for node in function.node:
            for _, sub in subgraphs(node):
                yield from walk(sub)


def _node_tensors(nodes):
    for node in nodes:
        for a in node.attribute:
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
    yield from _all_tensors(model.graph)
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


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read, check and return a model, with its external data loaded. Raises NormfoldError."""
    return read_model(path)[0]


_FILE_KINDS = ((stat.S_ISDIR, "is a directory, not a model file"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
               (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
               (stat.S_ISSOCK, "is a socket"))


def _regular_file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a regular file, or None. Never opens it (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except PermissionError:
        return "permission denied"
    except (OSError, ValueError) as exc:  # ELOOP, ENAMETOOLONG, embedded NUL byte, ...
        return f"cannot read ({getattr(exc, 'strerror', None) or _one_line(exc)})"
    if stat.S_ISREG(mode):
        return None
    for test, text in _FILE_KINDS:
        if test(mode):
            return f"{text}; a model must be a regular file"
    return "not a regular file"


def _max_opsets() -> dict[str, int]:
    """The newest opset of each operator domain the installed onnx knows."""
    known = {"": onnx.defs.onnx_opset_version()}
    try:
        from onnx.onnx_cpp2py_export import defs as _defs

        known.update({domain: high for domain, (_, high) in _defs.schema_version_map().items()})
    except Exception:  # a private helper; the default domain above is what matters
        pass
    known["ai.onnx"] = known[""]
    return known


def _check_opsets(path: Path, model: onnx.ModelProto) -> None:
    known = _max_opsets()
    imports = list(model.opset_import)
    for function in model.functions:
        imports.extend(function.opset_import)
    for imp in imports:
        high = known.get(imp.domain)
        if high is not None and imp.version > high:
            domain = f"domain {imp.domain!r}" if imp.domain not in ("", "ai.onnx") else "the default domain"
            raise NormfoldError(f"{path}: opset {imp.version} of {domain} is newer than the installed onnx "
                                f"{onnx.__version__} supports (up to {high})")


_VALID_DTYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)


def _type_elem_types(tp: onnx.TypeProto):
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(tp, kind).elem_type
    elif kind == "sequence_type":
        yield from _type_elem_types(tp.sequence_type.elem_type)
    elif kind == "optional_type":
        yield from _type_elem_types(tp.optional_type.elem_type)
    elif kind == "map_type":
        yield tp.map_type.key_type
        yield from _type_elem_types(tp.map_type.value_type)


def _check_types(path: Path, model: onnx.ModelProto) -> None:
    """Element types the checker lets through but onnx's and numpy's type tables do not know."""
    for graph in _all_graphs(model):
        for vi in (*graph.input, *graph.output, *graph.value_info):
            for elem in _type_elem_types(vi.type):
                if elem != onnx.TensorProto.UNDEFINED and elem not in _VALID_DTYPES:
                    raise NormfoldError(f"{path}: invalid model: {vi.name!r} has an unknown element type {elem}")


def _check_tensor_headers(path: Path, model: onnx.ModelProto) -> None:
    """Every constant must have a known data type and no negative dimension (onnx's checker names
    neither the tensor nor the type, and numpy would reshape to a -1 dimension)."""
    for tensor in _model_tensors(model):
        name = tensor.name or "<unnamed>"
        if tensor.data_type not in _VALID_DTYPES:
            raise NormfoldError(f"{path}: invalid model: tensor {name!r} has an unknown data type {tensor.data_type}")
        if any(d < 0 for d in tensor.dims):
            raise NormfoldError(f"{path}: invalid model: tensor {name!r} has a negative dimension {list(tensor.dims)}")


def _raw_size_ok(tensor: onnx.TensorProto) -> bool | None:
    """Whether raw_data has exactly the bytes its type and shape need; None when that cannot be
    told from the header alone (no raw_data, or a type without a fixed item size)."""
    needed = data_bytes(tensor) if tensor.HasField("raw_data") else None
    return None if needed is None else len(tensor.raw_data) == needed


def _check_tensor_data(path: Path, model: onnx.ModelProto) -> None:
    """Every constant must hold exactly the data its type and shape need (after external data is in).
    Weights in raw_data are checked by their byte count, not decoded: that would copy every weight."""
    for tensor in _model_tensors(model):
        if _raw_size_ok(tensor) or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # external tensors still in their files were checked by _check_external_extents
        try:
            numpy_helper.to_array(tensor)
        except Exception as exc:
            name = tensor.name or "<unnamed>"
            dtype = onnx.TensorProto.DataType.Name(tensor.data_type)
            raise NormfoldError(f"{path}: invalid model: tensor {name!r} ({dtype} {list(tensor.dims)}) has data that "
                                f"does not match its type and shape: {_one_line(exc, 120)}") from None


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` before (and gone in 7)
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def _check_strings(path: Path, model: onnx.ModelProto) -> None:
    """Names and other strings must be valid UTF-8. The protobuf runtime hands back bytes for those
    that are not, and onnx's checker then fails while formatting its own message."""
    stack: list = [model]
    while stack:
        message = stack.pop()
        for field, value in _set_fields(message):
            if field.type == field.TYPE_MESSAGE:
                if _is_repeated(field):
                    stack.extend(value)
                else:
                    stack.append(value)
            elif field.type == field.TYPE_STRING:
                for text in (value if _is_repeated(field) else (value,)):
                    if isinstance(text, bytes):
                        raise NormfoldError(f"{path}: invalid model: {message.DESCRIPTOR.name}.{field.name} holds a "
                                            f"string that is not valid UTF-8 ({text[:40]!r})")


def _set_fields(message):
    """message.ListFields(), but for a tensor without raw_data, which ListFields would copy out
    of protobuf (the weights are bytes, never text)."""
    if not isinstance(message, onnx.TensorProto):
        return message.ListFields()
    return [(field, getattr(message, field.name)) for field in _TENSOR_FIELDS
            if (len(getattr(message, field.name)) if _is_repeated(field) else message.HasField(field.name))]


def _check_external_location(path: Path, base: Path, location: str) -> None:
    """Refuse a location outside the model's folder before anything is opened, then require a
    regular file (a FIFO or device would block or never end)."""
    if not location:
        raise NormfoldError(f"{path}: external data of a tensor has no location")
    if "\0" in location or os.path.isabs(location) or PureWindowsPath(location).drive:
        raise NormfoldError(f"{path}: external data location {location!r} points outside the model's folder; refused")
    try:
        target = (base / location).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long
        raise NormfoldError(f"{path}: external data location {location!r} cannot be resolved; refused") from None
    if base not in target.parents:
        raise NormfoldError(f"{path}: external data location {location!r} points outside the model's folder; refused")
    problem = _regular_file_problem(target)
    if problem == "no such file":
        raise NormfoldError(f"{path}: external data file {location!r} not found")
    if problem:
        raise NormfoldError(f"{path}: external data file {location!r}: {problem.split(';')[0]}; refused")


def read_model(path: str | os.PathLike, lazy: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """Like load_model, and also the external data files the model's weights came from. With
    `lazy`, external weights are checked (location, size) but left in their files: a caller then
    reads them with numpy_helper.to_array(tensor, base_dir) and StagedModel copies them over."""
    path = Path(path)
    problem = _regular_file_problem(path)
    if problem:
        raise NormfoldError(f"{path}: {problem}")
    if path.stat().st_size == 0:
        raise NormfoldError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise NormfoldError(f"{path}: cannot read ({exc.strerror or _one_line(exc)})") from None
    except Exception as exc:  # DecodeError and whatever else the protobuf runtime raises on bad bytes
        raise NormfoldError(f"{path}: not a readable ONNX model ({_one_line(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise NormfoldError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_import:
        raise NormfoldError(f"{path}: not an ONNX model (no opset import)")
    _check_strings(path, model)
    _check_opsets(path, model)
    _check_types(path, model)
    _check_tensor_headers(path, model)
    base = path.resolve().parent
    locations = list(dict.fromkeys(external_locations(model)))
    for location in locations:
        _check_external_location(path, base, location)
    try:
        # The checker sees the graph before external weights are read in. With external data it
        # must be given the path, so that it resolves data locations against the model's folder.
        # full_check adds strict shape inference: a model whose recorded shapes and types contradict
        # what its ops compute is refused here, so that every model normfold writes passes it too.
        if locations:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            # On a copy whose large weights are typed inputs: the checks are the same (only small
            # constants such as Reshape targets matter to shape inference), and the checker does
            # not serialize every weight once more. Their sizes are checked by _check_tensor_data.
            onnx.checker.check_model(light_model(model), full_check=True)
    except Exception as exc:  # ValidationError and several other C++-mapped types
        raise NormfoldError(f"{path}: invalid model: {_one_line(exc)}") from None
    if locations and lazy:
        _check_external_extents(path, base, model)
    elif locations:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:  # OSError, ValueError (bad offset/length, short file), ...
            raise NormfoldError(f"{path}: cannot read external data: {_one_line(exc)}") from None
    _check_tensor_data(path, model)
    return model, locations


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
            raise NormfoldError(f"{path}: cannot read external data: tensor {tensor.name!r} has an offset or "
                                "length that is not a number") from None
        if offset < 0 or length < 0 or offset + length > sizes[location] or (needed is not None and length != needed):
            raise NormfoldError(f"{path}: cannot read external data: tensor {tensor.name!r} ({location!r}, offset "
                                f"{offset}, length {length}) does not fit the file ({sizes[location]} bytes) or "
                                f"the tensor's {needed} bytes")


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """The whole message on one line (checker messages continue on further lines), shortened."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _copy_fields(source, dest, skip: str) -> None:
    """Every set field of `source` but `skip` into the empty message `dest` (small fields only;
    a tensor's raw_data is never read, see _set_fields)."""
    for field, value in _set_fields(source):
        if field.name == skip:
            continue
        if field.type == field.TYPE_MESSAGE:
            target = getattr(dest, field.name)
            target.extend(value) if _is_repeated(field) else target.CopyFrom(value)
        elif _is_repeated(field):
            getattr(dest, field.name).extend(value)
        else:
            setattr(dest, field.name, value)


_GRAPH_TAG = _varint(onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number << 3 | 2)
_INITIALIZER_TAG = _varint(onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number << 3 | 2)


_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"]
_RAW_DATA_TAG_BYTES = len(_varint(_RAW_DATA.number << 3 | 2))
_TENSOR_FIELDS = [f for f in onnx.TensorProto.DESCRIPTOR.fields if f is not _RAW_DATA]


def tensor_size(tensor: onnx.TensorProto) -> int:
    """tensor.ByteSize(), at a fraction of the cost for weights in raw_data: upb computes
    ByteSize by serializing the whole message (1.7 ms per 10 MB, slower than serializing it),
    while the header is a few small fields and raw_data's share is its length plus a prefix."""
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    header = onnx.TensorProto()
    _copy_fields(tensor, header, skip="raw_data")
    length = len(tensor.raw_data)  # a copy too, but a plain memcpy (0.4 ms per 10 MB)
    return header.ByteSize() + _RAW_DATA_TAG_BYTES + len(_varint(length)) + length


def write_model(model: onnx.ModelProto, f) -> None:
    """Write `model` as protobuf, one initializer at a time. SerializeToString() would build the
    whole file in memory once more (as large as the model); this writes the same message, with
    the graph's initializers last within the graph (field order is free in protobuf), and holds
    one weight's bytes at a time. The same model always gives the same bytes."""
    graph = model.graph
    head, body = onnx.ModelProto(), onnx.GraphProto()
    _copy_fields(model, head, skip="graph")
    _copy_fields(graph, body, skip="initializer")
    body_bytes = body.SerializeToString()
    sizes = [tensor_size(t) for t in graph.initializer]
    graph_size = len(body_bytes) + sum(len(_INITIALIZER_TAG) + len(_varint(n)) + n for n in sizes)
    f.write(head.SerializeToString())
    if not model.HasField("graph"):
        return
    f.write(_GRAPH_TAG + _varint(graph_size))
    f.write(body_bytes)
    for tensor, size in zip(graph.initializer, sizes):
        f.write(_INITIALIZER_TAG + _varint(size))
        f.write(tensor.SerializeToString())


def approximate_size(model: onnx.ModelProto) -> int:
    """The serialized size of a model, within a few percent: its tensors' data plus a margin for
    the graph. ByteSize() would be exact but costs about as much as serializing the whole model."""
    data = sum(data_bytes(t) or t.ByteSize() for t in _model_tensors(model))  # header arithmetic: no copy
    return data + 64 * (len(model.graph.node) + 1) * 16


EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay in the model file, as onnx.save does


def _write_external_data(model: onnx.ModelProto, data_path: Path, location: str,
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
                    src.seek(start)
                    if length < 0:
                        length = os.fstat(src.fileno()).st_size - start
                    remaining = length
                    while remaining:
                        chunk = src.read(min(remaining, 1 << 24))
                        if not chunk:
                            raise OSError(f"external data of {tensor.name!r} ends early")
                        out.write(chunk)
                        remaining -= len(chunk)
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


class StagedModel:
    """A model written to a temporary folder beside `dest`, waiting to be moved into place."""

    def __init__(self, model: onnx.ModelProto, dest: str | os.PathLike, external_data: bool | None = None,
                 data_name: str | None = None, consume: bool = False, source_dir: str | os.PathLike | None = None):
        """Write `model` for `dest`. With external data (forced, or needed past protobuf's 2 GB),
        weights go to `data_name` beside it; tensors still in the source's external files (read
        lazily, relative to `source_dir`) are copied across without being loaded. `consume=True`
        lets the model's tensors point at the new file afterwards (the caller is done with it);
        otherwise a copy of the model is written."""
        self.dest = Path(dest)
        parent = self.dest.parent
        check_destination(self.dest)
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".tmp", dir=parent))
        except OSError as exc:
            raise NormfoldError(f"{self.dest}: cannot write to {str(parent)!r} ({exc.strerror})") from None
        self.path = self.folder / self.dest.name
        self.files: list[str] = [self.dest.name]
        try:
            if external_data is None:
                external_data = approximate_size(model) >= TWO_GB - 2**26
            if external_data:
                data_name = data_name or f"{self.dest.name}.data"
                if not consume:
                    copy = onnx.ModelProto()
                    copy.CopyFrom(model)
                    model = copy
                if _write_external_data(model, self.folder / data_name, data_name, source_dir):
                    self.files.insert(0, data_name)
                with open(self.path, "wb") as f:
                    write_model(model, f)
            else:
                # No fsync: the rename already guarantees that a crashed or killed run leaves no
                # partial model; forcing 400 MB to disk would cost more than the fold itself.
                with open(self.path, "wb") as f:
                    write_model(model, f)
        except OSError as exc:  # disk full, quota, a file system that refuses the name
            self.discard()
            raise NormfoldError(f"{self.dest}: cannot write ({exc.strerror or _one_line(exc)})") from None
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        """Move the staged files into place, data first and model last."""
        try:
            for name in self.files:
                os.chmod(self.folder / name, _default_mode())  # as a plain open() would have made it
                os.replace(self.folder / name, self.dest.parent / name)
        except OSError as exc:
            raise NormfoldError(f"{self.dest}: cannot move the result into place ({exc.strerror or _one_line(exc)})") from None
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _default_mode() -> int:
    """0o666 less the process umask: the mode open() gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_destination(path: str | os.PathLike, what: str = "output") -> None:
    """Raise NormfoldError unless `path` names a file that could be created in an existing folder.
    Meant to be called before any work, so that a bad destination leaves nothing written."""
    path = Path(path)
    if path.is_dir():
        raise NormfoldError(f"{path}: is a directory; give a file name for the {what}")
    if not path.parent.is_dir():
        problem = "is not a folder" if path.parent.exists() else "does not exist"
        raise NormfoldError(f"{path}: {what} folder {str(path.parent)!r} {problem}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    check_destination(path, "report")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise NormfoldError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
