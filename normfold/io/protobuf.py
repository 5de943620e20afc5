"""A protobuf writer for models of any size: the same bytes as SerializeToString(), one
initializer at a time, and message sizes without serializing the weights."""

from __future__ import annotations

import onnx


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` before (and gone in 7)
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"]
_TENSOR_FIELDS = [f for f in onnx.TensorProto.DESCRIPTOR.fields if f is not _RAW_DATA]


def _set_fields(message):
    """message.ListFields(), but for a tensor without raw_data, which ListFields would copy out
    of protobuf (the weights are bytes, never text)."""
    if not isinstance(message, onnx.TensorProto):
        return message.ListFields()
    return [(field, getattr(message, field.name)) for field in _TENSOR_FIELDS
            if (len(getattr(message, field.name)) if _is_repeated(field) else message.HasField(field.name))]


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


_RAW_DATA_TAG_BYTES = len(_varint(_RAW_DATA.number << 3 | 2))


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
