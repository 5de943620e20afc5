"""The accuracy rule: judge a candidate by how far both models are from the original run in float64.

A fixed tolerance cannot tell a correct fold from a wrong one at every depth and magnitude: a deep
CNN with realistic BatchNorm statistics, folded exactly, differs from its original by 1e-4 to 1e-3
at outputs of magnitude 100, because both are float32 computations that round in different places.
Measured against the exact result, the folded model is as accurate as the original.

So when an output fails `|candidate - original| <= atol + rtol * |original|` under *default*
tolerances (explicit --atol/--rtol always win), the original is run again with float64 arithmetic
(`to_float64`: every float tensor, type and Cast target upcast; onnxruntime where it has double
kernels, else onnx's reference evaluator with a vectorised Conv) on the same inputs, and

    candidate_error = max |candidate - original64|,  original_error = max |original - original64|
    pass  <=>  candidate_error <= ACCURACY_FACTOR * original_error + ACCURACY_ULPS * ulp(scale)

where scale = max |original64| and ulp is the epsilon of the output's tolerance dtype (the lowest
precision on its paths) times that scale. A wrong epsilon or a dropped bias makes the candidate
far less accurate than the original and still fails.

When no float64 run is possible (a custom op, or not enough memory for the upcast copy), the rule
falls back to scaling atol with the output's magnitude: |c - o| <= atol * max(1, max|o|) + rtol*|o|.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from normfold.errors import VerificationUnavailable, one_line
from normfold.report import OutputComparison, Verification

ACCURACY_FACTOR = 2.0
ACCURACY_ULPS = 4.0
SOURCE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
EPSILON = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
# Standard ops whose integer attribute names an output element type (CastLike takes its type from
# an input, which is upcast itself).
DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
               "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype",
               "DequantizeLinear": "output_dtype"}
FLOAT64_MEMORY_FACTOR = 6.0  # the float64 copy is up to 4x a 16-bit model's bytes, plus a session
MEMORY_FRACTION = 0.6


# ---------------------------------------------------------------- the float64 model

def _tensor(t: TensorProto) -> None:
    if t.data_type in SOURCE_TYPES:
        new = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)
        new.doc_string = t.doc_string
        t.CopyFrom(new)


def _type(tp: onnx.TypeProto) -> None:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(tp, kind)
        if inner.elem_type in SOURCE_TYPES:
            inner.elem_type = TensorProto.DOUBLE
    elif kind in ("sequence_type", "optional_type"):
        _type(getattr(tp, kind).elem_type)
    elif kind == "map_type":
        _type(tp.map_type.value_type)


def _node(n: onnx.NodeProto) -> None:
    dtype_attr = DTYPE_ATTRS.get(n.op_type) if n.domain in ("", "ai.onnx") else None
    for a in list(n.attribute):
        if a.type == AttributeProto.TENSOR:
            _tensor(a.t)
        elif a.type == AttributeProto.TENSORS:
            for t in a.tensors:
                _tensor(t)
        elif a.type == AttributeProto.SPARSE_TENSOR:
            _tensor(a.sparse_tensor.values)
        elif a.type == AttributeProto.GRAPH:
            _graph(a.g)
        elif a.type == AttributeProto.GRAPHS:
            for g in a.graphs:
                _graph(g)
        elif a.type == AttributeProto.TYPE_PROTO:
            _type(a.tp)
        elif a.type == AttributeProto.INT and a.name == dtype_attr and a.i in SOURCE_TYPES:
            a.i = TensorProto.DOUBLE
    if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
        for a in list(n.attribute):  # value_float(s) make a float32 tensor: make it a double one
            if a.name in ("value_float", "value_floats"):
                value = np.array(a.f if a.name == "value_float" else list(a.floats), np.float64)
                n.attribute.remove(a)
                n.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(value)))


def _graph(g: onnx.GraphProto) -> None:
    for t in g.initializer:
        _tensor(t)
    for s in g.sparse_initializer:
        _tensor(s.values)
    for vi in (*g.input, *g.output):
        _type(vi.type)
    del g.value_info[:]  # re-inferred; a stale float32 annotation would contradict the upcast
    for n in g.node:
        _node(n)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64: every float32/float16/bfloat16 initializer, constant,
    graph input/output type and Cast (or other dtype attribute) target becomes double, also in
    If/Loop/Scan bodies and local functions. Needs the tensor data in memory."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _graph(copy.graph)
    for f in copy.functions:
        for vi in f.value_info:
            _type(vi.type)
        for n in f.node:
            _node(n)
    return copy


# ---------------------------------------------------------------- running it

def _evaluator_ops():
    """A float64 Conv for onnx's reference evaluator, vectorised (sliding windows and one einsum per
    call) instead of its per-position loops; onnxruntime's CPU provider has no double Conv."""
    from onnx.reference.op_run import OpRun

    class Conv(OpRun):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            return (_conv(X, W, B, auto_pad, dilations, group, pads, strides),)

    class BatchNormalization(OpRun):
        """Inference mode, whatever the opset: onnx's evaluator applies `momentum` (which it fills
        in by default) at opsets 9-13, computing batch statistics."""

        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None, spatial=None,
                 is_test=None):
            shape = (-1,) + (1,) * (x.ndim - 2)
            eps = 1e-5 if epsilon is None else epsilon
            y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
            return (y.astype(x.dtype),)

    return [Conv, BatchNormalization]


