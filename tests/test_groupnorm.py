"""Decomposed GroupNorm -> GroupNormalization (opset 21), in the spellings exporters write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normfold
from builders import build, fold_and_compare, ops, run, sites
from normfold.api import FoldOptions, VerifyOptions
from normfold.verify import compare_arrays

MODELS = Path(__file__).parents[1] / "models"


def _affine(channels: int, seed: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(channels).astype(dtype), rng.standard_normal(channels).astype(dtype)


def torch_groupnorm(shape=(2, 8, 5, 5), groups=4, eps=1e-5, affine="both", restore="shape", opset=21,
                    dtype="float", batch=None, gamma=None, beta=None, in_scale=None, grouping=None,
                    extra="", extra_out="", seed=0):
    """The TorchScript / dynamo exporters' GroupNorm: Reshape -> InstanceNormalization -> Reshape -> Mul -> Add.
    `restore` is how the second Reshape gets X's shape: "shape" (Shape(X)) or "const"."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    rank, channels = len(shape), shape[1]
    dims = ",".join([batch or str(shape[0])] + [str(d) for d in shape[1:]])
    per_channel = (channels,) + (1,) * (rank - 2)
    g, b = _affine(channels, seed, np_dtype)
    consts = {"k": np.array(grouping or [0, groups, -1], np.int64),
              "ones": (np.ones(groups) if in_scale is None else in_scale).astype(np_dtype),
              "zeros": np.zeros(groups, np_dtype),
              "gamma": (g.reshape(per_channel) if gamma is None else gamma).astype(np_dtype),
              "beta": (b.reshape(per_channel) if beta is None else beta).astype(np_dtype)}
    if restore == "shape":
        shape_line = "s = Shape (x)"
    else:
        shape_line = ""
        consts["s"] = np.array(shape, np.int64)
    tail = {"both": "m = Mul (b, gamma)\n y = Add (m, beta)", "swapped": "m = Mul (gamma, b)\n y = Add (beta, m)",
            "scale": "y = Mul (b, gamma)", "bias": "y = Add (b, beta)", "none": "y = Identity (b)"}[affine]
    text = f"""g ({dtype}[{dims}] x) => ({dtype}[{dims}] y{extra_out}) {{
      r = Reshape (x, k)
      n = InstanceNormalization <epsilon={eps!r}> (r, ones, zeros)
      {shape_line}
      b = Reshape (n, s)
      {tail}
      {extra}
    }}"""
    used = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    return build(text, opset=opset, **{k: v for k, v in consts.items() if k in used})


