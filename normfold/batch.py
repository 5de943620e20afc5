"""Many models at once: find them, plan every path of the run, run `fold_job` on each (in worker
processes with -j), keep going when one fails, then commit every model that succeeded and the
report together. A model's failure is its own report (with its exit code and reason), never an
exception; a path conflict or a report that cannot be written refuses the whole run."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from normfold import exit_codes
from normfold.api import FoldOptions, VerifyOptions, fold_job, make_target
from normfold.errors import NormfoldError, one_line, show_path
from normfold.io import Transaction
from normfold.paths import PathConflict, Plan, Target, default_output, plan_run
from normfold.report import Report, document_json


@dataclass(frozen=True)
class Job:
    source: Path
    dest: Path | None  # None: beside the source (<stem>.folded.onnx), or the source with in_place
    make_folder: bool = False  # create dest's folder (an output tree mirroring the inputs' layout)


def find_models(paths: Iterable[str | os.PathLike], output: str | os.PathLike | None,
                in_place: bool = False) -> list[Job]:
    """Jobs for files and folders, in the order given and, within a folder, sorted by path.
    Folders are searched for *.onnx (not *.folded.onnx, our own outputs); an entry named *.onnx
    that is not a regular file (a FIFO, a device) is kept, so that its job says why it cannot be
    read. With an output folder, each model keeps its path relative to the folder given."""
    paths = [Path(p) for p in paths]
    found: list[tuple[Path, Path]] = []  # (source, path relative to what the user named)
    for path in paths:
        if path.is_dir():
            models = sorted(p for p in path.rglob("*.onnx") if not p.is_dir() and not p.name.endswith(".folded.onnx"))
            if not models:
                raise NormfoldError(f"{show_path(path)}: no .onnx files in this folder")
            found += [(p, p.relative_to(path)) for p in models]
        else:
            found.append((path, Path(path.name)))
    into_folder = output is not None and (Path(output).is_dir() or str(output).endswith(("/", os.sep)))
    single = len(paths) == 1 and not paths[0].is_dir() and not into_folder
    if output is None or in_place or single:
        return [Job(src, Path(output) if (single and output is not None) else None) for src, _ in found]
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise NormfoldError(f"{show_path(out_dir)}: with several models, -o must name a folder")
    jobs = [Job(src, out_dir / rel.with_name(default_output(rel).name), make_folder=True) for src, rel in found]
    dests = [j.dest for j in jobs]
    clash = sorted({str(d) for d in dests if dests.count(d) > 1})
    if clash:
        raise NormfoldError(f"several models would be written to {show_path(clash[0])}; name folders rather than files")
    return jobs


def _run_one(target: Target, staging: str, options: FoldOptions, verify: VerifyOptions,
             plan: Plan | None) -> tuple[Report, list[tuple[str, str]]]:
    try:
        return fold_job(target, staging, options, verify, plan=plan)
    except PathConflict:
        raise  # refuses the whole run
    except NormfoldError as exc:
        return Report(input=str(target.source), output=str(target.dest), exit_code=exit_codes.BAD_INPUT,
                      error=str(exc)), []
    except Exception as exc:  # a bug on one model must not stop the others
        return Report(input=str(target.source), exit_code=exit_codes.INTERNAL_ERROR,
                      error=f"internal error: {type(exc).__name__}: {one_line(exc)}"), []


def _worker_init() -> None:
    """Ctrl-C reaches every process of the terminal's group: only the parent acts on it (it stops
    the workers). A worker told to stop kills its verification child and ends at once, silently."""
    from normfold.watchdog import kill_children

    def stop(signum, frame):
        kill_children()
        os._exit(exit_codes.INTERRUPTED)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)


def _make_folders(targets: list[Target]) -> list[Path]:
    """Create the output folders a mirrored output tree needs; returns those created (removed
    again if the run writes nothing)."""
    created: list[Path] = []
    for t in targets:
        missing = []
        folder = t.dest.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except OSError as exc:
                _remove_folders(created)
                raise NormfoldError(f"{show_path(folder)}: cannot create the output folder ({exc.strerror})") from None
            created.append(folder)
    return created


def _remove_folders(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


def fold_many(jobs: list[Job], *, in_place: bool = False, options: FoldOptions | None = None,
              verify: VerifyOptions | None = None, workers: int = 1,
              done: Callable[[Report], None] | None = None, report: str | os.PathLike | None = None,
              report_to_stdout: Callable[[str], None] | None = None) -> list[Report]:
    """Fold every job; `workers` > 1 runs them in that many processes. Reports come back in job
    order; `done` is called as each one finishes (for a progress bar). Every model that succeeded
    and the JSON `report` ("-": given to `report_to_stdout` before the commit) are moved into place
    together at the end; a failure to stage the report leaves nothing written (NormfoldError)."""
    options, verify = options or FoldOptions(), verify or VerifyOptions()
    targets = [make_target(j.source, j.dest, in_place=in_place, external_data=options.external_data) for j in jobs]
    plan = plan_run(targets, report, verify=verify.enabled, make_folders=any(j.make_folder for j in jobs))
    created = _make_folders([t for t, j in zip(targets, jobs) if j.make_folder])
    reports: list[Report] = []
    try:
        with Transaction() as tx:
            staging = [str(tx.folder_for(t.dest)) for t in targets]  # an unwritable folder is found first
            if plan.report is not None:
                tx.folder_for(plan.report)
            results = _run_all(targets, staging, options, verify, plan, workers, done)
            reports = []
            for report_, moves in results:
                if report_.exit_code == exit_codes.OK:
                    tx.add(moves)
                    report_.written = True
                reports.append(report_)
            if plan.report_to_stdout and report_to_stdout is not None:
                report_to_stdout(document_json("fold", reports))
            elif plan.report is not None:
                tx.stage_text(plan.report, document_json("fold", reports))
            tx.commit()
    finally:
        if not any(r.written for r in reports) or not tx.committed:
            _remove_folders(created)  # empty folders made for outputs that were not written
    return reports


def _run_all(targets, staging, options, verify, plan, workers, done):
    if workers <= 1 or len(targets) <= 1:
        results = []
        for target, folder in zip(targets, staging):
            results.append(_run_one(target, folder, options, verify, plan))
            if done:
                done(results[-1][0])
        return results
    # Imported here: the process pool's modules (multiprocessing & co.) add a few ms to every
    # start, and most runs fold one model.
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results: dict[int, tuple[Report, list]] = {}
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init)
    try:
        pending = {pool.submit(_run_one, target, folder, options, verify, plan): i
                   for i, (target, folder) in enumerate(zip(targets, staging))}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                i = pending.pop(future)
                results[i] = future.result()
                if done:
                    done(results[i][0])
    except BaseException:
        # Interrupted (or a path conflict): stop the workers now rather than let them finish.
        # Their staged files are in this process's staging folders, removed on the way out.
        for future in pending:
            future.cancel()
        for process in list(getattr(pool, "_processes", {}).values()):
            try:
                process.terminate()
            except Exception:
                pass
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [results[i] for i in range(len(targets))]
