#!/usr/bin/env python3
"""Run ONE optimizer on ONE model in this process (peers.py starts it under /usr/bin/time).

    python bench/_runner.py TOOL IN.onnx OUT.onnx

TOOL: floor | onnxsim | onnxslim | onnxoptimizer | onnxscript | ort-basic | ort-extended
Exit 0 on success; otherwise one line on stderr starting with 'runner-error:'.
The last stdout line is JSON with this process's own perf_counter wall time and ru_maxrss, so the
figures exist even where /usr/bin/time does not.
"""
from __future__ import annotations

import json
import resource
import sys
import time

START = time.perf_counter()


def _save(model, out: str) -> None:
    import onnx

    onnx.save(model, out)


def floor(src: str, out: str) -> str:
    import onnx

    _save(onnx.load(src), out)
    return ""


def onnxsim_(src: str, out: str) -> str:
    import onnx
    import onnxsim

    model, ok = onnxsim.simplify(onnx.load(src))
    _save(model, out)
    return "" if ok else "onnxsim check returned False"


def onnxslim_(src: str, out: str) -> str:
    import onnx
    import onnxslim

    model = onnxslim.slim(onnx.load(src))
    _save(model, out)
    return ""


def onnxoptimizer_(src: str, out: str) -> str:
    import onnx
    import onnxoptimizer

    passes = onnxoptimizer.get_fuse_and_elimination_passes()
    if "fuse_bn_into_conv" not in passes:
        passes = ["fuse_bn_into_conv", *passes]
    model = onnxoptimizer.optimize(onnx.load(src), passes)
    _save(model, out)
    return ""


def onnxscript_(src: str, out: str) -> str:
    """onnxscript.optimizer.optimize (constant folding, dead code, inlining), then
    onnxscript.rewriter.rewrite with its default rules (BN into Conv/ConvTranspose/Gemm among them),
    then onnxscript.rewriter.onnx_fusions.fuse (RMSNormalization etc.; only acts on opset-23 models)."""
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer
    import onnxscript.rewriter
    from onnxscript.rewriter import onnx_fusions

    model = ir.serde.deserialize_model(onnx.load(src))
    model = onnxscript.optimizer.optimize(model)
    model = onnxscript.rewriter.rewrite(model)
    counts = onnx_fusions.fuse(model)
    _save(ir.serde.serialize_model(model), out)
    fused = {k: v for k, v in counts.items() if v}
    return f"onnx_fusions: {fused}" if fused else ""


def ort(level: str):
    def run(src: str, out: str) -> str:
        import onnxruntime as ort_

        options = ort_.SessionOptions()
        options.graph_optimization_level = getattr(ort_.GraphOptimizationLevel, level)
        options.optimized_model_filepath = out
        options.log_severity_level = 3
        ort_.InferenceSession(src, options, providers=["CPUExecutionProvider"])
        return ""

    return run


TOOLS = {
    "floor": floor,
    "onnxsim": onnxsim_,
    "onnxslim": onnxslim_,
    "onnxoptimizer": onnxoptimizer_,
    "onnxscript": onnxscript_,
    "ort-basic": ort("ORT_ENABLE_BASIC"),
    "ort-extended": ort("ORT_ENABLE_EXTENDED"),
}


def main() -> int:
    tool, src, out = sys.argv[1:4]
    try:
        note = TOOLS[tool](src, out)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - one line, whatever went wrong
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"runner-error: {text}", file=sys.stderr)
        note, code = text, 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": time.perf_counter() - START, "maxrss_kb": usage.ru_maxrss, "note": note}))
    return code


if __name__ == "__main__":
    sys.exit(main())
