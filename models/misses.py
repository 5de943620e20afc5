#!/usr/bin/env python
"""Per corpus model: ground truth vs what normfold fuses, and a compact op dump around every
reduction that no site covers (a norm normfold did not see at all).

    python models/misses.py [name-substring ...] > /work/notes/corpus-misses.md
    python models/misses.py --update-expected [name-substring ...]   # manifests' "expected" := what
                                                                      # the current code reaches

Runs `fold` in memory with --target-opset 23 --allow-transpose (no verification, nothing written).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import onnx
from onnx import numpy_helper

import normfold
from normfold.api import FoldOptions

MODELS = Path(__file__).resolve().parent
FUSED_OP = {"layernorm": "LayerNormalization", "rmsnorm": "RMSNormalization", "groupnorm": "GroupNormalization"}
MAX_DUMPS = 2  # per model
REDUCERS = {"ReduceMean", "GlobalAveragePool", "ReduceSum", "ReduceSumSquare"}


def _const_shapes(model):
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    t = numpy_helper.to_array(a.t)
                    shapes[n.output[0]] = list(t.shape) if t.size > 1 else f"={t.reshape(-1)[0]:.3g}" if t.size else []
    for i in model.graph.initializer:
        if 0 < len(i.dims) <= 1 and (i.dims[0] if i.dims else 1) <= 8 or not i.dims:
            try:
                v = numpy_helper.to_array(i).reshape(-1)
                shapes[i.name] = f"={v.tolist() if v.size > 1 else v[0]:}" if v.dtype.kind in "iu" else (
                    f"={v[0]:.3g}" if v.size == 1 else list(i.dims))
            except Exception:  # noqa: BLE001
                pass
    return shapes


def dump_around(model, start, limit=24):
    """The reduction, two levels of its producers, and what it feeds (not through Shape readers or
    heavy ops), in graph order."""
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in model.graph.node for o in n.output}
    heavy = {"Conv", "MatMul", "Gemm", "Shape", "ConvTranspose"}
    seen = {start.name: start}
    up = [start]
    for _ in range(2):
        nxt = []
        for n in up:
            for i in n.input:
                p = producer.get(i)
                if p is not None and p.name not in seen and p.op_type not in heavy and p.op_type != "Constant":
                    seen[p.name] = p
                    nxt.append(p)
        up = nxt
    frontier = list(seen.values())
    while frontier and len(seen) < limit:
        nxt = []
        for n in frontier:
            for o in n.output:
                for c in consumers.get(o, []):
                    if c.name not in seen and c.op_type not in heavy and len(seen) < limit:
                        seen[c.name] = c
                        nxt.append(c)
        frontier = nxt
    consts = _const_shapes(model)
    short = {}

    def t(name):
        if name in consts:
            return f"C{consts[name]}"
        p = producer.get(name)
        if p is not None and p.name in seen:
            return f"%{short.setdefault(p.name, len(short))}"
        if p is not None:
            return f"<{p.op_type}>"
        return f"<input {name}>"

    order = [n for n in model.graph.node if n.name in seen]
    for n in order:
        short.setdefault(n.name, len(short))
    lines = []
    for n in order:
        attrs = []
        for a in n.attribute:
            if a.name in ("axes", "perm", "keepdims", "to", "epsilon", "axis"):
                v = onnx.helper.get_attribute_value(a)
                attrs.append(f"{a.name}={list(v) if isinstance(v, (list, tuple)) else v}")
        args = ", ".join(t(i) for i in n.input if i)
        lines.append(f"    %{short[n.name]} = {n.op_type}({args}){' ' + ' '.join(attrs) if attrs else ''}")
    return lines


def analyse(path, entry):
    model = onnx.load(path)
    _, report = normfold.fold(model, FoldOptions(target_opset=23, allow_transpose=True))
    gt = entry["ground_truth"]
    out = [f"### {entry['file']}  ({entry.get('pipeline') or entry.get('exporter')}, opset {entry['opset']}, "
           f"{entry.get('dtype')})"]
    truth = {k: gt[k] for k in ("batchnorm", "layernorm", "rmsnorm", "groupnorm") if gt.get(k)}
    fused = {k: report.ops_after.get(op, 0) - report.ops_before.get(op, 0) for k, op in FUSED_OP.items()}
    sites = Counter((s.pass_name, s.status, s.reason) for s in report.sites)
    out.append(f"- ground truth: {truth or 'none'}")
    out.append(f"- fused (new fused ops): { {k: v for k, v in fused.items() if v} or 'none'}; "
               f"sites: {', '.join(f'{p}/{st}' + (f'({r})' if r else '') + f' x{c}' for (p, st, r), c in sorted(sites.items(), key=str)) or 'none'}")
    covered = {n for s in report.sites for n in s.nodes}
    missed = [n for n in model.graph.node if n.op_type in REDUCERS and n.name not in covered]
    left = [s for s in report.sites if s.status == "left"]
    for s in left:
        out.append(f"- left {s.pass_name} {s.reason}: {s.detail[:300]}")
    short = any(truth[k] > fused.get(k, 0) for k in truth if k != "batchnorm")
    if missed and short:  # (a model that reaches its ground truth needs no dump)
        out.append(f"- reductions covered by no site: {', '.join(n.op_type for n in missed)} (dumped: those with "
                   "a Sqrt/Reciprocal/Pow/Div downstream)")
        done, dumped = set(), 0
        for n in missed:
            if n.name in done:
                continue
            if dumped == MAX_DUMPS:
                rest = [m.name for m in missed if m.name not in done]
                out.append(f"  - (not dumped: {len(rest)} more reductions, e.g. `{rest[0]}`)")
                break
            lines = dump_around(model, n)
            if not any(op in ln for ln in lines for op in (" = Sqrt(", " = Reciprocal(", " = Pow(", " = Div(")):
                done.add(n.name)  # a plain reduction (a mask's count, a pooling head), no norm behind it
                continue
            out.append(f"  - around `{n.name}`:")
            out.extend(lines)
            dumped += 1
            # the dump usually holds the norm's second reduction: do not dump that one again
            done.add(n.name)
            done.update(m.name for m in missed if _in_dump(model, n, m))
    missed_norms = {k: truth[k] - fused.get(k, 0) for k in truth if k != "batchnorm" and truth[k] > fused.get(k, 0)}
    folded = sum(1 for s in report.sites if s.status == "folded")
    if folded:
        fused = dict(fused, folded=folded)
    return out, truth, fused, missed_norms, sum(1 for s in left)


def _in_dump(model, start, other, limit=28):
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    seen, frontier = {start.name}, [start]
    while frontier and len(seen) < limit:  # (downstream only: enough to tell the norm's 2nd reduction)
        nxt = []
        for n in frontier:
            for o in n.output:
                for c in consumers.get(o, []):
                    if c.name not in seen and c.op_type not in ("Conv", "MatMul", "Gemm"):
                        seen.add(c.name)
                        nxt.append(c)
        frontier = nxt
    return other.name in seen


# Why a model's "expected" is below its ground truth: the issue 15 item its spelling belongs to.
WHY = [
    ("hwdyn", "issue 15 item 3/4: GroupNorm on a fully dynamic image (None, None, None, C): every reshape target "
              "computed from Shape"),
    ("seq_dyn", "issue 15 item 3/4: dynamic batch and sequence (computed reshape targets around the Dense layers)"),
    ("groupnorm_dyn", "issue 15 item 3/4: GroupNorm with a dynamic batch (computed Reshape target, weighted "
                      "moments, div_no_nan guards)"),
    ("convnext", "issue 15 item 2: channels-first LayerNorm after tf2onnx's transpose push-down"),
    ("noopt", "issue 15 item 1: Keras moments without tf2onnx's optimizers (Identity = StopGradient, Neg(mean))"),
    ("kexport", "Keras Model.export(format='onnx') spelling (tf2onnx from_function)"),
    ("float16", "issue 15 item 6: Keras float16 dtype policy"),
    ("fp16", "issue 15 item 6/7: fp16 / mixed_float16 spelling"),
    ("opset7", "issue 15 item 8: IR < 4, initializers listed as graph inputs"),
    ("levit", "issue 15 item 10: Shape reader / Flatten between MatMul and BatchNormalization"),
    ("dropout", "issue 15 item 10: Identity (eval Dropout) between a BN and the Gemm it folds forward into"),
    ("op7", "issue 15 item 8: IR < 4, initializers listed as graph inputs"),
]


def update_expected(path, entry):
    """Set entry["expected"] to what the current code does where it is short of the ground truth."""
    import sys as _sys
    _sys.path.insert(0, str(MODELS.parent / "tests"))
    from test_corpus import unreported  # the test's own accounting

    _, report = normfold.fold(onnx.load(path), FoldOptions(target_opset=23, allow_transpose=True))
    truth = entry["ground_truth"]
    fused = {k: report.ops_after.get(op, 0) for k, op in FUSED_OP.items()}
    short = {k: min(fused[k], truth[k]) for k in FUSED_OP if fused[k] < truth[k]}
    silent = unreported(entry, report)
    exp = {}
    if short or silent:
        exp.update(fused=short, silent_misses=silent)
    # BatchNormalization nodes: the BN test folds at the model's own opset
    model = onnx.load(path)
    if truth["batchnorm"] and any(n.op_type == "BatchNormalization" for n in model.graph.node):
        _, bn_report = normfold.fold(model, FoldOptions())
        want = truth["batchnorm"] - truth["batchnorm_after_linear"] - truth["batchnorm_before_linear"]
        left = bn_report.ops_after.get("BatchNormalization", 0)
        reasons = sorted({s.reason for s in bn_report.sites if s.pass_name == "bn" and s.status == "left"}
                         - {"intermediate-used-elsewhere", "no-linear-producer"})
        if left > want:
            exp["batchnorm_left"] = left
        if reasons:
            exp["bn_reasons"] = reasons
    # onnxruntime's offline optimizer (basic level) must not make normfold fuse less
    import tempfile
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "ort.onnx")
        so.log_severity_level = 4
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        _, ort_report = normfold.fold(onnx.load(so.optimized_model_filepath),
                                      FoldOptions(target_opset=23, allow_transpose=True))
    before = sum(s.status == "fused" for s in report.sites)
    after = sum(s.status == "fused" for s in ort_report.sites)
    if after < before:
        exp["ort_offline_fused"] = after
    entry.pop("expected", None)
    if exp:
        exp["why"] = next((w for key, w in WHY if key in entry["file"]), "not recognised yet")
        entry["expected"] = exp


def main(argv):
    if "--update-expected" in argv:
        filters = [a for a in argv[1:] if a != "--update-expected"]
        for manifest in sorted(MODELS.glob("*/manifest.json")):
            data = json.loads(manifest.read_text())
            for entry in data["models"]:
                if "failed" not in entry and (not filters or any(f in entry["file"] for f in filters)):
                    update_expected(manifest.parent / entry["file"], entry)
            manifest.write_text(json.dumps(data, indent=1) + "\n")
        return
    filters = argv[1:]
    body, summary = [], []
    for manifest in sorted(MODELS.glob("*/manifest.json")):
        for entry in json.loads(manifest.read_text())["models"]:
            if "failed" in entry or (filters and not any(f in entry["file"] for f in filters)):
                continue
            lines, truth, fused, missed, nleft = analyse(manifest.parent / entry["file"], entry)
            body.extend(lines + [""])
            summary.append(f"| {manifest.parent.name}/{entry['file']} | "
                           f"{', '.join(f'{k} {v}' for k, v in truth.items()) or '-'} | "
                           f"{', '.join(f'{k} {v}' for k, v in fused.items() if v) or '-'} | "
                           f"{', '.join(f'{k} {v}' for k, v in missed.items()) or '-'} | {nleft} |")
    print("| model | ground truth | fused | not fused | sites left |\n|---|---|---|---|---|")
    print("\n".join(summary))
    print()
    print("\n".join(body))


if __name__ == "__main__":
    main(sys.argv)