def keras_groupnorm(shape=(1, 8, 4, 4), groups=4, eps=1e-3, flavour="keras3", center=True, scale=True,
                    axes_as_input=True, opset=21, transpose=True, batch=None, seed=0):
    """tf2onnx's Keras GroupNormalization on a channels-first X (N, C, *S): Transpose to channels-last,
    Reshape to (N, *S, G, C/G), moments over every axis but N and G, affine inside the grouped shape,
    Reshape back. flavour "keras3" (ReduceMean, Neg(mean)) or "tfkeras" (ReduceSum / n with the
    div_no_nan Equal/Where guard, Sub(beta, mean * g))."""
    rank, channels = len(shape), shape[1]
    last = [shape[0], *shape[2:], channels]
    grouped_rank = rank + 1
    axes = list(range(1, rank - 1)) + [rank]
    size = int(np.prod(shape[2:])) * (channels // groups)
    in_dims = ",".join([batch or str(shape[0])] + [str(d) for d in (shape[1:] if transpose else last[1:])])
    out_dims = ",".join([batch or str(shape[0])] + [str(d) for d in last[1:]])
    g, b = _affine(channels, seed)
    affine_shape = (1,) * (grouped_rank - 2) + (groups, channels // groups)
    consts = {"k1": np.array([-1, *shape[2:], groups, channels // groups], np.int64),
              "k2": np.array([-1, *last[1:]], np.int64), "eps": np.float32(eps),
              "gamma": g.reshape(affine_shape), "beta": b.reshape(affine_shape)}
    if axes_as_input:
        consts["ax"] = np.array(axes, np.int64)

    def reduce(op, out, inp):
        return f"{out} = {op} ({inp}, ax)" if axes_as_input else f"{out} = {op} <axes={axes}> ({inp})"

    perm = [0] + list(range(2, rank)) + [1]
    lines = [f"t = Transpose <perm={perm}> (x)" if transpose else "t = Identity (x)", "z = Reshape (t, k1)"]
    if flavour == "keras3":
        lines += [reduce("ReduceMean", "mean", "z"), "d = Sub (z, mean)", "sq = Mul (d, d)",
                  reduce("ReduceMean", "var", "sq")]
    else:
        consts["count"] = np.full((1,) * (grouped_rank - 2) + (groups, 1), size, np.float32)
        consts["zero"] = np.float32(0)
        lines += [reduce("ReduceSum", "sum", "z"), "q = Div (sum, count)", "nz = Equal (count, zero)",
                  "mean = Where (nz, zero, q)", "d = Sub (z, mean)", "sq = Mul (d, d)",
                  reduce("ReduceSum", "sum2", "sq"), "q2 = Div (sum2, count)", "var = Where (nz, zero, q2)"]
    lines += ["ve = Add (var, eps)", "sd = Sqrt (ve)", "r = Reciprocal (sd)" if scale else "gg = Reciprocal (sd)"]
    lines += ["gg = Mul (r, gamma)"] if scale else []
    lines.append("a = Mul (z, gg)")
    if flavour == "keras3":
        lines += ["ng = Neg (mean)", "bm = Mul (ng, gg)"]
        lines += ["s = Add (bm, beta)", "o = Add (a, s)"] if center else ["o = Add (a, bm)"]
    else:
        lines += ["bm = Mul (mean, gg)", "s = Sub (beta, bm)", "o = Add (a, s)"] if center else \
                 ["bm = Mul (mean, gg)", "o = Sub (a, bm)"]
    lines.append("y = Reshape (o, k2)")
    body = "\n      ".join(lines)
    text = f"""g (float[{in_dims}] x) => (float[{out_dims}] y) {{
      {body}
    }}"""
    used = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    return build(text, opset=opset, **{k: v for k, v in consts.items() if k in used})


def gn_sites(report, status=None, reason=None):
    return [s for s in sites(report, status, reason) if s.pass_name == "groupnorm"]


def only_groupnorm(model) -> onnx.NodeProto:
    [node] = [n for n in model.graph.node if n.op_type == "GroupNormalization"]
    return node


# ---- PyTorch spelling ----------------------------------------------------------------------------

@pytest.mark.parametrize("affine", ["both", "swapped", "scale", "bias", "none"])
@pytest.mark.parametrize("restore", ["shape", "const"])
def test_torch_spellings_fuse_into_one_groupnormalization(affine, restore):
    model = torch_groupnorm(affine=affine, restore=restore)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["GroupNormalization"] + (["Identity"] if affine == "none" else [])
    assert [s.status for s in report.sites] == ["fused"]
    node = only_groupnorm(folded)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_groups"] == 4 and attrs["stash_type"] == 1 and attrs["epsilon"] == pytest.approx(1e-5)


@pytest.mark.parametrize("shape, groups, gamma_shape", [
    ((2, 16, 12), 16, (16, 1)),         # Wav2Vec2: rank 3, one channel per group
    ((2, 6, 3, 4, 5), 3, (6, 1, 1, 1)),  # rank 5
    ((3, 8, 4, 4), 2, (1, 8, 1, 1)),     # gamma with a leading 1
    ((2, 8, 4, 4), 1, (8, 1, 1)),        # one group: LayerNorm over C, H, W
])
def test_torch_ranks_and_gamma_shapes(shape, groups, gamma_shape):
    g, b = _affine(shape[1], 7)
    model = torch_groupnorm(shape=shape, groups=groups, gamma=g.reshape(gamma_shape), beta=b.reshape(gamma_shape))
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["GroupNormalization"]


def test_fp16_fuses_and_matches():
    folded, _, _ = fold_and_compare(torch_groupnorm(dtype="float16"))
    assert ops(folded) == ["GroupNormalization"]
    assert folded.graph.initializer[-1].data_type == onnx.TensorProto.FLOAT16


def test_grouping_shape_with_the_batch_written_out():
    folded, _, _ = fold_and_compare(torch_groupnorm(grouping=[2, 4, -1], restore="const"), atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["GroupNormalization"]


@pytest.mark.parametrize("builder", [lambda: torch_groupnorm(batch="N"),
                                     lambda: keras_groupnorm(batch="N")], ids=["torch", "keras3"])
def test_dynamic_batch(builder):
    model = builder()
    folded, report = normfold.fold(model)
    assert "GroupNormalization" in ops(folded), report.to_text(verbose=True)
    onnx.checker.check_model(folded, full_check=True)
    dims = [3] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    feeds = {"x": np.random.default_rng(1).standard_normal(dims).astype(np.float32)}
    [expected], [got] = run(model, feeds), run(folded, feeds)
    assert compare_arrays("y", expected, got, 1e-5, 1e-5).passed


def test_target_opset_converts_then_fuses():
    folded, report, _ = fold_and_compare(torch_groupnorm(opset=13), atol=1e-5, rtol=1e-5, target_opset=21)
    assert ops(folded) == ["GroupNormalization"]
    assert (report.opset_before, report.opset_after) == (13, 21)


def test_gamma_along_the_last_axis_is_not_absorbed():
    model = torch_groupnorm(gamma=np.linspace(0.5, 2, 5).astype(np.float32))  # [W]: not a channel scale
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["GroupNormalization", "Mul", "Add"]
    assert [s.status for s in gn_sites(report)] == ["fused"]


# ---- Keras spellings (channels-last through tf2onnx) ---------------------------------------------

@pytest.mark.parametrize("flavour", ["keras3", "tfkeras"])
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False), (False, False)])
def test_keras_spellings_fuse_with_the_transpose_moved_after(flavour, center, scale):
    model = keras_groupnorm(flavour=flavour, center=center, scale=scale)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["GroupNormalization", "Transpose"]
    assert [s.status for s in report.sites] == ["fused"]
    assert folded.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("shape, groups", [((1, 6, 10), 3), ((2, 8, 2, 3, 4), 2)])
def test_keras_other_ranks(shape, groups):
    folded, _, _ = fold_and_compare(keras_groupnorm(shape=shape, groups=groups), atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["GroupNormalization", "Transpose"]


def test_keras_axes_attribute_converted_from_opset_13():
    model = keras_groupnorm(axes_as_input=False, opset=13)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, target_opset=21)
    assert ops(folded) == ["GroupNormalization", "Transpose"]


def test_keras_transpose_read_elsewhere_is_kept_and_a_new_one_added():
    model = keras_groupnorm()
    model.graph.output.append(onnx.helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [1, 4, 4, 8]))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Transpose", "GroupNormalization", "Transpose"]


def test_keras_without_a_transpose_from_nchw_is_left():
    model = keras_groupnorm(transpose=False)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = gn_sites(report)
    assert site.reason == "unsupported-axis" and "Transpose" in site.detail


# ---- Transposes between the grouped layouts (onnxruntime's transpose optimizer) ------------------

KERAS3_STEPS = [("mean", "ReduceMean ({0}, ax{L})", ["z"]), ("d", "Sub ({0}, {1})", ["z", "mean"]),
                ("sq", "Mul ({0}, {1})", ["d", "d"]), ("var", "ReduceMean ({0}, ax{L})", ["sq"]),
                ("ve", "Add ({0}, eps)", ["var"]), ("sd", "Sqrt ({0})", ["ve"]), ("r", "Reciprocal ({0})", ["sd"]),
                ("gg", "Mul ({0}, gamma{L})", ["r"]), ("a", "Mul ({0}, {1})", ["z", "gg"]),
                ("ng", "Neg ({0})", ["mean"]), ("bm", "Mul ({0}, {1})", ["ng", "gg"]),
                ("s", "Add ({0}, beta{L})", ["bm"]), ("o", "Add ({0}, {1})", ["a", "s"])]
TFKERAS_STEPS = [("sum", "ReduceSum ({0}, ax{L})", ["z"]), ("q", "Div ({0}, count{L})", ["sum"]),
                 ("mean", "Where (nz{L}, zero, {0})", ["q"]), ("d", "Sub ({0}, {1})", ["z", "mean"]),
                 ("sq", "Mul ({0}, {1})", ["d", "d"]), ("sum2", "ReduceSum ({0}, ax{L})", ["sq"]),
                 ("q2", "Div ({0}, count{L})", ["sum2"]), ("var", "Where (nz{L}, zero, {0})", ["q2"]),
                 ("ve", "Add ({0}, eps)", ["var"]), ("sd", "Sqrt ({0})", ["ve"]), ("r", "Reciprocal ({0})", ["sd"]),
                 ("gg", "Mul ({0}, gamma{L})", ["r"]), ("a", "Mul ({0}, {1})", ["z", "gg"]),
                 ("bm", "Mul ({0}, {1})", ["mean", "gg"]), ("s", "Sub (beta{L}, {0})", ["bm"]),
                 ("o", "Add ({0}, {1})", ["a", "s"])]


def moved_groupnorm(shape=(1, 8, 4, 4), groups=4, layouts=None, flavour="keras3", eps=1e-3, seed=0):
    """A Keras GroupNorm with its steps spread over the two grouped layouts, as onnxruntime's
    transpose optimizer leaves tf2onnx's: layout 0 is [N, G, C/G, *S], 1 is [N, *S, G, C/G].
    `layouts` maps a step's output (and "z", the grouping Reshape; "y", the final Reshape's input)
    to its layout; missing ones are 1 (tf2onnx's own spelling). z in layout 1 comes from a
    Transpose of X to channels-last; in layout 0 X is reshaped directly. A step reads each input
    in its own layout, through one shared Transpose per tensor and layout where they differ."""
    layouts = layouts or {}
    rank, channels = len(shape), shape[1]
    per_group, spatial, grouped_rank = channels // groups, list(shape[2:]), len(shape) + 1
    group_axis = {0: 1, 1: rank - 1}
    to_last = [0, *range(3, grouped_rank), 1, 2]
    swap = {0: to_last, 1: [to_last.index(i) for i in range(grouped_rank)]}
    g, b = _affine(channels, seed)
    consts = {"eps": np.float32(eps), "zero": np.float32(0)}
    for lay in (0, 1):
        affine_shape = [1] * grouped_rank
        affine_shape[group_axis[lay]:group_axis[lay] + 2] = [groups, per_group]
        consts[f"gamma{lay}"], consts[f"beta{lay}"] = g.reshape(affine_shape), b.reshape(affine_shape)
        consts[f"ax{lay}"] = np.array(list(range(2, grouped_rank)) if lay == 0 else [*range(1, rank - 1), rank])
        count_shape = [1] * grouped_rank
        count_shape[group_axis[lay]] = groups
        consts[f"count{lay}"] = np.full(count_shape, per_group * int(np.prod(spatial)), np.float32)
    layout_of, swapped, lines = {}, {}, []

    def read(tensor, lay):
        if layout_of[tensor] == lay:
            return tensor
        if (tensor, lay) not in swapped:
            name = swapped[tensor, lay] = f"{tensor}_t{lay}"
            lines.append(f"{name} = Transpose <perm={swap[layout_of[tensor]]}> ({tensor})")
        return swapped[tensor, lay]

    z_layout = layouts.get("z", 1)
    if z_layout == 1:
        consts["k1"] = np.array([-1, *spatial, groups, per_group])
        lines += [f"t = Transpose <perm={[0, *range(2, rank), 1]}> (x)", "z = Reshape (t, k1)"]
    else:
        consts["k1"] = np.array([-1, groups, per_group, *spatial])
        lines.append("z = Reshape (x, k1)")
    layout_of["z"] = z_layout
    for out, op, inputs in KERAS3_STEPS if flavour == "keras3" else TFKERAS_STEPS:
        lay = layouts.get(out, 1)
        if "nz{L}" in op and f"nz{lay}" not in layout_of:
            lines.append(f"nz{lay} = Equal (count{lay}, zero)")
            layout_of[f"nz{lay}"] = lay
        lines.append(f"{out} = " + op.format(*(read(i, lay) for i in inputs), L=lay))
        layout_of[out] = lay
    y_layout = layouts.get("y", 1)
    out_shape = [shape[0], *spatial, channels] if y_layout == 1 else list(shape)
    consts["k2"] = np.array([-1, *out_shape[1:]])
    lines.append(f"y = Reshape ({read('o', y_layout)}, k2)")
    body = "\n      ".join(lines)
    text = f"""g (float[{",".join(map(str, shape))}] x) => (float[{",".join(map(str, out_shape))}] y) {{
      {body}
    }}"""
    used = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    return build(text, opset=21, **{k: v for k, v in consts.items() if k in used})


# What onnxruntime's transpose optimizer wrote for tf2onnx's Keras 3 and tf_keras GroupNorms (1.32).
ORT_KERAS3 = {"z": 0, "mean": 0, "d": 0, "sq": 0, "var": 0}
ORT_TFKERAS = {"z": 0, "sum": 0}


@pytest.mark.parametrize("flavour, layouts", [("keras3", ORT_KERAS3), ("tfkeras", ORT_TFKERAS)])
def test_transposes_moved_into_the_moments_fuse(flavour, layouts):
    model = moved_groupnorm(flavour=flavour, layouts=layouts)
    assert ops(model).count("Transpose") == 3 if flavour == "keras3" else 2
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["GroupNormalization", "Transpose"], report.to_text(verbose=True)
    assert folded.graph.node[0].input[0] == "x"
    assert list(folded.graph.node[1].attribute[0].ints) == [0, 2, 3, 1]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 2), groups=st.integers(1, 3), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 3), min_size=1, max_size=3), flavour=st.sampled_from(["keras3", "tfkeras"]),
       seed=st.integers(0, 1000))
