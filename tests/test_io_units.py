"""normfold/io's small pure parts in-process: what kind of file a path names, protobuf varints."""

from __future__ import annotations

import io
import os
import socket

import numpy as np
import onnx
import pytest

from builders import build
from normfold.io.files import regular_file_problem
from normfold.io.protobuf import _varint, write_model


def test_a_regular_file_has_no_problem(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    assert regular_file_problem(path) is None
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    assert regular_file_problem(link) is None  # a symlink to a regular file is one


def test_what_is_not_a_regular_file_is_named(tmp_path):
    assert regular_file_problem(tmp_path / "missing.onnx") == "no such file"
    (tmp_path / "f").write_text("")
    assert regular_file_problem(tmp_path / "f" / "below") == "no such file"  # a file as a folder
    assert regular_file_problem(tmp_path) == "is a directory, not a model file; a model must be a regular file"
    os.mkfifo(tmp_path / "fifo")
    assert regular_file_problem(tmp_path / "fifo") == "is a FIFO (named pipe); a model must be a regular file"
    assert regular_file_problem("/dev/null") == "is a character device; a model must be a regular file"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert regular_file_problem(loop).startswith("cannot read (") and "symbolic links" in regular_file_problem(loop)
    assert regular_file_problem(tmp_path / ("x" * 300)).startswith("cannot read (File name too long")


def test_a_socket_is_named(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        assert regular_file_problem(path) == "is a socket; a model must be a regular file"


@pytest.mark.parametrize("n, encoded", [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"),
                                        (300, b"\xac\x02"), (16384, b"\x80\x80\x01")])
def test_varints_are_protobufs(n, encoded):
    assert _varint(n) == encoded


def test_a_model_without_a_graph_writes_its_header_only():
    model = onnx.ModelProto(ir_version=8, producer_name="p")
    out = io.BytesIO()
    write_model(model, out)
    assert out.getvalue() == model.SerializeToString()


def test_the_written_model_reads_back_equal():
    model = build("g (float[3] x) => (float[3] y) { y = Add (x, w) }", w=np.arange(3, dtype=np.float32))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(200, np.float32), "big"))
    out = io.BytesIO()
    write_model(model, out)
    assert onnx.load_from_string(out.getvalue()) == model


# ---- staging: nothing in place until commit, then everything ---------------------------------------
def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_only_staging_folders_of_gone_processes_are_removed(tmp_path):
    from normfold.io.staging import STAGING_PREFIX, remove_stale_staging

    dead = _dead_pid()
    stale = tmp_path / f"{STAGING_PREFIX}{dead}-0badc0de"
    (stale / "m1").mkdir(parents=True)
    (stale / "m1" / "out.onnx").write_bytes(b"partial")
    keep = [tmp_path / f"{STAGING_PREFIX}{os.getpid()}-00000000",        # this process
            tmp_path / f"{STAGING_PREFIX}{os.getppid()}-00000000",       # alive
            tmp_path / f"{STAGING_PREFIX}x{dead}-00000000",              # not a pid
            tmp_path / f"normfold-staging-{dead}-00000000"]              # not the prefix
    for folder in keep:
        folder.mkdir()
    (tmp_path / f"{STAGING_PREFIX}{dead}-file").write_text("a file, not a folder")
    target = tmp_path / "target"
    target.mkdir()
    (target / "data").write_text("precious")
    (tmp_path / f"{STAGING_PREFIX}{dead}-link").symlink_to(target)
    assert remove_stale_staging(tmp_path) == [stale.name]
    assert not stale.exists() and all(folder.is_dir() for folder in keep)
    assert (target / "data").read_text() == "precious" and (tmp_path / f"{STAGING_PREFIX}{dead}-file").exists()
    assert remove_stale_staging(tmp_path / "missing") == []


def test_a_process_that_exists_but_is_not_ours_counts_as_alive(monkeypatch):
    import normfold.io.staging as staging

    def kill(pid, sig):
        raise {1: PermissionError, 2: ProcessLookupError, 3: OSError}[pid]()

    monkeypatch.setattr(os, "kill", kill)
    assert staging._pid_alive(1) and staging._pid_alive(3) and not staging._pid_alive(2)


