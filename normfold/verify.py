"""Run two models in onnxruntime on the same seeded inputs and compare every output.

The reference runs with graph optimizations disabled: onnxruntime fuses decomposed LayerNorm
itself at higher levels, which would hide a difference between the models.

Pass rule, per element: |candidate - reference| <= atol + rtol * |reference|. NaN equals NaN at
the same place; a NaN or Inf that only one side has is a mismatch. Integer and bool outputs must be
equal. Default tolerances depend on the output dtype (DEFAULT_TOLERANCES).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from normfold.errors import NormfoldError, VerificationUnavailable
from normfold.report import OutputComparison, Verification

DEFAULT_TOLERANCES = {  # dtype -> (atol, rtol)
    "float64": (1e-7, 1e-7),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (6e-2, 6e-2),
}
DEFAULT_DYNAMIC_DIM = 1
DEFAULT_INT_RANGE = (0, 2)  # [low, high): valid for ids, masks and token types alike

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


def parse_shape(text: str) -> tuple[str, list[int]]:
    """'input:1x3x224x224' -> ('input', [1, 3, 224, 224]). The name may itself contain ':'."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not re.fullmatch(r"\d+(x\d+)*|", dims):
        raise NormfoldError(f"--shape {text!r}: expected NAME:DIMS such as input:1x3x224x224")
    return name, [int(d) for d in dims.split("x")] if dims else []


@dataclass
class Session:
    """A loaded onnxruntime session and where it came from (for messages)."""

    label: str
    session: object


def open_session(model: str | os.PathLike | bytes, label: str, optimize: bool = False) -> Session:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # deterministic reductions; the models we check are run once
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationUnavailable(f"onnxruntime cannot load the {label} model: {_one_line(exc)}") from None
    return Session(label, session)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def make_inputs(session: Session, seed: int = 0, shapes: dict[str, list[int]] | None = None,
                dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every model input: floats ~ N(0, 1), integers in DEFAULT_INT_RANGE,
    dynamic dimensions from `shapes` (whole shapes by input name) or `dims` (by symbol), else
    DEFAULT_DYNAMIC_DIM."""
    shapes, dims = shapes or {}, dims or {}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    known = {i.name for i in session.session.get_inputs()}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise NormfoldError(f"--shape names {unknown} that are not model inputs (inputs: {sorted(known)})")
    for spec in session.session.get_inputs():
        dtype = _ORT_TYPES.get(spec.type)
        if dtype is None:
            raise VerificationUnavailable(f"input {spec.name!r} has type {spec.type}, which normfold cannot generate")
        if spec.name in shapes:
            shape = shapes[spec.name]
            if len(shape) != len(spec.shape):
                raise NormfoldError(f"--shape {spec.name}: rank {len(shape)} but the model input has rank {len(spec.shape)}")
        else:
            shape = [d if isinstance(d, int) and d >= 0 else dims.get(d, DEFAULT_DYNAMIC_DIM) if isinstance(d, str)
                     else DEFAULT_DYNAMIC_DIM for d in spec.shape]
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.integers(*DEFAULT_INT_RANGE, size=shape).astype(dtype)
    return feeds


def _run(session: Session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.session.get_outputs()]
    try:
        values = session.session.run(names, feeds)
    except Exception as exc:
        raise VerificationUnavailable(f"onnxruntime failed to run the {session.label} model: {_one_line(exc)}") from None
    return dict(zip(names, values))


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float | None = None,
                   rtol: float | None = None) -> OutputComparison:
    dtype = str(ref.dtype)
    if np.issubdtype(ref.dtype, np.floating):
        d_atol, d_rtol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])
    else:
        d_atol, d_rtol = 0.0, 0.0
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return OutputComparison(name, dtype, list(ref.shape), float("inf"), float("inf"), atol, rtol, False, float("inf"))
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    both_nan = np.isnan(r) & np.isnan(g)
    same_inf = np.isinf(r) & np.isinf(g) & (np.sign(r) == np.sign(g))
    special = both_nan | same_inf
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(special, 0.0, np.abs(g - r))
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN or Inf on one side only
        scale = np.where(special, 0.0, np.abs(r))
        scale = np.where(np.isfinite(scale), scale, 0.0)
        rel = diff / np.maximum(scale, np.finfo(np.float64).tiny)
        excess = diff - rtol * scale
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    needed = float(max(0.0, excess.max())) if excess.size else 0.0
    passed = bool(np.all(diff <= atol + rtol * scale))
    return OutputComparison(name, dtype, list(ref.shape), max_abs, max_rel, atol, rtol, passed, needed)


def compare_models(reference: str | os.PathLike | bytes, candidate: str | os.PathLike | bytes, *,
                   seed: int = 0, shapes: dict[str, list[int]] | None = None, dims: dict[str, int] | None = None,
                   atol: float | None = None, rtol: float | None = None,
                   feeds: dict[str, np.ndarray] | None = None) -> Verification:
    """Run both models on the same inputs and compare every output of the reference."""
    ref = open_session(reference, "original")
    feeds = feeds if feeds is not None else make_inputs(ref, seed, shapes, dims)
    ref_out = _run(ref, feeds)
    del ref
    cand = open_session(candidate, "folded")
    cand_out = _run(cand, feeds)
    del cand
    result = Verification("passed", seed=seed, inputs={k: list(v.shape) for k, v in feeds.items()})
    for name, value in ref_out.items():
        if name not in cand_out:
            result.outputs.append(OutputComparison(name, str(value.dtype), list(value.shape), float("inf"),
                                                   float("inf"), 0.0, 0.0, False, float("inf")))
            continue
        result.outputs.append(compare_arrays(name, value, cand_out[name], atol, rtol))
    if not all(o.passed for o in result.outputs):
        result.status = "failed"
        bad = [o.name for o in result.outputs if not o.passed]
        result.detail = f"outputs differ: {', '.join(bad)}"
    return result
