"""Errors normfold raises on purpose, and the one formatter that puts any message on one line."""

from __future__ import annotations

import os


class NormfoldError(Exception):
    """Bad input or an impossible request: the CLI prints the message on one line and exits 2."""


class VerificationUnavailable(NormfoldError):
    """onnxruntime could not run a model, so equivalence could not be checked."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM (raised by the command's signal handler, see `note_interrupt`). Not a
    KeyboardInterrupt: Click would print a blank line on that before the one interrupt line."""


_interrupted = False


def note_interrupt(raise_now: bool = True) -> None:
    """Record an interrupt and raise Interrupted. The record outlives the exception: an import
    that was running when the signal came may swallow it (pybind turns it into an ImportError),
    and `check_interrupted` then raises it again before anything is committed. `raise_now`
    False only records it (the caller is inside an import: see cli.main._interrupt)."""
    global _interrupted
    _interrupted = True
    if raise_now:
        raise Interrupted


def check_interrupted() -> None:
    if _interrupted:
        raise Interrupted


class VerificationTimeout(VerificationUnavailable):
    """Verification did not finish within --timeout seconds."""


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if ch == "\r":
        return "\\r"
    if code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch


def escape(text: str) -> str:
    """`text` with control characters and undecodable file-name bytes written as escapes, so that
    a file name holding a newline cannot split an error line."""
    if text.isprintable():
        return text
    return "".join(_escape_char(ch) for ch in text)


def show_path(path: str | os.PathLike) -> str:
    """A path as error messages show it: one line, every byte visible."""
    return escape(os.fspath(path) if not isinstance(path, bytes) else os.fsdecode(path))


def one_line(message: BaseException | str, limit: int = 300) -> str:
    """A message on one line: the runs of whitespace of a multi-line text (onnx's checker, protobuf,
    onnxruntime) become single spaces, what else cannot be shown is escaped, and a long text is cut
    at `limit` characters. An exception without a message gives its type's name."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    text = escape(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
