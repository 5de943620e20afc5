"""Staging: every file a run writes (models, their external data, the report) is first written into
a staging folder beside its destination, and all of them are moved into place together, with
os.replace, only at the end of the run (`Transaction.commit`). A failure or an interrupt before
that leaves nothing but the staging folder, which is removed on the way out.

Staging folders are named `.normfold-staging-<pid>-<random>`. A run killed with SIGKILL cannot
remove its own; the next run that stages in the same folder removes those whose process is gone.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path

import onnx

from normfold.errors import NormfoldError, check_interrupted, one_line, show_path
from normfold.io.external import approximate_size, write_external_data
from normfold.io.protobuf import write_model

TWO_GB = 2**31
STAGING_PREFIX = ".normfold-staging-"

# Every staging folder this process created and has not removed yet: an interrupt removes them all.
_LIVE: set[Path] = set()
# Set once a run's files are in place: an interrupt after that no longer undoes anything (the CLI
# then lets the run finish printing, with its own exit code).
COMMITTED = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # pragma: no mutate (signal 1 would hang up a live process: mutmut itself)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # some other user's process: alive, not ours to judge
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[str]:
    """Remove the staging folders in `folder` left by normfold runs whose process no longer exists
    (killed with SIGKILL, or the machine went down). Returns their names."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        pid_text = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        except OSError:
            pass
    return removed


def make_staging_folder(parent: str | os.PathLike) -> Path:
    """A new, empty staging folder in `parent` (after removing stale ones there)."""
    parent = Path(parent)
    remove_stale_staging(parent)
    folder = parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        folder.mkdir(mode=0o700)
    except OSError as exc:
        raise NormfoldError(f"cannot write to {show_path(parent)!r} ({exc.strerror or one_line(exc)})") from None
    _LIVE.add(folder)
    return folder


def remove_staging(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    _LIVE.discard(folder)


def discard_all_staging() -> None:
    """Remove every staging folder of this process (on an interrupt: nothing is written)."""
    for folder in list(_LIVE):
        remove_staging(folder)


_counter = itertools.count()


def _default_mode() -> int:
    """0o666 less the process umask: the mode open() gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class StagedModel:
    """A model written into its own subfolder of a staging folder, with its final file names (so
    external-data locations are already right), waiting to be moved into place."""

    def __init__(self, model: onnx.ModelProto, dest: str | os.PathLike, staging: str | os.PathLike,
                 external_data: bool | None = None, data_name: str | None = None, consume: bool = False,
                 source_dir: str | os.PathLike | None = None):
        """Write `model` for `dest` inside the staging folder `staging` (which must be in dest's
        folder). With external data (forced, or needed past protobuf's 2 GB), weights go to
        `data_name` beside it; tensors still in the source's external files (read lazily,
        relative to `source_dir`) are copied across without being loaded. `consume=True` lets
        the model's tensors point at the new file afterwards (the caller is done with it);
        otherwise a copy of the model is written."""
        self.dest = Path(dest)
        self.folder = Path(staging) / f"m{os.getpid()}-{next(_counter)}"
        try:
            self.folder.mkdir()
        except OSError as exc:
            raise NormfoldError(f"{show_path(self.dest)}: cannot write to {show_path(self.dest.parent)!r} "
                                f"({exc.strerror or one_line(exc)})") from None
        self.path = self.folder / self.dest.name
        self.files: list[str] = [self.dest.name]  # in commit order: data first, model last
        try:
            if external_data is None:
                external_data = approximate_size(model) >= TWO_GB - 2**26
            if external_data:
                data_name = data_name or f"{self.dest.name}.data"
                if not consume:
                    copy = onnx.ModelProto()
                    copy.CopyFrom(model)
                    model = copy
                if write_external_data(model, self.folder / data_name, data_name, source_dir):
                    self.files.insert(0, data_name)
            # No fsync: the rename already guarantees that a crashed or killed run leaves no
            # partial model; forcing 400 MB to disk would cost more than the fold itself.
            with open(self.path, "wb") as f:
                write_model(model, f)
        except OSError as exc:  # disk full, quota, a file system that refuses the name
            self.discard()
            raise NormfoldError(f"{show_path(self.dest)}: cannot write ({exc.strerror or one_line(exc)})") from None
        except BaseException:
            self.discard()
            raise

    def moves(self) -> list[tuple[str, str]]:
        """(staged file, destination) pairs in commit order: external data first, model last."""
        return [(str(self.folder / name), str(self.dest.parent / name)) for name in self.files]

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Transaction:
    """The files of one run, staged and then committed together.

    `folder_for(dest)` gives the staging folder in dest's folder (made on first use; call it for
    every destination before any work, so that an unwritable folder is found first). `add` records
    a staged file; `commit` moves every recorded file into place in the order added; `discard`
    (also on leaving a `with` block) removes the staging folders and whatever is still in them."""

    def __init__(self) -> None:
        self.folders: dict[str, Path] = {}
        self.moves: list[tuple[str, str]] = []
        self.committed = False

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def folder_for(self, dest: str | os.PathLike) -> Path:
        parent = os.path.realpath(os.path.dirname(os.path.abspath(dest)))
        if parent not in self.folders:
            self.folders[parent] = make_staging_folder(parent)
        return self.folders[parent]

    def add(self, moves: list[tuple[str, str]]) -> None:
        self.moves.extend(moves)

    def stage_text(self, dest: str | os.PathLike, text: str) -> None:
        folder = self.folder_for(dest) / f"r{os.getpid()}-{next(_counter)}"
        try:
            folder.mkdir()
            staged = folder / Path(dest).name
            with open(staged, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise NormfoldError(f"{show_path(dest)}: cannot write ({exc.strerror or one_line(exc)})") from None
        self.moves.append((str(staged), str(dest)))

    def commit(self) -> None:
        """Move every staged file into place (each with the mode a plain open() would give)."""
        global COMMITTED
        mode = _default_mode()
        blocked = {signal.SIGINT, signal.SIGTERM}
        main = threading.current_thread() is threading.main_thread()
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # an interrupt waits until all are moved
        try:
            check_interrupted()  # never commit after an interrupt, even one some library swallowed
            for staged, dest in self.moves:
                os.chmod(staged, mode)
                os.replace(staged, dest)
            self.committed = COMMITTED = True
        except OSError as exc:
            raise NormfoldError(f"{show_path(dest)}: cannot move the result into place "
                                f"({exc.strerror or one_line(exc)})") from None
        finally:
            if main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            self.discard()

    def discard(self) -> None:
        for folder in self.folders.values():
            remove_staging(folder)
        self.folders.clear()
