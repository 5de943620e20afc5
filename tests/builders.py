"""Tiny graphs for tests: the structure as readable ONNX text, the constants as numpy arrays."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import normfold
from normfold.verify import compare_arrays


def build(text: str, opset: int = 13, ir_version: int = 8, **consts: np.ndarray) -> onnx.ModelProto:
    """A model from the body of an ONNX text graph plus named initializers."""
    model = onnx.parser.parse_model(f'<ir_version: {ir_version}, opset_import: ["" : {opset}]>\n{text}')
    for name, value in consts.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


def fold_and_compare(model: onnx.ModelProto, atol: float | None = None, rtol: float | None = None,
                     scaled_atol: bool = False, **options):
    """Fold `model`, check the result with onnx's checker and against the original in onnxruntime.
    With `scaled_atol`, atol is relative to the largest output magnitude (the rounding of a long
    low-precision sum scales with its terms, not with its result). Returns (folded model, report,
    list of OutputComparison)."""
    # The expected outputs come from the model as given, before fold() sees it: computed after,
    # a fold that changed its input would be compared with itself and pass.
    feeds = random_feeds(model)
    expected = run(model, feeds)
    folded, report = normfold.fold(model, normfold.FoldOptions(**options))
    onnx.checker.check_model(folded, full_check=True)
    got = run(folded, feeds)

    def tolerance(e):
        return atol * max(1.0, float(np.max(np.abs(e.astype(np.float64))))) if scaled_atol and atol else atol

    comparisons = [compare_arrays(f"out{i}", e, g, tolerance(e), rtol) for i, (e, g) in enumerate(zip(expected, got))]
    failed = [c for c in comparisons if not c.passed]
    assert not failed, f"outputs differ after folding: {failed}"
    return folded, report, comparisons


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def sites(report, status=None, reason=None):
    return [s for s in report.sites if (status is None or s.status == status) and (reason is None or s.reason == reason)]


def load_report(path) -> dict:
    """A JSON report as written by the CLI, validated against normfold/report.schema.json."""
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads((Path(normfold.__file__).parent / "report.schema.json").read_text())
    document = json.loads(Path(path).read_text())
    jsonschema.validate(document, schema)
    return document


def model_of(nodes, inputs, outputs, consts, opset=15):
    """A model from onnx.helper pieces: `consts` (name -> array) become its initializers."""
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs,
                                   [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def value(name, shape, elem=onnx.TensorProto.FLOAT):
    """A graph input or output declaration."""
    return onnx.helper.make_tensor_value_info(name, elem, shape)


def the_site(report):
    """The report's one site (the test fails if there are more or none)."""
    [site] = report.sites
    return site


def left(model, reason):
    """Fold `model`: its one site is left for `reason` and no node changed."""
    folded, report = normfold.fold(model)
    site = the_site(report)
    assert (site.status, site.reason) == ("left", reason)
    assert ops(folded) == ops(model)
    return site
