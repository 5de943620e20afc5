"""Many models at once: find them, run `fold_file` on each in worker processes, keep going when one
fails. A model's failure is its own report (with its exit code and reason), never an exception."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from normfold import exit_codes
from normfold.api import FoldOptions, VerifyOptions, default_output, fold_file
from normfold.errors import NormfoldError
from normfold.report import Report


@dataclass(frozen=True)
class Job:
    source: Path
    dest: Path | None  # None: beside the source (<stem>.folded.onnx), or the source with in_place
    make_folder: bool = False  # create dest's folder (an output tree mirroring the inputs' layout)


def find_models(paths: Iterable[str | os.PathLike], output: str | os.PathLike | None,
                in_place: bool = False) -> list[Job]:
    """Jobs for files and folders. Folders are searched for *.onnx (not *.folded.onnx, our own
    outputs); with an output folder, each model keeps its path relative to the folder given."""
    paths = [Path(p) for p in paths]
    found: list[tuple[Path, Path]] = []  # (source, path relative to what the user named)
    for path in paths:
        if path.is_dir():
            models = sorted(p for p in path.rglob("*.onnx") if p.is_file() and not p.name.endswith(".folded.onnx"))
            if not models:
                raise NormfoldError(f"{path}: no .onnx files in this folder")
            found += [(p, p.relative_to(path)) for p in models]
        else:
            found.append((path, Path(path.name)))
    into_folder = output is not None and (Path(output).is_dir() or str(output).endswith(("/", os.sep)))
    single = len(paths) == 1 and not paths[0].is_dir() and not into_folder
    if output is None or in_place or single:
        return [Job(src, Path(output) if (single and output is not None) else None) for src, _ in found]
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise NormfoldError(f"{out_dir}: with several models, -o must name a folder")
    jobs = [Job(src, out_dir / rel.with_name(default_output(rel).name), make_folder=True) for src, rel in found]
    dests = [j.dest for j in jobs]
    clash = sorted({str(d) for d in dests if dests.count(d) > 1})
    if clash:
        raise NormfoldError(f"several models would be written to {clash[0]}; name folders rather than files")
    return jobs


def _run_one(job: Job, in_place: bool, options: FoldOptions, verify: VerifyOptions) -> Report:
    try:
        if job.make_folder:
            try:
                job.dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise NormfoldError(f"{job.dest.parent}: cannot create the output folder ({exc.strerror})") from None
        return fold_file(job.source, job.dest, in_place=in_place, options=options, verify=verify)
    except NormfoldError as exc:
        return Report(input=str(job.source), output=str(job.dest) if job.dest else None,
                      exit_code=exit_codes.BAD_INPUT, error=str(exc))
    except Exception as exc:  # a bug on one model must not stop the others
        return Report(input=str(job.source), exit_code=exit_codes.INTERNAL_ERROR,
                      error=f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def fold_many(jobs: list[Job], *, in_place: bool = False, options: FoldOptions | None = None,
              verify: VerifyOptions | None = None, workers: int = 1,
              done: Callable[[Report], None] | None = None) -> list[Report]:
    """Fold every job; `workers` > 1 runs them in that many processes. Reports come back in job
    order; `done` is called as each one finishes (for a progress bar)."""
    options, verify = options or FoldOptions(), verify or VerifyOptions()
    if workers <= 1 or len(jobs) <= 1:
        reports = []
        for job in jobs:
            reports.append(_run_one(job, in_place, options, verify))
            if done:
                done(reports[-1])
        return reports
    # Imported here: the process pool's modules (multiprocessing & co.) add a few ms to every
    # start, and most runs fold one model.
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results: dict[int, Report] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(_run_one, job, in_place, options, verify): i for i, job in enumerate(jobs)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    results[i] = future.result()
                    if done:
                        done(results[i])
        except BaseException:
            # Interrupted: stop the workers now rather than let them finish and write after the fact.
            # They inherit the SIGTERM handler, so each removes its staging folder on the way out.
            for future in pending:
                future.cancel()
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise
    return [results[i] for i in range(len(jobs))]