def test_groupnorm_fuses_with_any_mix_of_grouped_layouts(data, n, groups, per_group, spatial, flavour, seed):
    """Every step of the site in either grouped layout: one GroupNormalization, followed by a
    Transpose exactly when the site's output is channels-last, and the same numbers."""
    assume(per_group * int(np.prod(spatial)) > 1)  # see test_groupnorm_fuses_for_any_shape
    steps = [out for out, _, _ in (KERAS3_STEPS if flavour == "keras3" else TFKERAS_STEPS)]
    layouts = {name: data.draw(st.integers(0, 1), label=name) for name in ["z", *steps, "y"]}
    model = moved_groupnorm(shape=(n, groups * per_group, *spatial), groups=groups, layouts=layouts,
                            flavour=flavour, seed=seed)
    folded, report, _ = fold_and_compare(model, atol=1e-4, rtol=1e-4)
    expected = ["GroupNormalization"] + (["Transpose"] if layouts["y"] == 1 else [])
    assert ops(folded) == expected, report.to_text(verbose=True)


def test_a_transpose_inside_read_elsewhere_is_left():
    model = moved_groupnorm(layouts=ORT_KERAS3)
    model.graph.output.append(onnx.helper.make_tensor_value_info("z_t1", onnx.TensorProto.FLOAT, None))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = gn_sites(report)
    assert site.reason == "intermediate-used-elsewhere" and "z_t1" in site.detail


@pytest.mark.parametrize("shape", [(1, 6, 5), (1, 4, 2, 3, 2)])
def test_a_transpose_the_wrong_way_round_is_left(shape):
    """On ranks where the two swaps differ, a Transpose that is the inverse of the one the layout
    needs (shapes made to line up with equal dims) must not be taken as a layout swap."""
    model = moved_groupnorm(shape=shape, groups=2, layouts={"z": 0, "mean": 0, "d": 0})
    swap = next(n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] == "d")
    perm = list(swap.attribute[0].ints)
    inverse = [perm.index(i) for i in range(len(perm))]
    assert inverse != perm
    swap.attribute[0].ints[:] = inverse
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    # no norm at all any more: reported (under whichever family its moments resemble), never fused
    assert [s.status for s in report.sites] == ["left"], report.to_text(verbose=True)


def test_inputs_read_in_different_layouts_are_not_a_group_norm():
    """Sub(z in [N, *S, G, C/G], mean in [N, G, 1, 1, 1]) broadcasts when S[0] == G, but subtracts
    the wrong means: a step must read all its inputs in one layout."""
    model = moved_groupnorm(shape=(1, 4, 2, 3), groups=2, layouts={"mean": 0})
    sub = next(n for n in model.graph.node if n.op_type == "Sub")
    assert list(sub.input) == ["z", "mean_t1"]
    sub.input[1] = "mean"  # the Transpose stays: Neg still reads it
    onnx.checker.check_model(model, full_check=True)  # still a valid model, just not a GroupNorm
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert not gn_sites(report, "fused")


