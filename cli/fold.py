"""`normfold fold`: fold and fuse, verify, write."""

from __future__ import annotations

import sys

import click

from normfold import exit_codes
from normfold.api import fold_file
from normfold.cli.main import EXIT_CODES_HELP, fail
from normfold.cli.options import fold_options, fold_options_from, pass_errors, verification_options, verify_options
from normfold.errors import NormfoldError
from normfold.io import write_text_atomic
from normfold.report import Report


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file [default: <stem>.folded.onnx beside MODEL].")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL (only after verification passed).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON to this file.")
@fold_options
@verification_options
@click.option("--verify", "verify_mode", type=click.Choice(["outputs", "sites"]), default="outputs", show_default=True,
              help="sites: also compare every rewritten site's output tensor, to name the one that differs.")
@click.option("--no-verify", is_flag=True, help="Write without running onnxruntime.")
@click.option("--allow-unverified", is_flag=True, help="Write even when onnxruntime cannot run the model.")
@click.option("--benchmark", is_flag=True, help="Time both models in onnxruntime (session creation, median latency).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("-v", "--verbose", is_flag=True, help="List every site, not only those left.")
@pass_errors
def fold(model, output, in_place, report_path, verify_mode, no_verify, allow_unverified, benchmark, quiet, verbose,
         **groups):
    """Fold and fuse the norm sites of MODEL, check the result in onnxruntime, and write it.

    Nothing is written unless every output of the result matches the original
    (|folded - original| <= atol + rtol * |original|).
    """
    try:
        options = fold_options_from(groups)
        verify = verify_options(groups, enabled=not no_verify, allow_unverified=allow_unverified,
                                sites=verify_mode == "sites", benchmark=benchmark)
        report = fold_file(model, output, in_place=in_place, options=options, verify=verify)
    except NormfoldError as exc:
        if report_path:
            _write_quietly(report_path, Report(input=model, exit_code=exit_codes.BAD_INPUT, error=str(exc)))
        raise
    if report_path:
        write_text_atomic(report_path, report.to_json())
    if report.exit_code != exit_codes.OK or not quiet:
        click.echo(report.to_text(verbose=verbose), err=report.exit_code != exit_codes.OK)
    if report.exit_code == exit_codes.OUTPUTS_DIFFER:
        click.echo("normfold: error: outputs differ from the original; nothing written", err=True)
    elif report.exit_code == exit_codes.UNVERIFIED:
        click.echo(f"normfold: error: {report.verification.detail}; nothing written "
                   "(use --allow-unverified or --no-verify to write anyway)", err=True)
    sys.exit(report.exit_code)


def _write_quietly(path: str, report: Report) -> None:
    try:
        write_text_atomic(path, report.to_json())
    except NormfoldError:
        pass
