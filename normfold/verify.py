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
DEFAULT_INT_RANGE = (0, 2)
MAX_INPUT_BYTES = 1 << 30  # a generated input larger than this is surely a wrong shape  # [low, high): valid for ids, masks and token types alike

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


OPT_LEVELS = ("disabled", "basic", "extended", "all")


def parse_int_range(text: str) -> tuple[str, tuple[int, int]]:
    """'input_ids:0:1000' -> ('input_ids', (0, 1000)), the range [low, high)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise NormfoldError(f"--int-range {text!r}: expected NAME:LOW:HIGH such as input_ids:0:1000")
    try:
        low, high = int(parts[1]), int(parts[2])
    except ValueError:
        raise NormfoldError(f"--int-range {text!r}: LOW and HIGH must be integers") from None
    if high <= low:
        raise NormfoldError(f"--int-range {text!r}: HIGH must be greater than LOW")
    return parts[0], (low, high)


def parse_tolerance(values: tuple[str, ...] | list[str], flag: str) -> dict[str | None, float]:
    """['1e-4', 'logits:1e-2'] -> {None: 1e-4, 'logits': 1e-2} (None: every other output)."""
    result: dict[str | None, float] = {}
    for text in values:
        name, sep, number = text.rpartition(":")
        try:
            result[name if sep else None] = float(number)
        except ValueError:
            raise NormfoldError(f"{flag} {text!r}: expected a number or OUTPUT:number") from None
    return result


def load_input_file(path: str | os.PathLike, input_names: list[str]) -> dict[str, np.ndarray]:
    """One batch of inputs from a .npz (arrays named like the inputs) or a .npy (single-input models)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise NormfoldError(f"--inputs {path}: cannot read ({exc})") from None
    if isinstance(data, np.ndarray):
        if len(input_names) != 1:
            raise NormfoldError(f"--inputs {path}: a .npy file fits a model with one input; this one has "
                                f"{len(input_names)} ({', '.join(input_names)}); use a .npz")
        return {input_names[0]: data}
    feeds = {name: data[name] for name in data.files}
    missing = sorted(set(input_names) - set(feeds))
    if missing:
        raise NormfoldError(f"--inputs {path}: no array for input(s) {missing}")
    return {name: feeds[name] for name in input_names}


@dataclass
class Session:
    """A loaded onnxruntime session and where it came from (for messages)."""

    label: str
    session: object


def open_session(model: str | os.PathLike | bytes, label: str, optimize: bool | str = False,
                 threads: int = 1) -> Session:
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    level = optimize if isinstance(optimize, str) else ("basic" if optimize else "disabled")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 4  # our one-line error says what failed; no ORT log on stderr
    options.intra_op_num_threads = threads  # 1 by default: deterministic reductions
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationUnavailable(f"onnxruntime cannot load the {label} model: {_one_line(exc)}") from None
    return Session(label, session)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _numpy_type(ort_type: str):
    if ort_type == "tensor(bfloat16)":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _ORT_TYPES.get(ort_type)


