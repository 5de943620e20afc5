"""A per-channel Mul/Add after InstanceNormalization (what onnxsim/onnxslim leave of a one-channel-
per-group GroupNorm) goes into the op's scale and bias."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normfold
from normfold.passes import FoldContext, run_rules
from normfold.passes.instance_affine import InstanceNormAffine
from normfold.shapes import infer_shapes
from builders import build, fold_and_compare, ops, sites

MODELS = Path(__file__).parents[1] / "models"


def instance_then_affine(shape=(2, 4, 6), tail="both", reshape=False, dtype="float", seed=0, const_shape=None):
    rng = np.random.default_rng(seed)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    channels, rank = shape[1], len(shape)
    per_channel = const_shape or (channels,) + (1,) * (rank - 2)
    dims = ",".join(map(str, shape))
    lines = ["n = InstanceNormalization <epsilon=1e-5> (x, s, b)"]
    last = "n"
    if reshape:
        lines += ["xs = Shape (x)", "nr = Reshape (n, xs)"]
        last = "nr"
    if tail in ("both", "mul"):
        lines.append(f"m = Mul ({last}, gamma)")
        last = "m"
    if tail in ("both", "add"):
        lines.append(f"a = Add ({last}, beta)")
        last = "a"
    lines.append(f"y = Identity ({last})")
    body = "\n      ".join(lines)
    text = f"""g ({dtype}[{dims}] x) => ({dtype}[{dims}] y) {{
      {body}
    }}"""
    consts = {"s": rng.standard_normal(channels).astype(np_dtype), "b": rng.standard_normal(channels).astype(np_dtype),
              "gamma": rng.standard_normal(per_channel).astype(np_dtype),
              "beta": rng.standard_normal(per_channel).astype(np_dtype)}
    used = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    return build(text, opset=13, **{k: v for k, v in consts.items() if k in used})


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(2, 4, 6), (1, 3, 5, 4), (2, 2, 3, 2, 2)]), tail=st.sampled_from(["both", "mul", "add"]),
       reshape=st.booleans(), dtype=st.sampled_from(["float", "float16"]), seed=st.integers(0, 1000))
def test_affine_after_instance_norm_is_absorbed(shape, tail, reshape, dtype, seed):
    model = instance_then_affine(shape, tail, reshape, dtype, seed)
    tol = 1e-2 if dtype == "float16" else 1e-5
    folded, report, _ = fold_and_compare(model, atol=tol, rtol=tol, scaled_atol=dtype == "float16")
    assert ops(folded) == ["InstanceNormalization", "Identity"], report.to_text(verbose=True)
    [site] = report.sites
    assert site.status == "fused" and site.pass_name == "groupnorm"


def test_a_constant_along_another_axis_is_left():
    model = instance_then_affine(tail="mul", const_shape=(6,))  # broadcasts along the last axis, not the channels
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert sites(report, "left", "not-per-channel")


def test_wav2vec2_group_norm_after_a_simplifier_dropped_its_first_reshape(tmp_path):
    """onnxsim removes the Reshape(X, [0, C, -1]) of wav2vec2's one-channel-per-group GroupNorm (it is
    the identity on [N, C, L]); done by hand here. The Mul/Add after it go into the InstanceNormalization."""
    model = onnx.load(MODELS / "torch" / "hf_wav2vec2_op14.onnx")
    inorm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    first = next(n for n in model.graph.node if n.output[0] == inorm.input[0])
    assert first.op_type == "Reshape"
    inorm.input[0] = first.input[0]
    model.graph.node.remove(first)
    onnx.save(model, tmp_path / "simplified.onnx")
    report = normfold.fold_file(tmp_path / "simplified.onnx", tmp_path / "out.onnx",
                                verify=normfold.VerifyOptions(shapes={"input_values": [1, 400]}))
    assert report.exit_code == 0 and report.verification.status == "passed", report.to_text()
    [site] = [s for s in report.sites if s.pass_name == "groupnorm"]
    assert site.status == "fused" and "identity Reshape" in site.detail
    # Shape, Reshape, Mul and Add gone, and the two Constants of the old scale and bias; nothing else
    # changes at the model's opset 14
    gone = {op: n - report.ops_after.get(op, 0) for op, n in report.ops_before.items() if n != report.ops_after.get(op, 0)}
    assert gone == {"Shape": 1, "Reshape": 1, "Mul": 1, "Add": 1, "Constant": 2}


KIND = "InstanceNormalization with a per-channel Mul/Add after it"


@pytest.mark.parametrize("tail, reshape, absorbed", [
    ("both", True, "Mul(m) and Add(a)"), ("both", False, "Mul(m) and Add(a)"), ("mul", False, "Mul(m)"),
    ("add", True, "Add(a)"),
])
def test_the_report_names_the_site_its_nodes_in_graph_order_and_what_was_absorbed(tail, reshape, absorbed):
    model = instance_then_affine(tail=tail, reshape=reshape)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    [site] = report.sites
    # the unnamed op now writes the site's output, and is labelled by it in the report
    now = f"InstanceNormalization({'a' if tail != 'mul' else 'm'})"
    assert site.kind == KIND and site.created == [now] and site.output == now[-2]
    # the Shape of X is written after the InstanceNormalization in the graph, and found after its Reshape
    expected_nodes = (["InstanceNormalization(n)"] + (["Shape(xs)", "Reshape(nr)"] if reshape else [])
                      + [f"{op}({out})" for op, out in (("Mul", "m"), ("Add", "a")) if tail in ("both", op.lower())])
    assert site.nodes == expected_nodes
    removed = " (the identity Reshape to X's shape removed)" if reshape else ""
    assert site.detail == f"{absorbed} absorbed into {now}'s scale and bias{removed}"


@pytest.mark.parametrize("name, prefix", [("", "InstanceNormalization"), ("enc/in0", "enc/in0")])
def test_the_new_scale_and_bias_are_named_after_the_instance_norm(name, prefix):
    model = instance_then_affine()
    model.graph.node[0].name = name
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert list(folded.graph.node[0].input) == ["x", f"{prefix}.scale", f"{prefix}.bias"]


@pytest.mark.parametrize("const_shape", [(1,), (1, 1), ()])
def test_one_constant_for_every_channel_is_absorbed(const_shape):
    folded, report, _ = fold_and_compare(instance_then_affine(const_shape=const_shape), atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["InstanceNormalization", "Identity"] and report.sites[0].status == "fused"


def test_a_constant_along_another_axis_is_left_and_says_why():
    model = instance_then_affine(tail="mul", const_shape=(6,))
    _, report = normfold.fold(model)
    [site] = report.sites
    assert site.reason == "not-per-channel" and site.kind == KIND
    assert site.detail == ("Mul constant of shape [6] does not broadcast along the 4 channels of "
                           "InstanceNormalization(n) only")


def test_an_instance_norm_scale_of_the_wrong_length_is_left():
    """A scale of one value for four channels (onnx's checker accepts it): the absorbed scale would
    have four, a different op; the site stays as it was."""
    model = instance_then_affine(tail="mul")
    scale = next(t for t in model.graph.initializer if t.name == "s")
    scale.CopyFrom(onnx.numpy_helper.from_array(np.ones(1, np.float32), "s"))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and [s.reason for s in report.sites] == ["not-per-channel"]


@pytest.mark.parametrize("which", ["s", "b"])
def test_a_scale_or_bias_that_is_not_a_constant_is_left(which):
    model = instance_then_affine()
    init = next(t for t in model.graph.initializer if t.name == which)
    model.graph.initializer.remove(init)
    model.graph.input.append(onnx.helper.make_tensor_value_info(which, onnx.TensorProto.FLOAT, [4]))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.status, site.reason) == ("left", "non-constant-parameters")
    assert site.detail == "InstanceNormalization(n): scale or bias is not a constant"


def test_an_input_of_unknown_rank_is_left():
    model = instance_then_affine()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.ClearField("shape")
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("unknown-shape", "the rank of 'x' could not be inferred")


def test_an_absorbed_scale_that_overflows_float16_is_left_without_a_warning():
    model = instance_then_affine(tail="mul", dtype="float16")
    for t in model.graph.initializer:
        if t.name in ("s", "gamma"):
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(t).shape, 1000, np.float16),
                                                    t.name))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning in the cast is expected and silenced
        folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert (site.reason, site.detail) == ("invalid-statistics",
                                          "the absorbed scale or bias of InstanceNormalization(n) overflows float16")
    # fold() runs the passes under np.errstate(all="ignore"); the rule is quiet on its own too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [record] = run_rules(model.graph, [InstanceNormAffine()], FoldContext(opset=13), infer_shapes(model))
    assert record.reason == "invalid-statistics"


TAILS = {
    "graph output": ("float[2,4,6] y, float[2,4,6] n", "y = Mul (n, gamma)"),
    "read twice": ("float[2,4,6] y", "m = Mul (n, gamma)\n      y = Add (m, n)"),
    "not a constant": ("float[2,4,6] y", "y = Mul (n, x)"),
}


@pytest.mark.parametrize("case", TAILS)
def test_no_site_where_the_norm_s_output_has_no_constant_tail_of_its_own(case):
    outputs, tail = TAILS[case]
    model = build(f"""g (float[2,4,6] x) => ({outputs}) {{
      n = InstanceNormalization (x, s, b)
      {tail}
    }}""", s=np.ones(4, np.float32), b=np.zeros(4, np.float32), gamma=np.full((4, 1), 2, np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and report.sites == []


def test_a_single_input_reshape_of_opset_4_is_no_identity_reshape():
    """Reshape-1 takes its shape as an attribute: no second input to read."""
    model = build("""g (float[2,4,6] x) => (float[2,4,6] y) {
      n = InstanceNormalization (x, s, b)
      r = Reshape <shape=[2,4,6]> (n)
      y = Mul (r, c)
    }""", opset=4, s=np.ones(4, np.float32), b=np.zeros(4, np.float32), c=np.ones((4, 1), np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and report.sites == []


@pytest.mark.parametrize("shape, attrs", [((1, 4, 6), "start = 1"), ((1, 4, 6), "start = -2"),
                                          ((2, 4, 6, 1), "end = 3"), ((2, 4, 6, 1), "end = -1")])
def test_a_reshape_to_part_of_x_s_shape_is_no_identity(shape, attrs):
    """Reshape(IN(X), Shape<start/end>(X)) drops axes: it stays, and so do the Mul and Add after it."""
    dims = ",".join(map(str, shape))
    out = ",".join(map(str, shape[1:] if "start" in attrs else shape[:-1]))
    model = build(f"""g (float[{dims}] x) => (float[{out}] y) {{
      n = InstanceNormalization (x, s, b)
      xs = Shape <{attrs}> (x)
      r = Reshape (n, xs)
      y = Mul (r, c)
    }}""", opset=15, s=np.ones(4, np.float32), b=np.zeros(4, np.float32), c=np.full((4, 1), 2, np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and report.sites == []


def test_a_shape_of_x_read_elsewhere_stays_and_is_not_part_of_the_site():
    model = build("""g (float[2,4,6] x) => (float[2,4,6] y, int64[3] shp) {
      n = InstanceNormalization (x, s, b)
      xs = Shape (x)
      r = Reshape (n, xs)
      y = Mul (r, c)
      shp = Identity (xs)
    }""", s=np.ones(4, np.float32), b=np.zeros(4, np.float32), c=np.full((4, 1), 2, np.float32))
    folded, report, _ = fold_and_compare(model, atol=1e-6, rtol=1e-6)
    assert ops(folded) == ["InstanceNormalization", "Shape", "Identity"]
    assert report.sites[0].nodes == ["InstanceNormalization(n)", "Reshape(r)", "Mul(y)"]


def test_a_grouping_reshape_kept_before_the_norm_does_not_stop_the_absorption():
    """Reshape(X, [0, G, -1]) -> InstanceNormalization -> Mul -> Add, the GroupNorm spelling with its
    second Reshape dropped: groupnorm.py needs that Reshape, and the constants act on the grouped
    tensor's channels, so they go into the InstanceNormalization (they were left, without a site)."""
    rng = np.random.default_rng(3)
    model = build("""g (float[2,4,3,5] x) => (float[2,2,30] y) {
      r = Reshape (x, k)
      n = InstanceNormalization (r, s, b)
      m = Mul (n, gamma)
      y = Add (m, beta)
    }""", k=np.array([0, 2, -1], np.int64), s=np.ones(2, np.float32), b=np.zeros(2, np.float32),
                  gamma=rng.standard_normal((2, 1)).astype(np.float32), beta=rng.standard_normal((2, 1)).astype(np.float32))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Reshape", "InstanceNormalization"]
    assert [(s.pass_name, s.status) for s in report.sites] == [("groupnorm", "fused")]
