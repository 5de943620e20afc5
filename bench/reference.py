"""Accuracy of 16-bit float models against a float32 reference (used by bench/peers.py).

`max_abs_diff` in peers.py compares a tool's output with the ORIGINAL model. On a float16 model that
measures agreement with the original's own rounding: a decomposed fp16 LayerNorm (mean and
difference in fp16) and the fused LayerNormalization (computed in fp32 inside onnxruntime) differ
by a few fp16 ulps although the fused one is the more accurate. So here both the original and a
candidate are measured against the same model run in float32: `upcast_model` turns every
float16/bfloat16 tensor, type and cast target into float32, and `Reference.error` gives a model's
max abs error against that upcast original on the same seeded inputs.

    /work/venvs/peers/bin/python bench/reference.py [--check] MODEL.onnx [CANDIDATE.onnx]
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from normfold.verify import compare_arrays, make_inputs, open_session

HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
STANDARD_DOMAINS = ("", "ai.onnx")
# Standard ops whose integer attribute names an output element type. A float16 target must become
# FLOAT too, or the upcast graph would mix float and float16 and fail type checking.
# (CastLike needs nothing: its target type comes from an input, which is upcast itself.)
DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
               "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype",
               "DequantizeLinear": "output_dtype"}
MANTISSA_BITS = {"float16": 10, "bfloat16": 7}


# ---------------------------------------------------------------- upcasting

class _Upcaster:
    """Walks every place of a model that can hold a 16-bit float element type: counts them and,
    with `apply`, rewrites them to float32 in place. One walker serves both the cheap check
    (`has_16bit_float`, no copy of a 400 MB model) and the rewrite, so the two cannot disagree."""

    def __init__(self, apply: bool):
        self.apply = apply
        self.count = 0

    def tensor(self, t: TensorProto) -> None:
        if t.data_type not in HALF_TYPES:
            return
        self.count += 1
        if self.apply:
            # Exact: every fp16/bf16 value is representable in fp32. from_array re-encodes the data
            # (fp16 is stored as bits in int32_data or raw_data, not as float values).
            new = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
            new.doc_string = t.doc_string
            t.CopyFrom(new)

    def sparse(self, s: onnx.SparseTensorProto) -> None:
        self.tensor(s.values)  # indices are int64; only the values carry the float type

    def type_proto(self, tp: onnx.TypeProto) -> None:
        kind = tp.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            inner = getattr(tp, kind)
            if inner.elem_type in HALF_TYPES:
                self.count += 1
                if self.apply:
                    inner.elem_type = TensorProto.FLOAT
        elif kind in ("sequence_type", "optional_type"):
            self.type_proto(getattr(tp, kind).elem_type)
        elif kind == "map_type":
            self.type_proto(tp.map_type.value_type)

    def node(self, n: onnx.NodeProto) -> None:
        dtype_attr = DTYPE_ATTRS.get(n.op_type) if n.domain in STANDARD_DOMAINS else None
        for a in n.attribute:
            if a.type == AttributeProto.TENSOR:  # Constant value, ConstantOfShape value, ...
                self.tensor(a.t)
            elif a.type == AttributeProto.TENSORS:
                for t in a.tensors:
                    self.tensor(t)
            elif a.type == AttributeProto.SPARSE_TENSOR:
                self.sparse(a.sparse_tensor)
            elif a.type == AttributeProto.SPARSE_TENSORS:
                for s in a.sparse_tensors:
                    self.sparse(s)
            elif a.type == AttributeProto.GRAPH:  # If/Loop/Scan bodies
                self.graph(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    self.graph(g)
            elif a.type == AttributeProto.TYPE_PROTO:
                self.type_proto(a.tp)
            elif a.type == AttributeProto.TYPE_PROTOS:
                for tp in a.type_protos:
                    self.type_proto(tp)
            elif a.type == AttributeProto.INT and a.name == dtype_attr and a.i in HALF_TYPES:
                self.count += 1
                if self.apply:
                    a.i = TensorProto.FLOAT

    def graph(self, g: onnx.GraphProto) -> None:
        for t in g.initializer:
            self.tensor(t)
        for s in g.sparse_initializer:
            self.sparse(s)
        for vi in (*g.input, *g.output, *g.value_info):
            self.type_proto(vi.type)
        for n in g.node:
            self.node(n)

    def model(self, m: onnx.ModelProto) -> None:
        self.graph(m.graph)
        for f in m.functions:  # model-local functions may cast to float16 in their bodies
            for vi in f.value_info:
                self.type_proto(vi.type)
            for n in f.node:
                self.node(n)


def has_16bit_float(model: onnx.ModelProto) -> bool:
    """Whether any tensor, type or cast target of the model is float16 or bfloat16. Reads only
    metadata, so a model loaded with load_external_data=False will do."""
    walker = _Upcaster(apply=False)
    walker.model(model)
    return walker.count > 0


def upcast_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which every float16/bfloat16 tensor is float32: initializers and
    Constant/ConstantOfShape (any tensor-valued) attributes, also in If/Loop/Scan bodies and local
    functions; graph input/output/value_info element types; Cast `to` (and other dtype attributes)
    targeting a 16-bit float. Needs the tensor data in memory (onnx.load's default)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _Upcaster(apply=True).model(copy)
    return copy


# ---------------------------------------------------------------- measuring against the reference

def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or str(a.dtype) == "bfloat16"


def _ulp(magnitude: float, dtype: str) -> float:
    """Spacing of the 16-bit float type at `magnitude` (its smallest subnormal at 0)."""
    bits = MANTISSA_BITS[dtype]
    min_exp = -14 if dtype == "float16" else -126  # smallest normal exponent
    if not math.isfinite(magnitude) or magnitude <= 0:
        return 2.0 ** (min_exp - bits)
    exp = max(math.frexp(magnitude)[1] - 1, min_exp)  # floor(log2(magnitude)), normal range
    return 2.0 ** (exp - bits)


@dataclass
class Reference:
    """The float32 reference of one 16-bit model: seeded inputs (in the original's dtypes) and the
    upcast original's outputs on them."""

    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    half_dtype: str  # "float16" or "bfloat16": the type whose ulp `ulp` measures
    scale: float  # max |reference| over the float outputs
    ulp: float  # one `half_dtype` ulp at `scale`: the slack of peers.py's "worse than original" rule

    def error(self, model: str | bytes, label: str = "candidate") -> float:
        """Max abs error (float64) of the model's float outputs against the reference, over all
        outputs; run like normfold verifies (ORT_DISABLE_ALL, 1 thread). A NaN/Inf on one side only,
        a missing output or a shape change counts as inf."""
        session = open_session(model, label, "disabled")
        names = [o.name for o in session.session.get_outputs()]
        got = dict(zip(names, session.session.run(names, self.feeds)))
        worst = 0.0
        for name, ref in self.outputs.items():
            if name not in got:
                return math.inf
            # Both sides as float64 so compare_arrays (normfold's NaN/Inf rules) accepts the mix of
            # fp32 reference and fp16 output.
            cmp = compare_arrays(name, ref.astype(np.float64), got[name].astype(np.float64))
            worst = max(worst, cmp.max_abs_error)
        return worst


    def spec_error(self, model: str) -> float:
        """As `error`, but run by onnx's reference evaluator, where every op rounds to the type the
        model declares for its output (as a runtime with native 16-bit kernels does). onnxruntime's
        CPU provider instead runs 16-bit ops that lack a kernel of that type (ReduceMean, Sub, Pow,
        ...) in float32 and drops the casts between them, so there a decomposed fp16 norm is
        effectively computed in float32. Raises when the evaluator cannot run the model."""
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(model)
        names = [o.name for o in proto.graph.output]
        got = dict(zip(names, ReferenceEvaluator(proto).run(None, self.feeds)))
        worst = 0.0
        for name, ref in self.outputs.items():
            if name not in got:
                return math.inf
            cmp = compare_arrays(name, ref.astype(np.float64), np.asarray(got[name]).astype(np.float64))
            worst = max(worst, cmp.max_abs_error)
        return worst


def make_reference(original: str, shapes: dict[str, list[int]] | None = None, seed: int = 0) -> Reference:
    """Inputs from normfold's own generator for the ORIGINAL (as compare_models makes them, so the
    figures sit beside peers.py's max_abs_diff), and the upcast original's outputs on them."""
    orig = open_session(original, "original", "disabled")
    feeds = make_inputs(orig, seed, shapes)
    bf16_out = any(o.type == "tensor(bfloat16)" for o in orig.session.get_outputs())
    del orig
    upcast = open_session(upcast_model(onnx.load(original)).SerializeToString(), "upcast original", "disabled")
    ref_feeds = {}
    for spec in upcast.session.get_inputs():  # fp16/bf16 inputs became float: feed the same values as fp32
        value = feeds[spec.name]
        ref_feeds[spec.name] = value.astype(np.float32) if spec.type == "tensor(float)" and _is_float(value) else value
    names = [o.name for o in upcast.session.get_outputs()]
    outputs = {n: v for n, v in zip(names, upcast.session.run(names, ref_feeds)) if _is_float(v)}
    scale = max((float(np.nanmax(np.abs(np.where(np.isfinite(v), v, 0)))) for v in outputs.values() if v.size),
                default=0.0)
    # A model with bf16 outputs is judged in bf16 ulps; otherwise in fp16 ulps (also when the fp16
    # is internal only, as in Keras mixed-precision models with fp32 outputs).
    half_dtype = "bfloat16" if bf16_out else "float16"
    return Reference(feeds, outputs, half_dtype, scale, _ulp(scale, half_dtype))


def reference_error(original_path: str, candidate_path: str, shapes: dict[str, list[int]] | None = None,
                    reference: Reference | None = None) -> dict:
    """Max abs error of the original and of the candidate against the float32 reference (pass
    `reference` to reuse one across candidates of the same original)."""
    ref = reference or make_reference(original_path, shapes)
    return {"original": ref.error(original_path, "original"), "candidate": ref.error(candidate_path),
            "scale": ref.scale, "ulp": ref.ulp, "half_dtype": ref.half_dtype}


def check_upcast(path: str) -> str:
    """onnx.checker (full, with shape inference) and an onnxruntime load of the upcast model."""
    up = upcast_model(onnx.load(path))
    if has_16bit_float(up):
        raise AssertionError("16-bit float left after upcast")
    onnx.checker.check_model(up, full_check=True)
    open_session(up.SerializeToString(), "upcast", "disabled")
    return "ok"


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--check":
        for p in args[1:]:
            print(p, check_upcast(p))
    elif args:
        print(reference_error(args[0], args[-1]))
    else:
        print(__doc__)
