"""What a model needs before the passes see it: exporter habits that are not errors but would hide
sites or mislead the passes. Each step edits the model in place and returns notes for the report.

- Initializers listed as graph inputs. IR versions before 4 require every initializer to be a
  graph input (TorchScript at opset 7-8 writes IR 3, as does much of the public model zoos), and
  an initializer that is also an input is only a default a caller may override: the passes leave
  every site that reads one (`non-constant-parameters`). `initializer_inputs="constant"` treats
  them as constants and removes them from the inputs; "auto" does so where the IR version
  required the listing (ir_version < 4, raised to 4, which does not require it); "input" never.
- value_info that contradicts shape inference. jax2onnx records NHWC shapes for tensors its
  layout changes made NCHW; onnxruntime runs such models, and value_info is annotation only.
  The contradicting entries are dropped (the passes would otherwise read wrong shapes).
"""

from __future__ import annotations

import onnx

from normfold.graph import label, subgraphs
from normfold.shapes import light_model

INITIALIZER_INPUTS = ("auto", "constant", "input")
LISTING_IR = 4  # the first IR version that does not require initializers to be graph inputs


def prepare_model(model: onnx.ModelProto, initializer_inputs: str = "auto") -> list[str]:
    """Apply every step to `model` (in place). Returns the notes for the report."""
    return initializers_as_constants(model, initializer_inputs) + drop_contradicting_value_info(model)


def initializers_as_constants(model: onnx.ModelProto, mode: str = "auto") -> list[str]:
    if mode not in INITIALIZER_INPUTS:
        raise ValueError(f"initializer_inputs must be one of {INITIALIZER_INPUTS}, not {mode!r}")
    graph = model.graph
    names = {t.name for t in graph.initializer}
    listed = [i.name for i in graph.input if i.name in names]
    if not listed or mode == "input" or (mode == "auto" and model.ir_version >= LISTING_IR):
        return []
    kept = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(kept)
    note = f"{len(listed)} initializer(s) listed as graph inputs treated as constants and removed from the inputs"
    if model.ir_version < LISTING_IR:
        note += (f" (IR version {model.ir_version} requires the listing; raised to {LISTING_IR}, which does not; "
                 "--initializer-inputs input keeps them as inputs)")
        model.ir_version = LISTING_IR
    else:
        note += " (--initializer-inputs constant)"
    return [note]


LISTED_HINT = "--initializer-inputs constant"
NON_CONSTANT = ("non-constant-parameters", "non-constant-weights")


def explain_listed_inputs(model: onnx.ModelProto, sites: list) -> None:
    """Name the cause and the option in the detail of every site left as non-constant whose nodes
    read an initializer that is still listed as a graph input (the BN folds say it themselves;
    this covers every pass). Main graph only: subgraph inputs are parameters, not defaults."""
    graph = model.graph
    listed = {i.name for i in graph.input} & {t.name for t in graph.initializer}
    if not listed:
        return
    reads = {label(n): [i for i in n.input if i in listed] for n in graph.node}
    for site in sites:
        if site.reason not in NON_CONSTANT or site.graph != "main" or LISTED_HINT in site.detail:
            continue
        names = sorted({name for n in site.nodes for name in reads.get(n, [])})
        if names:
            shown = ", ".join(repr(n) for n in names[:4]) + (" ..." if len(names) > 4 else "")
            site.detail += (f" ({shown}: initializer(s) also listed as graph inputs, so a caller may override "
                            f"them; {LISTED_HINT} treats such initializers as constants)")


def _all_value_info(graph: onnx.GraphProto) -> bool:
    return bool(graph.value_info) or any(_all_value_info(sub) for node in graph.node for _, sub in subgraphs(node))


def _dims(tp: onnx.TypeProto) -> list | None:
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _contradicts(recorded: onnx.TypeProto, inferred: onnx.TypeProto | None) -> bool:
    if inferred is None or not recorded.HasField("tensor_type") or not inferred.HasField("tensor_type"):
        return False
    a, b = recorded.tensor_type.elem_type, inferred.tensor_type.elem_type
    if a and b and a != b:
        return True
    da, db = _dims(recorded), _dims(inferred)
    if da is None or db is None:
        return False
    return len(da) != len(db) or any(x is not None and y is not None and x != y for x, y in zip(da, db))


def _show(tp: onnx.TypeProto) -> str:
    dims = _dims(tp)
    elem = onnx.TensorProto.DataType.Name(tp.tensor_type.elem_type) if tp.tensor_type.elem_type else "?"
    return f"{elem}{'[?]' if dims is None else [d if d is not None else '?' for d in dims]}"


def _drop(recorded: onnx.GraphProto, inferred: onnx.GraphProto, dropped: list[str]) -> None:
    """Drop the value_info of `recorded` that contradict `inferred` (the same graph, inferred
    without its value_info), and likewise in every subgraph."""
    types = {vi.name: vi.type for vi in (*inferred.input, *inferred.value_info, *inferred.output)}
    bad = [vi for vi in recorded.value_info if _contradicts(vi.type, types.get(vi.name))]
    if bad:
        dropped.extend(f"{vi.name!r} recorded {_show(vi.type)}, inferred {_show(types[vi.name])}" for vi in bad)
        names = {vi.name for vi in bad}
        kept = [vi for vi in recorded.value_info if vi.name not in names]
        del recorded.value_info[:]
        recorded.value_info.extend(kept)
    for node_r, node_i in zip(recorded.node, inferred.node):
        for (_, sub_r), (_, sub_i) in zip(subgraphs(node_r), subgraphs(node_i)):
            _drop(sub_r, sub_i, dropped)


def _clear_value_info(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for node in graph.node:
        for _, sub in subgraphs(node):
            _clear_value_info(sub)


def contradicting_value_info(model: onnx.ModelProto) -> list[str]:
    """Drop from `model` (in place) the value_info entries whose type or shape contradicts what
    shape inference computes without them; one description per entry dropped. Shape inference
    runs on a copy without the large weights (see shapes.light_model), and only when there is
    some value_info."""
    if not _all_value_info(model.graph):
        return []
    light = light_model(model)
    _clear_value_info(light.graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help here: without it nothing is known to contradict
        return []
    dropped: list[str] = []
    _drop(model.graph, inferred.graph, dropped)
    return dropped


def drop_contradicting_value_info(model: onnx.ModelProto) -> list[str]:
    dropped = contradicting_value_info(model)
    if not dropped:
        return []
    shown = "; ".join(dropped[:3]) + (f"; and {len(dropped) - 3} more" if len(dropped) > 3 else "")
    return [f"dropped {len(dropped)} value_info annotation(s) that contradict shape inference ({shown})"]


def checks_without_contradicting_value_info(model: onnx.ModelProto) -> bool:
    """Whether onnx's full check passes on `model` once its contradicting value_info are dropped
    (on a light copy; `model` is not changed). For a loader that refused the model as it is."""
    light = light_model(model)
    if not contradicting_value_info(light):
        return False
    try:
        onnx.checker.check_model(light, full_check=True)
    except Exception:
        return False
    return True
