"""Run two models in onnxruntime on the same seeded inputs and compare every output.

The reference runs with graph optimizations disabled: onnxruntime fuses decomposed LayerNorm
itself at higher levels, which would hide a difference between the models.

Pass rule, per element: |candidate - reference| <= atol + rtol * |reference|. NaN equals NaN at
the same place; a NaN or Inf that only one side has is a mismatch. Integer and bool outputs must be
equal. Default tolerances come from the lowest-precision float type on the paths that produce the
output (DEFAULT_TOLERANCES; a float32 output computed in float16 gets float16's). When an output
fails under default tolerances, the accuracy rule decides (normfold.accuracy): both models are
measured against the original run in float64, and the candidate passes when it is not meaningfully
less accurate than the original.

Memory: at most one onnxruntime session exists at a time; models over ISOLATE_BYTES run in a child
process (onnxruntime does not give freed memory back to the system), and the original's outputs are
computed once and reused.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from normfold.errors import NormfoldError, VerificationUnavailable, one_line
from normfold.report import OutputComparison, Verification

if TYPE_CHECKING:
    import onnx

DEFAULT_TOLERANCES = {  # dtype -> (atol, rtol)
    "float64": (1e-7, 1e-7),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (6e-2, 6e-2),
}
DEFAULT_DYNAMIC_DIM = 1
# When onnxruntime rejects the model at DEFAULT_DYNAMIC_DIM (an audio model cannot run on one
# sample), the free dimensions are retried at these values: first all but the leading (batch) axis,
# then all of them.
RETRY_DIMS = (16, 64, 256, 1024, 4096)
DEFAULT_INT_RANGE = (0, 2)  # [low, high): valid for ids, masks and token types alike
MAX_INPUT_BYTES = 1 << 30  # a generated input larger than this is surely a wrong shape
ISOLATE_BYTES = 256 << 20  # models with more weight bytes than this run in a child process
# Float types from the lowest precision to the highest: an output's default tolerance is that of
# the first of these on the paths that produce it.
PRECISION_ORDER = ("bfloat16", "float16", "float32", "float64")
ELEM_TYPE_NAMES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}

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
        raise NormfoldError(f"--inputs {path}: cannot read ({one_line(exc)})") from None
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
                 threads: int = 1, external_folder: str | None = None) -> Session:
    """An onnxruntime CPU session; `external_folder` is where a model given as bytes finds its
    external data files."""
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
    if external_folder:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationUnavailable(f"onnxruntime cannot load the {label} model: {one_line(exc)}") from None
    return Session(label, session)


def _numpy_type(ort_type: str):
    if ort_type == "tensor(bfloat16)":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _ORT_TYPES.get(ort_type)


def make_inputs(session: Session, seed: int = 0, shapes: dict[str, list[int]] | None = None,
                dims: dict[str, int] | None = None, int_ranges: dict[str, tuple[int, int]] | None = None,
                free: tuple[int, int | None] = (DEFAULT_DYNAMIC_DIM, None)) -> dict[str, np.ndarray]:
    """Seeded random inputs for every model input: floats ~ N(0, 1), integers in `int_ranges[name]`
    or DEFAULT_INT_RANGE, dynamic dimensions from `shapes` (whole shapes by input name), `dims` (by
    symbol; a symbol also takes its value from a shape given for another input), else the free
    value: `free` = (value, value on the leading axis or None for the same)."""
    shapes, dims, int_ranges = shapes or {}, dims or {}, int_ranges or {}
    specs = session.session.get_inputs()
    _check_input_names(specs, shapes, int_ranges)
    free_dim = _free_dims(specs, shapes, dims, free)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        dtype = _numpy_type(spec.type)
        if dtype is None:
            raise VerificationUnavailable(f"input {spec.name!r} has type {spec.type}, which normfold cannot generate")
        if spec.name in shapes:
            shape = shapes[spec.name]
            if len(shape) != len(spec.shape):
                raise NormfoldError(f"--shape {spec.name}: rank {len(shape)} but the model input has rank {len(spec.shape)}")
        else:
            shape = [d if isinstance(d, int) and d >= 0 else free_dim(axis, d) for axis, d in enumerate(spec.shape)]
        size = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        if size > MAX_INPUT_BYTES:
            raise VerificationUnavailable(f"input {spec.name!r} of shape {shape} would take {size / 2**30:.1f} GiB; "
                                          "give smaller dimensions with --shape or --dim")
        feeds[spec.name] = _random_array(rng, shape, dtype, int_ranges.get(spec.name, DEFAULT_INT_RANGE))
    return feeds


def _check_input_names(specs, shapes: dict, int_ranges: dict) -> None:
    known = {i.name for i in specs}
    for flag, names in (("--shape", shapes), ("--int-range", int_ranges)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise NormfoldError(f"{flag} names {unknown} that are not model inputs (inputs: {sorted(known)})")


def _free_dims(specs, shapes: dict, dims: dict, free: tuple[int, int | None]):
    """free_dim(axis, d): the value of a dimension that is not a known size (see make_inputs)."""
    # A shape given for one input names the dynamic dimensions it shares with the others.
    dims = dict(dims)
    for spec in specs:
        if spec.name in shapes and len(shapes[spec.name]) == len(spec.shape):
            for symbol, value in zip(spec.shape, shapes[spec.name]):
                if isinstance(symbol, str):
                    dims.setdefault(symbol, value)
    value, leading = free
    leading = value if leading is None else leading
    leading_symbols = {spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], str)}

    def free_dim(axis: int, d) -> int:
        if isinstance(d, str):
            return dims.get(d, leading if d in leading_symbols else value)
        return leading if axis == 0 else value

    return free_dim


def _random_array(rng: np.random.Generator, shape: list[int], dtype, int_range: tuple[int, int]) -> np.ndarray:
    """Floats ~ N(0, 1), booleans 0 or 1, other integers in [int_range)."""
    kind = np.dtype(dtype).kind if dtype is not np.bool_ else "b"
    if kind == "f" or str(np.dtype(dtype)) == "bfloat16":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    return rng.integers(*int_range, size=shape).astype(dtype)


def _run(session: Session, feeds: dict[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
    names = names or [o.name for o in session.session.get_outputs()]
    try:
        values = session.session.run(names, feeds)
    except Exception as exc:
        raise VerificationUnavailable(f"onnxruntime failed to run the {session.label} model: {one_line(exc)}") from None
    return dict(zip(names, values))


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, atol: float | None = None,
                   rtol: float | None = None, tolerance_dtype: str | None = None) -> OutputComparison:
    """One tensor against its reference. Tolerances not given come from DEFAULT_TOLERANCES of
    `tolerance_dtype` (the lowest-precision float type on its paths), else of the tensor's dtype."""
    dtype = str(ref.dtype)
    is_float = bool(np.issubdtype(ref.dtype, np.floating) or dtype == "bfloat16")
    source = (tolerance_dtype or dtype) if is_float else None
    d_atol, d_rtol = DEFAULT_TOLERANCES.get(source, DEFAULT_TOLERANCES["float32"]) if is_float else (0.0, 0.0)
    explicit = atol is not None and rtol is not None
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if ref.shape != got.shape or ref.dtype != got.dtype:
        return OutputComparison(name, dtype, list(ref.shape), float("inf"), float("inf"), atol, rtol, False,
                                float("inf"), tolerance_dtype=None if explicit else source)
    diff, scale = _differences(ref, got)
    # An rtol large enough to overflow rtol * |ref| is an infinite tolerance (inf - inf where the
    # error is infinite too): no warning, nor an error under a caller's np.seterr(all="raise").
    with np.errstate(invalid="ignore", over="ignore"):
        rel = diff / np.maximum(scale, np.finfo(np.float64).tiny)
        excess = diff - rtol * scale
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = float(rel.max()) if rel.size else 0.0
        needed = float(max(0.0, excess.max())) if excess.size else 0.0
        passed = bool(np.all(diff <= atol + rtol * scale))
    return OutputComparison(name, dtype, list(ref.shape), max_abs, max_rel, atol, rtol, passed, needed,
                            tolerance_dtype=None if explicit else source)


