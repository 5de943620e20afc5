"""The library entry points: `fold` rewrites a model in memory; `fold_file` is the whole job the
CLI runs (plan the paths, load, fold, write to a staging folder, verify, move into place).
`fold_job` is that job without the move, for runs that commit several models together."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter

from normfold import exit_codes
from normfold.errors import NormfoldError, VerificationTimeout, VerificationUnavailable, one_line
from normfold.graph import count_ops
from normfold.io import StagedModel, Transaction, check_external_location, external_locations, read_model
from normfold.passes import PASS_NAMES, RULES, FoldContext, run_rules
from normfold.paths import Plan, Target, data_name_for, default_output, plan_run
from normfold.passes.norms import add_contrib_opset_import
from normfold.prepare import explain_listed_inputs, prepare_model
from normfold.report import Report, SiteRecord, Verification
from normfold.shapes import infer_shapes
from normfold.verify import ModelRun, RunOptions, compare_models, model_bytes, preload, run_reference
from normfold.watchdog import Child, run_in_child, start_in_child

# Models with at most this many weight bytes verify in one child process (the original's run, then
# the result's): writing one takes milliseconds, less than a second child costs (about 20 ms: a
# fork, and onnxruntime set up again), so starting the original early while it is written loses.
TOGETHER_BYTES = 16 << 20


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
    # Initializers also listed as graph inputs: "constant" treats them as constants (and removes
    # them from the inputs), "input" as overridable defaults, "auto" as constants where the IR
    # version required the listing (< 4). See normfold.prepare.
    initializer_inputs: str = "auto"


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
    timeout: float | None = None  # seconds one verification may take (then exit 3, nothing written)
    # Check every rewritten site on its own instead of the whole model (normfold.verify_local):
    # True (--verify local), False (whole model, --verify outputs/sites), None: by itself when one
    # onnxruntime session of the model would not fit in the memory available.
    local: bool | None = None

    def run_options(self) -> RunOptions:
        return RunOptions(self.seed, self.shapes, self.dims, self.int_ranges, list(self.input_files), self.batches,
                          self.opt_level)

    def start_reference(self, reference, sites: list[str] | None = None) -> Child:
        """The original's run (normfold.verify.run_reference) started in a child process, so that
        the caller can write the result meanwhile; `reference(..., pending=)` collects it."""
        preload()
        return start_in_child(run_reference, reference, self.run_options(), sites=sites, isolate=False)

    def reference(self, reference, sites: list[str] | None = None, *, deadline: float | None = None,
                  pending: Child | None = None) -> ModelRun | Verification:
        """The original's run, reused by every comparison with it (normfold.verify.run_reference),
        in a child process (`pending`: one start_reference began); or an 'unavailable'
        verification. VerificationTimeout is raised."""
        try:
            child = pending or self.start_reference(reference, sites)
            return child.result(_remaining(deadline, self.timeout))
        except VerificationTimeout:
            raise
        except VerificationUnavailable as exc:
            return Verification("unavailable", seed=self.seed, detail=str(exc))

    def compare(self, reference, candidate, sites: list[str] | None = None,
                reference_run: ModelRun | Verification | None = None, *, deadline: float | None = None) -> Verification:
        """compare_models with these options, in a child process (normfold.watchdog: so that
        --timeout and SIGTERM can stop onnxruntime, and the memory onnxruntime took goes back to
        the system); a model onnxruntime cannot run gives 'unavailable'. With `reference_run`,
        the original is not run again. VerificationTimeout is raised: a timeout never lets a model
        be written."""
        if isinstance(reference_run, Verification):
            return reference_run
        preload()
        try:
            return run_in_child(self._compare_here, reference, candidate, sites, reference_run,
                                timeout=_remaining(deadline, self.timeout))
        except VerificationTimeout:
            raise
        except VerificationUnavailable as exc:
            return Verification("unavailable", seed=self.seed, detail=str(exc))

    def _compare_here(self, reference, candidate, sites: list[str] | None,
                      reference_run: ModelRun | None) -> Verification:
        return compare_models(reference, candidate, seed=self.seed, shapes=self.shapes, dims=self.dims,
                              int_ranges=self.int_ranges, input_files=self.input_files, batches=self.batches,
                              atol=self.atol, rtol=self.rtol, opt_level=self.opt_level, sites=sites,
                              reference_run=reference_run, isolate=False if reference_run is not None else None)

    def _both_here(self, reference, candidate, sites: list[str] | None) -> tuple[ModelRun | Verification, Verification]:
        """The original's run, then the comparison with it, in this process (the child of `verify`):
        the first session is gone before the second is made."""
        try:
            original = run_reference(reference, self.run_options(), sites=sites, isolate=False)
        except VerificationUnavailable as exc:
            failed = Verification("unavailable", seed=self.seed, detail=str(exc))
            return failed, failed
        return original, self._compare_here(reference, candidate, sites, original)

    def verify(self, reference, candidate, sites: list[str] | None = None, *, deadline: float | None = None,
               pending: Child | None = None, together: bool | None = None) -> tuple[ModelRun | Verification, Verification]:
        """The original's run (`pending`: already started) and the comparison of `candidate` with
        it, at most one onnxruntime session at a time. A small model (`together`; None: decided by
        its size) has both in one child process: a second child would cost more than either run.
        Otherwise each side runs in its own child. VerificationTimeout is raised past --timeout
        (counted over both)."""
        if deadline is None and self.timeout is not None:
            deadline = time.monotonic() + self.timeout
        if pending is None and (together if together is not None else model_bytes(reference) <= TOGETHER_BYTES):
            preload()
            try:
                return run_in_child(self._both_here, reference, candidate, sites, timeout=_remaining(deadline, self.timeout))
            except VerificationTimeout:
                raise
            except VerificationUnavailable as exc:
                failed = Verification("unavailable", seed=self.seed, detail=str(exc))
                return failed, failed
        original = self.reference(reference, sites, deadline=deadline, pending=pending)
        return original, self.compare(reference, candidate, reference_run=original, deadline=deadline)

    def verify_local(self, reference, candidate, sites: list[SiteRecord]) -> Verification:
        """normfold.verify_local.verify_locally with these options, in a child process."""
        from normfold.verify_local import verify_locally

        preload()
        try:
            return run_in_child(verify_locally, reference, candidate, sites, timeout=self.timeout, seed=self.seed,
                                atol=self.atol, rtol=self.rtol)
        except VerificationTimeout:
            raise
        except VerificationUnavailable as exc:
            return Verification("unavailable", seed=self.seed, detail=str(exc), mode="local")


def _remaining(deadline: float | None, timeout: float | None) -> float | None:
    """What is left of --timeout for the next step of one verification (several child runs)."""
    if deadline is None:
        return timeout
    return max(0.0, deadline - time.monotonic())


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
        raise NormfoldError(f"cannot convert the model from opset {current} to {target}: {one_line(exc, 200)}") from None
    return converted


def _context(model: onnx.ModelProto, options: FoldOptions, base_dir: str | os.PathLike) -> FoldContext:
    return FoldContext(opset=model_opset(model), exclude_nodes=frozenset(options.exclude_nodes),
                       allow_contrib=options.allow_contrib, allow_transpose=options.allow_transpose,
                       base_dir=str(base_dir))


@dataclass
class _Prepared:
    """A model ready for the passes: converted to a newer opset if some site needs it, with its
    context and shapes computed once (the dry pass that decides the conversion reuses them)."""
    model: onnx.ModelProto
    ctx: FoldContext
    shapes: dict
    converted: bool
    notes: list[str]  # what normfold.prepare did to the model as a whole


def _prepare(model: onnx.ModelProto, options: FoldOptions, base_dir: str | os.PathLike) -> _Prepared:
    notes = prepare_model(model, options.initializer_inputs)  # in place; before shapes or any pass
    ctx, shapes = _context(model, options, base_dir), infer_shapes(model)
    if _held_back_by_opset(model, options, ctx, shapes):
        model = convert_opset(model, options.target_opset)
        return _Prepared(model, _context(model, options, base_dir), infer_shapes(model), True, notes)
    return _Prepared(model, ctx, shapes, False, notes)


def _run_passes(prepared: _Prepared, options: FoldOptions, report: Report) -> None:
    model = prepared.model
    rules = [rule for rule in RULES if rule.name in options.passes]
    # Overflow to inf or a 0 divisor in a fold is caught by its checks (the site is left with a
    # reason); numpy's RuntimeWarnings about it would only be noise on stderr of a good run.
    with np.errstate(all="ignore"):
        report.sites = run_rules(model.graph, rules, prepared.ctx, prepared.shapes)
    report.notes = prepared.notes
    explain_listed_inputs(model, report.sites)  # every pass's non-constant reason names the option
    add_contrib_opset_import(model)  # only when a rewrite used com.microsoft (--allow-contrib)
    report.opset_after = model_opset(model)
    report.ops_after = count_ops(model.graph)
    report.nodes_after = sum(report.ops_after.values())


def _check_passes(options: FoldOptions) -> None:
    unknown = sorted(set(options.passes) - set(PASS_NAMES))
    if unknown:
        raise NormfoldError(f"unknown pass(es) {unknown}; known: {list(PASS_NAMES)}")


def fold(model: onnx.ModelProto, options: FoldOptions | None = None, *, copy: bool = True,
         base_dir: str | os.PathLike = "") -> tuple[onnx.ModelProto, Report]:
    """Fold and fuse every site the selected passes can rewrite. Returns the new model and a report
    (verification is not part of this call: see `fold_file` and `normfold.verify`). `base_dir` is
    where weights still in external data files are read from."""
    options = options or FoldOptions()
    _check_passes(options)
    _check_external_files(model, base_dir)
    if copy:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        model = clone
    report = _new_report(model)
    prepared = _prepare(model, options, base_dir)
    _run_passes(prepared, options, report)
    return prepared.model, report


def _check_external_files(model: onnx.ModelProto, base_dir: str | os.PathLike) -> None:
    """Every external data file the model names must be a regular file inside `base_dir`: said
    here as read_model says it of a model file (a rule reads a weight from there only when it
    needs one, and onnx's own error at that point named neither the file nor base_dir)."""
    base = Path(base_dir or ".").resolve()
    for location in dict.fromkeys(external_locations(model)):
        check_external_location(base, base, location)


def _held_back_by_opset(model: onnx.ModelProto, options: FoldOptions, ctx: FoldContext, shapes: dict) -> bool:
    if options.target_opset is None or options.target_opset <= model_opset(model):
        return False
    # Only the rules whose op needs a newer opset can be held back by it (and a BN fold's check
    # would compute every folded weight just to be thrown away).
    rules = [rule for rule in RULES if rule.name in options.passes and rule.min_opset
             and ctx.opset < rule.min_opset <= options.target_opset]
    if not rules:
        return False
    # The first such site decides. (A later rewrite could make it moot only where a rule can rewrite
    # below its own min_opset, i.e. RMSNorm as com.microsoft with --allow-contrib; converting then
    # is still a verified fold, with the standard op.)
    sites = run_rules(model.graph, rules, ctx, shapes, dry=True, stop_at="opset-too-old")
    return any(s.reason == "opset-too-old" for s in sites)


def needs_newer_opset(model: onnx.ModelProto, options: FoldOptions, base_dir: str | os.PathLike = "") -> bool:
    """Whether some site is left only because the model's opset is too old for the fused op (a dry
    run of the passes, nothing rewritten). When none is, --target-opset can be skipped: the version
    converter copies the whole model and would change nothing normfold does."""
    return _held_back_by_opset(model, options, _context(model, options, base_dir), infer_shapes(model))


def make_target(input_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
                in_place: bool = False, external_data: str | None = None) -> Target:
    """Where one model is read from and written to (the default `<stem>.folded.onnx` beside it)."""
    src = Path(input_path)
    if in_place:
        if output_path is not None and os.path.realpath(output_path) != os.path.realpath(src):
            raise NormfoldError("--in-place and -o name different files; use one of them")
        dest = src
    else:
        dest = Path(output_path) if output_path is not None else default_output(src)
    return Target(src, dest, data_name_for(dest, external_data), in_place)


def fold_file(input_path: str | os.PathLike, output_path: str | os.PathLike | None = None, *,
              in_place: bool = False, options: FoldOptions | None = None,
              verify: VerifyOptions | None = None) -> Report:
    """Load, fold, verify and write. The report's exit_code tells how it ended; NormfoldError is
    raised for bad input (nothing is written then either)."""
    started = time.perf_counter()
    options, verify = options or FoldOptions(), verify or VerifyOptions()
    target = make_target(input_path, output_path, in_place=in_place, external_data=options.external_data)
    plan = plan_run([target], verify=verify.enabled)
    with Transaction() as tx:
        report, moves = fold_job(target, tx.folder_for(target.dest), options, verify, plan=plan, started=started)
        if report.exit_code == exit_codes.OK:
            tx.add(moves)
            tx.commit()
            report.written = True
    return report


def fold_job(target: Target, staging: str | os.PathLike, options: FoldOptions, verify: VerifyOptions, *,
             plan: Plan | None = None, started: float | None = None) -> tuple[Report, list[tuple[str, str]]]:
    """Load, fold, stage into `staging` (a staging folder in the destination's folder) and verify
    one model, without moving anything into place. Returns the report (exit_code set; `written`
    still False) and, when it succeeded, the (staged file, destination) moves that commit it.
    With `plan`, the model's external data files are checked against the run's writes once it
    is loaded (PathConflict: the whole run is refused)."""
    started = time.perf_counter() if started is None else started
    _check_passes(options)
    src, dest = target.source, target.dest
    t = time.perf_counter()
    model, external_files = _load(target, plan, verify)
    base_dir = str(src.resolve().parent)
    timings = {"load": time.perf_counter() - t}
    external = True if external_files or options.external_data is not None else None
    report = _new_report(model, src, dest)
    prepared = _fold_prepared(model, options, base_dir, report, timings)
    del model
    check = _Check(verify, src, report)  # the original starts running while the result is written
    try:
        t = time.perf_counter()
        staged = StagedModel(prepared.model, dest, staging, external_data=external, data_name=target.data_name,
                             consume=True, source_dir=base_dir)
        converted = prepared.converted
        del prepared  # verification loads both models in onnxruntime; do not hold a third copy
        timings["save"] = time.perf_counter() - t
    except BaseException:
        check.cancel()
        raise
    try:
        t = time.perf_counter()
        check.finish(staged.path, converted and (lambda: _stage_conversion(
            src, dest, staging, options, external_files, base_dir)))
        if verify.enabled:
            timings["verify"] = time.perf_counter() - t
        if verify.benchmark and report.verification.status != "unavailable":
            t = time.perf_counter()
            report.benchmark = benchmark_files(src, staged.path, verify)
            timings["benchmark"] = time.perf_counter() - t
        report.exit_code = _exit_code(report.verification, verify)
        if report.exit_code == exit_codes.OK:
            return _finish(report, timings, started), staged.moves()
    except BaseException:
        check.cancel()
        staged.discard()
        raise
    staged.discard()
    return _finish(report, timings, started), []


def _load(target: Target, plan: Plan | None, verify: VerifyOptions) -> tuple[onnx.ModelProto, list[str]]:
    """The model, its external weights left in their files until needed (and those files, checked
    against the run's writes when there is a plan)."""
    model, external_files = read_model(target.source, lazy=True)
    if plan is not None:
        plan.add_external_data(target, external_files)
    if verify.enabled:
        check_input_files(model, verify.input_files)
    return model, external_files


def _new_report(model: onnx.ModelProto, src: Path | None = None, dest: Path | None = None) -> Report:
    """A report with what the model held before any rewrite."""
    report = Report(input=src and str(src), output=dest and str(dest), opset_before=model_opset(model))
    report.ops_before = count_ops(model.graph)
    report.nodes_before = sum(report.ops_before.values())
    return report


def _fold_prepared(model: onnx.ModelProto, options: FoldOptions, base_dir: str, report: Report,
                   timings: dict[str, float]) -> _Prepared:
    """The model converted to the target opset (timings["convert"]) and folded (timings["fold"])."""
    t = time.perf_counter()
    prepared = _prepare(model, options, base_dir)
    if prepared.converted:
        timings["convert"] = time.perf_counter() - t
    t = time.perf_counter()
    _run_passes(prepared, options, report)
    timings["fold"] = time.perf_counter() - t
    return prepared


class _Check:
    """The verification of one fold_job. Begun before the result is written: the original's run
    (a child process) overlaps the writing, which on a multi-GB model costs as much as a run
    (a small model runs both later, in one child: TOGETHER_BYTES). Still at most one onnxruntime
    session at a time: the result runs once the original is done."""

    def __init__(self, verify: VerifyOptions, src: Path, report: Report):
        self.verify, self.src, self.report = verify, src, report
        self.pending: Child | None = None
        self.local, self.why, self.together = verify.local, "", False
        self.sites = [s.output for s in report.sites if s.status != "left" and s.output] if verify.sites else None
        if not verify.enabled:
            return
        if self.local:  # --verify local: neither the whole-model decision nor its size is needed
            return
        size = model_bytes(src)
        if self.local is None:
            from normfold.verify_local import whole_model_too_big

            self.local, self.why = whole_model_too_big(src, size)
        self.together = size <= TOGETHER_BYTES
        if not self.local and not self.together:
            self.pending = verify.start_reference(src, self.sites)

    def finish(self, candidate: Path, stage_conversion) -> None:
        """report.verification (and report.conversion), and each site's max_abs_error."""
        verify, report = self.verify, self.report
        if not verify.enabled:
            report.verification = Verification("skipped", detail="--no-verify")
            return
        if self.local:
            report.verification = _verified_locally(verify, self.src, candidate, report.sites)
            if self.why:
                report.verification.notes.insert(0, self.why + ": verified each rewritten site on its own "
                                                               "(as --verify local)")
        else:
            pending, self.pending = self.pending, None
            report.verification, report.conversion = _verified_with_conversion(
                verify, self.src, candidate, self.sites, stage_conversion, pending=pending, together=self.together)
        errors = {c.name: c.max_abs_error for c in report.verification.sites}
        for site in report.sites:
            error = errors.get(site.id if self.local else site.output)
            site.max_abs_error = error if site.status != "left" else None

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None


def _exit_code(verification: Verification, verify: VerifyOptions) -> int:
    status = verification.status
    if status == "failed":
        return exit_codes.OUTPUTS_DIFFER
    if status == "unavailable" and (_timed_out(verification) or not verify.allow_unverified):
        return exit_codes.UNVERIFIED
    return exit_codes.OK


_TIMED_OUT = "timed out: "


def _verified_with_conversion(verify: VerifyOptions, reference, candidate, sites: list[str] | None,
                              stage_conversion, pending: Child | None = None,
                              together: bool | None = None) -> tuple[Verification, Verification | None]:
    """The result's verification and, only when it failed and the opset was converted, the
    conversion's alone (to name a converter fault as such). The original runs once (`pending`:
    already started): its outputs serve both comparisons. One onnxruntime session at a time,
    each in its own child process. --timeout counts from here: time spent writing the result
    while the original ran is not charged to verification."""
    deadline = None if verify.timeout is None else time.monotonic() + verify.timeout
    conversion = None
    try:
        original, result = verify.verify(reference, candidate, sites, deadline=deadline, pending=pending,
                                         together=together)
        if stage_conversion and result.status == "failed":
            staged = stage_conversion()
            try:
                conversion = verify.compare(reference, staged.path, reference_run=original, deadline=deadline)
            finally:
                staged.discard()
            if conversion.status == "failed":
                conversion.detail = "converting the opset alone changed the outputs: " + conversion.detail
                result.detail = conversion.detail
    except VerificationTimeout as exc:
        return Verification("unavailable", seed=verify.seed, detail=_TIMED_OUT + str(exc)), conversion
    return result, conversion


def _verified_locally(verify: VerifyOptions, reference, candidate, sites: list[SiteRecord]) -> Verification:
    try:
        return verify.verify_local(reference, candidate, sites)
    except VerificationTimeout as exc:
        return Verification("unavailable", seed=verify.seed, detail=_TIMED_OUT + str(exc), mode="local")


def _stage_conversion(src: Path, dest: Path, staging, options: FoldOptions, external_files: list[str],
                      base_dir: str) -> StagedModel:
    """The opset-converted original alone, staged for a comparison (converted again: the first
    copy became the result)."""
    model, _ = read_model(src, lazy=True)
    prepared = _prepare(model, options, base_dir)
    return StagedModel(prepared.model, dest, staging, external_data=True if external_files else None,
                       consume=True, source_dir=base_dir)


def _timed_out(verification: Verification | None) -> bool:
    """A timeout never lets a model be written, not even with --allow-unverified."""
    return verification is not None and verification.status == "unavailable" and verification.detail.startswith(_TIMED_OUT)


def _finish(report: Report, timings: dict[str, float], started: float) -> Report:
    timings["total"] = time.perf_counter() - started
    report.timings = {k: round(v, 4) for k, v in timings.items()}
    return report


def check_input_files(model: onnx.ModelProto, files: list[str]) -> None:
    """--inputs must fit the model's inputs: the element type and every fixed dimension (a bad
    file is a usage error, exit 2, not a model onnxruntime cannot run)."""
    if not files:
        return
    from normfold.errors import show_path
    from normfold.verify import load_input_file

    initializers = {t.name for t in model.graph.initializer}
    specs = [vi for vi in model.graph.input if vi.name not in initializers]
    for path in files:
        feeds = load_input_file(path, [vi.name for vi in specs])
        for vi in specs:
            array, tt = np.asarray(feeds[vi.name]), vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            try:
                expected = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            except Exception:
                continue
            if array.dtype != expected:
                raise NormfoldError(f"--inputs {show_path(path)}: {vi.name!r} is {array.dtype}, the model's input is "
                                    f"{np.dtype(expected).name}")
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                if len(dims) != array.ndim or any(d is not None and d != n for d, n in zip(dims, array.shape)):
                    shown = ["?" if d is None else d for d in dims]
                    raise NormfoldError(f"--inputs {show_path(path)}: {vi.name!r} has shape {list(array.shape)}, the "
                                        f"model's input is {shown}")


def benchmark_files(original, candidate, verify: VerifyOptions) -> dict:
    """Session creation time and latency of the original and the folded model (see benchmark_models)."""
    from normfold.verify import benchmark_models, load_input_file, make_inputs, open_session

    probe = open_session(original, "original")
    names = [i.name for i in probe.session.get_inputs()]
    feeds = (load_input_file(verify.input_files[0], names) if verify.input_files
             else make_inputs(probe, verify.seed, verify.shapes, verify.dims, verify.int_ranges))
    del probe
    return benchmark_models({"original": original, "folded": candidate}, feeds)
