"""Option groups shared by several commands (like Polygraphy's argument groups): the inputs and
tolerances of a verification, and the fold options."""

from __future__ import annotations

import functools
import sys

import click

from normfold import exit_codes
from normfold.api import FoldOptions, VerifyOptions
from normfold.errors import NormfoldError
from normfold.passes import PASS_NAMES
from normfold.verify import OPT_LEVELS, parse_int_range, parse_shape, parse_tolerance

VERIFY_KEYS = ("shapes", "dims", "int_ranges", "input_files", "batches", "seed", "atol", "rtol", "ort_opt_level")
FOLD_KEYS = ("target_opset", "allow_contrib", "allow_transpose", "passes", "skip", "exclude_node", "external_data")


def _stack(*decorators):
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


verification_options = _stack(
    click.option("--shape", "shapes", multiple=True, metavar="NAME:DIMS",
                 help="Input shape for the random inputs, e.g. input:1x3x224x224 (repeatable)."),
    click.option("--dim", "dims", multiple=True, metavar="SYMBOL=N",
                 help="Value of a named dynamic dimension, e.g. batch=1 (repeatable)."),
    click.option("--int-range", "int_ranges", multiple=True, metavar="NAME:LO:HI",
                 help="Range [LO, HI) of an integer input, e.g. input_ids:0:30522 [default: 0:2]."),
    click.option("--inputs", "input_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
                 help="Real inputs: a .npz with one array per input (or a .npy for one input); one batch per file."),
    click.option("--batches", type=click.IntRange(1, 1000), default=1, show_default=True,
                 help="Random batches to compare (seeds SEED, SEED+1, ...)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."),
    click.option("--atol", multiple=True, metavar="[OUTPUT:]X",
                 help="Absolute tolerance, for every output or one (repeatable) [default: by dtype]."),
    click.option("--rtol", multiple=True, metavar="[OUTPUT:]X",
                 help="Relative tolerance, for every output or one (repeatable) [default: by dtype]."),
    click.option("--ort-opt-level", type=click.Choice(OPT_LEVELS), default="disabled", show_default=True,
                 help="onnxruntime graph optimizations while comparing (disabled: its fusions cannot hide a difference)."),
)


fold_options = _stack(
    click.option("--target-opset", type=int,
                 help="Allow raising the opset to this where a fused op needs it (17: LayerNormalization, "
                      "21: GroupNormalization, 23: RMSNormalization); converted only when some site needs it."),
    click.option("--allow-contrib", is_flag=True,
                 help="Where the standard op needs a newer opset, use onnxruntime's com.microsoft ops instead."),
    click.option("--allow-transpose", is_flag=True,
                 help="Fuse a LayerNorm over non-trailing axes (channels-first) between a Transpose pair."),
    click.option("--passes", help=f"Comma-separated passes to run [default: all: {','.join(PASS_NAMES)}]."),
    click.option("--skip", help="Comma-separated passes not to run."),
    click.option("--exclude-node", multiple=True, help="Leave sites containing this node alone (repeatable)."),
    click.option("--external-data", is_flag=False, flag_value="", default=None, metavar="[NAME]",
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


def verify_options(kwargs: dict, **extra) -> VerifyOptions:
    """VerifyOptions from the verification option group (pops its keys from `kwargs`)."""
    v = {k: kwargs.pop(k) for k in VERIFY_KEYS}
    return VerifyOptions(seed=v["seed"], shapes=dict(parse_shape(s) for s in v["shapes"]), dims=_parse_dims(v["dims"]),
                         int_ranges=dict(parse_int_range(r) for r in v["int_ranges"]),
                         input_files=list(v["input_files"]), batches=v["batches"],
                         atol=_single(parse_tolerance(v["atol"], "--atol")),
                         rtol=_single(parse_tolerance(v["rtol"], "--rtol")), opt_level=v["ort_opt_level"], **extra)


def fold_options_from(kwargs: dict) -> FoldOptions:
    """FoldOptions from the fold option group (pops its keys from `kwargs`)."""
    f = {k: kwargs.pop(k) for k in FOLD_KEYS}
    return FoldOptions(passes=_parse_passes(f["passes"], f["skip"]), target_opset=f["target_opset"],
                       exclude_nodes=frozenset(f["exclude_node"]), allow_contrib=f["allow_contrib"],
                       allow_transpose=f["allow_transpose"], external_data=f["external_data"])


EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code:<3} {text}" for code, text in exit_codes.DESCRIPTIONS.items())


def fail(message: str, code: int = exit_codes.BAD_INPUT) -> None:
    click.echo(f"normfold: error: {message}", err=True)
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