def _conv(X, W, B, auto_pad, dilations, group, pads, strides) -> np.ndarray:
    """ONNX Conv (attributes as the evaluator passes them, None when absent) as one einsum over the
    input's windows, per group."""
    rank = X.ndim - 2
    dilations = list(dilations or [1] * rank)
    strides = list(strides or [1] * rank)
    group = group or 1
    windows = _conv_windows(X, list(W.shape[2:]), auto_pad, dilations, pads, strides)  # [N, C, *out, *kernel]
    n, c = X.shape[:2]
    m = W.shape[0]
    out_shape = windows.shape[2:2 + rank]
    letters = "hijk"[:rank]
    kletters = "pqrs"[:rank]
    grouped = windows.reshape((n, group, c // group) + windows.shape[2:])
    weights = W.reshape((group, m // group) + W.shape[1:])
    y = np.einsum(f"ngc{letters}{kletters},gmc{kletters}->ngm{letters}", grouped, weights, optimize=True)
    y = y.reshape((n, m) + tuple(out_shape))
    if B is not None:
        y = y + B.reshape((1, m) + (1,) * rank)
    return y.astype(X.dtype)


def _conv_windows(X, kernel: list[int], auto_pad, dilations: list[int], pads, strides: list[int]) -> np.ndarray:
    """A view of the padded input: for each output position, the dilated kernel's window of it."""
    rank = X.ndim - 2
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max(0, (-(-size // s) - 1) * s + e - size) for size, s, e in zip(X.shape[2:], strides, extent)]
        small = [t // 2 for t in total]
        begin = small if auto_pad == "SAME_UPPER" else [t - s for t, s in zip(total, small)]
        pads = begin + [t - b for t, b in zip(total, begin)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * rank)
    pads = list(pads or [0] * (2 * rank))
    x = np.pad(X, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    windows = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + rank)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    return windows[index]


def _run_float64(reference, feeds: list[dict[str, np.ndarray]], names: list[str]) -> tuple[list[dict], str]:
    """The float64 original's `names` on every batch, and what ran it."""
    from normfold.shapes import infer_shapes
    from normfold.verify import open_session

    if isinstance(reference, bytes):
        proto = onnx.load_from_string(reference)
    else:
        proto = onnx.load(os.fspath(reference))
    shapes = infer_shapes(proto)
    present = {o.name for o in proto.graph.output}
    up = to_float64(proto)
    del proto
    for name in names:
        if name not in present and name in shapes:
            elem = shapes[name][0]
            up.graph.output.append(onnx.helper.make_tensor_value_info(
                name, TensorProto.DOUBLE if elem in SOURCE_TYPES else elem, None))
    wide = [{k: v.astype(np.float64) if (np.issubdtype(v.dtype, np.floating) or str(v.dtype) == "bfloat16") else v
             for k, v in f.items()} for f in feeds]
    try:
        session = open_session(up.SerializeToString(), "float64 original")
        return [dict(zip(names, session.session.run(names, f))) for f in wide], "onnxruntime"
    except Exception as exc:  # noqa: BLE001 - no double kernel for some op: the evaluator has them all
        first = exc
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(up, new_ops=_evaluator_ops())
        return [dict(zip(names, (np.asarray(v) for v in evaluator.run(names, f)))) for f in wide], "onnx.reference"
    except Exception as exc:  # noqa: BLE001
        raise VerificationUnavailable(f"no float64 run of the original: onnxruntime: {one_line(first, 150)}; "
                                      f"onnx.reference: {one_line(exc, 150)}") from None


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_float64(reference, feeds: list[dict[str, np.ndarray]], names: list[str]) -> tuple[list[dict], str]:
    """`_run_float64`, refused when the upcast copy would not fit in memory; in a child process for
    large models (see normfold.verify.isolated)."""
    from normfold.verify import ISOLATE_BYTES, isolated, model_bytes

    size = model_bytes(reference)
    available = _available_memory()
    if available is not None and size * FLOAT64_MEMORY_FACTOR > MEMORY_FRACTION * available:
        raise VerificationUnavailable(f"a float64 copy of the original would need about "
                                      f"{size * FLOAT64_MEMORY_FACTOR / 2**30:.1f} GiB")
    if size > ISOLATE_BYTES:
        return isolated(_run_float64, (reference, feeds, names), "float64 original")
    return _run_float64(reference, feeds, names)


# ---------------------------------------------------------------- the rule

def judge_by_accuracy(result: Verification, reference, ref_run, got_run, atols: dict, rtols: dict) -> None:
    """Re-judge, in place, every float comparison of `result` that failed under default tolerances."""
    explicit = {name for name in ref_run.output_names + ref_run.exposed
                if atols.get(name if name in ref_run.output_names else None, atols.get(None)) is not None
                or rtols.get(name if name in ref_run.output_names else None, rtols.get(None)) is not None}
    targets = [c for c in result.outputs + result.sites
               if not c.passed and c.rule == "tolerance" and c.tolerance_dtype and c.name not in explicit
               and all(c.name in out for out in got_run.outputs)
               and all(out[c.name].shape == ref_run.outputs[0][c.name].shape for out in got_run.outputs[:1])]
    if not targets:
        return
    try:
        exact, engine = run_float64(reference, ref_run.feeds, [c.name for c in targets])
    except VerificationUnavailable as exc:
        result.notes.append(f"output magnitude scales atol ({exc})")
        exact, engine = None, ""
    else:
        result.notes.append(f"judged by accuracy against the original run in float64 ({engine})")
    for c in targets:
        refs = [out[c.name] for out in ref_run.outputs]
        gots = [out[c.name] for out in got_run.outputs]
        if exact is None:
            _by_magnitude(c, refs, gots)
        else:
            _by_accuracy(c, refs, gots, [e[c.name] for e in exact])


def _by_accuracy(c: OutputComparison, refs, gots, exact) -> None:
    from normfold.verify import _differences

    e_orig = e_cand = scale = 0.0
    for r, g, x in zip(refs, gots, exact):
        x = np.asarray(x, np.float64)
        d_orig, s = _differences(x, r.astype(np.float64))
        d_cand, _ = _differences(x, g.astype(np.float64))
        if d_orig.size:
            e_orig, e_cand, scale = max(e_orig, float(d_orig.max())), max(e_cand, float(d_cand.max())), max(scale, float(s.max()))
    allowed = ACCURACY_FACTOR * e_orig + ACCURACY_ULPS * EPSILON.get(c.tolerance_dtype, EPSILON["float32"]) * scale
    # A reference that the original itself misses by more than the magnitude bound is not trusted
    # (an evaluator bug would otherwise excuse any candidate): the magnitude rule decides then. The
    # accuracy rule is never looser than that bound either.
    bound = c.atol * max(1.0, scale) + c.rtol * scale
    within = _by_magnitude(dataclasses.replace(c), refs, gots)
    if e_orig > bound:
        _by_magnitude(c, refs, gots)
        return
    c.rule, c.original_error, c.candidate_error, c.allowed_error = "accuracy", e_orig, e_cand, allowed
    c.passed = bool(e_cand <= allowed) and within


def _by_magnitude(c: OutputComparison, refs, gots) -> bool:
    from normfold.verify import _differences

    scale = max((float(_differences(r, r)[1].max()) for r in refs if r.size), default=0.0)
    atol = c.atol * max(1.0, scale)
    passed = True
    for r, g in zip(refs, gots):
        diff, s = _differences(r, g)
        passed = passed and bool(np.all(diff <= atol + c.rtol * s))
    c.rule, c.atol, c.passed = "magnitude", atol, passed
    return passed
