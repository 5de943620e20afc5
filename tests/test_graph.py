"""GraphView's constant evaluation: the ops computed directly must agree with onnx's reference."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from normfold.graph import _simple_value


def reference(node: onnx.NodeProto, value: np.ndarray) -> np.ndarray:
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                         value.shape)],
        [onnx.helper.make_empty_tensor_value_info("y")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    return ReferenceEvaluator(model).run(None, {"x": value})[0]


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 4), max_size=4), op=st.sampled_from(["Identity", "Transpose"]),
       dtype=st.sampled_from([np.float32, np.float16, np.int64]), data=st.data())
def test_directly_computed_ops_match_the_reference(shape, op, dtype, data):
    value = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    kwargs = {}
    if op == "Transpose" and shape and data.draw(st.booleans()):  # make_node cannot type an empty perm
        kwargs["perm"] = data.draw(st.permutations(range(len(shape))))
    node = onnx.helper.make_node(op, ["x"], ["y"], **kwargs)
    got = _simple_value(node, [value])
    expected = reference(node, value)
    assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)