@pytest.mark.parametrize("name", ["keras3_groupnorm_op17.onnx", "tfkeras_groupnorm_op17.onnx"])
@pytest.mark.parametrize("level", ["basic", "extended"])
def test_corpus_groupnorm_after_onnxruntime_offline_optimization_fuses(name, level, tmp_path):
    """The real exports, saved by onnxruntime's offline optimizer (which moves the channels-last
    Transpose into the moments), then folded: every GroupNorm of the ground truth is fused."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(MODELS / "tf" / name), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "ort.onnx")
    assert any(n.op_type == "Transpose" and n.input[0].endswith(("moments/mean", "weighted_input_sum"))
               for n in optimized.graph.node), "onnxruntime no longer moves the Transpose into the moments"
    entry = manifest_entry("tf", name)
    report = normfold.fold_file(tmp_path / "ort.onnx", tmp_path / "out.onnx", options=FoldOptions(target_opset=21),
                                verify=VerifyOptions(shapes=shape_sets(entry)[0]))
    assert report.exit_code == 0 and report.verification.status == "passed", report.to_text()
    assert len(gn_sites(report, "fused")) == entry["ground_truth"]["groupnorm"] == 1
    assert not gn_sites(report, "left")


# ---- sites left with a reason --------------------------------------------------------------------

@pytest.mark.parametrize("opset", [13, 18, 20])
def test_old_opset_is_left_with_the_opset_that_would_allow_it(opset):
    model = torch_groupnorm(opset=opset)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = report.sites
    assert site.reason == "opset-too-old" and "--target-opset 21" in site.detail
    assert f"opset {opset}" in site.detail


def test_non_unit_instance_norm_scale_is_left():
    model = torch_groupnorm(in_scale=np.array([1, 2, 1, 1], np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert gn_sites(report, "left", "not-per-channel")


@pytest.mark.parametrize("extra, extra_out", [("z = Identity (n)", ", float[2,4,50] z"),
                                              ("z = Identity (r)", ", float[2,4,50] z")])
def test_intermediate_used_elsewhere_is_left(extra, extra_out):
    model = torch_groupnorm(extra=extra, extra_out=extra_out)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert gn_sites(report, "left", "intermediate-used-elsewhere")


def test_keras_intermediate_used_elsewhere_is_left():
    model = keras_groupnorm()
    model.graph.output.append(onnx.helper.make_tensor_value_info("var", onnx.TensorProto.FLOAT, None))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert gn_sites(report, "left", "intermediate-used-elsewhere")


def test_groups_that_do_not_split_the_channels_are_left():
    # 6 channels, 4 groups of 6 * 4 / 4 = 6 values each: groups straddle channels, not a GroupNorm
    model = torch_groupnorm(shape=(1, 6, 2, 2), groups=4, affine="none")
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    assert gn_sites(report, "left", "unsupported-axis")


def test_excluded_node_is_left():
    model = torch_groupnorm()
    inorm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    inorm.name = "gn/InstanceNormalization"
    folded, report = normfold.fold(model, normfold.FoldOptions(exclude_nodes=["gn/InstanceNormalization"]))
    assert ops(folded) == ops(model)
    assert gn_sites(report, "left", "excluded")


# ---- property test -------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), groups=st.integers(1, 4), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       eps=st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3]), spelling=st.sampled_from(["torch", "keras3", "tfkeras"]),
       seed=st.integers(0, 1000))
def test_groupnorm_fuses_for_any_shape(n, groups, per_group, spatial, eps, spelling, seed):
    shape = (n, groups * per_group, *spatial)
    # Keras computes x * g - mean * g with g = gamma / sqrt(var + eps): for a one-element group
    # (var = 0) both terms are ~gamma / sqrt(eps) and cancel, so the *original* loses every digit.
    assume(spelling == "torch" or per_group * int(np.prod(spatial)) > 1)
    if spelling == "torch":
        model = torch_groupnorm(shape=shape, groups=groups, eps=eps, seed=seed)
        expected = ["GroupNormalization"]
    else:
        model = keras_groupnorm(shape=shape, groups=groups, eps=eps, flavour=spelling, seed=seed)
        expected = ["GroupNormalization", "Transpose"]
    folded, report, _ = fold_and_compare(model, atol=1e-4, rtol=1e-4)
    assert ops(folded) == expected, report.to_text(verbose=True)


# ---- the committed corpus ------------------------------------------------------------------------

CORPUS = [("torch", "conv_groupnorm_op13.onnx"), ("torch", "conv_groupnorm_op18.onnx"),
          ("torch", "conv_groupnorm_dynamo_op18.onnx"), ("torch", "hf_wav2vec2_op14.onnx"),
          ("tf", "keras3_groupnorm_op13.onnx"), ("tf", "keras3_groupnorm_op17.onnx"),
          ("tf", "keras3_groupnorm_op18.onnx"), ("tf", "tfkeras_groupnorm_op17.onnx")]


def manifest_entry(folder: str, name: str) -> dict:
    entries = json.loads((MODELS / folder / "manifest.json").read_text())["models"]
    return next(e for e in entries if e["file"] == name)


def shape_sets(entry: dict) -> list[dict]:
    first = {name: spec["shape"] for name, spec in entry["inputs"].items()}
    return [first] + [check["shapes"] for check in entry.get("other_shape_checks", [])]


@pytest.mark.parametrize("folder, name", CORPUS, ids=[f"{f}/{n}" for f, n in CORPUS])
def test_corpus_groupnorms_fuse_at_opset_21(folder, name, tmp_path):
    entry = manifest_entry(folder, name)
    truth = entry["ground_truth"]["groupnorm"]
    for shapes in shape_sets(entry):
        report = normfold.fold_file(MODELS / folder / name, tmp_path / "out.onnx",
                                    options=FoldOptions(target_opset=21), verify=VerifyOptions(shapes=shapes))
        assert report.verification.status == "passed", report.to_text()
        assert report.exit_code == 0 and report.written
        assert len(gn_sites(report, "fused")) == truth, report.to_text(verbose=True)
        assert not gn_sites(report, "left")
        assert report.ops_after.get("GroupNormalization", 0) == truth
        assert report.ops_after.get("InstanceNormalization", 0) == 0
        assert max(o.max_abs_error for o in report.verification.outputs) < 1e-4
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)


@pytest.mark.parametrize("folder, name", CORPUS, ids=[f"{f}/{n}" for f, n in CORPUS])
def test_corpus_groupnorms_at_their_own_opset_are_left_as_too_old(folder, name):
    entry = manifest_entry(folder, name)
    folded, report = normfold.fold(onnx.load(MODELS / folder / name))
    left = gn_sites(report, "left", "opset-too-old")
    assert len(left) == len(gn_sites(report)) == entry["ground_truth"]["groupnorm"]
    assert all("--target-opset 21" in s.detail for s in left)
    assert "GroupNormalization" not in normfold.graph.count_ops(folded.graph)


def test_tf_keras_group_norm_after_another_tool_constant_folded_it(tmp_path):
    """onnxsim's constant folding turns tf_keras' div_no_nan guard Equal(n, 0) into a constant
    condition (here done by hand, as onnxsim does); the GroupNorm must still be recognised."""
    from onnx import numpy_helper

    model = onnx.load(Path(__file__).parents[1] / "models" / "tf" / "tfkeras_groupnorm_op17.onnx")
    equal = next(n for n in model.graph.node if n.op_type == "Equal")
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    folded_condition = np.equal(*(values[name] for name in equal.input))
    model.graph.node.remove(equal)
    model.graph.initializer.append(numpy_helper.from_array(folded_condition, equal.output[0]))
    onnx.save(model, tmp_path / "simplified.onnx")
    report = normfold.fold_file(tmp_path / "simplified.onnx", tmp_path / "out.onnx",
                                options=normfold.FoldOptions(target_opset=21))
    assert report.verification.status == "passed"
    assert report.ops_after.get("GroupNormalization") == 1


def test_instance_norm_without_an_epsilon_attribute_uses_its_default():
    """InstanceNormalization's epsilon defaults to 1e-5 when the attribute is absent (issue 13: a fold
    that took 0 there, or any other value, would still pass a loose check, not this one)."""
    model = torch_groupnorm(eps=1e-5)
    inorm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    del inorm.attribute[:]
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    [fused] = [n for n in folded.graph.node if n.op_type == "GroupNormalization"]
    assert [a.f for a in fused.attribute if a.name == "epsilon"] == [pytest.approx(1e-5)]


# ---- what the rewrite writes: names, the parameters' shape, the Transpose pair -------------------

def _name_anchor(model, name: str):
    """Give the grouped norm's first reduction (the site's anchor) a name: the new nodes' prefix."""
    [mean] = [n for n in model.graph.node if n.output[0] == "mean"]
    mean.name = name
    return model


@pytest.mark.parametrize("anchor, prefix", [("enc/blk/ReduceMean", "enc/blk"), ("mean_op", "mean_op"),
                                            ("", "GroupNorm")])
def test_the_new_nodes_and_parameters_are_named_after_the_anchor_s_scope(anchor, prefix):
    """An exporter's scope (everything before the last '/') names what replaces the site, so that
    the fused op is found where the decomposed one was; a name without a scope is the prefix itself."""
    folded, report, _ = fold_and_compare(_name_anchor(keras_groupnorm(), anchor), atol=1e-5, rtol=1e-5)
    gn, transpose = folded.graph.node
    assert (gn.name, transpose.name) == (f"{prefix}/GroupNormalization", f"{prefix}/Transpose")
    [site] = report.sites
    assert site.created == [gn.name, transpose.name]
    assert list(gn.input[1:]) == [f"{prefix}.scale", f"{prefix}.bias"]
    assert gn.output[0] == f"{prefix}/GroupNormalization_output_0" and list(transpose.input) == list(gn.output)


def test_the_scale_and_bias_are_per_channel_vectors_in_the_input_s_type():
    """GroupNormalization-21 takes scale and bias of shape [C] (not the grouped (G, C/G) layout the
    model multiplies in), channel = group * C/G + index."""
    model = keras_groupnorm(shape=(1, 8, 4, 4), groups=4)
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    gn = only_groupnorm(folded)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    source = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    scale, bias = init[gn.input[1]], init[gn.input[2]]
    assert scale.shape == bias.shape == (8,) and scale.dtype == bias.dtype == np.float32
    np.testing.assert_array_equal(scale, source["gamma"].reshape(-1))
    np.testing.assert_array_equal(bias, source["beta"].reshape(-1))


def test_a_channels_last_input_with_allow_transpose_is_wrapped_in_a_transpose_pair():
    """X already channels-last (no exporter Transpose to read through): --allow-transpose puts the
    channels at axis 1 in front of GroupNormalization and moves them back after it."""
    model = _name_anchor(keras_groupnorm(transpose=False), "blk/ReduceMean")
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, allow_transpose=True)
    # the builder's Identity in front of the Reshape is what the grouping splits: it stays
    assert ops(folded) == ["Identity", "Transpose", "GroupNormalization", "Transpose"]
    _, t_in, gn, t_out = folded.graph.node
    perm = [onnx.helper.get_attribute_value(a) for a in t_in.attribute if a.name == "perm"]
    assert list(t_in.input) == ["t"] and perm == [[0, 3, 1, 2]]
    assert t_in.name == "blk/Transpose_in" and t_in.output[0] == "blk/Transpose_in_output"
    assert gn.input[0] == t_in.output[0] and t_out.output[0] == "y"
    assert [s.status for s in gn_sites(report)] == ["fused"]


def test_the_report_says_what_replaced_the_site_and_its_rounding():
    folded, report, _ = fold_and_compare(keras_groupnorm(groups=4, eps=1e-3), atol=1e-5, rtol=1e-5)
    [site] = report.sites
    n = len(keras_groupnorm().graph.node) - 1  # all but the exporter's Transpose (it dies unread)
    assert site.detail == (f"{n} nodes fused into GroupNormalization (num_groups=4, epsilon=0.001), "
                           "then Transpose(perm=[0, 2, 3, 1]) to the layout the site produced")
    assert site.max_rounding == 0.0  # float32 gamma and beta, stored as they were


