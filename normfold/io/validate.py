"""Reading a model with every check before anything else touches it: a regular file, parseable,
opsets and types this onnx knows, tensors whose data match their headers, valid UTF-8, external
data only inside the model's folder, and onnx's full check. Every refusal is a NormfoldError with
one line naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

from normfold.errors import NormfoldError, one_line, show_path
from normfold.io.external import (_all_graphs, _check_external_extents, check_external_location,
                                  _model_tensors, external_locations)
from normfold.io.files import regular_file_problem
from normfold.io.protobuf import _is_repeated, _set_fields
from normfold.prepare import checks_without_contradicting_value_info
from normfold.shapes import data_bytes, light_model

def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read, check and return a model, with its external data loaded. Raises NormfoldError."""
    return read_model(path)[0]


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
            raise NormfoldError(f"{show_path(path)}: opset {imp.version} of {domain} is newer than the installed onnx "
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
                    raise NormfoldError(f"{show_path(path)}: invalid model: {vi.name!r} has an unknown element type {elem}")


def _check_tensor_headers(path: Path, model: onnx.ModelProto) -> None:
    """Every constant must have a known data type and no negative dimension (onnx's checker names
    neither the tensor nor the type, and numpy would reshape to a -1 dimension)."""
    for tensor in _model_tensors(model):
        name = tensor.name or "<unnamed>"
        if tensor.data_type not in _VALID_DTYPES:
            raise NormfoldError(f"{show_path(path)}: invalid model: tensor {name!r} has an unknown data type {tensor.data_type}")
        if any(d < 0 for d in tensor.dims):
            raise NormfoldError(f"{show_path(path)}: invalid model: tensor {name!r} has a negative dimension {list(tensor.dims)}")


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
            raise NormfoldError(f"{show_path(path)}: invalid model: tensor {name!r} ({dtype} {list(tensor.dims)}) has data that "
                                f"does not match its type and shape: {one_line(exc, 120)}") from None


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
                        raise NormfoldError(f"{show_path(path)}: invalid model: {message.DESCRIPTOR.name}.{field.name} holds a "
                                            f"string that is not valid UTF-8 ({text[:40]!r})")


def read_model(path: str | os.PathLike, lazy: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """Like load_model, and also the external data files the model's weights came from. With
    `lazy`, external weights are checked (location, size) but left in their files: a caller then
    reads them with numpy_helper.to_array(tensor, base_dir) and StagedModel copies them over."""
    path = Path(path)
    model = _parse(path)
    _check_strings(path, model)
    _check_opsets(path, model)
    _check_types(path, model)
    _check_tensor_headers(path, model)
    base = path.resolve().parent
    locations = list(dict.fromkeys(external_locations(model)))
    for location in locations:
        check_external_location(path, base, location)
    _check_with_onnx(path, model, bool(locations))
    if locations and lazy:
        _check_external_extents(path, base, model)
    elif locations:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:  # OSError, ValueError (bad offset/length, short file), ...
            raise NormfoldError(f"{show_path(path)}: cannot read external data: {one_line(exc)}") from None
    _check_tensor_data(path, model)
    return model, locations


def _parse(path: Path) -> onnx.ModelProto:
    """The model in a regular, non-empty file, without its external data, refused unless it has a
    graph with outputs and an opset import."""
    problem = regular_file_problem(path)
    if problem:
        raise NormfoldError(f"{show_path(path)}: {problem}")
    if path.stat().st_size == 0:
        raise NormfoldError(f"{show_path(path)}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise NormfoldError(f"{show_path(path)}: cannot read ({exc.strerror or one_line(exc)})") from None
    except Exception as exc:  # DecodeError and whatever else the protobuf runtime raises on bad bytes
        raise NormfoldError(f"{show_path(path)}: not a readable ONNX model ({one_line(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise NormfoldError(f"{show_path(path)}: not an ONNX model (no graph)")
    if not model.graph.output:
        raise NormfoldError(f"{show_path(path)}: invalid model: the graph has no outputs (nothing to compute or compare)")
    if not model.opset_import:
        raise NormfoldError(f"{show_path(path)}: not an ONNX model (no opset import)")
    return model


def _check_with_onnx(path: Path, model: onnx.ModelProto, external: bool) -> None:
    """onnx's full check, run before external weights are read in."""
    try:
        # With external data the checker must be given the path, so that it resolves data
        # locations against the model's folder. full_check adds strict shape inference: a model
        # whose recorded shapes and types contradict what its ops compute is refused here, so that
        # every model normfold writes passes it too.
        if external:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            # On a copy whose large weights are typed inputs: the checks are the same (only small
            # constants such as Reshape targets matter to shape inference), and the checker does
            # not serialize every weight once more. Their sizes are checked by _check_tensor_data.
            onnx.checker.check_model(light_model(model), full_check=True)
    except Exception as exc:  # ValidationError and several other C++-mapped types
        # value_info that contradicts inference is annotation, not error: fold() drops it (prepare.py)
        if not checks_without_contradicting_value_info(model):
            raise NormfoldError(f"{show_path(path)}: invalid model: {one_line(exc)}") from None
