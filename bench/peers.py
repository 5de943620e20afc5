#!/usr/bin/env python3
"""Benchmark normfold against peer ONNX optimizers on the committed corpus and the large models.

    /work/venvs/peers/bin/python bench/peers.py [--models-only-corpus] [--large DIR] [--out FILE]

Each tool runs on each model in its own subprocess (under /usr/bin/time -f %e,%M when present, so
the wall time and peak RSS are that tool's own process), writing into a temporary folder. This
(parent) process then inspects every output: BatchNormalization nodes left, norm sites left
(counted by normfold itself at target opset 23), nodes outside the standard domain, the onnx
checker, the max abs output difference against the original (normfold.compare_models on the
manifest's input shapes), and onnxruntime latency (default optimization level, 1 thread). On models
with float16/bfloat16 tensors it also measures the original and every output against a float32
reference, the original upcast (bench/reference.py): `ref_err`.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import compileall
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

import normfold
from normfold.verify import make_inputs
# bench/reference.py: importable because the script's own folder is on sys.path
from reference import Reference, has_16bit_float, make_reference

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNNER = HERE / "_runner.py"
TIME_BIN = shutil.which("time", path="/usr/bin") or None
NORM_PASSES = ("layernorm", "rmsnorm", "groupnorm")
PEERS = ["onnxsim", "onnxslim", "onnxoptimizer", "onnxscript", "ort-basic", "ort-extended"]
TOOLS = ["floor", "normfold", "normfold+verify", "normfold@23", *PEERS]
STANDARD_DOMAINS = ("", "ai.onnx")


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text[:limit] + ("..." if len(text) > limit else "")


# ---------------------------------------------------------------- the models

def corpus_models() -> list[dict]:
    models = []
    for family in ("torch", "tf"):
        manifest = json.loads((REPO / "models" / family / "manifest.json").read_text())
        for entry in manifest["models"]:
            path = REPO / "models" / family / entry["file"]
            if not path.exists():
                continue
            models.append({"name": f"{family}/{entry['file']}", "path": str(path), "group": "corpus",
                           "opset": entry["opset"],
                           "shapes": {k: v["shape"] for k, v in entry["inputs"].items()}})
    return models


def large_models(folder: Path) -> list[dict]:
    models = []
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        shapes = {}
        inits = {i.name for i in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dims = inp.type.tensor_type.shape.dim
            shapes[inp.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
        models.append({"name": f"large/{path.name}", "path": str(path), "group": "large",
                       "opset": opset_of(model), "shapes": shapes})
    return models


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            return imp.version
    return 0


# ---------------------------------------------------------------- running one tool

def command(tool: str, model: dict, out: Path) -> list[str]:
    if tool.startswith("normfold"):
        exe = Path(sys.executable).with_name("normfold")
        base = [str(exe)] if exe.exists() else [sys.executable, "-m", "normfold"]
        target = max(model["opset"], 23 if tool == "normfold@23" else 17)
        cmd = [*base, "fold", model["path"], "-o", str(out), "-q", "--target-opset", str(target)]
        if tool in ("normfold", "normfold@23"):
            cmd.append("--no-verify")
        else:
            for name, shape in model["shapes"].items():
                cmd += ["--shape", f"{name}:{'x'.join(map(str, shape))}"]
        return cmd
    return [sys.executable, str(RUNNER), tool, model["path"], str(out)]


def run_tool_repeated(tool: str, model: dict, out: Path, timeout: float, repeat: int) -> dict:
    """run_tool `repeat` times, each writing a fresh file; wall time and peak RSS are the medians
    (a single 400 MB write varies by up to 2x on a shared VM)."""
    runs = []
    for _ in range(max(1, repeat)):
        out.unlink(missing_ok=True)
        runs.append(run_tool(tool, model, out, timeout))
        if not runs[-1]["ok"]:
            return runs[-1]
    result = dict(runs[-1])
    for key in ("wall_s", "maxrss_kb"):
        values = sorted(r[key] for r in runs if r.get(key) is not None)
        result[key] = values[len(values) // 2] if values else None
    result["repeat"] = len(runs)
    return result


def run_tool(tool: str, model: dict, out: Path, timeout: float) -> dict:
    cmd = command(tool, model, out)
    timefile = out.with_suffix(".time")
    if TIME_BIN:
        cmd = [TIME_BIN, "-f", "%e,%M", "-o", str(timefile), *cmd]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"ok": False, "status": "timeout", "reason": f"timeout after {timeout:.0f} s",
                "wall_s": None, "maxrss_kb": None}
    wall = time.perf_counter() - started
    rss = None
    if TIME_BIN and timefile.exists():
        last = [ln for ln in timefile.read_text().splitlines() if ln.strip()]
        try:
            e, m = last[-1].split(",")
            wall, rss = float(e), int(m)
        except (IndexError, ValueError):
            pass
    if rss is None:  # no /usr/bin/time: the runner's own figures (normfold: parent's wall clock only)
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                info = json.loads(line)
                wall, rss = info["wall_s"], info["maxrss_kb"]
                break
    result = {"ok": proc.returncode == 0 and out.exists(), "exit_code": proc.returncode, "wall_s": wall,
              "maxrss_kb": rss, "status": "ok", "reason": ""}
    if not result["ok"]:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "Command exited with" not in ln]
        picked = [ln for ln in lines if ln.startswith(("runner-error:", "normfold: error:"))] or lines[-1:]
        result["status"] = "failed"
        result["reason"] = one_line(picked[0] if picked else f"exit {proc.returncode}, no output written")
        if proc.returncode == 0 and not out.exists():
            result["reason"] = "exit 0 but no output written"
    else:
        for line in reversed(stdout.splitlines()):  # runner notes (e.g. onnx_fusions counts)
            if line.startswith("{"):
                note = json.loads(line).get("note")
                if note:
                    result["note"] = one_line(note)
                break
    return result


# ---------------------------------------------------------------- inspecting an output

def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_nodes(g)


def count_sites(model: onnx.ModelProto) -> dict:
    """Run normfold at target opset 23 on a model: what it would still fold or fuse there is what
    the model still holds. Falls back to the model's own opset (counting opset-too-old sites) when
    the version converter refuses the model."""
    mode = "target-23"
    try:
        _, report = normfold.fold(model, normfold.FoldOptions(target_opset=max(23, opset_of(model))))
    except Exception as exc:  # noqa: BLE001
        mode = f"own-opset ({one_line(exc, 120)})"
        _, report = normfold.fold(model, normfold.FoldOptions())
    bn = sum(1 for s in report.sites if s.pass_name == "bn" and s.status == "folded")
    norms = {p: 0 for p in NORM_PASSES}
    other: dict[str, int] = {}
    for s in report.sites:
        if s.pass_name in NORM_PASSES and (s.status in ("folded", "fused") or s.reason == "opset-too-old"):
            norms[s.pass_name] += 1
        elif s.pass_name in NORM_PASSES:  # norm-like nodes normfold sees but would not fuse
            key = f"{s.pass_name}:{s.reason}"
            other[key] = other.get(key, 0) + 1
    return {"bn_sites_left": bn, "norm_sites_left": sum(norms.values()), "norm_sites_by_kind": norms,
            "norm_like_left_unfusable": sum(other.values()), "norm_like_unfusable_by_reason": other,
            "site_count_mode": mode}


def latency_ms(paths: list[str], shapes: dict, runs: int, warmup: int = 2) -> list[float]:
    """Median onnxruntime latency of each model (default optimization level, 1 thread), measured
    interleaved in rounds so that a noisy neighbour hits every model alike."""
    import onnxruntime as ort

    sessions = []
    for path in paths:
        options = ort.SessionOptions()  # default level (ORT_ENABLE_ALL)
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    feeds = make_inputs(normfold.verify.Session("latency", sessions[0]), 0, shapes)
    times: list[list[float]] = [[] for _ in sessions]
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    # at least `runs` runs each; tiny models run more (up to 0.3 s or 500 runs each) for a stable median
    while len(times[0]) < runs or (sum(times[0]) < 300.0 and len(times[0]) < 500):
        for sess, bucket in zip(sessions, times):
            t = time.perf_counter()
            sess.run(None, feeds)
            bucket.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def inspect(original: dict, out: str, runs: int, reference: Reference | None = None) -> dict:
    info: dict = {}
    model = onnx.load(out)
    nodes = list(all_nodes(model.graph))
    info["nodes"] = len(nodes)
    info["opset"] = opset_of(model)
    info["bn_nodes_left"] = sum(1 for n in nodes if n.op_type == "BatchNormalization" and n.domain in STANDARD_DOMAINS)
    opset = info["opset"]

    def standard(n: onnx.NodeProto) -> bool:  # a standard-domain op with a schema at the model's opset
        if n.domain not in STANDARD_DOMAINS:
            return False
        try:
            onnx.defs.get_schema(n.op_type, opset, "")
            return True
        except Exception:  # noqa: BLE001 - SchemaError: e.g. ORT's own LayerNormalization at opset 14
            return False

    bad = [n for n in nodes if not standard(n)]
    nonstd = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in bad})
    info["nonstandard_nodes"] = len(bad)
    info["nonstandard_ops"] = nonstd
    try:
        onnx.checker.check_model(out)
        info["checker_ok"], info["checker_error"] = True, ""
    except Exception as exc:  # noqa: BLE001
        info["checker_ok"], info["checker_error"] = False, one_line(exc)
    try:
        info.update(count_sites(model))
    except Exception as exc:  # noqa: BLE001
        info["site_count_error"] = one_line(exc)
    del model
    try:
        v = normfold.compare_models(original["path"], out, shapes=original["shapes"])
        info["max_abs_diff"] = max((o.max_abs_error for o in v.outputs), default=0.0)
        info["compare_status"] = v.status
        if v.status != "passed":
            info["compare_detail"] = one_line(v.detail)
    except Exception as exc:  # noqa: BLE001
        info["max_abs_diff"] = None
        info["compare_status"] = "error"
        info["compare_detail"] = one_line(exc)
    if reference is not None:
        # max_abs_diff above measures agreement with the original's own 16-bit rounding; this
        # measures closeness to the float32 model, which is what a fusion should not make worse.
        try:
            info["ref_err"] = reference.error(out)
        except Exception as exc:  # noqa: BLE001
            info["ref_err"] = None
            info["ref_err_error"] = one_line(exc)
        try:
            info["ref_err_spec"] = reference.spec_error(out)
        except Exception as exc:  # noqa: BLE001  (onnx.reference lacks or mis-runs some op)
            info["ref_err_spec"] = None
            info["ref_err_spec_error"] = one_line(exc)
    try:
        if out == original["path"]:
            info["latency_ms"] = info["latency_orig_ms"] = latency_ms([out], original["shapes"], runs)[0]
        else:
            info["latency_orig_ms"], info["latency_ms"] = latency_ms([original["path"], out], original["shapes"], runs)
    except Exception as exc:  # noqa: BLE001
        info["latency_ms"] = None
        info["latency_error"] = one_line(exc)
    return info


# ---------------------------------------------------------------- tables

def geomean(values):
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def fmt(v, spec=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        if spec:
            return format(v, spec)
        return f"{v:.2g}" if v < 1e-2 or v >= 1e3 else f"{v:.3g}"
    return str(v)


def cell(r: dict) -> str:
    """Per-model matrix cell: 'BN-nodes/BN-sites/norms' left, with flags."""
    if r["status"] == "timeout":
        return "TIMEOUT"
    if not r["ok"]:
        return "FAIL"
    text = f"{r.get('bn_nodes_left', '?')}/{r.get('bn_sites_left', '?')}/{r.get('norm_sites_left', '?')}"
    flags = ""
    if r.get("nonstandard_nodes"):
        flags += "x"
    if not r.get("checker_ok", True):
        flags += "!"
    if r.get("compare_status") not in (None, "passed"):
        flags += "D" if r.get("compare_status") == "failed" else "E"
    return text + (" " + flags if flags else "")


def summarize(results: list[dict], models: list[str], tool: str) -> dict:
    rows = [r for r in results if r["tool"] == tool and r["model"] in models]
    ok = [r for r in rows if r["ok"]]
    diffs = [r["max_abs_diff"] for r in ok if r.get("max_abs_diff") is not None]
    orig_ref = {r["model"]: r["ref_err"] for r in results
                if r["tool"] == "original" and r["model"] in models and r.get("ref_err") is not None}
    ref_rows = [r for r in ok if r.get("ref_err") is not None and r["model"] in orig_ref]
    ref = [r["ref_err"] for r in ref_rows]
    orig_spec = {r["model"]: r["ref_err_spec"] for r in results
                 if r["tool"] == "original" and r["model"] in models and r.get("ref_err_spec") is not None}
    spec_rows = [r for r in ok if r.get("ref_err_spec") is not None and r["model"] in orig_spec]
    return {
        "runs": len(rows), "ok": len(ok), "failed": sum(r["status"] == "failed" for r in rows),
        "timeout": sum(r["status"] == "timeout" for r in rows),
        "bn_nodes_left": sum(r.get("bn_nodes_left", 0) for r in ok),
        "bn_sites_left": sum(r.get("bn_sites_left", 0) for r in ok),
        "norm_sites_left": sum(r.get("norm_sites_left", 0) for r in ok),
        "norm_like_left_unfusable": sum(r.get("norm_like_left_unfusable", 0) for r in ok),
        "nonstandard_nodes": sum(r.get("nonstandard_nodes", 0) for r in ok),
        "checker_failures": sum(not r.get("checker_ok", True) for r in ok),
        "compare_failures": sum(r.get("compare_status") not in (None, "passed") for r in ok),
        "max_abs_diff": max(diffs) if diffs else None,
        # 16-bit models only: worst error against the float32 reference, beside the original's worst
        # on the same models, and on how many of them the tool is worse by REF_RULE
        "ref_err_max": max(ref) if ref else None,
        "ref_err_orig_max": max(orig_ref[r["model"]] for r in ref_rows) if ref_rows else None,
        "ref_models": len(ref_rows),
        "ref_worse": sum((r.get("ref_excess_ulps") or 0.0) > 1.0 for r in ref_rows),
        # the same with every op rounding to its declared type (onnx.reference), where it runs
        "ref_spec_max": max((r["ref_err_spec"] for r in spec_rows), default=None),
        "ref_spec_orig_max": max((orig_spec[r["model"]] for r in spec_rows), default=None),
        "ref_spec_models": len(spec_rows),
        "time_ratio_geomean": geomean(r.get("time_ratio") for r in ok),
        "mem_ratio_geomean": geomean(r.get("mem_ratio") for r in ok),
        "latency_ratio_geomean": geomean(r.get("latency_ratio") for r in ok),
    }


SUMMARY_COLS = [("ok", "ok"), ("failed", "fail"), ("timeout", "t/o"), ("bn_nodes_left", "BN nodes"),
                ("bn_sites_left", "BN-like sites"), ("norm_sites_left", "norms left"),
                ("norm_like_left_unfusable", "norm-like unmatched"),
                ("nonstandard_nodes", "non-std nodes"), ("checker_failures", "checker fails"),
                ("compare_failures", "diff fails"), ("max_abs_diff", "max abs diff"),
                ("ref_err", "fp16 err vs fp32 ref (worst, tool / orig)"), ("ref_worse", "fp16 worse than orig"),
                ("ref_spec", "fp16 err, ops rounding as typed (worst, tool / orig)"),
                ("time_ratio_geomean", "time/floor"), ("mem_ratio_geomean", "RSS/floor"),
                ("latency_ratio_geomean", "latency out/orig")]


def summary_table(summaries: dict[str, dict], title: str) -> str:
    head = ["tool", *[c[1] for c in SUMMARY_COLS]]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tool, s in summaries.items():
        vals = []
        for key, _ in SUMMARY_COLS:
            v = s.get(key)
            if key == "ref_err":
                v = (f"{fmt(s.get('ref_err_max'), '.2e')} / {fmt(s.get('ref_err_orig_max'), '.2e')}"
                     if s.get("ref_models") else None)
            elif key == "ref_spec":
                v = (f"{fmt(s.get('ref_spec_max'), '.2e')} / {fmt(s.get('ref_spec_orig_max'), '.2e')} "
                     f"({s['ref_spec_models']} models)" if s.get("ref_spec_models") else None)
            elif key == "ref_worse":
                v = f"{s['ref_worse']}/{s['ref_models']}" if s.get("ref_models") else None
            vals.append(fmt(v, ".2f") if key.endswith("geomean") and v is not None else fmt(v))
        lines.append("| " + " | ".join([tool, *vals]) + " |")
    return "\n".join(lines)


REF_RULE = ("a tool is counted worse on a model when its ref_err exceeds the original's by more than one "
            "16-bit ulp (fp16, or bf16 for bf16 outputs) at the largest |reference output| of that model")


def ref_excess_ulps(r: dict, orig: dict, key: str = "ref_err") -> float | None:
    """How far the tool's error against the float32 reference exceeds the original's, in 16-bit
    ulps of the model's output magnitude (REF_RULE: worse when > 1). One ulp of slack because
    fusing legitimately moves single roundings: a correctly rounded result can land on the other
    neighbour of the reference than the original's did."""
    if r.get(key) is None or orig.get(key) is None or not orig.get("ref_ulp"):
        return None
    return (r[key] - orig[key]) / orig["ref_ulp"]