def test_the_fused_op_stands_where_the_site_s_last_node_stood():
    """A node of the model between the site's nodes keeps its place before the fused op (the
    graph's order is the model's, with the site replaced at its end)."""
    model = keras_groupnorm()
    side = onnx.helper.make_node("Relu", ["x"], ["side"], name="side")
    last = len(model.graph.node) - 1  # the Reshape back, the site's last node
    model.graph.node.insert(last, side)
    model.graph.output.append(onnx.helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [1, 8, 4, 4]))
    folded, _, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Relu", "GroupNormalization", "Transpose"]


# ---- a LayerNorm between two Reshapes is a GroupNorm only when Z splits the channels -------------
# Keras 3's normalization of z over the axes `ax` (its moments, then (z - mean) / sqrt(var + eps)) as
# ONNX text, for the grouped-Reshape graphs below.
MOMENTS_OF_Z = """mean = ReduceMean (z, ax)
      d = Sub (z, mean)
      sq = Mul (d, d)
      var = ReduceMean (sq, ax)
      ve = Add (var, eps)
      sd = Sqrt (ve)
      r = Reciprocal (sd)
      o = Mul (d, r)"""


def reshaped_layernorm(xshape, zshape, axes, out_cast: bool = False):
    """Z = Reshape(X, zshape); the Keras 3 moments over `axes` of Z; Reshape back to X's shape (with
    `out_cast`, a Cast to float16 before it)."""
    dims = ",".join(map(str, xshape))
    out_type = "float16" if out_cast else "float"
    tail = "o16 = Cast <to=10> (o)\n      y = Reshape (o16, k2)" if out_cast else "y = Reshape (o, k2)"
    text = f"""g (float[{dims}] x) => ({out_type}[{dims}] y) {{
      z = Reshape (x, k1)
      {MOMENTS_OF_Z}
      {tail}
    }}"""
    consts = {"k1": np.array(zshape, np.int64), "k2": np.array(xshape, np.int64), "ax": np.array(axes, np.int64),
              "eps": np.float32(1e-5)}
    model = build(text, opset=21, **consts)
    assert [d.dim_value for d in onnx.shape_inference.infer_shapes(model).graph.value_info[0].type.tensor_type
            .shape.dim] == list(zshape)
    return model


@pytest.mark.parametrize("xshape, zshape, axes", [
    ((8, 6), (2, 4, 6), [1, 2]),          # Z splits the batch, not a channel axis
    ((2, 6), (2, 6, 1), [1, 2]),          # the last axis "split" into (6, 1), the norm over both
    ((2, 6, 4), (2, 4, 3, 2), [2, 3]),    # the leading axes agree, but axis 1 is not split in two
    ((2, 3, 4), (3, 2, 2, 2), [1, 3]),    # Z's axes 2, 3 multiply to X's axis 2, but the axes before differ
])
def test_a_norm_over_a_reshape_that_does_not_split_the_channels_is_no_group_norm(xshape, zshape, axes):
    model = reshaped_layernorm(xshape, zshape, axes)
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert "GroupNormalization" not in ops(folded)
    assert not gn_sites(report) and [s.pass_name for s in report.sites] == ["layernorm"]


def test_a_group_norm_that_writes_another_type_than_it_reads_is_only_its_layernorm():
    """float32 in, a Cast to float16 inside the site: GroupNormalization reads and writes one type,
    so only the norm up to the Cast is fused (a LayerNorm over Z), the Cast and the Reshapes stay."""
    model = reshaped_layernorm((2, 8, 3), (2, 4, 2, 3), [2, 3], out_cast=True)
    folded, report, _ = fold_and_compare(model, atol=1e-3, rtol=1e-3)
    assert ops(folded) == ["Reshape", "LayerNormalization", "Cast", "Reshape"]
    assert not gn_sites(report)


def test_a_channels_last_graph_input_is_grouped_only_with_allow_transpose():
    """The grouping Reshape reads a graph input (no producer, no exporter Transpose): left without
    --allow-transpose, naming the input; wrapped in a Transpose pair with it."""
    model = keras_groupnorm(transpose=False)
    graph = model.graph
    [identity] = [n for n in graph.node if n.op_type == "Identity"]
    graph.node.remove(identity)
    [split] = [n for n in graph.node if n.output[0] == "z"]
    split.input[0] = "x"
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("unsupported-axis", "the GroupNorm groups the last axis of 'x', which no "
                                          "Transpose from a channels-first tensor puts there (--allow-transpose "
                                          "wraps GroupNormalization in a Transpose pair)")
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5, allow_transpose=True)
    assert ops(folded) == ["Transpose", "GroupNormalization", "Transpose"]


def test_a_group_norm_without_epsilon_is_left():
    """GroupNormalization divides by sqrt(var + epsilon): an epsilon of 0 is not written."""
    folded, report = normfold.fold(keras_groupnorm(eps=0.0))
    assert ops(folded) == ops(keras_groupnorm(eps=0.0))
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("invalid-statistics", "epsilon 0.0 is not positive")


def test_a_bfloat16_group_norm_is_left():
    """onnxruntime's CPU GroupNormalization-21 has no bfloat16 kernel."""
    model = reshaped_layernorm((2, 8, 3), (2, 4, 2, 3), [2, 3])
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    # no epsilon: the check of the type comes first (test_norms has bfloat16 norms with one)
    [add] = [n for n in model.graph.node if n.output[0] == "ve"]
    model.graph.node.remove(add)
    [sqrt] = [n for n in model.graph.node if n.output[0] == "sd"]
    sqrt.input[0] = "var"
    del model.graph.initializer[:]
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                                    (("k1", [2, 4, 2, 3]), ("k2", [2, 8, 3]), ("ax", [2, 3]))])
    onnx.checker.check_model(model, full_check=True)
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("unsupported-dtype", "'x' is BFLOAT16; the fused op is written only for "
                                                               "float32, float16 and float64")


def dynamic_grouping(first: str = "n", last: str = "h", back: str = "s") -> onnx.ModelProto:
    """X [N, 8, H] with both N and H dynamic, grouped by a Reshape whose target the graph computes
    from Shape(X) (first, 4, 2, last), normalized over (C/G, H), reshaped back to `back`."""
    text = f"""g (float[N,8,H] x) => (float[N,8,H] y) {{
      s = Shape (x)
      n = Slice (s, i0, i1)
      h = Slice (s, i2, i3)
      k1 = Concat <axis=0> ({first}, gc, {last})
      z = Reshape (x, k1)
      {MOMENTS_OF_Z}
      y = Reshape (o, {back})
    }}"""
    consts = dict(i0=np.array([0]), i1=np.array([1]), i2=np.array([2]), i3=np.array([3]), gc=np.array([4, 2]),
                  ax=np.array([2, 3]), eps=np.float32(1e-5), m1=np.array([-1]), zero=np.array([0]))
    words = set(text.replace("(", " ").replace(")", " ").replace(",", " ").split())
    return build(text, opset=21, **{k: v for k, v in consts.items() if k in words})


