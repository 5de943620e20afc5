"""The helpers the rules share (normfold/passes/_pattern.py), on their own: each rule's tests reach
only the cases its exporters write, and a helper's contract is wider than any one caller's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import build
from normfold.graph import GraphView
from normfold.passes._pattern import channel_vector, in_graph_order, is_op, normalized_shape, reduce_axes, reuse_or_add


def view_of(body: str, opset: int = 18, inputs: str = "float[2,3,4,5] x", **consts) -> GraphView:
    model = build(f"g ({inputs}) => (float[2,3,4,5] y) {{\n{body}\n y = Identity (x)\n}}", opset=opset, **consts)
    return GraphView(model.graph, opset=opset)


def first(view: GraphView, op: str) -> onnx.NodeProto:
    return next(n for n in view.nodes if n.op_type == op)


# ---- is_op ---------------------------------------------------------------------------------------

def test_is_op_accepts_both_spellings_of_the_default_domain():
    node = onnx.helper.make_node("Mul", ["a", "b"], ["c"])
    assert is_op(node, "Add", "Mul") and not is_op(node, "Add") and not is_op(None, "Mul")
    node.domain = "ai.onnx"
    assert is_op(node, "Mul")
    node.domain = "com.microsoft"
    assert not is_op(node, "Mul")


# ---- reduce_axes ---------------------------------------------------------------------------------

AXES = np.array([0, 2, 3], np.int64)


@pytest.mark.parametrize("body, opset, consts, expected", [
    ("m = ReduceMean <axes=[0, 2]> (x)", 13, {}, (0, 2)),                      # the attribute (opset < 18)
    ("m = ReduceMean (x, ax)", 18, {"ax": AXES}, (0, 2, 3)),                  # an initializer input
    ("m = ReduceMean (x, ax)", 18, {"ax": np.array(1, np.int64)}, (1,)),       # a scalar one
    ("ax = Constant <value = int64[2] {1, 3}> ()\n m = ReduceMean (x, ax)", 18, {}, (1, 3)),
    ("a32 = Constant <value = int32[2] {1, 3}> ()\n ax = Cast <to = 7> (a32)\n m = ReduceMean (x, ax)", 18, {},
     (1, 3)),                                                                  # Cast of a constant
    ("m = ReduceMean (x)", 18, {}, None),                                      # no axes: every axis
    ("m = ReduceMean (x, ax)", 18, {"ax": np.zeros(0, np.int64)}, None),       # empty axes: every axis
])
def test_reduce_axes_reads_every_place_axes_are_written(body, opset, consts, expected):
    view = view_of(body, opset=opset, **consts)
    assert reduce_axes(view, first(view, "ReduceMean")) == expected


def test_reduce_axes_of_a_non_constant_input_are_unknown():
    view = view_of("m = ReduceMean (x, ax)", inputs="float[2,3,4,5] x, int64[3] ax")
    assert reduce_axes(view, first(view, "ReduceMean")) is None


def test_reduce_axes_attribute_is_read_whatever_the_inputs_say():
    """No valid node has both; the attribute is what the op says, so an input next to it is not read."""
    view = view_of("m = ReduceMean <axes=[1]> (x)", opset=13, ax=AXES)
    node = first(view, "ReduceMean")
    node.input.append("ax")
    assert reduce_axes(view, node) == (1,)


# ---- normalized_shape ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, k, rank, norm_shape, expected", [
    ((16,), 1, 3, None, (16,)),
    ((1, 1, 16), 1, 3, None, (16,)),        # leading ones up to the input's rank
    ((1, 16), 1, 1, None, None),            # more axes than the input has
    ((16,), 1, 1, None, (16,)),             # as many axes as the input
    ((2, 16), 1, 3, None, None),            # varies along a leading axis
    ((2, 16), 2, 3, None, (2, 16)),
    ((16,), 2, 3, None, None),              # broadcast along axis -2: its size is unknown without norm_shape
    ((16,), 2, 3, (5, 16), (5, 16)),        # ... and known with it
    ((1, 16), 2, 3, (5, 16), (5, 16)),
    ((4,), 1, 3, (16,), None),              # does not fit the normalized shape
    ((2, 16), 2, 3, (5, 16), None),
])
def test_normalized_shape(shape, k, rank, norm_shape, expected):
    assert normalized_shape(shape, k, rank, norm_shape) == expected


# ---- reuse_or_add --------------------------------------------------------------------------------

GAMMA = np.arange(4, dtype=np.float32)


def reuse_view() -> GraphView:
    model = build("""g (float[4] x, float[4] gin) => (float[4] y) {
      c = Constant <value = float[4] {0, 1, 2, 3}> ()
      a = Mul (x, gamma)
      b = Mul (a, c)
      y = Mul (b, gin)
    }""", gamma=GAMMA, gin=GAMMA)
    return GraphView(model.graph)


@pytest.mark.parametrize("name, value, reused", [
    ("gamma", GAMMA, True),                      # the same values: the initializer is read again
    ("gamma", GAMMA + 1, False),                 # other values
    ("gamma", GAMMA.astype(np.float64), False),  # other type
    ("gamma", GAMMA.reshape(1, 4), False),       # other shape
    ("gin", GAMMA, False),                       # an initializer that is also a graph input: a default only
    ("c", GAMMA, False),                         # a Constant node's output is not an initializer
    (None, GAMMA, False),
])
def test_reuse_or_add_reuses_only_an_initializer_holding_exactly_the_value(name, value, reused):
    view = reuse_view()
    before = len(view.graph.initializer)
    got = reuse_or_add(view, name, value, "new")
    if reused:
        assert got == name and len(view.graph.initializer) == before
    else:
        assert got == "new" and len(view.graph.initializer) == before + 1
        assert view.const("new").dtype == value.dtype and np.array_equal(view.const("new"), value)


# ---- channel_vector ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dims, expected", [
    ((4, 1), [2, 4, 6], [0, 1, 2, 3]),
    ((1, 4, 1), [2, 4, 6], [0, 1, 2, 3]),
    ((4, 1, 1), [2, 4, 6, 5], [0, 1, 2, 3]),
    ((1, 1), [2, 4, 6], [0, 0, 0, 0]),   # one value for every channel
    ((1,), [2, 4, 6], [0, 0, 0, 0]),
    ((), [2, 4, 6], [0, 0, 0, 0]),
    ((4,), [2, 4, 6], None),             # varies along the last axis, not the channels
    ((3, 1), [2, 4, 6], None),           # the wrong number of channels
    ((1, 1, 4, 1), [2, 4, 6], None),     # widens X
    ((1,), [2, "C", 6], None),           # channel count unknown
    ((4,), [2, 4], [0, 1, 2, 3]),        # X (N, C): the last axis is the channel axis
    ((1,), [16], None),                  # X has no channel axis
])
def test_channel_vector(shape, dims, expected):
    value = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    got = channel_vector(value, dims)
    assert (got is None) if expected is None else np.array_equal(got, np.array(expected, np.float32))


def test_channel_vector_of_no_value_is_none():
    assert channel_vector(None, [2, 4, 6]) is None


# ---- in_graph_order ------------------------------------------------------------------------------

def test_in_graph_order_sorts_the_view_nodes_and_leaves_other_lists_alone():
    view = view_of("a = Relu (x)\n b = Relu (a)\n c = Relu (b)")
    a, b, c = view.nodes[:3]
    assert in_graph_order(view, [c, a, b]) == [a, b, c]
    stranger = onnx.helper.make_node("Relu", ["c"], ["d"])  # not in the view (e.g. added by a rewrite)
    assert in_graph_order(view, [c, stranger, a]) == [c, stranger, a]


@pytest.mark.parametrize("dims, shown", [([2, 8, 5], "[2, 8, 5]"), ([None, 8, None], "[?, 8, ?]"), ([], "[]")])
def test_shapes_are_shown_with_a_question_mark_for_each_dynamic_size(dims, shown):
    from normfold.passes._pattern import shown_dims

    assert shown_dims(dims) == shown
