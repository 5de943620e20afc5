"""The `normfold` command group and its console entry point. Each command lives in its own
module and is only a thin layer: parse options, call the library, render the report, exit.

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
from normfold.cli.options import EXIT_CODES_HELP

@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="normfold")
def main() -> None:
    """Fold BatchNorm and fuse decomposed LayerNorm/RMSNorm/GroupNorm in ONNX models, verified
    with onnxruntime."""


def _register() -> None:
    from normfold.cli.fold import fold
    from normfold.cli.inspect import check, inspect
    from normfold.cli.verify import verify

    for command in (fold, inspect, check, verify):
        main.add_command(command)


_register()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run() -> None:
    """Console entry point: never a traceback, a named exit code for every ending."""
    signal.signal(signal.SIGTERM, _interrupt)  # a pipeline's kill ends like Ctrl-C: staged files removed
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: one line, like every other error
        hint = f" (see 'normfold {exc.ctx.info_name} --help')" if getattr(exc, "ctx", None) and exc.ctx.parent else ""
        click.echo(f"normfold: error: {exc.format_message()}{hint}", err=True)
        sys.exit(exit_codes.BAD_INPUT)
    except (click.exceptions.Abort, KeyboardInterrupt):  # Click turns Ctrl-C into Abort
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
