"""The pass driver (normfold/passes/__init__.py) with small stand-in rules: which rule gets a node,
what is recorded for a site left or rewritten, dry runs, subgraphs, --exclude-node, and the
registry the command line selects passes from."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import build
from normfold.passes import FoldContext, Left, Match, Rewritten, Rule, _rules, run_rules


def relu_chain(n=2) -> onnx.ModelProto:
    lines = [f"r{i} = Relu ({'x' if i == 0 else f'r{i - 1}'})" for i in range(n)]
    return build(f"""g (float[2] x) => (float[2] r{n - 1}) {{
      {chr(10).join(lines)}
    }}""")


class Stub(Rule):
    """Matches every Relu (or the ones named in `only`); checks to `outcome`; a rewrite renames the
    Relu's output to its input's name plus '_new' and says so."""

    def __init__(self, name="stub", outcome=None, recognizer=False, only=(), status="folded", kind="a Relu"):
        self.name, self.outcome, self.recognizer, self.only, self.status, self.kind = (
            name, outcome, recognizer, set(only), status, kind)
        self.offered: list[str] = []
        self.checked: list[str] = []

    def match(self, view, node):
        self.offered.append(node.output[0])
        if node.op_type != "Relu" or (self.only and node.output[0] not in self.only):
            return None
        return Match(self.kind, [node], node.output[0])

    def check(self, view, match, ctx):
        self.checked.append(match.output)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome if self.outcome is not None else {"plan": match.output}

    def rewrite(self, view, match, plan):
        node = match.nodes[0]
        view.replace_input(node, 0, node.input[0])
        return Rewritten([f"new_{plan['plan']}"], f"rewrote {plan['plan']}", ["a note"], 0.5)


def walk(model, rules, dry=False, exclude=frozenset()):
    return run_rules(model.graph, rules, FoldContext(opset=13, exclude_nodes=exclude), {}, dry=dry)


def test_a_rewrite_is_recorded_with_what_the_rule_returned():
    rule = Stub(status="fused", kind="one Relu")
    [first, second] = walk(relu_chain(), [rule])
    assert (first.pass_name, first.kind, first.status, first.nodes, first.output, first.graph) == (
        "stub", "one Relu", "fused", ["Relu(r0)"], "r0", "main")
    assert (first.detail, first.created, first.notes, first.max_rounding, first.reason) == (
        "rewrote r0", ["new_r0"], ["a note"], 0.5, None)
    assert second.output == "r1" and rule.offered == ["r0", "r1"]


def test_a_left_site_is_recorded_with_its_reason_and_the_next_rule_still_gets_the_node():
    left, other = Stub("a", Left("unknown-shape", "no shape")), Stub("b")
    records = walk(relu_chain(1), [left, other])
    # the rewrite of rule b makes a's refusal moot: only the rewrite is reported
    assert [(r.pass_name, r.status) for r in records] == [("b", "folded")]
    records = walk(relu_chain(1), [Stub("a", Left("unknown-shape", "no shape"))])
    assert [(r.status, r.reason, r.detail, r.created) for r in records] == [("left", "unknown-shape", "no shape", [])]


def test_the_first_rule_that_rewrites_a_node_ends_its_turn():
    first, second = Stub("a"), Stub("b")
    records = walk(relu_chain(1), [first, second])
    assert [r.pass_name for r in records] == ["a"] and second.offered == []


def test_a_pass_that_left_a_node_is_not_asked_again_by_its_other_rules():
    one, two = Stub("p", Left("unknown-shape", "first")), Stub("p", Left("not-per-channel", "second"))
    other = Stub("q", Left("opset-too-old", "third"))
    records = walk(relu_chain(1), [one, two, other])
    assert [(r.pass_name, r.detail) for r in records] == [("p", "first"), ("q", "third")]
    assert two.offered == [] and other.offered == ["r0"]


def test_a_recognizer_does_not_report_a_site_already_reported_but_may_rewrite_it():
    plain = Stub("p", Left("unknown-shape", "seen"))
    quiet = Stub("r", Left("not-per-channel", "again"), recognizer=True)
    assert [r.detail for r in walk(relu_chain(1), [plain, quiet])] == ["seen"]
    # a recogniser's own refusal of a node no one reported is reported
    assert [r.detail for r in walk(relu_chain(1), [quiet])] == ["again"]
    # ... and it may still rewrite a reported site, which then reports only the rewrite
    records = walk(relu_chain(1), [plain, Stub("r", recognizer=True)])
    assert [(r.pass_name, r.status) for r in records] == [("r", "folded")]


def test_a_rewrite_drops_only_the_left_records_of_its_own_nodes():
    left_first = Stub("p", Left("unknown-shape", "r0 left"), only={"r0"})
    rewrite_second = Stub("q", only={"r1"})
    records = walk(relu_chain(), [left_first, rewrite_second])
    assert [(r.pass_name, r.status, r.nodes) for r in records] == [("p", "left", ["Relu(r0)"]),
                                                                   ("q", "folded", ["Relu(r1)"])]


def test_a_dry_walk_checks_but_does_not_rewrite():
    model = relu_chain()
    before = model.SerializeToString()
    rule = Stub()
    records = walk(model, [rule], dry=True)
    assert model.SerializeToString() == before
    assert [(r.status, r.detail, r.created) for r in records] == [("folded", "would be rewritten", [])] * 2
    assert rule.checked == ["r0", "r1"]


def test_an_excluded_node_is_left_without_asking_the_rule():
    model = relu_chain()
    for i, node in enumerate(model.graph.node):
        node.name = f"relu{i}"
    rule = Stub()
    records = walk(model, [rule], exclude=frozenset({"relu1"}))
    assert [(r.status, r.reason) for r in records] == [("folded", None), ("left", "excluded")]
    assert records[1].detail == "left alone at the user's request (--exclude-node)"
    assert rule.checked == ["r0"]


@pytest.mark.parametrize("error", [ValueError("bias of 3 for 4 channels"), IndexError("x"), TypeError("y"),
                                   ZeroDivisionError("z")])
def test_a_check_that_trips_over_its_constants_leaves_the_site(error):
    [record] = walk(relu_chain(1), [Stub(outcome=error)])
    assert (record.status, record.reason) == ("left", "inconsistent-constants")
    assert record.detail == (f"Relu(r0): its constants do not fit the ops that read them ({error}); "
                             "left as it was")


def test_a_check_that_fails_otherwise_is_an_error():
    with pytest.raises(KeyError):
        walk(relu_chain(1), [Stub(outcome=KeyError("bug"))])


def test_subgraphs_are_walked_and_named_by_their_node_and_attribute():
    body = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["t"])], "then", [],
                                  [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [2])])
    other = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["e"])], "else", [],
                                   [onnx.helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, [2])])
    for name in ("cond", ""):
        node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other, name=name)
        graph = onnx.helper.make_graph(
            [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
                          onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        records = walk(model, [Stub(outcome=Left("unknown-shape", "sub"))])
        where = name or "If"
        assert [(r.graph, r.output) for r in records] == [(f"main/{where}:else_branch", "e"),
                                                          (f"main/{where}:then_branch", "t")]


def test_the_registry_lists_every_rule_once_in_the_order_they_are_offered_a_node():
    rules = _rules()
    assert [(type(r).__name__, r.name, getattr(r, "centered", None)) for r in rules] == [
        ("BatchNormFold", "bn", None), ("ChannelAffineFold", "bn", None), ("ChannelPairFold", "bn", None),
        ("LayerNormRule", "layernorm", True), ("RMSNormRule", "rmsnorm", False), ("GroupNormRule", "groupnorm", True),
        ("LayerNormFusion", "layernorm", None), ("GroupNormFusion", "groupnorm", None),
        ("InstanceNormAffine", "groupnorm", None), ("NormLike", "layernorm", True), ("NormLike", "rmsnorm", False)]
    assert len({id(r) for r in rules} | {id(r) for r in _rules()}) == 2 * len(rules)  # new objects each time


def test_a_site_with_a_rewrite_keeps_the_input_model_s_labels():
    """A rewrite that makes a kept node write another tensor (here: the Relu, renamed below) is
    still reported by the labels of the model the user gave."""
    class Renaming(Stub):
        def rewrite(self, view, match, plan):
            view.rename_output(match.nodes[0], 0, "renamed")
            return Rewritten([], "renamed")

    [record] = walk(relu_chain(1), [Renaming()])
    assert record.nodes == ["Relu(r0)"]


def test_nodes_removed_by_an_earlier_rewrite_are_not_offered():
    class RemoveNext(Stub):
        def rewrite(self, view, match, plan):
            nxt = view.sole_user(match.output)
            view.rename_output(match.nodes[0], 0, nxt.output[0])
            view.remove(nxt)
            return Rewritten([], "merged")

    rule = RemoveNext(only={"r0"})
    model = relu_chain()
    records = walk(model, [rule])
    assert rule.offered == ["r0"] and [r.detail for r in records] == ["merged"]
    assert [n.output[0] for n in model.graph.node] == ["r1"]  # committed


def test_a_long_error_message_is_cut_in_the_detail():
    [record] = walk(relu_chain(1), [Stub(outcome=ValueError("a\nb " + "x" * 300))])
    assert record.detail == ("Relu(r0): its constants do not fit the ops that read them (a b " + "x" * 153 + "...); "
                             "left as it was")


class Looks(Stub):
    """Reports what the view it is given knows: the opset, an outer constant, the base folder."""

    def check(self, view, match, ctx):
        w = view.const("w")
        return Left("unknown-shape", f"opset {view.opset}, w {None if w is None else w.tolist()}, dir {view.base_dir!r}, "
                                     f"dims {view.dims(match.nodes[0].input[0])}")


def test_every_graph_s_view_has_the_model_s_opset_shapes_folder_and_outer_scope():
    body = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["w"], ["t"])], "body", [],
                                  [onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [2])])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body, name="cond")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["r"]), node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
         onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")])
    ctx = FoldContext(opset=13, base_dir="/models")
    records = run_rules(graph, [Looks()], ctx, {"x": (1, [2]), "w": (1, [2])})
    assert [r.detail for r in records] == ["opset 13, w [1.0, 2.0], dir '/models', dims [2]"] + [
        "opset 13, w [1.0, 2.0], dir '/models', dims [2]"] * 2
    assert [r.graph for r in records] == ["main", "main/cond:else_branch", "main/cond:then_branch"]


def test_a_dry_walk_leaves_subgraphs_alone_too():
    body = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["t"]), onnx.helper.make_node("Relu", ["t"], ["u"])],
                                  "body", [], [onnx.helper.make_tensor_value_info("u", onnx.TensorProto.FLOAT, [2])])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
         onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    before = graph.SerializeToString()
    records = run_rules(graph, [Stub()], FoldContext(opset=13), {}, dry=True)
    assert graph.SerializeToString() == before and [r.detail for r in records] == ["would be rewritten"] * 4


class Pair(Stub):
    """Matches r0 together with the Relu after it (a site of two nodes)."""

    def match(self, view, node):
        self.offered.append(node.output[0])
        if node.output[0] != "r0":
            return None
        return Match(self.kind, [node, view.sole_user("r0")], "r1")


def test_a_site_left_at_an_earlier_node_is_dropped_when_a_later_rewrite_takes_one_of_its_nodes():
    records = walk(relu_chain(3), [Pair("p", Left("unknown-shape", "pair left")), Stub("q", only={"r1"}),
                                   Stub("s", Left("opset-too-old", "r2 left"), only={"r2"})])
    assert [(r.pass_name, r.status, r.nodes) for r in records] == [("q", "folded", ["Relu(r1)"]),
                                                                   ("s", "left", ["Relu(r2)"])]


def test_after_a_recognizer_passes_a_claimed_node_the_next_rules_still_get_it():
    plain = Stub("p", Left("unknown-shape", "seen"))
    quiet = Stub("r", Left("not-per-channel", "again"), recognizer=True)
    last = Stub("s")
    records = walk(relu_chain(1), [plain, quiet, last])
    assert [(r.pass_name, r.status) for r in records] == [("s", "folded")] and last.offered == ["r0"]


def held_at(output: str) -> list[Rule]:
    """Rule a leaves the Relu of `output` for "opset-too-old"; rule b leaves every Relu for "unknown-shape"."""
    return [Stub("a", Left("opset-too-old", "held"), only={output}), Stub("b", Left("unknown-shape", "no"))]


def test_a_dry_walk_with_stop_at_ends_at_the_first_site_left_for_that_reason():
    ctx = FoldContext(opset=13)
    records = run_rules(relu_chain(3).graph, held_at("r1"), ctx, {}, dry=True, stop_at="opset-too-old")
    assert [(r.output, r.pass_name, r.reason) for r in records] == [
        ("r0", "b", "unknown-shape"), ("r1", "a", "opset-too-old"), ("r1", "b", "unknown-shape")]
    # stop_at is for dry walks only; a reason never met walks everything
    for dry, stop_at in ((False, "opset-too-old"), (True, "missing")):
        records = run_rules(relu_chain(3).graph, held_at("r1"), ctx, {}, dry=dry, stop_at=stop_at)
        assert [r.output for r in records] == ["r0", "r1", "r1", "r2"]


def test_stop_at_in_a_subgraph_ends_the_whole_walk_with_the_records_before_it():
    def branch(name, *outputs):
        nodes = [onnx.helper.make_node("Relu", [i], [o]) for i, o in zip(("x",) + outputs, outputs)]
        return onnx.helper.make_graph(nodes, name, [], [onnx.helper.make_tensor_value_info(
            outputs[-1], onnx.TensorProto.FLOAT, [2])])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "t", "u"),
                                 else_branch=branch("else", "e"), name="cond")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["r"]), node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
         onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    records = run_rules(graph, held_at("t"), FoldContext(opset=13), {}, dry=True, stop_at="opset-too-old")
    assert [(r.graph, r.output, r.reason) for r in records] == [
        ("main", "r", "unknown-shape"), ("main/cond:else_branch", "e", "unknown-shape"),
        ("main/cond:then_branch", "t", "opset-too-old"), ("main/cond:then_branch", "t", "unknown-shape")]
