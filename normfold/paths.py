"""The one place that decides, before any work, which paths a run reads and writes.

A run reads every model it is given and each model's external data files; it writes, for every
model, the folded model and the external data file it may write beside it (reserved whether or
not the model turns out to need one), and the report. `plan_run` resolves all of them (real path,
and device + inode for files that exist, so a hard link or a symlink is seen through) and refuses,
with one line, any write that would land on something the run reads or on another write, and any
write onto something other than a regular file or a new name (a device, a FIFO, a symlink such as
/dev/stdout: os.replace would swap the special file for a plain one). Only `--in-place` may
replace its own input.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from normfold.errors import NormfoldError, show_path

REPORT_TO_STDOUT = "-"


@dataclass(frozen=True)
class Target:
    """One model of a run: where it is read from and where its result goes."""
    source: Path
    dest: Path
    data_name: str  # the external data file it may write beside dest
    in_place: bool = False

    @property
    def data_path(self) -> Path:
        return self.dest.parent / self.data_name


def default_output(path: Path) -> Path:
    return path.with_name(f"{path.stem}.folded.onnx" if path.suffix == ".onnx" else f"{path.name}.folded.onnx")


def data_name_for(dest: Path, external_data: str | None) -> str:
    """The external data file name a model written to `dest` uses (`--external-data NAME`, or the
    default `<output>.data`). NAME must be a plain file name: it is written beside the output."""
    if external_data and (os.path.basename(external_data) != external_data or external_data in (".", "..")):
        raise NormfoldError(f"--external-data {show_path(external_data)!r}: give a file name, not a path "
                            "(it is written beside the output)")
    return external_data or f"{dest.name}.data"


def identity(path: Path) -> tuple:
    """What makes two spellings the same file: device and inode when it exists, else its real path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except (OSError, ValueError):
        return ("path", os.path.realpath(os.path.abspath(path)))


def _also_by_path(path: Path) -> tuple:
    return ("path", os.path.realpath(os.path.abspath(path)))


def _external_files(source: Path) -> list[Path]:
    """The external data files `source` names, read from its header only (no data loaded). A model
    that cannot be read gives none here: its own job reports why."""
    try:
        if not stat.S_ISREG(os.stat(source).st_mode):
            return []
        import onnx

        from normfold.io.external import external_locations

        model = onnx.load(str(source), load_external_data=False)
        base = Path(os.path.realpath(source)).parent
        return [base / loc for loc in dict.fromkeys(external_locations(model)) if loc and "\0" not in loc]
    except Exception:
        return []


_SPECIAL = ((stat.S_ISLNK, "is a symbolic link"), (stat.S_ISCHR, "is a character device"),
            (stat.S_ISBLK, "is a block device"), (stat.S_ISFIFO, "is a FIFO (named pipe)"),
            (stat.S_ISSOCK, "is a socket"), (stat.S_ISDIR, "is a directory"))


