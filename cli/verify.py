"""`normfold verify ORIGINAL CANDIDATE`: compare any two models with the same inputs and outputs."""

from __future__ import annotations

import sys
import time

import click

from normfold import exit_codes
from normfold.api import benchmark_files, check_input_files
from normfold.cli.options import (EXIT_CODES_HELP, echo_error, pass_errors, report_option, verification_options,
                                  verify_options, write_report)
from normfold.cli.render import colour
from normfold.errors import VerificationTimeout
from normfold.io import read_model
from normfold.report import Report, Verification


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@verification_options
@click.option("--sites", "site_names", is_flag=False, flag_value="*", default=None, metavar="[NAME,...]",
              help="Also compare intermediate tensors present in both models: all of them, or those named.")
@click.option("--benchmark", is_flag=True, help="Time both models in onnxruntime (session creation, median latency).")
@report_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="Print the comparison even when not on a terminal.")
@pass_errors
def verify(original, candidate, site_names, benchmark, report_path, quiet, verbose, **groups):
    """Run ORIGINAL and CANDIDATE in onnxruntime on the same inputs and compare every output.

    Exit 0 when all outputs match, 1 when any differs, 2 on bad input, 3 when onnxruntime cannot
    run a model.
    """
    started = time.perf_counter()
    options = verify_options(groups)
    models = [read_model(path, lazy=True)[0] for path in (original, candidate)]  # one-line errors for bad files
    check_input_files(models[0], options.input_files)
    sites = None
    if site_names == "*":
        sites = _common_tensors(*models)
    elif site_names:
        sites = [n.strip() for n in site_names.split(",") if n.strip()]
    del models
    report = Report(input=original, output=candidate)
    try:
        _, report.verification = options.verify(original, candidate, sites)
    except VerificationTimeout as exc:
        report.verification = Verification("unavailable", seed=options.seed, detail=f"timed out: {exc}")
    status = report.verification.status
    if benchmark and status != "unavailable":
        report.benchmark = benchmark_files(original, candidate, options)
    report.exit_code = {"passed": exit_codes.OK, "failed": exit_codes.OUTPUTS_DIFFER}.get(status, exit_codes.UNVERIFIED)
    report.timings = {"total": round(time.perf_counter() - started, 4)}
    write_report(report_path, report.to_json("verify"), reads=(original, candidate))
    failed = report.exit_code != exit_codes.OK
    err = failed or report_path == "-"
    try:
        if not quiet and (failed or verbose or sys.stdout.isatty()):
            click.echo(colour(report.to_text(verbose=verbose), sys.stderr if err else None), err=err)
    except OSError:
        pass
    if failed:
        echo_error(report.verification.detail or "outputs differ")
    sys.exit(report.exit_code)


def _common_tensors(a, b) -> list[str]:
    """Tensors written by a node in both models (in `b`'s graph order), other than graph outputs."""
    produced_a = {o for n in a.graph.node for o in n.output if o}
    outputs = {o.name for o in b.graph.output}
    return [o for n in b.graph.node for o in n.output if o and o in produced_a and o not in outputs]