def _differences(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|got - ref| and |ref| in float64, elementwise: NaN/NaN and equal Infs differ by 0; a NaN or
    Inf on one side only differs by inf; the scale of a non-finite reference is 0."""
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
    return diff, scale


def _merge(old: OutputComparison | None, new: OutputComparison) -> OutputComparison:
    """The worst of two batches' comparisons of the same tensor."""
    if old is None:
        return new
    return dataclasses.replace(new, max_abs_error=max(old.max_abs_error, new.max_abs_error),
                               max_rel_error=max(old.max_rel_error, new.max_rel_error),
                               passed=old.passed and new.passed, needed_atol=max(old.needed_atol, new.needed_atol))


# ---------------------------------------------------------------- which float types make an output

def lowest_float_types(model: onnx.ModelProto, names: list[str], shapes: dict | None = None) -> dict[str, str]:
    """For each tensor in `names`, the lowest-precision float type (PRECISION_ORDER) among the
    tensors on the paths that produce it: inferred tensor types, Cast targets and initializer
    types, also inside If/Loop/Scan bodies on those paths. Tensors with no float type on their paths
    are left out."""
    from normfold.graph import subgraphs
    from normfold.shapes import infer_shapes

    shapes = infer_shapes(model) if shapes is None else shapes
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    result: dict[str, str] = {}
    for name in names:
        seen_nodes: set[int] = set()
        types: set[int] = set()
        stack = [name]
        visited: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in visited:
                continue
            visited.add(tensor)
            if tensor in shapes:
                types.add(shapes[tensor][0])
            node = producer.get(tensor)
            if node is None or id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if node.op_type == "Cast":
                types.update(a.i for a in node.attribute if a.name == "to")
            for _, sub in subgraphs(node):
                types.update(_graph_types(sub, shapes))
            stack.extend(i for i in node.input if i)
        ranked = [ELEM_TYPE_NAMES[t] for t in types if t in ELEM_TYPE_NAMES]
        if ranked:
            result[name] = min(ranked, key=PRECISION_ORDER.index)
    return result


def _graph_types(graph: onnx.GraphProto, shapes: dict) -> set[int]:
    from normfold.graph import subgraphs

    types = {t.data_type for t in graph.initializer}
    for node in graph.node:
        types.update(shapes[o][0] for o in node.output if o in shapes)
        if node.op_type == "Cast":
            types.update(a.i for a in node.attribute if a.name == "to")
        for _, sub in subgraphs(node):
            types |= _graph_types(sub, shapes)
    return types


# ---------------------------------------------------------------- running one model

@dataclass
class RunOptions:
    """How the inputs of a comparison are made (see compare_models)."""

    seed: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    input_files: list[str] = field(default_factory=list)
    batches: int = 1
    opt_level: str = "disabled"


@dataclass
class ModelRun:
    """One model run on every input batch: what the comparison needs, nothing of the model itself."""

    label: str
    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]  # per batch: graph outputs, then the exposed tensors
    output_names: list[str]  # the graph outputs, in order
    exposed: list[str] = field(default_factory=list)  # intermediate tensors added as outputs
    float_types: dict[str, str] = field(default_factory=dict)  # lowest_float_types of outputs and exposed
    notes: list[str] = field(default_factory=list)


