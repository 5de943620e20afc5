"""The library entry points: `fold` rewrites a model in memory; `fold_file` is the whole job the
CLI runs (load, fold, write to a staging folder, verify, move into place)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import version_converter

from normfold import exit_codes
from normfold.errors import NormfoldError, VerificationUnavailable
from normfold.graph import count_ops
from normfold.io import StagedModel, check_destination, read_model
from normfold.passes import PASS_NAMES, RULES, FoldContext, run_rules
from normfold.passes.rmsnorm import add_contrib_opset_import
from normfold.report import Report, Verification
from normfold.shapes import infer_shapes
from normfold.verify import compare_models


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


@dataclass
class FoldOptions:
    passes: tuple[str, ...] = PASS_NAMES
    target_opset: int | None = None
    exclude_nodes: frozenset[str] = frozenset()
    allow_contrib: bool = False
    allow_transpose: bool = False
    # Write weights to an external data file beside the output: None decides by itself (when the
    # input had external data or the model is near protobuf's 2 GB limit), "" forces it with the
    # default name <output>.data, any other string forces it with that file name.
    external_data: str | None = None


@dataclass
class VerifyOptions:
    enabled: bool = True
    allow_unverified: bool = False
    seed: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    input_files: list[str] = field(default_factory=list)
    batches: int = 1
    atol: float | dict | None = None
    rtol: float | dict | None = None
    opt_level: str = "disabled"
    sites: bool = False  # also compare every rewritten site's output tensor
    benchmark: bool = False  # time both models in onnxruntime

    def compare(self, reference, candidate, sites: list[str] | None = None) -> Verification:
        """compare_models with these options; a model onnxruntime cannot run gives 'unavailable'."""
        try:
            return compare_models(reference, candidate, seed=self.seed, shapes=self.shapes, dims=self.dims,
                                  int_ranges=self.int_ranges, input_files=self.input_files, batches=self.batches,
                                  atol=self.atol, rtol=self.rtol, opt_level=self.opt_level, sites=sites)
        except VerificationUnavailable as exc:
            return Verification("unavailable", seed=self.seed, detail=str(exc))


def convert_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    current = model_opset(model)
    if target <= current:
        return model
    max_known = onnx.defs.onnx_opset_version()
    if target > max_known:
        raise NormfoldError(f"--target-opset {target}: the installed onnx knows opsets up to {max_known}")
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        text = " ".join(str(exc).split())[:200]
        raise NormfoldError(f"cannot convert the model from opset {current} to {target}: {text}") from None
    return converted


def fold(model: onnx.ModelProto, options: FoldOptions | None = None, *, copy: bool = True,
         base_dir: str | os.PathLike = "") -> tuple[onnx.ModelProto, Report]:
    """Fold and fuse every site the selected passes can rewrite. Returns the new model and a report
    (verification is not part of this call: see `fold_file` and `normfold.verify`). `base_dir` is
    where weights still in external data files are read from."""
    options = options or FoldOptions()
    unknown = sorted(set(options.passes) - set(PASS_NAMES))
    if unknown:
        raise NormfoldError(f"unknown pass(es) {unknown}; known: {list(PASS_NAMES)}")
    if copy:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        model = clone
    report = Report(opset_before=model_opset(model))
    report.ops_before = count_ops(model.graph)
    report.nodes_before = sum(report.ops_before.values())
    if needs_newer_opset(model, options, base_dir):
        model = convert_opset(model, options.target_opset)
    ctx = FoldContext(opset=model_opset(model), exclude_nodes=frozenset(options.exclude_nodes),
                      allow_contrib=options.allow_contrib, allow_transpose=options.allow_transpose,
                      base_dir=str(base_dir))
    rules = [rule for rule in RULES if rule.name in options.passes]
    report.sites = run_rules(model.graph, rules, ctx, infer_shapes(model))
    add_contrib_opset_import(model)  # only when a rewrite used com.microsoft (--allow-contrib)
    report.opset_after = model_opset(model)
    report.ops_after = count_ops(model.graph)
    report.nodes_after = sum(report.ops_after.values())
    return model, report


def needs_newer_opset(model: onnx.ModelProto, options: FoldOptions, base_dir: str | os.PathLike = "") -> bool:
    """Whether some site is left only because the model's opset is too old for the fused op (a dry
    run of the passes, nothing rewritten). When none is, --target-opset can be skipped: the version
    converter copies the whole model and would change nothing normfold does."""
    if options.target_opset is None or options.target_opset <= model_opset(model):
        return False
    ctx = FoldContext(opset=model_opset(model), exclude_nodes=frozenset(options.exclude_nodes),
                      allow_contrib=options.allow_contrib, allow_transpose=options.allow_transpose,
                      base_dir=str(base_dir))
    # Only the rules whose op needs a newer opset can be held back by it (and a BN fold's check
    # would compute every folded weight just to be thrown away).
    rules = [rule for rule in RULES if rule.name in options.passes and rule.min_opset
             and ctx.opset < rule.min_opset <= options.target_opset]
    if not rules:
        return False
    sites = run_rules(model.graph, rules, ctx, infer_shapes(model), dry=True)
    return any(s.reason == "opset-too-old" for s in sites)


def default_output(path: Path) -> Path:
    return path.with_name(f"{path.stem}.folded.onnx" if path.suffix == ".onnx" else f"{path.name}.folded.onnx")


def fold_file(input_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
              in_place: bool = False, options: FoldOptions | None = None,
              verify: VerifyOptions | None = None) -> Report:
    """Load, fold, verify and write. The report's exit_code tells how it ended; NormfoldError is
    raised for bad input (nothing is written then either)."""
    started = time.perf_counter()
    verify = verify or VerifyOptions()
    options = options or FoldOptions()
    name = options.external_data
    if name and (os.path.basename(name) != name or name in (".", "..")):
        raise NormfoldError(f"--external-data {name!r}: give a file name, not a path (it is written beside the output)")
    src = Path(input_path)
    if in_place:
        if output_path is not None and Path(output_path).resolve() != src.resolve():
            raise NormfoldError("--in-place and -o name different files; use one of them")
        dest = src
    else:
        dest = Path(output_path) if output_path is not None else default_output(src)
        if dest.exists() and src.exists() and dest.resolve() == src.resolve():
            raise NormfoldError(f"{dest}: output is the input file; pass --in-place to overwrite it")
    check_destination(dest)

    t = time.perf_counter()
    model, external_files = read_model(src, lazy=True)  # external weights stay in their files until needed
    base_dir = str(src.resolve().parent)
    timings = {"load": time.perf_counter() - t}
    if not in_place:
        # Writing over the input's own weights file would corrupt the input model.
        ours = {dest.resolve(), dest.with_name(dest.name + ".data").resolve()}
        theirs = {(src.resolve().parent / loc).resolve() for loc in external_files}
        if ours & theirs:
            raise NormfoldError(f"{dest}: would overwrite the input's external data file "
                                f"{sorted(str(p) for p in ours & theirs)[0]}; choose another output name")

    before = count_ops(model.graph), model_opset(model)
    conversion = None
    if needs_newer_opset(model, options, base_dir):  # else converting would change nothing we do
        # Convert first and check the conversion on its own, so that a converter bug is named as
        # such (and never blamed on, or hidden by, a fold).
        t = time.perf_counter()
        model = convert_opset(model, options.target_opset)
        if verify.enabled:
            conversion = _verify_staged(src, model, dest, verify, external_files, base_dir)
        timings["convert"] = time.perf_counter() - t
    options = dataclasses.replace(options, target_opset=None)

    t = time.perf_counter()
    model, report = fold(model, options, copy=False, base_dir=base_dir)
    timings["fold"] = time.perf_counter() - t
    report.input, report.output = str(src), str(dest)
    report.ops_before, report.opset_before = before
    report.nodes_before = sum(report.ops_before.values())
    report.conversion = conversion
    if conversion is not None and conversion.status == "failed":
        conversion.detail = "converting the opset alone changed the outputs: " + conversion.detail
        report.verification = conversion
        report.exit_code = exit_codes.OUTPUTS_DIFFER
        return _finish(report, timings, started)

    t = time.perf_counter()
    staged = StagedModel(model, dest, external_data=True if external_files or name is not None else None,
                         data_name=name or None, consume=True, source_dir=base_dir)
    del model  # verification loads both models in onnxruntime; do not hold a third copy
    timings["save"] = time.perf_counter() - t
    try:
        if verify.enabled:
            t = time.perf_counter()
            sites = [s.output for s in report.sites if s.status != "left" and s.output] if verify.sites else None
            report.verification = verify.compare(src, staged.path, sites)
            errors = {c.name: c.max_abs_error for c in report.verification.sites}
            for site in report.sites:
                site.max_abs_error = errors.get(site.output) if site.status != "left" else None
            timings["verify"] = time.perf_counter() - t
        else:
            report.verification = Verification("skipped", detail="--no-verify")
        status = report.verification.status
        if verify.benchmark and status != "unavailable":
            t = time.perf_counter()
            report.benchmark = benchmark_files(src, staged.path, verify)
            timings["benchmark"] = time.perf_counter() - t
        if status == "failed":
            report.exit_code = exit_codes.OUTPUTS_DIFFER
        elif status == "unavailable" and not verify.allow_unverified:
            report.exit_code = exit_codes.UNVERIFIED
        else:
            staged.commit()
            report.written = True
            report.exit_code = exit_codes.OK
    finally:
        staged.discard()
    return _finish(report, timings, started)


def _finish(report: Report, timings: dict[str, float], started: float) -> Report:
    timings["total"] = time.perf_counter() - started
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    return report


def _verify_staged(src: Path, model: onnx.ModelProto, dest: Path, verify: VerifyOptions,
                   external_files: list[str], base_dir: str) -> Verification:
    """Compare the original file with `model`, staged beside `dest` and discarded afterwards."""
    staged = StagedModel(model, dest, external_data=True if external_files else None, source_dir=base_dir)
    try:
        return verify.compare(src, staged.path)
    finally:
        staged.discard()


def benchmark_files(original, candidate, verify: VerifyOptions) -> dict:
    """Session creation time and latency of the original and the folded model (see benchmark_models)."""
    from normfold.verify import benchmark_models, load_input_file, make_inputs, open_session

    probe = open_session(original, "original")
    names = [i.name for i in probe.session.get_inputs()]
    feeds = (load_input_file(verify.input_files[0], names) if verify.input_files
             else make_inputs(probe, verify.seed, verify.shapes, verify.dims, verify.int_ranges))
    del probe
    return benchmark_models({"original": original, "folded": candidate}, feeds)