def make_inputs(session: Session, seed: int = 0, shapes: dict[str, list[int]] | None = None,
                dims: dict[str, int] | None = None, int_ranges: dict[str, tuple[int, int]] | None = None
                ) -> dict[str, np.ndarray]:
    """Seeded random inputs for every model input: floats ~ N(0, 1), integers in `int_ranges[name]`
    or DEFAULT_INT_RANGE, dynamic dimensions from `shapes` (whole shapes by input name), `dims` (by
    symbol; a symbol also takes its value from a shape given for another input), else
    DEFAULT_DYNAMIC_DIM."""
    shapes, dims, int_ranges = shapes or {}, dims or {}, int_ranges or {}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    known = {i.name for i in session.session.get_inputs()}
    for flag, names in (("--shape", shapes), ("--int-range", int_ranges)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise NormfoldError(f"{flag} names {unknown} that are not model inputs (inputs: {sorted(known)})")
    # A shape given for one input names the dynamic dimensions it shares with the others.
    dims = dict(dims)
    for spec in session.session.get_inputs():
        if spec.name in shapes and len(shapes[spec.name]) == len(spec.shape):
            for symbol, value in zip(spec.shape, shapes[spec.name]):
                if isinstance(symbol, str):
                    dims.setdefault(symbol, value)
    for spec in session.session.get_inputs():
        dtype = _numpy_type(spec.type)
        if dtype is None:
            raise VerificationUnavailable(f"input {spec.name!r} has type {spec.type}, which normfold cannot generate")
        if spec.name in shapes:
            shape = shapes[spec.name]
            if len(shape) != len(spec.shape):
                raise NormfoldError(f"--shape {spec.name}: rank {len(shape)} but the model input has rank {len(spec.shape)}")
        else:
            shape = [d if isinstance(d, int) and d >= 0 else dims.get(d, DEFAULT_DYNAMIC_DIM) if isinstance(d, str)
                     else DEFAULT_DYNAMIC_DIM for d in spec.shape]
        size = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        if size > MAX_INPUT_BYTES:
            raise VerificationUnavailable(f"input {spec.name!r} of shape {shape} would take {size / 2**30:.1f} GiB; "
                                          "give smaller dimensions with --shape or --dim")
        kind = np.dtype(dtype).kind if dtype is not np.bool_ else "b"
        if kind == "f" or str(np.dtype(dtype)) == "bfloat16":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.integers(*int_ranges.get(spec.name, DEFAULT_INT_RANGE), size=shape).astype(dtype)
    return feeds


def _run(session: Session, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
    names = names or [o.name for o in session.session.get_outputs()]
    try:
        values = session.session.run(names, feeds)
    except Exception as exc:
        raise VerificationUnavailable(f"onnxruntime failed to run the {session.label} model: {_one_line(exc)}") from None
    return dict(zip(names, values))


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float | None = None,
                   rtol: float | None = None) -> OutputComparison:
    dtype = str(ref.dtype)
    if np.issubdtype(ref.dtype, np.floating) or dtype == "bfloat16":
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


def _merge(old: OutputComparison | None, new: OutputComparison) -> OutputComparison:
    """The worst of two batches' comparisons of the same tensor."""
    if old is None:
        return new
    return OutputComparison(new.name, new.dtype, new.shape, max(old.max_abs_error, new.max_abs_error),
                            max(old.max_rel_error, new.max_rel_error), new.atol, new.rtol,
                            old.passed and new.passed, max(old.needed_atol, new.needed_atol))


def with_outputs(model: str | os.PathLike | bytes, names: list[str]) -> tuple[bytes, list[str]]:
    """The model serialized with `names` (intermediate tensors) added as graph outputs; returns the
    bytes and the names that could be exposed (those with a known tensor type)."""
    import onnx

    from normfold.shapes import infer_shapes

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    shapes = infer_shapes(proto)
    present = {o.name for o in proto.graph.output}
    produced = {o for n in proto.graph.node for o in n.output}
    exposed = []
    for name in names:
        if name in present or name not in produced or shapes.get(name) is None:
            continue
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, shapes[name][0], None))
        exposed.append(name)
    return proto.SerializeToString(), exposed