_WARM = False  # preload() has warmed onnxruntime in this process
# One Identity on one float: the least a session can be (onnx.parser reads it in microseconds).
_WARM_MODEL = '<ir_version: 7, opset_import: ["" : 13]> warm (float[1] x) => (float[1] y) { y = Identity(x) }'


def preload() -> None:
    """Import what every run imports, in the process that forks the runs: a child would import it
    anew each time (numpy.random alone costs a small model's run a third more). Also run one
    one-node model here, once: onnxruntime builds its environment and kernel registries on the
    first session of a process, and a forked child inherits them built (measured: `normfold fold`
    of 42 small models, 2.76 s against 2.85 s). (The session has one thread and is gone before
    any fork, so no thread or lock is carried into a child.)"""
    import importlib

    global _WARM
    for name in ("numpy.random", "normfold.shape_values"):
        importlib.import_module(name)
    if not _WARM:
        _WARM = True
        _warm_onnxruntime()


def _warm_onnxruntime() -> bool:
    """Run _WARM_MODEL here; whether onnxruntime ran it (a broken onnxruntime fails later, in the
    run, with its own message)."""
    from onnx import parser

    try:
        session = open_session(parser.parse_model(_WARM_MODEL).SerializeToString(), "warm-up").session
        return session.run(None, {"x": np.full(1, 2.5, np.float32)})[0].tolist() == [2.5]
    except Exception:
        return False


