"""GraphView's index: topological positions, the names new nodes must avoid, and what nodes holding
subgraphs read (custom-domain ops included)."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from normfold.graph import GraphView, subgraphs

FLOAT = TensorProto.FLOAT


def graph(nodes, inputs=("x",), outputs=("y",)) -> onnx.GraphProto:
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, FLOAT, [2]) for n in inputs],
                             [helper.make_tensor_value_info(n, FLOAT, [2]) for n in outputs])


def relu(i, o, name=""):
    return helper.make_node("Relu", [i], [o], name=name)


def test_positions_of_a_sorted_graph_are_the_node_indices():
    g = graph([relu("x", "a"), relu("a", "b"), helper.make_node("Add", ["a", "b"], ["y"])])
    view = GraphView(g)
    assert [view.position(n) for n in view.nodes] == [0, 1, 2]


@pytest.mark.parametrize("nodes", [
    [relu("b", "a"), relu("x", "b"), relu("a", "y")],  # reads what a later node makes
    [relu("x", "a"), helper.make_node("Add", ["a", "b"], ["b"]), relu("b", "y")],  # reads its own output
    [relu("x", "a"), relu("a", "b"), relu("x", "b"), relu("b", "y")],  # two nodes make one name
    [relu("x", "y"), helper.make_node("Split", ["x"], ["a", "a"])],  # one node makes a name twice
], ids=["later-producer", "own-output", "two-producers", "one-node-twice"])
def test_a_graph_out_of_order_has_no_positions(nodes):
    view = GraphView(graph(nodes))
    assert [view.position(n) for n in view.nodes] == [None] * len(nodes)


def test_graph_inputs_and_initializers_read_anywhere_keep_the_order():
    g = graph([relu("x", "a"), helper.make_node("Add", ["w", "x"], ["y"])])
    g.initializer.append(helper.make_tensor("w", FLOAT, [2], [1.0, 2.0]))
    view = GraphView(g)
    assert [view.position(n) for n in view.nodes] == [0, 1]


def body(free: str, out: str) -> onnx.GraphProto:
    """A branch that reads `free` from the enclosing graph and names a node and a value inside."""
    return helper.make_graph([relu(free, out, name=f"inner_{out}")], f"body_{out}", [],
                             [helper.make_tensor_value_info(out, FLOAT, [2])])


def test_names_inside_subgraphs_are_never_given_to_new_values():
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    g = graph([relu("x", "a"), helper.make_node("If", ["c"], ["y"], then_branch=body("a", "then_out"),
                                                 else_branch=body("x", "else_out"))])
    g.input.append(cond)
    view = GraphView(g)
    for taken in ("then_out", "inner_then_out", "else_out", "inner_else_out", "a", "x", "y", "c"):
        assert view.unique_name(taken) != taken
    assert view.unique_name("fresh") == "fresh"


def test_a_custom_op_s_graph_attribute_counts_as_reading_what_its_body_reads():
    """Only If, Loop, Scan and SequenceMap hold graphs among the standard ops, but a custom-domain
    op may hold one too: its body's outer reads are the node's reads (a fold must not drop them)."""
    custom = helper.make_node("MyLoop", ["x"], ["y"], domain="com.example", body=body("a", "inner"))
    g = graph([relu("x", "a"), custom])
    view = GraphView(g)
    assert [name for name, _ in subgraphs(custom)] == ["body"]
    assert [n.op_type for n in view.users("a")] == ["MyLoop"]
    assert view.unique_name("inner") != "inner"


def test_a_standard_op_without_graphs_has_no_subgraphs():
    assert list(subgraphs(helper.make_node("Relu", ["x"], ["y"]))) == []
    node = helper.make_node("Loop", ["n", "", "v"], ["out"], body=body("a", "b"))
    assert [name for name, _ in subgraphs(node)] == ["body"]
