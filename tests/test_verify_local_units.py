"""normfold/verify_local.py in-process on tiny models: when the whole model is too big, what a site's
pattern and replacement are cut from, the inputs they get, and the verdict over all sites.
tests/test_verify_local.py runs it on BERT and LLaMA."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import normfold
import normfold.accuracy
import normfold.verify_local as local
from builders import build
from normfold.errors import VerificationUnavailable
from normfold.report import SiteRecord


def _layernorm(eps=1e-5, extra="", out="y"):
    return build(f"""g (float[N,4] x) => (float[N,4] {out}) {{
        m = ReduceMean <axes = [-1]> (x)
        d = Sub (x, m)
        q = Mul (d, d)
        v = ReduceMean <axes = [-1]> (q)
        e = Add (v, eps)
        s = Sqrt (e)
        n = Div (d, s)
        y = Mul (n, g) {extra}}}""", opset=17, eps=np.float32(eps), g=np.float32([1.0, 2.0, 3.0, 4.0]))


def _folded(tmp_path, model, name="m"):
    """(original path, result path, sites) of `model` folded and written without verification."""
    src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.out.onnx"
    onnx.save(model, src)
    report = normfold.fold_file(src, out, verify=normfold.VerifyOptions(enabled=False))
    assert report.written
    return src, out, report.sites


# ---- when the whole model is too big -------------------------------------------------------------
def test_whole_model_verification_is_too_big_past_the_memory_fraction(tmp_path, monkeypatch):
    onnx.save(_layernorm(), tmp_path / "m.onnx")
    size = (tmp_path / "m.onnx").stat().st_size
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: None)
    assert local.whole_model_too_big(tmp_path / "m.onnx") == (False, "")
    need = size * local.SESSION_FACTOR
    exact = need / local.MEMORY_FRACTION  # need == 0.6 * available: not more, so it fits
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: exact)
    assert local.whole_model_too_big(tmp_path / "m.onnx")[0] is False
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: 2**30)
    too_big, text = local.whole_model_too_big(tmp_path / "m.onnx")
    assert too_big is False
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: 1000)
    too_big, text = local.whole_model_too_big(tmp_path / "m.onnx")
    assert too_big is True and text == (f"whole-model verification would need about {need / 2**30:.1f} GiB "
                                        f"({size / 2**30:.1f} GiB of weights x 2.5), more than 0.6 of the 0.0 GiB available")


# ---- the model as indexed for cutting ------------------------------------------------------------
def _constants_model():
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32([2.0]))),
         helper.make_node("Constant", [], ["cf"], value_float=0.5),
         helper.make_node("Add", ["c", "w"], ["cw"]),
         helper.make_node("RandomNormal", [], ["r"], shape=[1]),
         helper.make_node("Add", ["r", "c"], ["rc"]),
         helper.make_node("Mul", ["x", "cw"], ["xc"]),
         helper.make_node("Add", ["xc", "rc"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.float32([3.0]), "w"), numpy_helper.from_array(np.zeros(17, np.float32), "big"),
         numpy_helper.from_array(np.zeros((2, 2), np.float32), "square"), numpy_helper.from_array(np.arange(16.0), "w16")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("as_bytes", [True, False])
def test_what_counts_as_a_constant_and_a_small_value(tmp_path, as_bytes):
    model = _constants_model()
    onnx.save(model, tmp_path / "m.onnx")
    m = local._Model(model.SerializeToString() if as_bytes else tmp_path / "m.onnx")
    assert m.folder == ("" if as_bytes else str(tmp_path))
    assert m.inputs == {"x"}  # w is an initializer (listed as an input too)
    assert [m.is_constant(t) for t in ("w", "c", "cw", "r", "rc", "x", "xc", "nowhere")] == \
        [True, True, True, False, False, False, False, False]
    assert m.small_value("c").tolist() == [2.0] and m.small_value("cf").dtype == np.float32
    assert float(m.small_value("cf")) == 0.5 and m.small_value("w").tolist() == [3.0]
    assert m.small_value("w16").tolist() == list(range(16))
    assert m.small_value("big") is None and m.small_value("square") is None and m.small_value("cw") is None
    assert m.small_value("nowhere") is None


def test_an_external_weight_is_not_a_small_value_and_is_loaded_into_the_cut(tmp_path):
    onnx.save(_layernorm(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    m = local._Model(tmp_path / "m.onnx")
    assert m.small_value("eps") is None
    nodes = {id(n): n for n in m.proto.graph.node[4:8]}  # Add(eps) .. Mul(g): reads d and v
    cut = onnx.load_from_string(m.cut(nodes, "y", {"d": (TensorProto.FLOAT, [3, 4]), "v": (TensorProto.FLOAT, [3, 1]),
                                                   "unused": (TensorProto.FLOAT, [1])}))
    assert [i.name for i in cut.graph.input] == ["d", "v"] and [o.name for o in cut.graph.output] == ["y"]
    assert {t.name: t.data_location for t in cut.graph.initializer} == {"eps": 0, "g": 0}
    assert not any(t.external_data for t in cut.graph.initializer)
    assert numpy_helper.to_array(next(t for t in cut.graph.initializer if t.name == "g")).tolist() == [1, 2, 3, 4]
    assert cut.opset_import == m.proto.opset_import and cut.ir_version == m.proto.ir_version
    assert cut.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_a_cut_brings_the_constant_cone_it_reads_and_keeps_graph_order():
    m = local._Model(_constants_model().SerializeToString())
    mul = m.producer["xc"]
    cut = onnx.load_from_string(m.cut({id(mul): mul}, "xc", {"x": (TensorProto.FLOAT, [1])}))
    assert [n.output[0] for n in cut.graph.node] == ["c", "cw", "xc"]  # the Constant and the Add computing cw
    assert [t.name for t in cut.graph.initializer] == ["w"]
    fn = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m.proto.functions.append(fn)
    assert onnx.load_from_string(m.cut({id(mul): mul}, "xc", {"x": (TensorProto.FLOAT, [1])})).functions[0].name == "F"


def test_a_cone_stops_at_the_given_tensors_and_constants_and_gives_up_past_its_limit():
    m = local._Model(_layernorm().SerializeToString())
    cone = local._cone(m, "y", {"d"}, 10)
    assert sorted(n.output[0] for n in cone.values()) == ["e", "n", "q", "s", "v", "y"]
    assert local._cone(m, "y", {"d"}, 5) is None  # 6 nodes needed
    assert local._cone(m, "y", {"d"}, 6) is not None
    assert local._cone(m, "y", set(), 20) is None  # it reads the graph input x


# ---- a site's pattern and its replacement ----------------------------------------------------------
def test_a_sites_pattern_is_cut_from_its_data_input(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm())
    original, result = local._Model(src), local._Model(out)
    before, after, free, target, result_target = local._pattern(original, result, site)
    assert free == ["x"] and target == result_target == "y" == site.output
    assert len(before) == 8 and [n.op_type for n in after.values()] == ["LayerNormalization"]


def test_a_site_whose_output_a_later_rewrite_renamed_is_compared_where_its_reader_reads(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm(extra="\n z = Relu (y)", out="z"), "r")
    result = onnx.load(out)
    node = next(n for n in result.graph.node if n.op_type == "LayerNormalization")
    node.output[0] = "renamed"
    next(n for n in result.graph.node if n.op_type == "Relu").input[0] = "renamed"
    onnx.save(result, out)
    original, res = local._Model(src), local._Model(out)
    _, _, _, target, result_target = local._pattern(original, res, site)
    assert (target, result_target) == ("y", "renamed")
    assert local._counterpart(original, res, "renamed") == ("y", "renamed")
    assert local._counterpart(original, res, "z") == ("z", "z")  # a graph output
    assert local._counterpart(original, res, "x") == ("y", "renamed")  # followed through the one reader
    assert local._counterpart(original, res, "nowhere") is None
    site.created = []
    with pytest.raises(VerificationUnavailable, match=f"^site {site.id}: its output is not in the result$"):
        local._pattern(original, res, site)


def test_a_site_that_cannot_be_cut_out_says_from_which_model(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm())
    original, result = local._Model(src), local._Model(out)
    site.nodes = ["Mul(y)"]  # its data inputs n, g: n is computed from x, which is not fed
    with pytest.raises(VerificationUnavailable, match=f"^site {site.id}: cannot cut it out of the result on its own$"):
        local._pattern(original, result, site)


def test_the_epsilons_of_a_pattern_and_the_magnitudes_they_add():
    m = local._Model(_layernorm(eps=1e-6).SerializeToString())
    nodes = {id(n): n for n in m.proto.graph.node}
    assert local._epsilons(m, nodes) == [pytest.approx(1e-6)]
    ln = helper.make_node("LayerNormalization", ["x", "g"], ["y"], epsilon=1e-3)
    assert local._epsilons(m, {**nodes, id(ln): ln}) == [pytest.approx(1e-6), pytest.approx(1e-3)]
    for value in (-1e-6, 0.5, 0.0):  # abs taken; too large or zero: not an epsilon
        assert local._epsilons(local._Model(_layernorm(eps=value).SerializeToString()),
                               {id(n): n for n in m.proto.graph.node}) == ([pytest.approx(1e-6)] if value == -1e-6 else [])
    extra = local._magnitudes([1e-4])[len(local.MAGNITUDES):]
    assert extra == [("variance = epsilon 0.0001", pytest.approx(1e-2), 0.0),
                     ("variance = epsilon 0.0001 / 100", pytest.approx(1e-3), 0.0)]
    assert local._magnitudes([]) == list(local.MAGNITUDES)


def test_the_inputs_of_a_pattern_at_each_magnitude():
    spec = {"x": (TensorProto.FLOAT, [0, 3]), "h": (TensorProto.FLOAT16, ["N", 2]), "b": (TensorProto.BOOL, [4]),
            "i": (TensorProto.INT64, [5]), "s": (TensorProto.FLOAT, None)}
    magnitudes = [("one", 1.0, 0.0), ("large", 30.0, 5.0)]
    feeds = local._feeds(spec, (4, 1), 7, magnitudes)
    assert [what for what, _ in feeds] == ["one", "large"]
    one, large = feeds[0][1], feeds[1][1]
    assert one["x"].shape == (1, 3) and one["h"].shape == (1, 2) and one["s"].shape == ()
    assert local._feeds(spec, (4, None), 7, magnitudes)[0][1]["x"].shape == (4, 3)  # the leading axis as the others
    assert one["b"].dtype == np.bool_ and one["i"].dtype == np.int64 and set(one["i"]) <= {0, 1}
    rng = np.random.default_rng([7, 1])
    x = 5.0 + 30.0 * rng.standard_normal((1, 3))
    h = (5.0 + 30.0 * rng.standard_normal((1, 2))) / 8.0  # 16-bit inputs of scale > 1 divided by 8
    assert np.array_equal(large["x"], x.astype(np.float32)) and np.array_equal(large["h"], h.astype(np.float16))
    assert local._feeds(spec, (4, 1), 7, magnitudes)[1][1]["x"].tolist() == large["x"].tolist()  # seeded


# ---- one site and all of them ----------------------------------------------------------------------
def test_a_correct_site_passes_and_a_wrong_one_fails(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm())
    c = local.check_site(local._Model(src), local._Model(out), site)
    assert c.passed and c.name == site.id and c.max_abs_error < 1e-4
    result = onnx.load(out)
    ln = next(n for n in result.graph.node if n.op_type == "LayerNormalization")
    next(a for a in ln.attribute if a.name == "epsilon").f = 1e-3  # a wrong epsilon
    onnx.save(result, out)
    c = local.check_site(local._Model(src), local._Model(out), site)
    assert not c.passed and c.rule == "accuracy"
    c = local.check_site(local._Model(src), local._Model(out), site, atol=10.0, rtol=0.0)  # explicit: as given
    assert c.passed and c.rule == "tolerance" and c.atol == 10.0


def test_a_site_whose_input_type_is_unknown_is_not_verified(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm())
    original = local._Model(src)
    original.shapes.pop("x", None)
    with pytest.raises(VerificationUnavailable, match=r"the type or rank of input\(s\) \['x'\] is unknown"):
        local.check_site(original, local._Model(out), site)


def test_verify_locally_checks_the_rewritten_sites_of_the_main_graph(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm())
    left = SiteRecord("batchnorm", "BN", "left", ["BatchNormalization(q)"], "x", reason="excluded", output="q")
    inner = SiteRecord("layernorm", "LN", "fused", ["n"], "x", output="t", graph="main/If:then_branch")
    v = local.verify_locally(src, out, [left, site, inner], seed=3, atol={None: None}, rtol={"y": 1.0})
    assert (v.status, v.mode, v.seed, v.inputs) == ("unavailable", "local", 3, {})
    assert [c.name for c in v.sites] == [site.id] and v.sites[0].passed
    assert v.notes == ["1 site(s) not verified locally: main/If:then_branch:t (in a subgraph)"] and v.detail == v.notes[0]
    assert v.rule.startswith("each rewritten site's pattern and replacement on the same inputs at several magnitudes: ")
    v = local.verify_locally(src, out, [site])
    assert (v.status, v.notes, v.detail, v.first_failing_site) == ("passed", [], "", None)
    unnamed = SiteRecord("layernorm", "LN", "fused", ["n"], "x")
    assert local.verify_locally(src, out, [unnamed]).status == "passed"  # no output: nothing to compare


def test_verify_locally_lists_failing_sites_first(tmp_path):
    two = build("""g (float[N,4] x) => (float[N,4] w) {
        m = ReduceMean <axes = [-1]> (x)
        d = Sub (x, m)
        q = Mul (d, d)
        v = ReduceMean <axes = [-1]> (q)
        e = Add (v, eps)
        s = Sqrt (e)
        n = Div (d, s)
        y = Mul (n, g)
        m2 = ReduceMean <axes = [-1]> (y)
        d2 = Sub (y, m2)
        q2 = Mul (d2, d2)
        v2 = ReduceMean <axes = [-1]> (q2)
        e2 = Add (v2, eps)
        s2 = Sqrt (e2)
        w = Div (d2, s2) }""", opset=17, eps=np.float32(1e-5), g=np.float32([1.0, 2.0, 3.0, 4.0]))
    src, out, sites = _folded(tmp_path, two)
    assert [s.output for s in sites] == ["y", "w"]
    result = onnx.load(out)
    second = [n for n in result.graph.node if n.op_type == "LayerNormalization"][1]
    next(a for a in second.attribute if a.name == "epsilon").f = 0.5
    onnx.save(result, out)
    v = local.verify_locally(src, out, sites, atol=1e-4, rtol={None: 1e-4})
    assert v.status == "failed" and [c.name for c in v.sites] == ["main:w", "main:y"]
    assert v.first_failing_site == "main:w" and v.detail == "sites differ: main:w"
    assert [c.atol for c in v.sites] == [1e-4, 1e-4]


# ---- the details the first mutation run found unchecked ----------------------------------------------
def test_the_too_big_sentence_and_its_boundary(monkeypatch):
    import normfold.verify

    monkeypatch.setattr(normfold.verify, "model_bytes", lambda path: 2**30)
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: 2**31)
    assert local.whole_model_too_big("m.onnx") == (True, "whole-model verification would need about 2.5 GiB (1.0 GiB "
                                                         "of weights x 2.5), more than 0.6 of the 2.0 GiB available")
    monkeypatch.setattr(normfold.verify, "model_bytes", lambda path: 2.4)
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: 10)  # 2.4 * 2.5 == 0.6 * 10: it fits
    assert local.whole_model_too_big("m.onnx")[0] is False
    monkeypatch.setattr(normfold.accuracy, "_available_memory", lambda: 2**31)
    assert local.whole_model_too_big("m.onnx", 2**30)[0] is True  # a size given is not measured again


def test_random_ops_are_never_constants():
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32([2.0]))),
             helper.make_node("RandomUniform", [], ["u"], shape=[1]),
             helper.make_node("RandomNormalLike", ["c"], ["nl"]),
             helper.make_node("RandomUniformLike", ["c"], ["ul"]),
             helper.make_node("Neg", ["c"], ["k"])]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1])
                                                for t in ("u", "nl", "ul", "k")])
    m = local._Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert [m.is_constant(t) for t in ("u", "nl", "ul", "k")] == [False, False, False, True]


def test_a_cone_passes_over_an_omitted_optional_input():
    graph = helper.make_graph([helper.make_node("Clip", ["x", "", "mx"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.float32(1.0), "mx")])
    m = local._Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert [n.op_type for n in local._cone(m, "y", {"x"}, 5).values()] == ["Clip"]


def test_only_positive_float_epsilons_and_small_added_scalars_count():
    graph = helper.make_graph(
        [helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1), helper.make_node("LayerNormalization", ["a", "s"], ["b"],
                                                                                     epsilon=0.0),
         helper.make_node("Add", ["b", "hundredth"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])], [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])],
        [numpy_helper.from_array(np.float64(0.01), "hundredth"), numpy_helper.from_array(np.ones(2), "s")])
    m = local._Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert local._epsilons(m, {id(n): n for n in m.proto.graph.node}) == []
    assert len(local._magnitudes([1e-4, 1e-2])) == len(local.MAGNITUDES) + 4


def test_the_inputs_fill_only_unknown_dimensions_and_keep_integers_and_booleans_in_range():
    spec = {"o": (TensorProto.FLOAT, [1, 5]), "t": (TensorProto.FLOAT, [0, "T"]), "b": (TensorProto.BOOL, [64]),
            "i": (TensorProto.INT64, [64]), "bf": (TensorProto.BFLOAT16, [8]), "h": (TensorProto.FLOAT16, [8])}
    magnitudes = [("one", 1.0, 0.0), ("two", 2.0, 0.0)]
    (_, one), (_, two) = local._feeds(spec, (4, 2), 5, magnitudes)
    assert one["o"].shape == (1, 5) and one["t"].shape == (2, 4)
    for name, dtype in (("b", np.bool_), ("i", np.int64)):
        assert one[name].shape == (64,) and one[name].dtype == dtype and set(one[name].tolist()) == {0, 1}
    assert str(one["bf"].dtype) == "bfloat16" and not np.all(one["bf"].astype(np.float32) == np.round(one["bf"].astype(np.float32)))
    rng = [np.random.default_rng([5, 0]), np.random.default_rng([5, 1])]
    drawn = [{}, {}]
    for k, (what, scale, offset) in enumerate(magnitudes):
        for name, (elem, dims) in spec.items():
            shape = {"o": (1, 5), "t": (2, 4), "b": (64,), "i": (64,), "bf": (8,), "h": (8,)}[name]
            if name in ("b", "i"):
                drawn[k][name] = rng[k].integers(0, 2, size=shape)
            else:
                drawn[k][name] = offset + scale * rng[k].standard_normal(shape)
    assert np.array_equal(one["h"], drawn[0]["h"].astype(np.float16))  # scale 1: as drawn
    assert np.array_equal(two["h"], (drawn[1]["h"] / 8.0).astype(np.float16))  # 16-bit, scale > 1: divided by 8
    assert np.array_equal(two["o"], drawn[1]["o"].astype(np.float32))  # 32-bit: not divided
    assert np.array_equal(one["b"], drawn[0]["b"].astype(np.bool_)) and np.array_equal(one["i"], drawn[0]["i"])


def test_inputs_computed_from_another_input_are_not_fed_on_their_own(tmp_path):
    model = build("""g (float[2] x) => (float[2] y) {
        t = Neg (x)
        y = Add (x, t) }""", opset=17)
    onnx.save(model, tmp_path / "m.onnx")
    m = local._Model(tmp_path / "m.onnx")
    site = SiteRecord("p", "k", "folded", ["Add(y)"], "d", output="y")
    assert local._pattern(m, m, site)[2] == ["x"]  # not t: fed independently it would not be -x
    site.nodes = ["nothing"]
    with pytest.raises(VerificationUnavailable, match=r"cannot cut it out of the original on its own$"):
        local._pattern(m, m, site)


def _wrong(out, eps=1e-3, index=0):
    result = onnx.load(out)
    ln = [n for n in result.graph.node if n.op_type == "LayerNormalization"][index]
    next(a for a in ln.attribute if a.name == "epsilon").f = eps
    onnx.save(result, out)


def test_which_comparisons_the_accuracy_rule_rejudges(tmp_path, monkeypatch):
    src, out, [site] = _folded(tmp_path, _layernorm())
    original, result = local._Model(src), local._Model(out)
    assert local.check_site(original, result, site).rule == "tolerance"  # passed: not re-judged
    _wrong(out)
    result = local._Model(out)
    for atol, rtol in ((None, 0.5), (0.5, None)):
        c = local.check_site(original, result, site, atol=atol, rtol=rtol)
        assert c.rule == "tolerance" and not c.passed and (c.atol, c.rtol) == ((0.5, c.rtol) if atol else (c.atol, 0.5))

    def unavailable(*args):
        raise VerificationUnavailable("no float64 run")

    monkeypatch.setattr(normfold.accuracy, "_run_float64", unavailable)
    c = local.check_site(original, result, site)
    assert c.rule == "magnitude" and not c.passed


def test_the_seed_of_a_sites_inputs_defaults_to_0(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm())
    _wrong(out)
    original, result = local._Model(src), local._Model(out)
    errors = [local.check_site(original, result, site, **kw).max_abs_error for kw in ({}, {"seed": 0}, {"seed": 1})]
    assert errors[0] == errors[1] != errors[2]
    assert local.verify_locally(src, out, [site]).seed == 0


def test_a_pattern_that_does_not_run_at_one_size_is_tried_at_the_next(tmp_path, monkeypatch):
    src, out, [site] = _folded(tmp_path, _layernorm())
    real, calls = local._run, []

    def first_fails(model, label_, feeds, output):
        calls.append(label_)
        if len(calls) == 1:
            raise VerificationUnavailable("no kernel at this size")
        return real(model, label_, feeds, output)

    monkeypatch.setattr(local, "_run", first_fails)
    assert local.check_site(local._Model(src), local._Model(out), site).passed
    assert calls == [f"site {site.id} (original)", f"site {site.id} (original)", f"site {site.id} (result)"]

    def always_fails(model, label_, feeds, output):
        raise VerificationUnavailable("no kernel at any size")

    monkeypatch.setattr(local, "_run", always_fails)
    with pytest.raises(VerificationUnavailable, match="^no kernel at any size$"):
        local.check_site(local._Model(src), local._Model(out), site)


def test_onnxruntime_errors_name_the_sites_pattern_or_replacement(tmp_path, monkeypatch):
    import normfold.verify

    src, out, [site] = _folded(tmp_path, _layernorm())
    real = normfold.verify.open_session

    def refuse(model, label, *args, **kwargs):
        if label.endswith(refused[0]):
            raise VerificationUnavailable(f"onnxruntime cannot load the {label} model")
        return real(model, label, *args, **kwargs)

    monkeypatch.setattr(normfold.verify, "open_session", refuse)
    for refused in (["(result)"], ["(original)"]):
        with pytest.raises(VerificationUnavailable, match=rf"the site main:y {re.escape(refused[0])} model"):
            local.check_site(local._Model(src), local._Model(out), site)


def test_a_float16_site_is_cut_with_its_own_output_type(tmp_path):
    model = _layernorm()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    src, out, [site] = _folded(tmp_path, model)
    c = local.check_site(local._Model(src), local._Model(out), site)
    assert c.passed and c.dtype == "float16"


def test_an_input_of_unknown_rank_is_not_verified(tmp_path):
    src, out, [site] = _folded(tmp_path, _layernorm())
    original = local._Model(src)
    original.shapes["x"] = (TensorProto.FLOAT, None)
    with pytest.raises(VerificationUnavailable, match=r"input\(s\) \['x'\] is unknown"):
        local.check_site(original, local._Model(out), site)


def _many_layernorms(count):
    lines, prev = [], "x"
    for k in range(count):
        lines += [f"m{k} = ReduceMean <axes = [-1]> ({prev})", f"d{k} = Sub ({prev}, m{k})", f"q{k} = Mul (d{k}, d{k})",
                  f"v{k} = ReduceMean <axes = [-1]> (q{k})", f"e{k} = Add (v{k}, eps)", f"s{k} = Sqrt (e{k})",
                  f"y{k} = Div (d{k}, s{k})"]
        lines.append(f"r{k} = Relu (y{k})")
        prev = f"r{k}"
    return build(f"g (float[N,4] x) => (float[N,4] {prev}) {{\n" + "\n".join(lines) + "}", opset=17,
                 eps=np.float32(1e-5))


def test_the_verdict_over_many_sites(tmp_path, monkeypatch):
    src, out, sites = _folded(tmp_path, _many_layernorms(11))
    assert len(sites) == 11
    for k in range(11):
        _wrong(out, eps=0.5 if k == 3 else 0.1, index=k)  # site 3 the worst
    v = local.verify_locally(src, out, sites, atol={None: 1e-4, "y0": 9.0}, rtol={None: 1e-4})
    assert v.status == "failed" and v.sites[0].name == "main:y3" and v.first_failing_site == "main:y3"
    assert v.sites[0].needed_atol == max(c.needed_atol for c in v.sites)
    shown = v.detail[len("sites differ: "):].split(", ")
    assert len(shown) == 10 and shown[0] == "main:y3"
    v = local.verify_locally(src, out, sites, atol={None: 10.0}, rtol={None: 0.25})  # the default entry applies
    assert v.status == "passed" and {(c.atol, c.rtol) for c in v.sites} == {(10.0, 0.25)}
    inner = [SiteRecord("layernorm", "LN", "fused", ["n"], "x", output=f"t{k}", graph="main/If:then_branch")
             for k in range(6)]
    v = local.verify_locally(src, out, inner)  # none verified: unavailable
    assert (v.status, v.sites) == ("unavailable", [])
    assert v.notes == ["6 site(s) not verified locally: " + "; ".join(f"main/If:then_branch:t{k} (in a subgraph)"
                                                                     for k in range(5))]
    assert v.detail == v.notes[0]

    def fails_first(original, result, site, *args):
        if site.output == "y0":
            raise VerificationUnavailable(f"site {site.id}: cannot run its pattern")
        return real(original, result, site, *args)

    real = local.check_site
    monkeypatch.setattr(local, "check_site", fails_first)
    v = local.verify_locally(src, out, [inner[0], sites[0], sites[1]], atol=10.0, rtol=0.0)
    assert [c.name for c in v.sites] == ["main:y1"] and v.status == "unavailable"
    assert v.notes == ["2 site(s) not verified locally: main/If:then_branch:t0 (in a subgraph); site main:y0: cannot run "
                       "its pattern"]


# ---- the survivors of the first runs: cones, counterparts, created nodes, tolerances, the order ------
def _model_bytes(nodes, inputs, outputs, inits=()):
    """A model of `nodes`; inputs and outputs are (name, elem type, shape)."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


