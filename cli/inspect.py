"""`normfold inspect` (what would change, and why) and `normfold check` (a lint for CI)."""

from __future__ import annotations

import os
import sys

import click

from normfold import exit_codes
from normfold.api import fold
from normfold.cli.options import (EXIT_CODES_HELP, echo_error, fold_options, fold_options_from, pass_errors,
                                  report_option, write_report)
from normfold.cli.render import colour
from normfold.errors import NormfoldError
from normfold.io import read_model
from normfold.report import Report, document_json, worst_exit_code

FUSED_OPS = ("BatchNormalization", "LayerNormalization", "RMSNormalization", "GroupNormalization",
             "InstanceNormalization", "com.microsoft::SimplifiedLayerNormalization")
WOULD = {"folded": "would fold", "fused": "would fuse", "left": "left"}


def _plan(path: str, options) -> Report:
    """Run the passes on the model in memory (nothing is written) and return the report."""
    model, _ = read_model(path, lazy=True)
    _, report = fold(model, options, copy=False, base_dir=os.path.dirname(os.path.abspath(path)))
    report.input = path
    return report


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False))
@fold_options
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of text.")
@pass_errors
def inspect(model, as_json, **groups):
    """List every normalization site of MODEL, what normfold would do with it and why, and the op
    counts. Writes nothing."""
    report = _plan(model, fold_options_from(groups))
    report.exit_code = exit_codes.OK
    if as_json:
        click.echo(document_json("inspect", [report]), nl=False)
        return
    lines = [f"{model}: opset {report.opset_before}, {report.nodes_before} nodes; "
             f"{report.count('folded')} to fold, {report.count('fused')} to fuse, {report.count('left')} left"]
    if report.opset_after != report.opset_before:
        lines[0] += f" (after conversion to opset {report.opset_after})"
    lines.extend(f"  note: {note}" for note in report.notes)
    for site in report.sites:
        what = WOULD[site.status] + (f" ({site.reason})" if site.reason else "")
        where = "" if site.graph == "main" else f" [{site.graph}]"
        lines.append(f"  {what}: {site.kind} at {site.nodes[0]}{where}: {site.detail}")
    present = {op: n for op, n in report.ops_before.items() if op in FUSED_OPS}
    if present:
        lines.append("  norm ops already in the model: " + ", ".join(f"{op} x{n}" for op, n in present.items()))
    lines.append(f"  nodes after: {report.nodes_after}; ops: " + ", ".join(
        f"{op} {report.ops_before.get(op, 0)}->{n}" for op, n in report.ops_after.items()
        if n != report.ops_before.get(op, 0)) if report.nodes_after != report.nodes_before else
        "  nothing would change")
    click.echo(colour("\n".join(lines)))


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@fold_options
@report_option
@pass_errors
def check(models, report_path, **groups):
    """Exit 1 if any site of the MODELs could still be folded or fused (with these options), 0 if
    none; one line per such site. A lint for CI: writes no model."""
    options = fold_options_from(groups)
    reports = []
    for path in models:
        try:
            report = _plan(path, options)
        except NormfoldError as exc:
            reports.append(Report(input=path, exit_code=exit_codes.BAD_INPUT, error=str(exc)))
            echo_error(str(exc))
            continue
        rewritable = [s for s in report.sites if s.status != "left"]
        report.exit_code = exit_codes.OUTPUTS_DIFFER if rewritable else exit_codes.OK
        for site in rewritable:
            if site.status == "folded":  # name the BN (or Mul/Add) and the layer it folds into
                line = f"node {site.nodes[-1]}: {site.kind} {site.nodes[0]} can be folded"
            else:
                line = f"node {site.nodes[0]}: {site.kind} can be fused"
            click.echo(f"{path}: {line}", err=report_path == "-")
        reports.append(report)
    write_report(report_path, document_json("check", reports), reads=models)
    sys.exit(worst_exit_code([r.exit_code for r in reports]))