def large_table(results: list[dict], model: str) -> str:
    head = ["tool", "status", "BN nodes", "BN-like sites", "norms left", "non-std", "checker", "max abs diff",
            "wall s", "peak RSS MB", "time/floor", "RSS/floor", "latency ms (orig)", "latency ms (out)"]
    # the fp32 reference column only for a 16-bit model (the generated large models are fp32)
    with_ref = any("ref_err" in r for r in results if r["model"] == model)
    if with_ref:
        head.insert(head.index("max abs diff") + 1, "err vs fp32 ref")
    lines = [f"**{model}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in results if r["model"] == model):
        if not r["ok"] and r["tool"] != "original":
            lines.append(f"| {r['tool']} | {r['status']}: {r['reason'][:80]} |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join([
            r["tool"], "ok" if r["tool"] != "original" else "(input)", fmt(r.get("bn_nodes_left")),
            fmt(r.get("bn_sites_left")), fmt(r.get("norm_sites_left")), fmt(r.get("nonstandard_nodes")),
            "ok" if r.get("checker_ok", True) else "FAIL", fmt(r.get("max_abs_diff")),
            *([fmt(r.get("ref_err"))] if with_ref else []),
            fmt(r.get("wall_s"), ".1f"), fmt(r["maxrss_kb"] / 1024, ".0f") if r.get("maxrss_kb") else "-",
            fmt(r.get("time_ratio"), ".2f"), fmt(r.get("mem_ratio"), ".2f"),
            fmt(r.get("latency_orig_ms"), ".1f"), fmt(r.get("latency_ms"), ".1f")]) + " |")
    return "\n".join(lines)


