"""What kind of file a path names, told without opening it (a FIFO would block, a device never end)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from normfold.errors import one_line

_FILE_KINDS = ((stat.S_ISDIR, "is a directory, not a model file"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
               (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
               (stat.S_ISSOCK, "is a socket"))


def regular_file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a regular file, or None. Never opens it (a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except PermissionError:
        return "permission denied"
    except (OSError, ValueError) as exc:  # ELOOP, ENAMETOOLONG, embedded NUL byte, ...
        return f"cannot read ({getattr(exc, 'strerror', None) or one_line(exc)})"
    if stat.S_ISREG(mode):
        return None
    for test, text in _FILE_KINDS:
        if test(mode):
            return f"{text}; a model must be a regular file"
    return "not a regular file"
