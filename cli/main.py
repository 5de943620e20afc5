"""The `normfold` command group and its console entry point. Each command lives in its own
module and is only a thin layer: parse options, call the library, render the report, exit.

Exit codes (normfold.exit_codes): 0 done; 1 outputs differ, nothing written; 2 bad usage or
unreadable/invalid model, nothing written; 3 verification impossible (onnxruntime cannot run a
model, or --timeout passed), nothing written unless --allow-unverified; 4 internal error;
130 interrupted (Ctrl-C or SIGTERM), nothing written.

This module imports nothing heavy at import time: `run` installs the interrupt handlers first,
so that Ctrl-C or SIGTERM while onnx, numpy and onnxruntime are still being imported ends with
the one interrupt line and 130 like any other interrupt. `main` (the Click group) is built on
first use.
"""

from __future__ import annotations

import os
import signal
import sys

from normfold.errors import Interrupted, check_interrupted, note_interrupt  # noqa: E402 - light: no onnx, no numpy

_INTERRUPTED_LINE = "normfold: error: interrupted; nothing written\n"
_main = None


def _build():
    global _main
    if _main is None:
        import click

        from normfold import __version__
        from normfold.cli.fold import fold
        from normfold.cli.inspect import check, inspect
        from normfold.cli.options import EXIT_CODES_HELP
        from normfold.cli.verify import verify

        @click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
        @click.version_option(__version__, prog_name="normfold")
        def main() -> None:
            """Fold BatchNorm and fuse decomposed LayerNorm/RMSNorm/GroupNorm in ONNX models, verified
            with onnxruntime."""

        for command in (fold, inspect, check, verify):
            main.add_command(command)
        _main = main
    return _main


def __getattr__(name: str):
    if name == "main":
        return _build()
    raise AttributeError(name)


def _committed() -> bool:
    staging = sys.modules.get("normfold.io.staging")
    return bool(staging is not None and staging.COMMITTED)


def _interrupt(signum, frame) -> None:
    """Ctrl-C and SIGTERM: stop where we are (staged files are removed on the way out), unless the
    run's files are already in place; then let it finish (printing is all that is left)."""
    if _committed():
        return
    # Never raise inside an import: an exception through a C extension's initialisation (numpy,
    # protobuf, onnxruntime) can crash the interpreter (SIGSEGV or abort, about 1 run in 40 with
    # SIGTERM 80-100 ms into start-up). The interrupt is recorded and raised by the next
    # check_interrupted, the first one right after the commands are imported.
    note_interrupt(raise_now=not _importing(frame))


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _write_stderr(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _exit(code: int) -> None:
    """Exit with `code` whatever happens to standard output: a failed flush at exit (stdout is
    /dev/full, or a closed pipe) must not turn the run's outcome into another one."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    sys.exit(code)


def run() -> None:
    """Console entry point: never a traceback, a named exit code for every ending."""
    signal.signal(signal.SIGTERM, _interrupt)  # a pipeline's kill ends like Ctrl-C: staged files removed
    signal.signal(signal.SIGINT, _interrupt)
    try:
        code = _run()
    except (KeyboardInterrupt, Interrupted):
        code = _interrupted()
    _exit(code)


def _interrupted() -> int:
    try:
        from normfold.io.staging import discard_all_staging
        from normfold.watchdog import kill_children

        kill_children()
        discard_all_staging()
    except BaseException:
        pass
    _write_stderr(_INTERRUPTED_LINE)
    return 130


def _run() -> int:
    import click

    from normfold import exit_codes
    from normfold.cli.options import echo_error

    try:
        main = _build()
        check_interrupted()  # one the imports above held back
        main(standalone_mode=False)
        return exit_codes.OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors: one line, like every other error
        hint = f" (see 'normfold {exc.ctx.info_name} --help')" if getattr(exc, "ctx", None) and exc.ctx.parent else ""
        echo_error(f"{exc.format_message()}{hint}")
        return exit_codes.BAD_INPUT
    except (click.exceptions.Abort, KeyboardInterrupt, Interrupted):  # Click turns Ctrl-C into Abort
        return _interrupted()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # a bug: one line, no traceback unless asked for
        if os.environ.get("NORMFOLD_DEBUG"):
            raise
        echo_error(f"internal error: {type(exc).__name__}: {exc} (set NORMFOLD_DEBUG=1 for details)")
        return exit_codes.INTERNAL_ERROR