def test_a_staging_folder_is_private_named_by_pid_and_removed_on_discard(tmp_path):
    import normfold.io.staging as staging

    dead = tmp_path / f"{staging.STAGING_PREFIX}{_dead_pid()}-0badc0de"
    dead.mkdir()
    folder = staging.make_staging_folder(tmp_path)
    assert not dead.exists()  # stale ones go first
    assert folder.parent == tmp_path and folder.name.startswith(f"{staging.STAGING_PREFIX}{os.getpid()}-")
    assert len(folder.name.rsplit("-", 1)[1]) == 8 and (folder.stat().st_mode & 0o777) == 0o700
    other = staging.make_staging_folder(tmp_path)
    assert other != folder and folder in staging._LIVE and other in staging._LIVE
    staging.discard_all_staging()
    assert not folder.exists() and not other.exists() and not (staging._LIVE & {folder, other})


def test_a_staging_folder_that_cannot_be_made_is_a_one_line_error(tmp_path):
    from normfold.errors import NormfoldError
    from normfold.io.staging import make_staging_folder

    (tmp_path / "file").write_text("")
    with pytest.raises(NormfoldError) as info:
        make_staging_folder(tmp_path / "file")
    assert str(info.value) == f"cannot write to {str(tmp_path / 'file')!r} (Not a directory)"


def test_new_files_get_the_mode_open_gives():
    from normfold.io.staging import _default_mode

    old = os.umask(0o027)
    try:
        assert _default_mode() == 0o640 and os.umask(0o027) == 0o027  # the umask is left as it was
    finally:
        os.umask(old)


def _weights_model(size: int = 300):
    return build("g (float[N] x) => (float[N] y) { y = Add (x, w) }", w=np.arange(size, dtype=np.float32))


def test_a_transaction_moves_everything_into_place_in_order_at_commit(tmp_path, monkeypatch):
    import normfold.io.staging as staging
    from normfold.io import StagedModel, Transaction

    monkeypatch.setattr(staging, "COMMITTED", False)  # (set back after the test: it is process-wide)

    (tmp_path / "sub").mkdir()
    dest = tmp_path / "out.onnx"
    with Transaction() as tx:
        folder = tx.folder_for(dest)
        assert tx.folder_for(tmp_path / "other.onnx") == folder  # one per destination folder
        assert tx.folder_for(tmp_path / "sub" / ".." / "x.json") == folder
        assert tx.folder_for(tmp_path / "sub" / "r.json") != folder
        staged = StagedModel(_weights_model(), dest, folder, external_data=True)
        assert staged.moves() == [(str(staged.folder / "out.onnx.data"), str(tmp_path / "out.onnx.data")),
                                  (str(staged.folder / "out.onnx"), str(dest))]
        tx.add(staged.moves())
        tx.stage_text(tmp_path / "sub" / "r.json", "{}\n")
        assert not dest.exists() and not (tmp_path / "sub" / "r.json").exists()  # nothing before commit
        tx.commit()
        assert tx.committed and staging.COMMITTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]
    assert (tmp_path / "sub" / "r.json").read_text() == "{}\n"
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(onnx.load(dest).graph.initializer[0]), np.arange(300))
    assert (dest.stat().st_mode & 0o777) == staging._default_mode()


