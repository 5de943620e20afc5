"""Option groups shared by several commands (like Polygraphy's argument groups): the inputs and
tolerances of a verification, and the fold options."""

from __future__ import annotations

import functools
import sys

import click

from normfold import exit_codes
from normfold.api import FoldOptions, VerifyOptions
from normfold.errors import NormfoldError, one_line
from normfold.passes import PASS_NAMES
from normfold.prepare import INITIALIZER_INPUTS
from normfold.verify import OPT_LEVELS, parse_int_range, parse_shape, parse_tolerance


def _stack(*decorators):
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def _group(*specs):
    """An option group: the decorator that adds its options, and their parameter names (the keys
    the `*_from` functions below must each turn into a field: checked at import)."""
    names = tuple(click.Option(list(decls), **kw).name for decls, kw in specs)
    return _stack(*(click.option(*decls, **kw) for decls, kw in specs)), names


def _opt(*decls, **kw):
    return decls, kw


def _regular_input_file(ctx, param, values):
    """--inputs must name regular files: a FIFO would block np.load forever."""
    import os
    import stat

    from normfold.errors import show_path

    for value in values:
        try:
            mode = os.stat(value).st_mode
        except OSError as exc:
            raise click.BadParameter(f"{show_path(value)}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise click.BadParameter(f"{show_path(value)}: not a regular file (a FIFO or device would block)")
    return values


def _timeout(ctx, param, value):
    if value is not None and not (0 < value < float("inf")):
        raise click.BadParameter("must be a positive number of seconds")
    return value


verification_options, VERIFY_KEYS = _group(
    _opt("--shape", "shapes", multiple=True, metavar="NAME:DIMS",
         help="Input shape for the random inputs, e.g. input:1x3x224x224 (repeatable)."),
    _opt("--dim", "dims", multiple=True, metavar="SYMBOL=N",
         help="Value of a named dynamic dimension, e.g. batch=1 (repeatable)."),
    _opt("--int-range", "int_ranges", multiple=True, metavar="NAME:LO:HI",
         help="Range [LO, HI) of an integer input, e.g. input_ids:0:30522 [default: 0:2]."),
    _opt("--inputs", "input_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
         callback=_regular_input_file,
         help="Real inputs: a .npz with one array per input (or a .npy for one input); one batch per file."),
    _opt("--batches", type=click.IntRange(1, 1000), default=1, show_default=True,
         help="Random batches to compare (seeds SEED, SEED+1, ...)."),
    _opt("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the random inputs."),
    _opt("--atol", multiple=True, metavar="[OUTPUT:]X",
         help="Absolute tolerance, for every output or one (repeatable) [default: by dtype]."),
    _opt("--rtol", multiple=True, metavar="[OUTPUT:]X",
         help="Relative tolerance, for every output or one (repeatable) [default: by dtype]."),
    _opt("--ort-opt-level", type=click.Choice(OPT_LEVELS), default="disabled", show_default=True,
         help="onnxruntime graph optimizations while comparing (disabled: its fusions cannot hide a difference)."),
    _opt("--timeout", type=float, default=None, metavar="SECONDS", callback=_timeout,
         help="Stop a verification that takes longer (exit 3, nothing written) [default: no limit]."),
)


fold_options, FOLD_KEYS = _group(
    _opt("--target-opset", type=int,
         help="Allow raising the opset to this where a fused op needs it (17: LayerNormalization, "
              "21: GroupNormalization, 23: RMSNormalization); converted only when some site needs it."),
    _opt("--allow-contrib", is_flag=True,
         help="Where the standard op needs a newer opset, use onnxruntime's com.microsoft ops instead."),
    _opt("--allow-transpose", is_flag=True,
         help="Fuse a LayerNorm over non-trailing axes (channels-first) between a Transpose pair."),
    _opt("--passes", help=f"Comma-separated passes to run [default: all: {','.join(PASS_NAMES)}]."),
    _opt("--skip", help="Comma-separated passes not to run."),
    _opt("--exclude-node", multiple=True, help="Leave sites containing this node alone (repeatable)."),
    _opt("--initializer-inputs", type=click.Choice(INITIALIZER_INPUTS), default="auto", show_default=True,
         help="Initializers also listed as graph inputs: constant: treat them as constants and remove them from "
              "the inputs; input: leave them overridable; auto: constant where the IR version requires the "
              "listing (< 4)."),
    _opt("--external-data", is_flag=False, flag_value="", default=None, metavar="[NAME]",
         help="Write the weights to an external data file NAME beside the output [default name: "
              "<output>.data; used by itself for inputs with external data and models near 2 GB]."),
)


def _parse_dims(values) -> dict[str, int]:
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


def _single(values: dict):
    """A tolerance dict with only a default is just that number."""
    return values.get(None) if set(values) <= {None} else values


def _tolerance(values, option):
    parsed = parse_tolerance(values, option)
    for key, value in parsed.items():
        if not (value >= 0 and value != float("inf")):  # also NaN
            raise NormfoldError(f"{option} {value!r}{'' if key is None else f' for {key!r}'}: must be a finite "
                                "number >= 0")
    return _single(parsed)


# Each key of a group -> the option fields it sets (a function of all the group's values). Every
# key must be here: an option that is parsed but never used would be silently ignored.
_VERIFY_FIELDS = {
    "shapes": lambda v: {"shapes": dict(parse_shape(s) for s in v["shapes"])},
    "dims": lambda v: {"dims": _parse_dims(v["dims"])},
    "int_ranges": lambda v: {"int_ranges": dict(parse_int_range(r) for r in v["int_ranges"])},
    "input_files": lambda v: {"input_files": list(v["input_files"])},
    "batches": lambda v: {"batches": v["batches"]},
    "seed": lambda v: {"seed": v["seed"]},
    "atol": lambda v: {"atol": _tolerance(v["atol"], "--atol")},
    "rtol": lambda v: {"rtol": _tolerance(v["rtol"], "--rtol")},
    "ort_opt_level": lambda v: {"opt_level": v["ort_opt_level"]},
    "timeout": lambda v: {"timeout": v["timeout"]},
}
_FOLD_FIELDS = {
    "target_opset": lambda v: {"target_opset": v["target_opset"]},
    "allow_contrib": lambda v: {"allow_contrib": v["allow_contrib"]},
    "allow_transpose": lambda v: {"allow_transpose": v["allow_transpose"]},
    "passes": lambda v: {"passes": _parse_passes(v["passes"], v["skip"])},
    "skip": lambda v: {},  # read with --passes
    "exclude_node": lambda v: {"exclude_nodes": frozenset(v["exclude_node"])},
    "external_data": lambda v: {"external_data": v["external_data"]},
    "initializer_inputs": lambda v: {"initializer_inputs": v["initializer_inputs"]},
}


def _check_fields(table: dict, keys: tuple[str, ...]) -> None:
    """Refuse, at import (not an assert: `python -O` would skip it), a group whose options and
    fields differ: an option without a field would be parsed and then ignored."""
    if set(table) != set(keys):
        raise TypeError(f"options without a field: {sorted(set(keys) - set(table))}; fields without an "
                        f"option: {sorted(set(table) - set(keys))} (see _VERIFY_FIELDS / _FOLD_FIELDS)")


_check_fields(_VERIFY_FIELDS, VERIFY_KEYS)
_check_fields(_FOLD_FIELDS, FOLD_KEYS)


def _fields(table: dict, kwargs: dict) -> dict:
    values = {k: kwargs.pop(k) for k in table}
    fields: dict = {}
    for convert in table.values():
        fields.update(convert(values))
    return fields


def verify_options(kwargs: dict, **extra) -> VerifyOptions:
    """VerifyOptions from the verification option group (pops its keys from `kwargs`)."""
    return VerifyOptions(**_fields(_VERIFY_FIELDS, kwargs), **extra)


def fold_options_from(kwargs: dict) -> FoldOptions:
    """FoldOptions from the fold option group (pops its keys from `kwargs`)."""
    return FoldOptions(**_fields(_FOLD_FIELDS, kwargs))


EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code:<3} {text}" for code, text in exit_codes.DESCRIPTIONS.items())