def ref_table(results: list[dict], models: list[str], tools: list[str], key: str = "ref_err") -> str:
    """Per 16-bit model: max abs error against the float32 reference of the original and of each
    tool's output (`key`: run by onnxruntime, or "ref_err_spec": by onnx.reference); * marks a tool
    worse than the original by REF_RULE."""
    by = {(r["model"], r["tool"]): r for r in results}
    head = ["model", "1 ulp at max abs output", "original", *tools]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        orig = by.get((m, "original"), {})
        if "ref_ulp" not in orig:
            continue
        cells = []
        for t in tools:
            r = by.get((m, t))
            if r is None or not r["ok"]:
                cells.append("" if r is None else "FAIL")
                continue
            excess = ref_excess_ulps(r, orig, key)
            cells.append(fmt(r.get(key), ".2e") + (" *" if excess is not None and excess > 1.0 else ""))
        row = [m, fmt(orig["ref_ulp"], ".2e"), fmt(orig.get(key), ".2e"), *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def matrix_table(results: list[dict], models: list[str], tools: list[str]) -> str:
    head = ["model", *tools]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["model"], r["tool"]): r for r in results}
    for m in models:
        lines.append("| " + " | ".join([m, *[cell(by[(m, t)]) if (m, t) in by else "" for t in tools]]) + " |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.splitlines()
    versions = {}
    for pkg in ("normfold", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "onnxscript",
                "onnx-ir", "numpy", "protobuf"):
        try:
            from importlib.metadata import version
            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = "unavailable"
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "normfold", "cli"],
                           capture_output=True, text=True).stdout.split("\n")
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "normfold_git": git,
            "normfold_dirty_files": [ln[3:] for ln in dirty if ln.strip()], "nproc": os.cpu_count(), "cpu": cpu,
            "free_h": mem[1] if len(mem) > 1 else "", "python": platform.python_version(),
            "time_source": "/usr/bin/time -f %e,%M" if TIME_BIN else "runner ru_maxrss + perf_counter",
            "versions": versions}


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-only-corpus", action="store_true", help="skip the large models")
    ap.add_argument("--large", default="/work/bench-data", help="folder of large models [/work/bench-data]")
    ap.add_argument("--out", default=str(HERE / "results.json"), help="results JSON [bench/results.json]")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--only", default="", help="run only models whose name contains this text")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per tool run [600]")
    ap.add_argument("--runs", type=int, default=10, help="timed onnxruntime runs for the latency median [10]")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each tool per model; wall time and peak RSS are the medians [1]")
    ap.add_argument("--markdown", default="", help="also write the tables as Markdown to this file")
    args = ap.parse_args(argv)

    # Time normfold as `pip install` leaves it: byte-compiled. An editable checkout run with
    # PYTHONDONTWRITEBYTECODE=1 (as on our VMs) would compile every module in every timed process,
    # ~60 ms that no installed copy pays; the peers' own wheels came byte-compiled.
    package = Path(normfold.__file__).parent
    for folder in (package, package.parent / "cli"):
        if folder.is_dir():
            compileall.compile_dir(str(folder), quiet=1)

    tools = [t for t in args.tools.split(",") if t]
    if "floor" not in tools:
        tools.insert(0, "floor")
    models = corpus_models()
    if not args.models_only_corpus and Path(args.large).is_dir():
        models += large_models(Path(args.large))
    if args.only:
        models = [m for m in models if args.only in m["name"]]
    print(f"{len(models)} models x {len(tools)} tools; timing by "
          f"{'/usr/bin/time' if TIME_BIN else 'runner rusage'}; timeout {args.timeout:.0f} s", flush=True)

    results: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normfold-bench-") as tmp:
        for i, model in enumerate(models):
            orig = {"model": model["name"], "tool": "original", "group": model["group"], "ok": True,
                    "status": "ok", "reason": "", "wall_s": None, "maxrss_kb": None}
            reference = None
            if has_16bit_float(onnx.load(model["path"], load_external_data=False)):
                try:  # once per model: the upcast original's outputs serve every tool's output
                    reference = make_reference(model["path"], model["shapes"])
                    orig.update(ref_ulp=reference.ulp, ref_scale=reference.scale, ref_half_dtype=reference.half_dtype)
                except Exception as exc:  # noqa: BLE001
                    orig["ref_error"] = one_line(exc)
            orig.update(inspect(model, model["path"], args.runs, reference))
            results.append(orig)
            floor = None
            for tool in tools:
                out = Path(tmp) / f"{i:03d}_{tool.replace('+', '_')}.onnx"
                r = {"model": model["name"], "tool": tool, "group": model["group"]}
                r.update(run_tool_repeated(tool, model, out, args.timeout, args.repeat))
                if r["ok"]:
                    try:
                        r.update(inspect(model, str(out), args.runs, reference))
                    except Exception as exc:  # noqa: BLE001
                        r.update(ok=False, status="failed", reason=f"output unreadable: {one_line(exc)}")
                    if reference is not None:
                        r["ref_excess_ulps"] = ref_excess_ulps(r, orig)
                if tool == "floor":
                    floor = r
                if floor and floor.get("wall_s") and r.get("wall_s") is not None:
                    r["time_ratio"] = r["wall_s"] / floor["wall_s"]
                if floor and floor.get("maxrss_kb") and r.get("maxrss_kb"):
                    r["mem_ratio"] = r["maxrss_kb"] / floor["maxrss_kb"]
                if r.get("latency_ms") and r.get("latency_orig_ms"):
                    r["latency_ratio"] = r["latency_ms"] / r["latency_orig_ms"]
                results.append(r)
                for f in (out, out.with_suffix(".time")):
                    f.unlink(missing_ok=True)
                for extra in Path(tmp).glob(f"{i:03d}_*"):  # external data a tool may have written
                    extra.unlink(missing_ok=True)
            row = "  ".join(f"{t}={cell(r)}" for t in tools for r in results[-len(tools):] if r["tool"] == t)
            print(f"[{i + 1}/{len(models)} {time.perf_counter() - started:6.0f}s] {model['name']}: "
                  f"orig={cell(orig)}  {row}", flush=True)

    corpus = [m["name"] for m in models if m["group"] == "corpus"]
    large = [m["name"] for m in models if m["group"] == "large"]
    show = ["original", *[t for t in tools if t != "floor"], "floor"]
    summaries = {"corpus": {t: summarize(results, corpus, t) for t in show}} if corpus else {}
    for m in large:
        summaries[m] = {t: summarize(results, [m], t) for t in show}
    meta = machine()
    meta["elapsed_s"] = time.perf_counter() - started
    body = [f' "machine": {json.dumps(meta, default=str)},', f' "tools": {json.dumps(tools)},',
            f' "summaries": {json.dumps(summaries, default=str)},', ' "results": [',
            ",\n".join("  " + json.dumps(r, default=str) for r in results), " ]"]
    Path(args.out).write_text("{\n" + "\n".join(body) + "\n}\n")  # one result per line

    parts = []
    if corpus:
        parts.append(summary_table(summaries["corpus"], f"Corpus ({len(corpus)} models): totals over successful runs"))
    for m in large:
        parts.append(large_table(results, m))
    fp16_table = ref_table(results, [m["name"] for m in models], [t for t in show if t not in ("original", "floor")])
    if fp16_table:
        parts.append("**16-bit float models: max abs error against the float32 reference** (the original upcast "
                     "to float32, same inputs, ORT_DISABLE_ALL; max over outputs; * = worse than the original: "
                     f"{REF_RULE})\n\n" + fp16_table)
        spec_table = ref_table(results, [m["name"] for m in models],
                               [t for t in show if t not in ("original", "floor")], key="ref_err_spec")
        parts.append("**The same, every op rounding to the type the model declares** (onnx.reference instead of "
                     "onnxruntime, whose CPU provider runs 16-bit ops without a 16-bit kernel in float32; empty "
                     "where onnx.reference cannot run the model)\n\n" + spec_table)
    parts.append("**Per model** (cell = BN nodes / BN-like foldable sites / norm sites left; "
                 "x = non-standard nodes (other domain, or no ONNX schema at the model's opset), ! = checker rejects, D = outputs differ beyond tolerance, "
                 "E = could not compare)\n\n" + matrix_table(results, [m["name"] for m in models], show))
    text = "\n\n".join(parts)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(f"\nwrote {args.out} ({meta['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