@pytest.mark.parametrize("first, last, back", [("n", "h", "s"), ("m1", "h", "s"), ("zero", "h", "s")])
def test_a_grouping_of_several_dynamic_dimensions_is_proven_from_the_shape_arithmetic(first, last, back):
    """N and H both dynamic: the Reshape targets name each size by the dimension of X it is
    (Shape(X) sliced, a -1 or a 0 for the batch), which proves Z splits only the channels."""
    model = dynamic_grouping(first, last, back)
    folded, report = normfold.fold(model)
    # a Slice of Shape(X) the builder's target does not use was dead in the model already: it stays
    assert [op for op in ops(folded) if op not in ("Shape", "Slice")] == ["GroupNormalization"], \
        report.to_text(verbose=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first, last", [("h", "n"), ("n", "n")])
def test_a_dynamic_grouping_that_moves_a_dimension_is_not_a_group_norm(first, last):
    model = dynamic_grouping(first, last)
    folded, report = normfold.fold(model)
    assert "GroupNormalization" not in ops(folded)
    assert [s.reason for s in gn_sites(report)] in ([], ["unknown-shape"]), report.to_text(verbose=True)


def test_a_rank_1_input_through_the_instance_norm_spelling_is_left_not_a_crash():
    """Reshape(X[16], [1, 2, -1]) -> InstanceNormalization -> Reshape(Shape(X)) -> Mul: the match asked
    whether the Mul constant is per channel of X before any check of X's rank, and X has no channel
    axis (an IndexError out of fold() before the fix)."""
    model = build("""g (float[16] x) => (float[16] y) {
      r = Reshape (x, k)
      n = InstanceNormalization (r, s, b)
      sh = Shape (x)
      bk = Reshape (n, sh)
      y = Mul (bk, c)
    }""", opset=21, k=np.array([1, 2, -1], np.int64), s=np.ones(2, np.float32), b=np.zeros(2, np.float32),
                  c=np.full(16, 2, np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = gn_sites(report)
    assert site.status == "left" and site.reason == "unknown-shape"
    assert site.detail == "'x' has rank 1; GroupNormalization needs (N, C, ...)"
    assert "Mul(y)" not in site.nodes  # not a per-channel constant: not part of the site


# ---- the PyTorch spelling's checks and rewrite, one at a time (groupnorm.py) ----------------------

def _torch_with(model, **changes):
    """Set initializers of a torch_groupnorm model (name -> array), without the checker: some of the
    cases below are shapes onnx's checker would have to run the graph to refute."""
    for name, value in changes.items():
        old = [t for t in model.graph.initializer if t.name == name]
        for t in old:
            model.graph.initializer.remove(t)
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    return model


@pytest.mark.parametrize("names, prefix", [({"r": "enc/blk/gn/Reshape"}, "enc/blk/gn"), ({"r": "gn_reshape"}, "gn_reshape"),
                                           ({}, "GroupNorm")])
def test_torch_groupnorm_is_named_after_its_first_reshape_and_stands_where_its_add_stood(names, prefix):
    model = torch_groupnorm(extra="u = Relu (x)", extra_out=", float[2,8,5,5] u")
    add = next(n for n in model.graph.node if n.op_type == "Add")
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.node.remove(relu)
    model.graph.node.insert(list(model.graph.node).index(add), relu)  # between the Mul and the Add
    for node in model.graph.node:
        node.name = names.get(node.output[0], "")
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Relu", "GroupNormalization"]
    gn = folded.graph.node[1]
    assert gn.name == f"{prefix}/GroupNormalization" and list(gn.input) == ["x", f"{prefix}.scale", f"{prefix}.bias"]
    [site] = gn_sites(report)
    assert site.kind == "GroupNorm (Reshape + InstanceNormalization)" and site.created == [gn.name]
    assert site.detail == "6 nodes fused into GroupNormalization (num_groups=4, epsilon=1e-05)"


@pytest.mark.parametrize("grouping, fused", [([2, 4, 50], True), ([0, 4, 50], True), ([-1, 4, 50], True),
                                             ([2, 4, 25], False), ([2, 4, -1, 1], False), ([-1, 4, -1], False),
                                             ([0, 0, -1], False), ([-1, 4, 25], False)])
def test_torch_grouping_shapes_written_out(grouping, fused):
    """[N, G, C/G * H * W] with any mix of the batch, 0 (copy it) and -1; a wrong count, rank, a
    second -1 or G of 0 are refused."""
    model = _torch_with(torch_groupnorm(), k=np.array(grouping, np.int64))
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    if fused:
        assert site.status == "fused" and ops(folded) == ["GroupNormalization"]
        return
    assert ops(folded) == ops(model) and site.reason == "unsupported-axis"
    if len(grouping) != 3 or grouping[1] <= 0:
        assert site.detail == f"Reshape(r): the grouping shape {grouping} is not a constant [N, G, -1]"
    else:
        assert site.detail == (f"Reshape(r): shape {grouping} does not group the channels of 'x' [2, 8, 5, 5] "
                               "as [N, 4, -1]")


def test_torch_grouping_shape_that_is_not_a_constant_is_left():
    model = torch_groupnorm()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "k"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [3]))
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("unsupported-axis",
                                          "Reshape(r): the grouping shape None is not a constant [N, G, -1]")


def test_torch_groups_that_do_not_split_the_channels_say_so():
    _, report = normfold.fold(torch_groupnorm(shape=(1, 6, 2, 2), groups=4, affine="none"))
    [site] = gn_sites(report)
    assert site.detail == ("4 groups do not split 6 channels evenly; the InstanceNormalization does not "
                           "normalize whole channels")


@pytest.mark.parametrize("restore, groups, fused", [
    ([2, 8, 5, 5], 4, True), ([0, 8, 5, 5], 4, True), ([0, 0, 5, 5], 8, True), ([0, 8, -1, 5], 4, True),
    ([2, 8, 25], 4, False), ([2, 8, 5, 5, 1], 4, False), ([2, 8, 5, 4], 4, False), ([0, 0, 5, 5], 4, False)])
def test_torch_restoring_shapes_written_out(restore, groups, fused):
    """The second Reshape's constant shape must give X's shape back: 0 copies the grouped tensor's
    dim, which is X's for the batch, and for the channels only with one channel per group."""
    model = torch_groupnorm(restore="const", groups=groups, affine="none")
    _torch_with(model, s=np.array(restore, np.int64))
    if not fused:
        model.graph.output[0].type.tensor_type.ClearField("shape")
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    if fused:
        assert site.status == "fused" and ops(folded) == ["GroupNormalization", "Identity"]
        return
    assert ops(folded) == ops(model) and site.reason == "unsupported-axis"
    assert site.detail == f"Reshape(b): the shape {restore} does not restore 'x' to [2, 8, 5, 5]"


def test_torch_restoring_shape_that_is_not_a_constant_is_left():
    model = torch_groupnorm(restore="const")
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "s"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [4]))
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("unsupported-axis",
                                          "Reshape(b): the shape ? does not restore 'x' to [2, 8, 5, 5]")


@pytest.mark.parametrize("shape, attrs, fused", [((2, 8, 5, 5), "start = 0", True), ((2, 8, 5, 5), "start = -4", True),
                                                 ((1, 8, 5, 5), "start = 1", False), ((2, 8, 5, 1), "end = 3", False),
                                                 ((2, 8, 5, 1), "end = -1", False)])
def test_torch_restoring_shape_of_part_of_x_is_left(shape, attrs, fused):
    """Reshape(., Shape<start/end>(X)) restores X only when it is all of X's shape."""
    model = torch_groupnorm(shape=shape, affine="none")
    shape_node = next(n for n in model.graph.node if n.op_type == "Shape")
    name, value = attrs.split(" = ")
    shape_node.attribute.append(onnx.helper.make_attribute(name, int(value)))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    model = onnx.helper.make_model(model.graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    if fused:
        assert site.status == "fused"
        return
    assert ops(folded) == ops(model) and site.reason == "unsupported-axis"
    assert site.detail == f"Reshape(b): the shape ? does not restore 'x' to {list(shape)}"


@pytest.mark.parametrize("allowzero, grouping, fused", [(1, [2, 4, 50], True), (1, [1, 4, 50], True),
                                                        (1, [0, 4, 50], False), (0, [0, 4, 50], True)])
def test_torch_grouping_with_allowzero_takes_a_zero_literally(allowzero, grouping, fused):
    """With allowzero=1 a 0 is a zero-sized dim, not a copy of the input's: refused."""
    shape = (grouping[0] or 2, 8, 5, 5)
    model = _torch_with(torch_groupnorm(shape=shape, affine="none"), k=np.array(grouping, np.int64))
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    reshape.attribute.append(onnx.helper.make_attribute("allowzero", allowzero))
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    assert (site.status == "fused") == fused


def _torch_checked(model):
    _, report = normfold.fold(model)
    [site] = gn_sites(report)
    return site.status, site.reason, site.detail


def test_torch_groupnorm_intermediate_used_elsewhere_says_which():
    model = torch_groupnorm(extra="z = Identity (n)", extra_out=", float[2,4,50] z")
    assert _torch_checked(model) == ("left", "intermediate-used-elsewhere",
                                     "'n' inside the GroupNorm is also used outside it")


@pytest.mark.parametrize("which", ["ones", "zeros"])
def test_torch_instance_norm_parameters_that_are_not_constants_are_left(which):
    model = torch_groupnorm()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == which))
    model.graph.input.append(onnx.helper.make_tensor_value_info(which, onnx.TensorProto.FLOAT, [4]))
    assert _torch_checked(model) == ("left", "non-constant-parameters",
                                     "InstanceNormalization(n): scale or bias is not a constant")