def model_bytes(model: str | os.PathLike | bytes) -> int:
    """The size of a model file plus the external data files it names (its weight bytes, roughly)."""
    if isinstance(model, bytes):
        return len(model)
    import onnx

    from normfold.io import external_locations

    path = os.fspath(model)
    total = os.path.getsize(path)
    try:
        proto = onnx.load(path, load_external_data=False) if total < ISOLATE_BYTES else None
    except Exception:
        return total
    if proto is not None:
        folder = os.path.dirname(os.path.abspath(path))
        for location in set(external_locations(proto)):
            try:
                total += os.path.getsize(os.path.join(folder, location))
            except OSError:
                pass
    return total


def run_model(model: str | os.PathLike | bytes, label: str, options: RunOptions, *,
              feeds: list[dict[str, np.ndarray]] | None = None, expose: list[str] | None = None,
              analyse: bool = False, isolate: bool | None = None) -> ModelRun:
    """Run `model` on `feeds`, or on inputs made from `options` (retrying larger free dimensions
    when onnxruntime rejects the default). `expose`: intermediate tensors to return too (those the
    model has); `analyse`: also find each output's lowest float type. With `isolate` (by default
    for models over ISOLATE_BYTES) the run happens in a child process, so that the memory
    onnxruntime took is returned to the system when it ends."""
    if isolate is None:
        isolate = model_bytes(model) > ISOLATE_BYTES
    args = (model, label, options, feeds, list(expose or []), analyse)
    return isolated(_run_model, args, label) if isolate else _run_model(*args)


