"""Click commands only: parse options, call the library, render the report, exit.

Exit codes (normfold.exit_codes): 0 done; 1 outputs differ, nothing written; 2 bad usage or
unreadable/invalid model, nothing written; 3 verification impossible (onnxruntime cannot run a
model), nothing written unless --allow-unverified; 4 internal error; 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from normfold import __version__, exit_codes
from normfold.errors import NormfoldError
from normfold.api import FoldOptions, VerifyOptions, fold_file
from normfold.io import write_text_atomic
from normfold.passes import PASS_NAMES
from normfold.verify import parse_shape

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code:<3} {text}" for code, text in exit_codes.DESCRIPTIONS.items())


def _fail(message: str, code: int = exit_codes.BAD_INPUT) -> None:
    click.echo(f"normfold: error: {message}", err=True)
    sys.exit(code)


def _parse_dims(values: tuple[str, ...]) -> dict[str, int]:
    dims = {}
    for text in values:
        name, sep, value = text.rpartition("=")
        if not sep or not name or not value.isdigit():
            raise NormfoldError(f"--dim {text!r}: expected SYMBOL=N such as batch=1")
        dims[name] = int(value)
    return dims


def _parse_passes(passes: str | None, skip: str | None) -> tuple[str, ...]:
    chosen = [p.strip() for p in passes.split(",") if p.strip()] if passes else list(PASS_NAMES)
    skipped = {p.strip() for p in skip.split(",") if p.strip()} if skip else set()
    unknown = sorted((set(chosen) | skipped) - set(PASS_NAMES))
    if unknown:
        raise NormfoldError(f"unknown pass(es) {unknown}; known: {', '.join(PASS_NAMES)}")
    return tuple(p for p in chosen if p not in skipped)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="normfold")
def main() -> None:
    """Fold BatchNorm and fuse decomposed LayerNorm in ONNX models, verified with onnxruntime."""


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file [default: <stem>.folded.onnx beside MODEL].")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL (only after verification passed).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON to this file.")
@click.option("--target-opset", type=int, help="Convert the model to this opset first (e.g. 17 for LayerNormalization).")
@click.option("--allow-contrib", is_flag=True,
              help="Where the standard op needs a newer opset, use onnxruntime's com.microsoft ops instead.")
@click.option("--allow-transpose", is_flag=True,
              help="Fuse a LayerNorm over non-trailing axes (channels-first) between a Transpose pair.")
@click.option("--passes", help=f"Comma-separated passes to run [default: all: {','.join(PASS_NAMES)}].")
@click.option("--skip", help="Comma-separated passes not to run.")
@click.option("--exclude-node", multiple=True, help="Leave sites containing this node alone (repeatable).")
@click.option("--shape", "shapes", multiple=True, help="Input shape for verification, NAME:1x3x224x224 (repeatable).")
@click.option("--dim", "dims", multiple=True, help="Value of a named dynamic dimension, SYMBOL=N (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random verification inputs.")
@click.option("--atol", type=float, help="Absolute tolerance for every output [default: by dtype].")
@click.option("--rtol", type=float, help="Relative tolerance for every output [default: by dtype].")
@click.option("--no-verify", is_flag=True, help="Write without running onnxruntime.")
@click.option("--allow-unverified", is_flag=True, help="Write even when onnxruntime cannot run the model.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("-v", "--verbose", is_flag=True, help="List every site, not only those left.")
def fold(model, output, in_place, report_path, target_opset, allow_contrib, allow_transpose, passes, skip, exclude_node, shapes, dims, seed,
         atol, rtol, no_verify, allow_unverified, quiet, verbose):
    """Fold and fuse the norm sites of MODEL, check the result in onnxruntime, and write it.

    Nothing is written unless every output of the result matches the original
    (|folded - original| <= atol + rtol * |original|).
    """
    report = None
    try:
        options = FoldOptions(passes=_parse_passes(passes, skip), target_opset=target_opset,
                              exclude_nodes=frozenset(exclude_node), allow_contrib=allow_contrib,
                              allow_transpose=allow_transpose)
        verify = VerifyOptions(enabled=not no_verify, allow_unverified=allow_unverified, seed=seed,
                               shapes=dict(parse_shape(s) for s in shapes), dims=_parse_dims(dims),
                               atol=atol, rtol=rtol)
        report = fold_file(model, output, in_place=in_place, options=options, verify=verify)
    except NormfoldError as exc:
        if report_path:
            _write_error_report(report_path, model, str(exc))
        _fail(str(exc))
    if report_path:
        try:
            write_text_atomic(report_path, report.to_json())
        except NormfoldError as exc:
            _fail(str(exc))
    if report.exit_code != exit_codes.OK or not quiet:
        click.echo(report.to_text(verbose=verbose), err=report.exit_code != exit_codes.OK)
    if report.exit_code == exit_codes.OUTPUTS_DIFFER:
        click.echo("normfold: error: outputs differ from the original; nothing written", err=True)
    elif report.exit_code == exit_codes.UNVERIFIED:
        click.echo(f"normfold: error: {report.verification.detail}; nothing written "
                   "(use --allow-unverified or --no-verify to write anyway)", err=True)
    sys.exit(report.exit_code)


def _write_error_report(path: str, model: str, message: str) -> None:
    from normfold.report import Report

    report = Report(input=model, exit_code=exit_codes.BAD_INPUT, error=message)
    try:
        write_text_atomic(path, report.to_json())
    except NormfoldError:
        pass


def run() -> None:
    """Console entry point: never a traceback, a named exit code for every ending."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exit_codes.BAD_INPUT)
    except click.exceptions.Abort:
        sys.exit(exit_codes.INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("normfold: interrupted; nothing written", err=True)
        sys.exit(exit_codes.INTERRUPTED)
    except SystemExit:
        raise
    except BaseException as exc:  # a bug: one line, no traceback unless asked for
        if os.environ.get("NORMFOLD_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:300]
        click.echo(f"normfold: internal error: {type(exc).__name__}: {text} (set NORMFOLD_DEBUG=1 for details)",
                   err=True)
        sys.exit(exit_codes.INTERNAL_ERROR)