def error_line(message: str) -> str:
    """The one error line every failure prints: `normfold: error: ` and the message, on one line."""
    return f"normfold: error: {one_line(message, 2000)}"


def echo_error(message: str) -> None:
    try:
        click.echo(error_line(message), err=True)
    except OSError:  # stderr closed or full: the exit code still tells
        pass


def fail(message: str, code: int = exit_codes.BAD_INPUT) -> None:
    echo_error(message)
    sys.exit(code)


def pass_errors(func):
    """Run a command body; a NormfoldError becomes the one-line error and exit 2."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except NormfoldError as exc:
            fail(str(exc))
    return wrapper


def report_option(func):
    return click.option("--report", "report_path", type=click.Path(dir_okay=False, allow_dash=True),
                        help="Write the JSON report to this file ('-': standard output).")(func)


def write_report(path: str | None, text: str, reads=()) -> None:
    """Write a report that no model goes with (check, verify, or a refused fold): checked like
    every other path of a run (never over an input, never onto a special file), staged and moved
    into place; '-' prints it on standard output."""
    from pathlib import Path

    from normfold.io import Transaction
    from normfold.paths import REPORT_TO_STDOUT, plan_run

    if path is None:
        return
    if path == REPORT_TO_STDOUT:
        try:
            click.echo(text, nl=False)
            sys.stdout.flush()
        except OSError as exc:
            raise NormfoldError(f"cannot write the report to standard output ({exc.strerror})") from None
        return
    plan = plan_run([], path)
    for read in reads:
        plan.add_read(Path(read), "input model", None)
    with Transaction() as tx:
        tx.stage_text(path, text)
        tx.commit()