def isolated(func, args: tuple, label: str):
    """`func(*args)` in a child process (spawned: no fork of a parent that may hold threads); its
    result, or its error raised here as the same kind (VerificationUnavailable, NormfoldError)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, func, args, os.getpid()), daemon=True)
    process.start()
    sender.close()
    try:
        kind, payload = receiver.recv()
    except EOFError:
        process.join()
        raise VerificationUnavailable(f"the process running the {label} model ended without a result "
                                      f"(exit code {process.exitcode}; out of memory?)") from None
    finally:
        receiver.close()
    process.join()
    if kind == "ok":
        return payload
    if kind == "unavailable":
        raise VerificationUnavailable(payload)
    if kind == "error":
        raise NormfoldError(payload)
    raise RuntimeError(payload)


def _child(sender, func, args, parent: int) -> None:
    from normfold.watchdog import die_with_parent

    die_with_parent(parent)  # a killed run must not leave onnxruntime running here
    try:
        result = ("ok", func(*args))
    except VerificationUnavailable as exc:
        result = ("unavailable", str(exc))
    except NormfoldError as exc:
        result = ("error", str(exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        import traceback

        result = ("internal", "".join(traceback.format_exception(exc)))
    sender.send(result)
    sender.close()


def _run_model(model, label: str, options: RunOptions, feeds, expose: list[str], analyse: bool) -> ModelRun:
    source, folder, exposed, float_types = model, None, [], {}
    if expose or analyse:
        import onnx

        from normfold.shapes import infer_shapes

        try:
            proto = (onnx.load_from_string(model) if isinstance(model, bytes)
                     else onnx.load(os.fspath(model), load_external_data=False))
        except Exception as exc:
            raise VerificationUnavailable(f"cannot read the {label} model: {one_line(exc)}") from None
        shapes = infer_shapes(proto)
        outputs = [o.name for o in proto.graph.output]
        if expose:
            exposed = _add_outputs(proto, expose, shapes)
        if analyse:
            float_types = lowest_float_types(proto, outputs + exposed, shapes)
        if exposed:
            source = proto.SerializeToString()
            if not isinstance(model, bytes):
                folder = os.path.dirname(os.path.abspath(os.fspath(model)))
        del proto
    session = open_session(source, label, options.opt_level, external_folder=folder)
    del source
    names = [o.name for o in session.session.get_outputs()]
    output_names = [n for n in names if n not in exposed]
    run = ModelRun(label, [], [], output_names, exposed, float_types)
    if feeds is not None:
        run.feeds = feeds
        run.outputs = [_run(session, f, names) for f in feeds]
        return run
    inputs = [i.name for i in session.session.get_inputs()]
    if options.input_files:
        run.feeds = [load_input_file(f, inputs) for f in options.input_files]
        run.outputs = [_run(session, f, names) for f in run.feeds]
        return run
    run.feeds, run.outputs, note = _generate_and_run(session, options, names)
    if note:
        run.notes.append(note)
    return run


def _generate_and_run(session: Session, options: RunOptions, names: list[str]):
    """Seeded batches and their outputs. When onnxruntime rejects the free dimensions at their
    default, they are retried at RETRY_DIMS (first all but the leading axis, then all of them)."""
    attempts = [(DEFAULT_DYNAMIC_DIM, None)] + [(v, DEFAULT_DYNAMIC_DIM) for v in RETRY_DIMS] + [(v, None) for v in RETRY_DIMS]
    first_error: VerificationUnavailable | None = None
    tried: list[dict] = []
    for index, free in enumerate(attempts):
        try:
            feeds = [make_inputs(session, options.seed + i, options.shapes, options.dims, options.int_ranges, free)
                     for i in range(max(1, options.batches))]
        except VerificationUnavailable:
            if index == 0:
                raise
            continue  # too large: try the next
        shapes = {k: list(v.shape) for k, v in feeds[0].items()}
        if shapes in tried:
            continue  # the model has no dimension this attempt changes
        tried.append(shapes)
        try:
            outputs = [_run(session, f, names) for f in feeds]
        except VerificationUnavailable as exc:
            first_error = first_error or exc
            if index == 0 and not _has_free_dims(session, options):
                raise
            continue
        note = ""
        if index:
            shown = ", ".join(f"{k}: {'x'.join(map(str, v))}" for k, v in shapes.items())
            note = (f"onnxruntime rejected the default input shape (free dimensions {DEFAULT_DYNAMIC_DIM}); "
                    f"ran with free dimensions at {free[0]}"
                    + (f" (leading axis {free[1]})" if free[1] is not None else "") + f": {shown}")
        return feeds, outputs, note
    assert first_error is not None
    raise VerificationUnavailable(f"{first_error} (also with free dimensions raised to "
                                  f"{', '.join(map(str, RETRY_DIMS))}; give --shape or --dim)")


def _has_free_dims(session: Session, options: RunOptions) -> bool:
    for spec in session.session.get_inputs():
        if spec.name in options.shapes:
            continue
        if any(not (isinstance(d, int) and d >= 0) and not (isinstance(d, str) and d in options.dims) for d in spec.shape):
            return True
    return False


def _add_outputs(proto: onnx.ModelProto, names: list[str], shapes: dict) -> list[str]:
    """Add the intermediate tensors `names` (those produced here with a known type) as graph
    outputs of `proto`; returns the ones added."""
    import onnx

    present = {o.name for o in proto.graph.output}
    produced = {o for n in proto.graph.node for o in n.output}
    exposed = []
    for name in names:
        if name in present or name not in produced or shapes.get(name) is None:
            continue
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, shapes[name][0], None))
        exposed.append(name)
    return exposed


def with_outputs(model: str | os.PathLike | bytes, names: list[str]) -> tuple[bytes, list[str]]:
    """The model serialized with `names` (intermediate tensors) added as graph outputs; returns the
    bytes and the names that could be exposed (those with a known tensor type)."""
    import onnx

    from normfold.shapes import infer_shapes

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    exposed = _add_outputs(proto, names, infer_shapes(proto))
    return proto.SerializeToString(), exposed


# ---------------------------------------------------------------- comparing two models

def _tolerance_maps(atol, rtol) -> tuple[dict, dict]:
    return (atol if isinstance(atol, dict) else {None: atol}), (rtol if isinstance(rtol, dict) else {None: rtol})


def run_reference(reference: str | os.PathLike | bytes, options: RunOptions | None = None, *,
                  sites: list[str] | None = None, feeds: dict[str, np.ndarray] | None = None,
                  isolate: bool | None = None) -> ModelRun:
    """The original's run that every comparison of its candidates reuses."""
    options = options or RunOptions()
    return run_model(reference, "original", options, feeds=[feeds] if feeds is not None else None,
                     expose=list(sites or []), analyse=True, isolate=isolate)