def test_torch_instance_norm_scale_that_is_not_ones_says_why():
    model = torch_groupnorm(in_scale=np.array([1, 2, 1, 1], np.float32))
    assert _torch_checked(model) == ("left", "not-per-channel",
                                     "InstanceNormalization(n): scale/bias are not ones/zeros; an affine map per "
                                     "group inside the groups cannot be written as a per-channel scale")


@pytest.mark.parametrize("dims, detail", [
    (None, "the rank of 'x' could not be inferred"),
    (["N", "C", 5, 5], "the channel count of 'x' could not be inferred"),
])
def test_torch_groupnorm_on_an_input_of_unknown_shape_is_left(dims, detail):
    model = torch_groupnorm()  # with a Mul and an Add: their constants cannot be told per channel either
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.ClearField("shape")
        if dims is not None:
            value.type.tensor_type.shape.CopyFrom(onnx.helper.make_tensor_type_proto(1, dims).tensor_type.shape)
    assert _torch_checked(model) == ("left", "unknown-shape", detail)


@pytest.mark.parametrize("elem_type, name", [(onnx.TensorProto.BFLOAT16, "BFLOAT16"), (onnx.TensorProto.INT32, "INT32")])
def test_torch_groupnorm_of_a_type_onnxruntime_has_no_kernel_for_is_left(elem_type, name):
    model = torch_groupnorm(affine="none")
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = elem_type
    assert _torch_checked(model) == ("left", "unsupported-dtype",
                                     f"'x' is {name}; the fused op is written only for float32, float16 and float64 "
                                     "(what onnxruntime's CPU kernel verifies)")


@pytest.mark.parametrize("eps", [0.0, -0.5, float("inf")])
def test_torch_groupnorm_with_an_epsilon_that_is_not_positive_and_finite_is_left(eps):
    model = torch_groupnorm()
    inorm = next(n for n in model.graph.node if n.op_type == "InstanceNormalization")
    del inorm.attribute[:]
    inorm.attribute.append(onnx.helper.make_attribute("epsilon", eps))
    assert _torch_checked(model) == ("left", "invalid-statistics", f"epsilon {eps} is not positive")


def test_torch_groupnorm_site_lists_the_shape_of_x_it_removes():
    folded, report, _ = fold_and_compare(torch_groupnorm(), atol=1e-5, rtol=1e-5)
    assert gn_sites(report)[0].nodes == ["Reshape(r)", "InstanceNormalization(n)", "Shape(s)", "Reshape(b)",
                                         "Mul(m)", "Add(y)"]


