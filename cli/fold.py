"""`normfold fold`: fold and fuse, verify, write: one model, or many files and folders at once."""

from __future__ import annotations

import os
import sys

import click

from normfold import exit_codes
from normfold.api import VerifyOptions
from normfold.batch import fold_many, find_models
from normfold.cli.options import EXIT_CODES_HELP, fold_options, fold_options_from, pass_errors, verification_options, verify_options
from normfold.cli.render import colour, summary_table
from normfold.errors import NormfoldError
from normfold.io import write_text_atomic
from normfold.report import Report, document_json, worst_exit_code


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", type=click.Path(),
              help="Output file, or folder for several models [default: <stem>.folded.onnx beside each model].")
@click.option("--in-place", is_flag=True, help="Overwrite each model (only after its verification passed).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON report to this file.")
@fold_options
@verification_options
@click.option("--verify", "verify_mode", type=click.Choice(["outputs", "sites"]), default="outputs", show_default=True,
              help="sites: also compare every rewritten site's output tensor, to name the one that differs.")
@click.option("--no-verify", is_flag=True, help="Write without running onnxruntime.")
@click.option("--allow-unverified", is_flag=True, help="Write even when onnxruntime cannot run the model.")
@click.option("--benchmark", is_flag=True, help="Time both models in onnxruntime (session creation, median latency).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Models to fold at once, each in its own process.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="Print the summary even when not on a terminal, and every site.")
@pass_errors
def fold(models, output, in_place, report_path, verify_mode, no_verify, allow_unverified, benchmark, jobs, quiet,
         verbose, **groups):
    """Fold and fuse the norm sites of each MODEL (a file or a folder of .onnx files), check the
    result in onnxruntime, and write it.

    Nothing is written for a model unless every output of the result matches the original
    (|folded - original| <= atol + rtol * |original|). With several models the exit code is the
    most severe of theirs, and a failing model does not stop the others.
    """
    options = fold_options_from(groups)
    verify = verify_options(groups, enabled=not no_verify, allow_unverified=allow_unverified,
                            sites=verify_mode == "sites", benchmark=benchmark)
    if report_path:
        _check_writable(report_path)
    try:
        job_list = find_models(models, output, in_place)
        if options.external_data and len(job_list) > 1:
            raise NormfoldError("--external-data NAME fits one model; with several, use --external-data "
                                "without a name (each gets <output>.data)")
    except NormfoldError as exc:
        if report_path:
            write_text_atomic(report_path, document_json("fold", [Report(input=" ".join(models),
                                                                         exit_code=exit_codes.BAD_INPUT,
                                                                         error=str(exc))]))
        raise
    reports = _run(job_list, in_place, options, verify, jobs, quiet)
    if report_path:
        write_text_atomic(report_path, document_json("fold", reports))
    code = worst_exit_code([r.exit_code for r in reports])
    _print(reports, code, quiet, verbose)
    sys.exit(code)


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise NormfoldError(f"--report {path}: folder {folder!r} does not exist")


def _run(job_list, in_place, options, verify: VerifyOptions, workers: int, quiet: bool) -> list[Report]:
    show_bar = len(job_list) > 1 and not quiet and sys.stderr.isatty()
    if not show_bar:
        return fold_many(job_list, in_place=in_place, options=options, verify=verify, workers=workers)
    with click.progressbar(length=len(job_list), label="folding", file=sys.stderr) as bar:
        return fold_many(job_list, in_place=in_place, options=options, verify=verify, workers=workers,
                         done=lambda _: bar.update(1))


def _print(reports: list[Report], code: int, quiet: bool, verbose: bool) -> None:
    """Quiet by default on success when not on a terminal (pipelines read the exit code and the
    JSON); errors always go to stderr, one line each."""
    interactive = sys.stdout.isatty()
    ok = code == exit_codes.OK
    if not quiet and (verbose or interactive or not ok):
        if len(reports) == 1 and reports[0].error is None:
            click.echo(colour(reports[0].to_text(verbose=verbose)), err=not ok)
        elif len(reports) > 1:
            click.echo(colour(summary_table(reports)), err=not ok)
    for report in reports:
        if report.error:
            prefix = f"{report.input}: " if len(reports) > 1 and not report.error.startswith(str(report.input)) else ""
            click.echo(f"normfold: error: {prefix}{report.error}", err=True)
        elif report.exit_code == exit_codes.OUTPUTS_DIFFER:
            click.echo(f"normfold: error: {report.input}: outputs differ from the original; nothing written", err=True)
        elif report.exit_code == exit_codes.UNVERIFIED:
            click.echo(f"normfold: error: {report.input}: {report.verification.detail}; nothing written "
                       "(use --allow-unverified or --no-verify to write anyway)", err=True)