def compare_runs(ref: ModelRun, got: ModelRun, atol: float | dict | None = None,
                 rtol: float | dict | None = None, seed: int | None = 0) -> Verification:
    """Compare a candidate's run with the original's, output by output and batch by batch (an
    output fails when it fails in any batch). Exposed tensors present in both runs are compared
    too; those only the original has are listed as removed by the rewrite."""
    atols, rtols = _tolerance_maps(atol, rtol)
    result = Verification("passed", seed=seed, inputs={k: list(v.shape) for k, v in ref.feeds[0].items()})
    result.batches = len(ref.feeds)
    result.notes = list(ref.notes)
    sites = [n for n in ref.exposed if n in got.exposed]
    result.removed_sites = [n for n in ref.exposed if n not in got.exposed]
    merged: dict[str, OutputComparison] = {}
    for expected, actual in zip(ref.outputs, got.outputs):
        for name in ref.output_names + sites:
            value = expected[name]
            if name not in actual:
                merged[name] = OutputComparison(name, str(value.dtype), list(value.shape), float("inf"),
                                                float("inf"), 0.0, 0.0, False, float("inf"))
                continue
            is_output = name in ref.output_names
            a = atols.get(name, atols.get(None)) if is_output else atols.get(None)
            r = rtols.get(name, rtols.get(None)) if is_output else rtols.get(None)
            merged[name] = _merge(merged.get(name), compare_arrays(name, value, actual[name], a, r,
                                                                   ref.float_types.get(name)))
    result.outputs = [merged[n] for n in ref.output_names]
    if sites:
        order = {n: i for i, n in enumerate(sites)}
        result.sites = sorted((merged[n] for n in sites), key=lambda c: (-c.needed_atol, -c.max_abs_error, order[c.name]))
    _conclude(result, sites)
    return result


def _conclude(result: Verification, sites: list[str]) -> None:
    """Status, first failing site and detail from the comparisons."""
    by_name = {c.name: c for c in result.sites}
    failing = [n for n in sites if n in by_name and not by_name[n].passed]
    result.first_failing_site = failing[0] if failing else None
    result.status = "passed"
    result.detail = ""
    if not all(o.passed for o in result.outputs):
        result.status = "failed"
        bad = [o.name for o in result.outputs if not o.passed]
        result.detail = f"outputs differ: {', '.join(bad)}"
        if result.first_failing_site:
            result.detail += f"; first failing site (in graph order): {result.first_failing_site}"


def compare_models(reference: str | os.PathLike | bytes, candidate: str | os.PathLike | bytes, *,
                   seed: int = 0, shapes: dict[str, list[int]] | None = None, dims: dict[str, int] | None = None,
                   int_ranges: dict[str, tuple[int, int]] | None = None, input_files: list[str] | None = None,
                   batches: int = 1, atol: float | dict | None = None, rtol: float | dict | None = None,
                   opt_level: str = "disabled", sites: list[str] | None = None,
                   feeds: dict[str, np.ndarray] | None = None, reference_run: ModelRun | None = None,
                   accuracy: bool = True, isolate: bool | None = None) -> Verification:
    """Run both models on the same inputs and compare every output of the reference.

    Inputs: `feeds`, else one batch per file in `input_files`, else `batches` seeded random batches
    (seeds seed, seed+1, ...). `atol`/`rtol` are a number for every output or {output: number,
    None: default}. With `sites` (tensor names), the tensors present in both models are exposed
    and compared too, so a mismatch can be traced to the first rewritten site that caused it.
    `reference_run` reuses the original's outputs from an earlier run_reference. With `accuracy`,
    an output that fails under default tolerances is judged by the accuracy rule. `isolate`: see
    run_model (None: models over ISOLATE_BYTES run in child processes)."""
    options = RunOptions(seed, dict(shapes or {}), dict(dims or {}), dict(int_ranges or {}), list(input_files or []),
                         batches, opt_level)
    ref = reference_run or run_reference(reference, options, sites=sites, feeds=feeds, isolate=isolate)
    atols, rtols = _tolerance_maps(atol, rtol)
    unknown = sorted((set(atols) | set(rtols)) - {None} - set(ref.output_names))
    if unknown:
        raise NormfoldError(f"tolerance given for {unknown}, which are not outputs (outputs: {ref.output_names})")
    got = run_model(candidate, "folded", options, feeds=ref.feeds, expose=ref.exposed, isolate=isolate)
    result = compare_runs(ref, got, atol, rtol, seed)
    if result.status == "failed" and accuracy:
        from normfold.accuracy import judge_by_accuracy

        judge_by_accuracy(result, reference, ref, got, atols, rtols)
        _conclude(result, [n for n in ref.exposed if n in got.exposed])
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