def test_an_instance_norm_that_reads_the_reshape_as_its_scale_is_no_group_norm():
    model = build("""g (float[2,4,6] z, float[4] sc) => (float[2,4,6] y) {
      r = Reshape (sc, k)
      n = InstanceNormalization (z, r, b)
      zs = Shape (z)
      y = Reshape (n, zs)
    }""", opset=21, k=np.array([4], np.int64), b=np.zeros(4, np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and report.sites == []


@pytest.mark.parametrize("grouping", [np.array([0., 4., -1.], np.float32), np.array([[0, 4, -1]], np.int64)])
def test_torch_grouping_shape_that_is_no_int_vector_is_left(grouping):
    model = _torch_with(torch_groupnorm(), k=grouping)
    assert _torch_checked(model) == ("left", "unsupported-axis",
                                     "Reshape(r): the grouping shape None is not a constant [N, G, -1]")


def _grouped(xdims: str, k1, k2, axes, ydims: str | None = None) -> onnx.ModelProto:
    """Z = Reshape(X, k1); the Keras 3 moments over `axes` of Z, o = (z - mean) / sd; Reshape(o, k2)."""
    text = f"""g (float[{xdims}] x) => (float[{ydims or xdims}] y) {{
      z = Reshape (x, k1)
      {MOMENTS_OF_Z}
      y = Reshape (o, k2)
    }}"""
    return build(text, opset=21, k1=np.array(k1, np.int64), k2=np.array(k2, np.int64), ax=np.array(axes, np.int64),
                 eps=np.float32(1e-5))


@pytest.mark.parametrize("what", ["gamma", "beta"])
def test_a_group_norm_whose_affine_varies_along_the_spatial_axis_is_left_with_its_shape(what):
    """Keras 3's GroupNorm (gamma and beta inside the grouped shape (N, H, W, G, C/G)) with one of
    them varying along H too: no [C] vector can hold it. Left under the groupnorm pass, all its nodes."""
    model = keras_groupnorm()
    [init] = [t for t in model.graph.initializer if t.name == what]
    c = np.random.default_rng(3).standard_normal((4, 1, 4, 2)).astype(np.float32)
    init.CopyFrom(onnx.numpy_helper.from_array(c, what))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("not-per-channel", f"the GroupNorm's {what} of shape [4, 1, 4, 2] varies "
                                                             "along axes other than the channels")
    # the norm's nodes from Z on (the grouping Reshapes and the exporter's Transpose are not the norm's)
    assert len(site.nodes) == len(model.graph.node) - 3 and site.nodes[0] == "ReduceMean(mean)"


def test_a_group_norm_reshaped_back_into_another_layout_is_left():
    """Z (2, 4, 2, 3) of X (2, 8, 3), reshaped back to (2, 3, 8): not X's layout."""
    folded, report = normfold.fold(_grouped("2,8,3", [2, 4, 2, 3], [2, 3, 8], [2, 3], ydims="2,3,8"))
    assert "GroupNormalization" not in ops(folded)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("unsupported-axis", "Reshape(y) does not give back the grouped tensor's layout")


def test_a_grouping_of_several_dynamic_dimensions_it_cannot_resolve_is_left_unknown_shape():
    """X (N, H, 8) grouped into (N, H, 4, 2) by 0s, reshaped back by 0s too: a 0 of the second
    Reshape copies a dimension of the norm's output, not of X, so the grouping is not proven."""
    folded, report = normfold.fold(_grouped("N,H,8", [0, 0, 4, 2], [0, 0, 8], [1, 3]), normfold.FoldOptions(
        allow_transpose=True))
    assert "GroupNormalization" not in ops(folded)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("unknown-shape", "Reshape(z) groups 'x' [?, ?, 8], a tensor with several "
                                          "dynamic dimensions; normfold cannot prove it splits only the channels")


def test_torch_groupnorm_on_an_input_of_unknown_type_is_left():
    """X written by an op of another domain, with a shape but no type in the model's value_info."""
    model = torch_groupnorm(affine="none")
    for node in model.graph.node:
        node.input[:] = ["x2" if i == "x" else i for i in node.input]
    model.graph.node.insert(0, onnx.helper.make_node("Foo", ["x"], ["x2"], domain="custom"))
    model.opset_import.append(onnx.helper.make_opsetid("custom", 1))
    info = onnx.ValueInfoProto(name="x2")
    info.type.tensor_type.shape.CopyFrom(onnx.helper.make_tensor_type_proto(1, [2, 8, 5, 5]).tensor_type.shape)
    model.graph.value_info.append(info)
    assert _torch_checked(model) == ("left", "unsupported-dtype",
                                     "'x2' is unknown; the fused op is written only for float32, float16 and float64 "
                                     "(what onnxruntime's CPU kernel verifies)")


def test_an_instance_norm_fed_by_another_op_than_a_reshape_is_no_group_norm():
    model = build("""g (float[2,4,6] x) => (float[2,4,6] y) {
      m = Mul (x, c)
      n = InstanceNormalization (m, s, b)
      xs = Shape (x)
      y = Reshape (n, xs)
    }""", opset=21, c=np.full((4, 1), 2, np.float32), s=np.ones(4, np.float32), b=np.zeros(4, np.float32))
    folded, report = normfold.fold(model)
    assert ops(folded) == ops(model) and report.sites == []


# ---- which grouped readings are proven, and from which shapes (norms._grouped, _grouping_dims) -----
RMS_OF_Z = """sq = Mul (z, z)
      var = ReduceMean (sq, ax)
      ve = Add (var, eps)
      sd = Sqrt (ve)
      r = Reciprocal (sd)
      o = Mul (z, r)"""


def test_an_rmsnorm_over_a_grouped_view_is_no_group_norm():
    """GroupNorm subtracts the groups' means: an RMSNorm between the grouping Reshapes stays an
    RMSNorm over the grouped tensor."""
    text = f"""g (float[2,8,3] x) => (float[2,8,3] y) {{
      z = Reshape (x, k1)
      {RMS_OF_Z}
      y = Reshape (o, k2)
    }}"""
    model = build(text, opset=23, k1=np.array([2, 4, 2, 3]), k2=np.array([2, 8, 3]), ax=np.array([2, 3]),
                  eps=np.float32(1e-5))
    folded, report, _ = fold_and_compare(model, atol=1e-5, rtol=1e-5)
    assert ops(folded) == ["Reshape", "RMSNormalization", "Reshape"]
    assert [(s.pass_name, s.status) for s in report.sites] == [("rmsnorm", "fused")]


def test_a_grouping_with_one_dynamic_size_is_checked_on_the_inferred_shapes():
    """X [2, 8, H] grouped by [2, 4, 2, -1] and back by [2, 8, -1]: one unknown size, which the equal
    element counts make equal, so shape inference's dimensions prove the grouping (the -1s, not in
    front, are nothing the shape arithmetic could name)."""
    model = _grouped("2,8,H", [2, 4, 2, -1], [2, 8, -1], [2, 3])
    folded, report = normfold.fold(model)
    assert ops(folded) == ["GroupNormalization"], report.to_text(verbose=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 5)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def channels_last_dynamic_grouping(gc=(4, 2), allowzero: int = 0) -> onnx.ModelProto:
    """X [N, H, 8] grouped into (N, H, 4, 2) by a target computed from Shape(X), normalized over
    (H, C/G), reshaped back by Shape(X)."""
    text = f"""g (float[N,H,8] x) => (float[N,H,8] y) {{
      s = Shape (x)
      n = Slice (s, i0, i1)
      h = Slice (s, i1, i2)
      k1 = Concat <axis=0> (n, h, gc)
      z = Reshape <allowzero={allowzero}> (x, k1)
      {MOMENTS_OF_Z}
      y = Reshape (o, s)
    }}"""
    return build(text, opset=21, i0=np.array([0]), i1=np.array([1]), i2=np.array([2]), gc=np.array(gc),
                 ax=np.array([1, 3]), eps=np.float32(1e-5))


def test_a_channels_last_grouping_of_several_dynamic_sizes_is_proven_from_the_shape_arithmetic():
    """N and H dynamic, the channels last: the target names N and H by X's own dimensions, so the
    grouping is proven (G and C/G static, the norm over H and C/G); it needs --allow-transpose."""
    model = channels_last_dynamic_grouping()
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    assert (site.reason, site.detail) == ("unsupported-axis", "the GroupNorm groups the last axis of 'x', which no "
                                          "Transpose from a channels-first tensor puts there (--allow-transpose "
                                          "wraps GroupNormalization in a Transpose pair)")
    folded, report = normfold.fold(model, normfold.FoldOptions(allow_transpose=True))
    assert ops(folded) == ["Transpose", "GroupNormalization", "Transpose"], report.to_text(verbose=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_literal_zero_size_in_a_grouping_is_no_copy_of_a_dimension():
    """allowzero=1 and a 0 past X's rank: a zero size, not a dimension of X (nothing the grouping
    could be proven from): no GroupNorm, and no claim about dynamic sizes either."""
    folded, report = normfold.fold(channels_last_dynamic_grouping(gc=(4, 0), allowzero=1),
                                   normfold.FoldOptions(allow_transpose=True))
    assert "GroupNormalization" not in ops(folded)
    assert not gn_sites(report)


def _without_x_shape(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return model


def _reshaped_by_an_input(which: str, axes=(2, 3)) -> onnx.ModelProto:
    """The grouping (`which` = "split") or the Reshape back ("merge") to a target that is a graph
    input of unknown length (the output's shape not declared either)."""
    text = f"""g (float[2,8,3] x, int64[K] kin) => (float[2,8,3] y) {{
      z = Reshape (x, {'kin' if which == 'split' else 'k1'})
      {MOMENTS_OF_Z}
      y = Reshape (o, {'k2' if which == 'split' else 'kin'})
    }}"""
    model = build(text, opset=21, k1=np.array([2, 4, 2, 3]), k2=np.array([2, 8, 3]), ax=np.array(axes),
                  eps=np.float32(1e-5))
    if which == "merge":
        model.graph.output[0].type.tensor_type.ClearField("shape")
    return model


@pytest.mark.parametrize("model, site", [
    (lambda: _without_x_shape(_grouped("2,8,3", [2, 4, 2, 3], [2, 8, 3], [2, 3])),
     ("layernorm", "fused", None, "8 nodes fused into LayerNormalization (axis=-2, epsilon=1e-05)")),
    (lambda: _reshaped_by_an_input("merge"),
     ("layernorm", "fused", None, "8 nodes fused into LayerNormalization (axis=-2, epsilon=1e-05)")),
    (lambda: _grouped("2,8,3", [2, 4, 2, 3], [2, 24], [2, 3], ydims="2,24"),
     ("layernorm", "fused", None, "8 nodes fused into LayerNormalization (axis=-2, epsilon=1e-05)")),
    (lambda: _grouped("2,8,3", [2, 4, 6], [2, 8, 3], [2]),
     ("layernorm", "fused", None, "8 nodes fused into LayerNormalization (axis=-1, epsilon=1e-05)")),
    (lambda: _reshaped_by_an_input("split", axes=(-2, -1)),
     ("layernorm", "left", "unknown-shape", "the size of the normalized axes could not be inferred")),
], ids=["x-shape-unknown", "output-rank-unknown", "merged-to-another-rank", "grouped-without-a-new-axis",
        "grouped-rank-unknown"])
def test_a_grouping_whose_shapes_do_not_line_up_is_only_a_norm_of_the_grouped_tensor(model, site):
    """X's shape unknown, Z or the output of unknown rank, Z not one axis more than X, the output not
    X's rank: no GroupNorm is proven; what is left is the norm over Z (fused between the Reshapes
    where its axes are known)."""
    folded, report = normfold.fold(model())
    assert "GroupNormalization" not in ops(folded)
    [found] = report.sites
    assert (found.pass_name, found.status, found.reason, found.detail) == site


def test_a_dynamic_grouping_by_a_target_nothing_computes_is_no_group_norm():
    """N and H dynamic, the grouping target a graph input: nothing names its entries, so nothing is
    proven; the norm over Z is left for its unknown sizes."""
    text = f"""g (float[N,8,H] x, int64[4] kin) => (float[N,8,H] y) {{
      s = Shape (x)
      z = Reshape (x, kin)
      {MOMENTS_OF_Z}
      y = Reshape (o, s)
    }}"""
    folded, report = normfold.fold(build(text, opset=21, ax=np.array([2, 3]), eps=np.float32(1e-5)))
    assert "GroupNormalization" not in ops(folded)
    [site] = report.sites
    assert (site.pass_name, site.reason, site.detail) == ("layernorm", "unknown-shape",
                                                          "the size of the normalized axes could not be inferred")


def test_a_dynamic_grouping_that_puts_another_size_first_is_not_proven():
    """(H, 4, 2, H) for X (N, 8, H): the first entry is not X's first dimension (valid only if N
    equals H), so the grouping is not proven."""
    folded, report = normfold.fold(dynamic_grouping("h", "h"))
    assert "GroupNormalization" not in ops(folded)
    [site] = report.sites
    assert (site.pass_name, site.reason) == ("layernorm", "unknown-shape")


@pytest.mark.parametrize("restore, grouping, detail", [
    ("shape", [1, 4, -1], "Reshape(r): shape [1, 4, -1] does not group the channels of 'x' [?, 8, 5, 5] as [N, 4, -1]"),
    ("const", [0, 4, -1], "Reshape(b): the shape [2, 8, 5, 5] does not restore 'x' to [?, 8, 5, 5]")])
def test_a_dynamic_batch_is_shown_as_a_question_mark_in_a_refusal(restore, grouping, detail):
    """A refusal names X's shape as a report writes shapes: the dynamic batch is ?, not Python's None."""
    model = torch_groupnorm(batch="N", grouping=grouping, restore=restore)
    folded, report = normfold.fold(model)
    [site] = gn_sites(report)
    assert ops(folded) == ops(model) and site.reason == "unsupported-axis"
    assert site.detail == detail
