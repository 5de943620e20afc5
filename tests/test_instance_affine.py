"""A per-channel Mul/Add after InstanceNormalization (what onnxsim/onnxslim leave of a one-channel-
per-group GroupNorm) goes into the op's scale and bias."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st

import normfold
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
