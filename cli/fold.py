"""`normfold fold`: fold and fuse, verify, write: one model, or many files and folders at once."""

from __future__ import annotations

import sys

import click

from normfold import exit_codes
from normfold.api import VerifyOptions
from normfold.batch import fold_many, find_models
from normfold.cli.options import (EXIT_CODES_HELP, echo_error, fold_options, fold_options_from, pass_errors,
                                  report_option, verification_options, verify_options, write_report)
from normfold.cli.render import colour, summary_table
from normfold.errors import NormfoldError
from normfold.report import Report, document_json, worst_exit_code


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", type=click.Path(),
              help="Output file, or folder for several models [default: <stem>.folded.onnx beside each model].")
@click.option("--in-place", is_flag=True, help="Overwrite each model (only after its verification passed).")
@report_option
@fold_options
@verification_options
@click.option("--verify", "verify_mode", type=click.Choice(["auto", "outputs", "sites", "local"]), default="auto",
              show_default=True,
              help="outputs: run both whole models; sites: also compare every rewritten site's output tensor, to "
                   "name the one that differs; local: check each rewritten site on its own (memory of the largest "
                   "site); auto: outputs, or local when one session of the model would not fit in memory.")
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
    most severe of theirs, and a failing model does not stop the others. Every file of the run,
    the report included, is moved into place together at the end.
    """
    options = fold_options_from(groups)
    verify = verify_options(groups, enabled=not no_verify, allow_unverified=allow_unverified,
                            sites=verify_mode == "sites", benchmark=benchmark,
                            local={"auto": None, "local": True}.get(verify_mode, False))
    try:
        job_list = find_models(models, output, in_place)
        if options.external_data and len(job_list) > 1:
            raise NormfoldError("--external-data NAME fits one model; with several, use --external-data "
                                "without a name (each gets <output>.data)")
    except NormfoldError as exc:
        try:
            write_report(report_path, document_json("fold", [Report(input=" ".join(models), exit_code=exit_codes.BAD_INPUT,
                                                                     error=str(exc))]), reads=models)
        except NormfoldError:
            pass  # the first error is the one to tell
        raise
    reports = _run(job_list, in_place, options, verify, jobs, quiet, report_path)
    code = worst_exit_code([r.exit_code for r in reports])
    # Everything is in place now: nothing printed below can change the outcome.
    try:
        _print(reports, code, quiet, verbose, to_stderr=report_path == "-")
    except OSError:
        pass
    sys.exit(code)


def _report_to_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        raise NormfoldError(f"cannot write the report to standard output ({exc.strerror}); nothing written") from None


def _run(job_list, in_place, options, verify: VerifyOptions, workers: int, quiet: bool, report_path) -> list[Report]:
    run = dict(in_place=in_place, options=options, verify=verify, workers=workers, report=report_path,
               report_to_stdout=_report_to_stdout)
    show_bar = len(job_list) > 1 and not quiet and sys.stderr.isatty()
    if not show_bar:
        return fold_many(job_list, **run)
    with click.progressbar(length=len(job_list), label="folding", file=sys.stderr) as bar:
        return fold_many(job_list, done=lambda _: bar.update(1), **run)


def _print(reports: list[Report], code: int, quiet: bool, verbose: bool, to_stderr: bool = False) -> None:
    """Quiet by default on success when not on a terminal (pipelines read the exit code and the
    JSON); errors always go to stderr, one line each. With the report on stdout, text goes to stderr."""
    ok = code == exit_codes.OK
    err = not ok or to_stderr
    interactive = (sys.stderr if to_stderr else sys.stdout).isatty()
    if not quiet and (verbose or interactive or not ok):
        if len(reports) == 1 and reports[0].error is None:
            click.echo(colour(reports[0].to_text(verbose=verbose), sys.stderr if err else None), err=err)
        elif len(reports) > 1:
            click.echo(colour(summary_table(reports), sys.stderr if err else None), err=err)
    for report in reports:
        if report.error:
            prefix = f"{report.input}: " if len(reports) > 1 and not report.error.startswith(str(report.input)) else ""
            echo_error(f"{prefix}{report.error}")
        elif report.exit_code == exit_codes.OUTPUTS_DIFFER:
            echo_error(f"{report.input}: outputs differ from the original; nothing written")
        elif report.exit_code == exit_codes.UNVERIFIED:
            hint = "" if report.verification.detail.startswith("timed out") else \
                " (use --allow-unverified or --no-verify to write anyway)"
            echo_error(f"{report.input}: {report.verification.detail}; nothing written{hint}")
