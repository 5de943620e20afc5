"""Names resolved by scope in If/Loop/Scan bodies (issue 14: a branch initializer `W` shadowing an
outer `W` was folded as if it were the value onnxruntime reads, and the written model differed).

onnxruntime (and onnx's reference evaluator) read the *outer* value where a subgraph initializer
shadows an outer name, while a subgraph input shadows as the scoping rule says. normfold treats
such a shadowed initializer as no constant (its site stays) and never rewrites an outer weight
that a subgraph initializer of the same name might stand for. The property test builds bodies
whose names shadow outer ones at random and checks, in onnxruntime, that folding (without
normfold's own verification) never changes an output.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import normfold
from builders import run

PARAMS = ("W", "s", "b", "m", "v")
SHAPES = {"W": (4, 3, 3, 3), "s": (4,), "b": (4,), "m": (4,), "v": (4,)}


def _value(name: str, rng: np.random.Generator) -> np.ndarray:
    if name == "v":
        return (rng.random(SHAPES[name]) + 0.5).astype(np.float32)
    return (rng.standard_normal(SHAPES[name]) * 3).astype(np.float32)


def _body(kind: str, choices: dict[str, str], input_name: str, rng, tag: str) -> onnx.GraphProto:
    """Conv -> BatchNormalization in a body. Each parameter is read from the outer scope
    ('outer'), from a local initializer with its own name ('local') or from a local initializer
    that shadows the outer one ('shadow')."""
    inits, names = [], {}
    for p in PARAMS:
        if choices[p] == "outer":
            names[p] = p
        else:
            names[p] = p if choices[p] == "shadow" else f"{p}_{tag}"
            inits.append(numpy_helper.from_array(_value(p, rng), names[p]))
    x = input_name if kind == "Scan" else "x"
    nodes = [helper.make_node("Conv", [x, names["W"]], [f"c_{tag}"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", [f"c_{tag}"] + [names[p] for p in PARAMS[1:]], [f"o_{tag}"])]
    out = helper.make_tensor_value_info(f"o_{tag}", T.FLOAT, [1, 4, 6, 6])
    inputs = []
    outputs = [out]
    if kind == "Loop":
        nodes.append(helper.make_node("Identity", [f"cond_in_{tag}"], [f"cond_out_{tag}"]))
        inputs = [helper.make_tensor_value_info(f"i_{tag}", T.INT64, []),
                  helper.make_tensor_value_info(f"cond_in_{tag}", T.BOOL, [])]
        outputs = [helper.make_tensor_value_info(f"cond_out_{tag}", T.BOOL, []), out]
    elif kind == "Scan":
        inputs = [helper.make_tensor_value_info(input_name, T.FLOAT, [1, 3, 6, 6])]
    return helper.make_graph(nodes, f"body_{tag}", inputs, outputs, inits)


def shadowing_model(kind: str, choices: dict[str, str], scan_input: str, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    outer_inits = [numpy_helper.from_array(_value(p, rng), p) for p in PARAMS]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "s", "b", "m", "v"], ["y0"])]
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 6, 6]),
              helper.make_tensor_value_info("cond", T.BOOL, [])]
    if kind == "If":
        nodes.append(helper.make_node("If", ["cond"], ["y1"], then_branch=_body(kind, choices, "", rng, "t"),
                                      else_branch=_body(kind, {p: "outer" for p in PARAMS}, "", rng, "e")))
        out_shape = [1, 4, 6, 6]
    elif kind == "Loop":
        outer_inits.append(numpy_helper.from_array(np.array(2, np.int64), "trips"))
        nodes.append(helper.make_node("Loop", ["trips", "cond"], ["y1"], body=_body(kind, choices, "", rng, "l")))
        out_shape = [2, 1, 4, 6, 6]
    else:
        outer_inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
        nodes.append(helper.make_node("Unsqueeze", ["x", "axis0"], ["xs"]))
        nodes.append(helper.make_node("Scan", ["xs"], ["y1"], num_scan_inputs=1,
                                      body=_body(kind, choices, scan_input, rng, "s")))
        out_shape = [1, 1, 4, 6, 6]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y0", T.FLOAT, [1, 4, 6, 6]),
                                                   helper.make_tensor_value_info("y1", T.FLOAT, out_shape)],
                              outer_inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _outputs(model: onnx.ModelProto, cond: bool) -> list[np.ndarray]:
    x = np.random.default_rng(7).standard_normal((1, 3, 6, 6)).astype(np.float32)
    return run(model, {"x": x, "cond": np.array(cond)})


def _check_equivalent(model: onnx.ModelProto) -> normfold.Report:
    folded, report = normfold.fold(model)
    onnx.checker.check_model(folded, full_check=True)
    for cond in (True, False):
        for a, b in zip(_outputs(model, cond), _outputs(folded, cond)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3)
    return report


def test_branch_initializer_shadowing_the_outer_weight_is_left():
    """The case of issue 14: `W` in the then-branch shadows the outer `W`; folding it changed the
    output by 18.6 (onnxruntime reads the outer W there)."""
    model = shadowing_model("If", {"W": "shadow", "s": "outer", "b": "outer", "m": "outer", "v": "outer"}, "x", 0)
    report = _check_equivalent(model)
    inner = [s for s in report.sites if s.graph != "main"]
    assert inner, "the body's BatchNormalization was not seen"  # a walk that skips bodies must not pass
    # both branches read a W that is ambiguous (then: its own or the outer one; else: the outer one)
    assert [(s.status, s.reason) for s in inner] == [("left", "non-constant-weights")] * 2
    # Nor the main graph's Conv + BN on the outer W: once no main-graph node reads W, onnxruntime
    # drops it, and the branch then reads its own W instead.
    main = [s for s in report.sites if s.graph == "main"]
    assert [(s.status, s.reason) for s in main] == [("left", "non-constant-weights")]


def test_body_without_shadowing_still_folds():
    report = _check_equivalent(shadowing_model("Loop", {p: "local" for p in PARAMS}, "x", 1))
    assert [s.status for s in report.sites] == ["folded", "folded"]


def test_new_names_never_clash_with_a_subgraph_name():
    """A name a rewrite adds in one scope must not exist in any other: a subgraph initializer
    of that name would shadow it (or be shadowed)."""
    model = shadowing_model("If", {p: "local" for p in PARAMS}, "x", 2)
    folded, _ = normfold.fold(model)
    seen: dict[str, int] = {}

    def walk(graph):
        for t in graph.initializer:
            seen[t.name] = seen.get(t.name, 0) + 1
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(folded.graph)
    assert {n: c for n, c in seen.items() if c > 1} == {}


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["If", "Loop", "Scan"]),
       choices=st.fixed_dictionaries({p: st.sampled_from(["outer", "local", "shadow"]) for p in PARAMS}),
       scan_input=st.sampled_from(["x", "xs_slice"]), seed=st.integers(0, 2**16))
def test_folding_keeps_outputs_whatever_shadows_what(kind, choices, scan_input, seed):
    report = _check_equivalent(shadowing_model(kind, choices, scan_input, seed))
    inner = [s for s in report.sites if s.graph != "main"]
    assert inner, "the body's BatchNormalization was not seen"  # a walk that skips bodies must not pass
    shadowed = any(c == "shadow" for c in choices.values()) or (kind == "Scan" and scan_input == "x")
    if not shadowed:
        assert all(s.status == "folded" for s in report.sites), report.sites
    elif any(c == "shadow" for c in choices.values()):
        assert all(s.status == "left" for s in report.sites), report.sites