def compare_models(reference: str | os.PathLike | bytes, candidate: str | os.PathLike | bytes, *,
                   seed: int = 0, shapes: dict[str, list[int]] | None = None, dims: dict[str, int] | None = None,
                   int_ranges: dict[str, tuple[int, int]] | None = None, input_files: list[str] | None = None,
                   batches: int = 1, atol: float | dict | None = None, rtol: float | dict | None = None,
                   opt_level: str = "disabled", sites: list[str] | None = None,
                   feeds: dict[str, np.ndarray] | None = None) -> Verification:
    """Run both models on the same inputs and compare every output of the reference.

    Inputs: `feeds`, else one batch per file in `input_files`, else `batches` seeded random batches
    (seeds seed, seed+1, ...). `atol`/`rtol` are a number for every output or {output: number,
    None: default}. With `sites` (tensor names present in both models), those tensors are exposed
    and compared too, so a mismatch can be traced to the first rewritten site that caused it."""
    atols = atol if isinstance(atol, dict) else {None: atol}
    rtols = rtol if isinstance(rtol, dict) else {None: rtol}
    site_names: list[str] = []
    if sites:
        try:
            reference, site_names = with_outputs(reference, list(sites))
            candidate, cand_sites = with_outputs(candidate, site_names)
            site_names = [n for n in site_names if n in cand_sites]
        except Exception as exc:  # a model too large to serialize, or one onnx cannot read back
            raise VerificationUnavailable(f"cannot expose site tensors: {_one_line(exc)}") from None
    ref = open_session(reference, "original", opt_level)
    inputs = [i.name for i in ref.session.get_inputs()]
    unknown = sorted(set(atols) - {None} | set(rtols) - {None})
    outputs = [o.name for o in ref.session.get_outputs() if o.name not in site_names]
    if set(unknown) - set(outputs):
        raise NormfoldError(f"tolerance given for {sorted(set(unknown) - set(outputs))}, which are not outputs "
                            f"(outputs: {outputs})")
    if feeds is not None:
        batch_feeds = [feeds]
    elif input_files:
        batch_feeds = [load_input_file(f, inputs) for f in input_files]
    else:
        batch_feeds = [make_inputs(ref, seed + i, shapes, dims, int_ranges) for i in range(max(1, batches))]
    ref_out = [_run(ref, f) for f in batch_feeds]
    del ref
    cand = open_session(candidate, "folded", opt_level)
    result = Verification("passed", seed=seed, inputs={k: list(v.shape) for k, v in batch_feeds[0].items()})
    result.batches = len(batch_feeds)
    merged: dict[str, OutputComparison] = {}
    cand_names = {o.name for o in cand.session.get_outputs()}
    for f, expected in zip(batch_feeds, ref_out):
        got = _run(cand, f, [n for n in expected if n in cand_names])
        for name, value in expected.items():
            if name not in got:
                merged[name] = OutputComparison(name, str(value.dtype), list(value.shape), float("inf"),
                                                float("inf"), 0.0, 0.0, False, float("inf"))
                continue
            a = atols.get(name, atols.get(None)) if name in outputs else atols.get(None)
            r = rtols.get(name, rtols.get(None)) if name in outputs else rtols.get(None)
            merged[name] = _merge(merged.get(name), compare_arrays(name, value, got[name], a, r))
    result.outputs = [merged[n] for n in outputs]
    if site_names:
        order = {n: i for i, n in enumerate(site_names)}
        result.sites = sorted((merged[n] for n in site_names), key=lambda c: (-c.needed_atol, -c.max_abs_error, order[c.name]))
        failing = [n for n in site_names if not merged[n].passed]
        result.first_failing_site = failing[0] if failing else None
    if not all(o.passed for o in result.outputs):
        result.status = "failed"
        bad = [o.name for o in result.outputs if not o.passed]
        result.detail = f"outputs differ: {', '.join(bad)}"
        if result.first_failing_site:
            result.detail += f"; first failing site (in graph order): {result.first_failing_site}"
    return result


def benchmark_models(models: dict[str, str | os.PathLike | bytes], feeds: dict[str, np.ndarray],
                     runs: int = 20, warmup: int = 3) -> dict[str, dict[str, dict[str, float]]]:
    """Session creation time and median latency of each model, with graph optimizations disabled
    and at onnxruntime's default level ("all"), using every core."""
    import time

    result: dict[str, dict[str, dict[str, float]]] = {}
    for label, model in models.items():
        result[label] = {}
        for level in ("disabled", "all"):
            t = time.perf_counter()
            session = open_session(model, label, level, threads=0)
            created = time.perf_counter() - t
            for _ in range(warmup):
                _run(session, feeds)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                _run(session, feeds)
                times.append(time.perf_counter() - t)
            result[label][level] = {"session_s": round(created, 4), "latency_ms": round(float(np.median(times)) * 1e3, 4)}
    return result