def test_a_transaction_left_without_commit_writes_nothing(tmp_path):
    from normfold.io import StagedModel, Transaction

    with Transaction() as tx:
        StagedModel(_weights_model(), tmp_path / "out.onnx", tx.folder_for(tmp_path / "out.onnx"))
        tx.stage_text(tmp_path / "r.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_commit_after_an_interrupt_moves_nothing(tmp_path, monkeypatch):
    import normfold.errors
    from normfold.io import Transaction

    tx = Transaction()
    tx.stage_text(tmp_path / "r.json", "{}")
    monkeypatch.setattr(normfold.errors, "_interrupted", True)
    with pytest.raises(normfold.errors.Interrupted):
        tx.commit()
    assert list(tmp_path.iterdir()) == [] and not tx.committed


def test_a_move_that_fails_is_a_one_line_error_and_the_staging_is_removed(tmp_path):
    from normfold.errors import NormfoldError
    from normfold.io import Transaction

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    tx = Transaction()
    tx.stage_text(tmp_path / "taken", "{}")  # a non-empty folder cannot be replaced by a file
    with pytest.raises(NormfoldError) as info:
        tx.commit()
    assert str(info.value).startswith(f"{tmp_path / 'taken'}: cannot move the result into place (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and not tx.committed


def test_text_that_cannot_be_staged_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    from normfold.errors import NormfoldError
    from normfold.io import Transaction

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with Transaction() as tx:
        tx.folder_for(tmp_path / "r.json")
        monkeypatch.setattr(builtins, "open", full)
        with pytest.raises(NormfoldError) as info:
            tx.stage_text(tmp_path / "r.json", "{}")
    assert str(info.value) == f"{tmp_path / 'r.json'}: cannot write (No space left on device)"


def test_a_staged_model_inline_unless_asked_and_the_callers_model_untouched(tmp_path):
    from normfold.io import StagedModel

    model = _weights_model(1000)
    staging = tmp_path / "s"
    staging.mkdir()
    inline = StagedModel(model, tmp_path / "a.onnx", staging)
    assert inline.files == ["a.onnx"] and sorted(p.name for p in inline.folder.iterdir()) == ["a.onnx"]
    assert onnx.load(inline.path) == model
    external = StagedModel(model, tmp_path / "b.onnx", staging, external_data=True, data_name="w.bin")
    assert external.files == ["w.bin", "b.onnx"] and model.graph.initializer[0].HasField("raw_data")
    written = onnx.load(external.path, load_external_data=False)
    assert {e.key: e.value for e in written.graph.initializer[0].external_data}["location"] == "w.bin"
    assert external.folder != inline.folder and external.folder.name.startswith(f"m{os.getpid()}-")
    consumed = StagedModel(model, tmp_path / "c.onnx", staging, external_data=True, consume=True)
    assert consumed.files == ["c.onnx.data", "c.onnx"] and not model.graph.initializer[0].HasField("raw_data")
    small = StagedModel(build("g (float[2] x) => (float[2] y) { y = Neg (x) }"), tmp_path / "d.onnx", staging,
                        external_data=True)
    assert small.files == ["d.onnx"]  # no weight to move: no data file
    inline.discard()
    assert not inline.folder.exists() and external.folder.exists()


def test_a_model_near_two_gigabytes_goes_external_by_itself(tmp_path, monkeypatch):
    import normfold.io.staging as staging

    monkeypatch.setattr(staging, "TWO_GB", 2**26 + 1200 + 64 * 2 * 16)  # just above 1200 bytes of weights
    (tmp_path / "s").mkdir()
    assert staging.StagedModel(_weights_model(300), tmp_path / "a.onnx", tmp_path / "s").files == ["a.onnx.data", "a.onnx"]
    assert staging.StagedModel(_weights_model(299), tmp_path / "b.onnx", tmp_path / "s").files == ["b.onnx"]


def test_a_model_that_cannot_be_staged_leaves_nothing(tmp_path, monkeypatch):
    import normfold.io.staging as staging
    from normfold.errors import NormfoldError

    (tmp_path / "s").mkdir()
    with pytest.raises(NormfoldError) as info:
        staging.StagedModel(_weights_model(), tmp_path / "a.onnx", tmp_path / "missing")
    assert str(info.value) == f"{tmp_path / 'a.onnx'}: cannot write to {str(tmp_path)!r} (No such file or directory)"

    def full(model, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging, "write_model", full)
    with pytest.raises(NormfoldError) as info:
        staging.StagedModel(_weights_model(), tmp_path / "a.onnx", tmp_path / "s")
    assert str(info.value) == f"{tmp_path / 'a.onnx'}: cannot write (No space left on device)"
    monkeypatch.setattr(staging, "write_model", lambda model, f: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        staging.StagedModel(_weights_model(), tmp_path / "a.onnx", tmp_path / "s")
    assert list((tmp_path / "s").iterdir()) == []