def check_writable_name(path: Path, what: str, make_folder: bool = False) -> None:
    """Raise unless `path` is a new name or a regular file in an existing folder (or, with
    `make_folder`, in a folder that can be made: its nearest existing ancestor is a folder)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise NormfoldError(f"{show_path(path)}: {what} folder {show_path(path.parent)!r} is not a folder") from None
    except (OSError, ValueError) as exc:
        raise NormfoldError(f"{show_path(path)}: cannot use as the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((text for test, text in _SPECIAL if test(mode)), "is not a regular file")
        hint = " (use --report - for standard output)" if what == "report" else ""
        if stat.S_ISDIR(mode):
            raise NormfoldError(f"{show_path(path)}: is a directory; give a file name for the {what}")
        raise NormfoldError(f"{show_path(path)}: {kind}; normfold writes its {what} only as a regular file or a new "
                            f"name{hint}")
    parent = path.parent
    if make_folder:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        problem = "is not a folder" if parent.exists() else "does not exist"
        raise NormfoldError(f"{show_path(path)}: {what} folder {show_path(parent)!r} {problem}")


def _utf8(path: Path, what: str) -> None:
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise NormfoldError(f"{show_path(path)}: the {what}'s file name is not valid UTF-8, and onnxruntime cannot "
                            "open such a file; rename it (or pass --no-verify)") from None


class PathConflict(NormfoldError):
    """Two paths of a run overlap: the whole run is refused, not only the model that found it."""


def _own_in_place(t: Target | None, what: str, write_path: Path, read_what: str, read_owner: Target | None) -> bool:
    """Whether an in-place model replaces its own input (the one overlap that is asked for)."""
    if t is None or not t.in_place or read_owner != t:
        return False
    return what == "output" or read_what.startswith("external data file")


def _refuse(path: Path, what: str, other: Path, other_what: str, t: Target | None) -> None:
    if t is not None and what == "output" and other_what == "input model" and identity(t.source) == identity(path):
        raise PathConflict(f"{show_path(path)}: output is the input file; pass --in-place to overwrite it")
    raise PathConflict(f"{show_path(path)}: the {what} would overwrite the {other_what} {show_path(other)}; "
                       "choose another name")


@dataclass
class Plan:
    targets: list[Target]
    report: Path | None = None  # a report file (None: none, or standard output)
    report_to_stdout: bool = False
    reads: dict = field(default_factory=dict)  # identity -> (path, what, target)
    writes: dict = field(default_factory=dict)  # identity -> (path, what, target)

    def add_read(self, path: Path, what: str, owner: Target | None) -> None:
        """Record a file the run reads; refuse it if the run also writes it."""
        for key in (identity(path), _also_by_path(path)):
            if key in self.writes:
                w_path, w_what, w_target = self.writes[key]
                if not _own_in_place(w_target, w_what, w_path, what, owner):
                    _refuse(w_path, w_what, path, what, w_target)
            self.reads.setdefault(key, (path, what, owner))

    def add_write(self, path: Path, what: str, t: Target | None) -> None:
        for key in (identity(path), _also_by_path(path)):
            if key in self.reads:
                r_path, r_what, r_owner = self.reads[key]
                if not _own_in_place(t, what, path, r_what, r_owner):
                    _refuse(path, what, r_path, r_what, t)
            if key in self.writes:
                other_path, other_what, _ = self.writes[key]
                raise PathConflict(f"{show_path(path)}: the {what} and the {other_what} {show_path(other_path)} "
                                   "are the same file; choose another name")
        for key in (identity(path), _also_by_path(path)):
            self.writes[key] = (path, what, t)

    def add_external_data(self, target: Target, files: list[str]) -> None:
        """The external data files a model turned out to read (known once it is loaded, before
        anything is written): refuse the run if it writes any of them."""
        base = Path(os.path.realpath(target.source)).parent
        for location in files:
            self.add_read(base / location, f"external data file of {show_path(target.source)}", target)


def plan_run(targets: list[Target], report: str | os.PathLike | None = None, *, verify: bool = True,
             read_headers: bool = False, make_folders: bool = False) -> Plan:
    """Check the paths of a whole run before any work. Raises PathConflict or NormfoldError (one
    line) for the first problem; returns the Plan otherwise. The models' external data files are
    added by each job as it loads its model (`Plan.add_external_data`), or here with
    `read_headers` (each model's header parsed once more)."""
    plan = Plan(targets)
    if report is not None and os.fspath(report) == REPORT_TO_STDOUT:
        plan.report_to_stdout = True
    elif report is not None:
        plan.report = Path(report)
    for t in targets:
        plan.add_read(t.source, "input model", t)
        if verify:
            _utf8(t.source, "input")
            _utf8(t.dest, "output")
    for t in targets:
        if t.data_name == t.dest.name:
            raise PathConflict(f"--external-data {show_path(t.data_name)!r}: is the output file itself; choose "
                               "another name")
        for path, what in ((t.dest, "output"), (t.data_path, "output's external data file")):
            plan.add_write(path, what, t)  # an overlap first: its message says more than the file's kind
            if not (t.in_place and what == "output"):
                check_writable_name(path, "output", make_folders)
    if plan.report is not None:
        plan.add_write(plan.report, "report", None)
        check_writable_name(plan.report, "report")
    if read_headers:
        for t in targets:
            for data in _external_files(t.source):
                plan.add_read(data, f"external data file of {show_path(t.source)}", t)
    return plan