F = TensorProto.FLOAT


def _neg_chain(length, start="x"):
    """t1 = Neg(start), ..., t{length} = Neg(t{length - 1}), each node named n{k}."""
    names = [start] + [f"t{k}" for k in range(1, length + 1)]
    return [helper.make_node("Neg", [a], [b], name=f"n{k}") for k, (a, b) in enumerate(zip(names, names[1:]), 1)]


def test_a_tensor_read_twice_counts_once_towards_a_cones_limit():
    """b = a * a reads a twice: the cone of b is two nodes, within a limit of exactly 2."""
    m = local._Model(_model_bytes([helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Mul", ["a", "a"], ["b"])],
                                  [("x", F, [2])], [("b", F, [2])]))
    assert sorted(n.output[0] for n in local._cone(m, "b", {"x"}, 2).values()) == ["a", "b"]
    assert local._cone(m, "b", {"x"}, 1) is None


@pytest.mark.parametrize("length, found", [(7, True), (8, False)])
def test_a_counterpart_is_looked_for_eight_nodes_downstream(length, found):
    """From t0, the result's graph output t{length} is `length` single-reader nodes on: found up to
    seven nodes on (t0..t7 are looked at), not at eight."""
    original = local._Model(_model_bytes([helper.make_node("Neg", ["x"], ["o"])], [("x", F, [2])], [("o", F, [2])]))
    result = local._Model(_model_bytes(_neg_chain(length, "t0"), [("t0", F, [2])], [(f"t{length}", F, [2])]))
    assert local._counterpart(original, result, "t0") == (("o", f"t{length}") if found else None)


def test_a_reader_with_more_inputs_than_its_twin_is_followed_past():
    """The result's Sum reads the renamed tensor as its second input; the original's Sum (the same
    node by name) has one input, so it names no counterpart there: the search goes on to the
    graph output."""
    original = local._Model(_model_bytes([helper.make_node("Sum", ["y"], ["z"], name="sum")],
                                         [("y", F, [2])], [("z", F, [2])]))
    result = local._Model(_model_bytes([helper.make_node("Sum", ["p", "renamed"], ["z"], name="sum")],
                                       [("p", F, [2]), ("renamed", F, [2])], [("z", F, [2])]))
    assert local._counterpart(original, result, "renamed") == ("z", "z")


@pytest.mark.parametrize("length, free", [(16, ["x"]), (17, ["x", "t17"])])
def test_a_data_input_computed_from_another_by_up_to_16_nodes_is_not_fed(length, free):
    m = local._Model(_model_bytes(_neg_chain(length) + [helper.make_node("Add", ["x", f"t{length}"], ["y"], name="add")],
                                  [("x", F, [2])], [("y", F, [2])]))
    site = SiteRecord("p", "k", "folded", ["add"], "d", output="y")
    assert local._pattern(m, m, site)[2] == free


def test_the_replacements_last_node_in_graph_order_writes_what_a_renamed_site_produces():
    """Site neg (output y, renamed away in the result) replaced by c1 then c2 (listed c2, c1): the
    last in graph order, c2, writes q, which relu reads where it read y. (c1's output p has two
    readers: from it no counterpart is found.)"""
    original = local._Model(_model_bytes([helper.make_node("Neg", ["x"], ["y"], name="neg"),
                                          helper.make_node("Relu", ["y"], ["z"], name="relu")],
                                         [("x", F, [2])], [("z", F, [2])]))
    result = local._Model(_model_bytes([helper.make_node("Abs", ["x"], ["p"], name="c1"),
                                        helper.make_node("Neg", ["p"], ["q"], name="c2"),
                                        helper.make_node("Sigmoid", ["p"], ["s"], name="side"),
                                        helper.make_node("Relu", ["q"], ["z"], name="relu")],
                                       [("x", F, [2])], [("z", F, [2]), ("s", F, [2])]))
    site = SiteRecord("p", "k", "folded", ["neg"], "d", output="y", created=["c2", "c1"])
    before, after, free, target, result_target = local._pattern(original, result, site)
    assert (target, result_target, free) == ("y", "q", ["x"])
    assert sorted(n.name for n in after.values()) == ["c1", "c2"]


def test_a_float32_site_computed_in_float16_is_judged_with_float16s_tolerance():
    """The pattern rounds x through float16 and back; its replacement does not: they differ by
    float16's rounding, within float16's tolerance, which the lowest float type on the pattern's
    paths sets (float32's would fail it)."""
    original = local._Model(_model_bytes([helper.make_node("Cast", ["x"], ["h"], name="down", to=TensorProto.FLOAT16),
                                          helper.make_node("Cast", ["h"], ["y"], name="up", to=F)],
                                         [("x", F, [2, 3])], [("y", F, [2, 3])]))
    result = local._Model(_model_bytes([helper.make_node("Identity", ["x"], ["y"], name="id")],
                                       [("x", F, [2, 3])], [("y", F, [2, 3])]))
    c = local.check_site(original, result, SiteRecord("p", "k", "folded", ["down", "up"], "d", output="y",
                                                      created=["id"]))
    assert (c.passed, c.rule, c.tolerance_dtype, c.dtype) == (True, "tolerance", "float16", "float32")
    assert (c.atol, c.rtol) == (1e-2, 1e-2) and c.max_rel_error > 1e-3  # ten times float32's rtol


def test_an_infinite_error_fails_without_being_rejudged():
    """log of a negative input is NaN where the original is finite: an infinite error, which no
    accuracy measure can excuse; the verdict stays the tolerance's."""
    original = local._Model(_model_bytes([helper.make_node("Neg", ["x"], ["y"], name="a")],
                                         [("x", F, [2, 3])], [("y", F, [2, 3])]))
    result = local._Model(_model_bytes([helper.make_node("Log", ["x"], ["y"], name="b")],
                                       [("x", F, [2, 3])], [("y", F, [2, 3])]))
    c = local.check_site(original, result, SiteRecord("p", "k", "folded", ["a"], "d", output="y", created=["b"]))
    assert (c.passed, c.rule, c.max_abs_error) == (False, "tolerance", float("inf"))


def test_failing_sites_of_equal_needed_atol_are_listed_by_their_error(monkeypatch):
    from normfold.report import OutputComparison

    model = _model_bytes([helper.make_node("Neg", ["x"], ["y"])], [("x", F, [2])], [("y", F, [2])])
    errors = {"a": 1.0, "b": 3.0, "c": 2.0}
    monkeypatch.setattr(local, "check_site", lambda original, result, site, *args: OutputComparison(
        site.id, "float32", [2], errors[site.output], 0.0, 0.0, 0.0, False, 0.5))
    sites = [SiteRecord("p", "k", "folded", ["n"], "d", output=name) for name in errors]
    v = local.verify_locally(model, model, sites)
    assert [c.name for c in v.sites] == ["main:b", "main:c", "main:a"]


def test_a_cut_whose_output_type_inference_did_not_find_declares_it_float():
    m = local._Model(_model_bytes([helper.make_node("Neg", ["x"], ["y"])], [("x", F, [2])], [("y", F, [2])]))
    del m.shapes["y"]
    neg = m.producer["y"]
    cut = onnx.load_from_string(m.cut({id(neg): neg}, "y", {"x": (F, [2])}))
    assert cut.graph.output[0].type.tensor_type.elem_type == F
