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
    import subprocess

    from normfold.io.staging import STAGING_PREFIX, remove_stale_staging

    dead = _dead_pid()
    alive = subprocess.Popen(["sleep", "60"])  # (not the parent: a wrong signal must not reach a real process)
    try:
        _check_stale_removal(tmp_path, dead, alive.pid, STAGING_PREFIX, remove_stale_staging)
    finally:
        alive.kill()
        alive.wait()


def _check_stale_removal(tmp_path, dead, alive, STAGING_PREFIX, remove_stale_staging):
    stale = tmp_path / f"{STAGING_PREFIX}{dead}-0badc0de"
    (stale / "m1").mkdir(parents=True)
    (stale / "m1" / "out.onnx").write_bytes(b"partial")
    keep = [tmp_path / f"{STAGING_PREFIX}{os.getpid()}-00000000",        # this process
            tmp_path / f"{STAGING_PREFIX}{alive}-00000000",              # alive
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


# ---- reading a model: every refusal one line naming the file, the file untouched -------------------
def _refused(path, lazy=False) -> str:
    from normfold.errors import NormfoldError
    from normfold.io import read_model

    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(NormfoldError) as info:
        read_model(path, lazy=lazy)
    assert (path.read_bytes() if path.is_file() else None) == before
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message[len(f"{path}: "):]


def _save(model, path, **kwargs):
    onnx.save(model, path, **kwargs)
    return path


def test_files_that_are_no_model_are_refused(tmp_path):
    assert _refused(tmp_path / "missing.onnx") == "no such file"
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert _refused(tmp_path / "empty.onnx") == "empty file, not an ONNX model"
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff")
    assert _refused(tmp_path / "junk.onnx").startswith("not a readable ONNX model (")
    (tmp_path / "nograph.onnx").write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    assert _refused(tmp_path / "nograph.onnx") == "not an ONNX model (no graph)"
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }")
    del model.graph.output[:]
    assert _refused(_save(model, tmp_path / "noout.onnx")) == (
        "invalid model: the graph has no outputs (nothing to compute or compare)")
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }")
    del model.graph.node[:]
    del model.opset_import[:]
    assert _refused(_save(model, tmp_path / "noopset.onnx")) == "not an ONNX model (no opset import)"


def test_a_graph_with_outputs_but_no_nodes_is_read(tmp_path):
    from normfold.io import read_model

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [x], [x]), opset_imports=[onnx.helper.make_opsetid("", 13)])
    model, locations = read_model(_save(model, tmp_path / "a.onnx"))
    assert [o.name for o in model.graph.output] == ["x"] and locations == []


def test_opsets_newer_than_onnx_knows_are_refused(tmp_path):
    newest = onnx.defs.onnx_opset_version()
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }")
    model.opset_import[0].version = newest + 1
    assert _refused(_save(model, tmp_path / "a.onnx")) == (
        f"opset {newest + 1} of the default domain is newer than the installed onnx {onnx.__version__} supports "
        f"(up to {newest})")
    model.opset_import[0].version = 13
    model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 99))
    high = dict((d, v[1]) for d, v in onnx.onnx_cpp2py_export.defs.schema_version_map().items())["ai.onnx.ml"]
    assert _refused(_save(model, tmp_path / "b.onnx")) == (
        f"opset 99 of domain 'ai.onnx.ml' is newer than the installed onnx {onnx.__version__} supports (up to {high})")
    model.opset_import[1].domain = "ai.onnx"
    assert "of the default domain" in _refused(_save(model, tmp_path / "c.onnx"))
    model.opset_import[1].domain = "com.example"  # a domain onnx does not know: any version
    model.opset_import[1].version = 99
    from normfold.io import read_model
    read_model(_save(model, tmp_path / "d.onnx"))


def test_an_opset_in_a_local_function_is_checked_too(tmp_path):
    newest = onnx.defs.onnx_opset_version()
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }")
    function = onnx.helper.make_function("local", "f", ["a"], ["b"], [onnx.helper.make_node("Neg", ["a"], ["b"])],
                                         [onnx.helper.make_opsetid("", newest + 2)])
    model.functions.append(function)
    assert f"opset {newest + 2} of the default domain" in _refused(_save(model, tmp_path / "a.onnx"))


def test_unknown_element_and_data_types_and_negative_dimensions_are_refused(tmp_path):
    model = build("g (float[2] x) => (float[2] y) { y = Add (x, w) }", w=np.zeros(2, np.float32))
    model.graph.output[0].type.tensor_type.elem_type = 99
    assert _refused(_save(model, tmp_path / "a.onnx")) == "invalid model: 'y' has an unknown element type 99"
    model.graph.output[0].type.tensor_type.elem_type = 1
    model.graph.initializer[0].data_type = 77
    assert _refused(_save(model, tmp_path / "b.onnx")) == "invalid model: tensor 'w' has an unknown data type 77"
    model.graph.initializer[0].data_type = 1
    model.graph.initializer[0].dims[:] = [-2]
    assert _refused(_save(model, tmp_path / "c.onnx")) == "invalid model: tensor 'w' has a negative dimension [-2]"
    model.graph.initializer[0].dims[:] = [2]
    model.graph.initializer[0].name = ""
    model.graph.initializer[0].data_type = 78
    assert "tensor '<unnamed>' has an unknown data type 78" in _refused(_save(model, tmp_path / "d.onnx"))


@pytest.mark.parametrize("wrap", ["sequence_type", "optional_type", "map_type"])
def test_element_types_inside_sequences_optionals_and_maps_are_checked(tmp_path, wrap):
    from normfold.io.validate import _type_elem_types

    inner = onnx.helper.make_tensor_type_proto(99, [2])
    outer = (onnx.helper.make_sequence_type_proto(inner) if wrap == "sequence_type" else
             onnx.helper.make_optional_type_proto(inner) if wrap == "optional_type" else
             onnx.helper.make_map_type_proto(onnx.TensorProto.INT64, inner))
    assert list(_type_elem_types(outer))[-1] == 99
    if wrap == "map_type":
        assert list(_type_elem_types(outer)) == [onnx.TensorProto.INT64, 99]
    assert list(_type_elem_types(onnx.helper.make_sparse_tensor_type_proto(5, [2]))) == [5]
    assert list(_type_elem_types(onnx.TypeProto())) == []


def test_tensors_whose_data_do_not_match_their_header_are_refused(tmp_path):
    model = build("g (float[2] x) => (float[2] y) { y = Add (x, w) }", w=np.zeros(2, np.float32))
    model.graph.initializer[0].raw_data = b"\0" * 12
    message = _refused(_save(model, tmp_path / "a.onnx"))
    assert message.startswith("invalid model: ") and "'w'" in message
    model = build("g (float[2] x) => (float[2] y) { y = Add (x, w) }", w=np.zeros(2, np.float32))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.float_data[:] = [1.0, 2.0, 3.0]
    message = _refused(_save(model, tmp_path / "b.onnx"))
    assert message.startswith("invalid model: ") and "'w'" in message


def test_strings_that_are_not_utf8_are_refused(tmp_path):
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }")
    data = model.SerializeToString().replace(b"Neg", b"N\xffg")
    (tmp_path / "a.onnx").write_bytes(data)
    assert _refused(tmp_path / "a.onnx") == (
        "invalid model: NodeProto.op_type holds a string that is not valid UTF-8 (b'N\\xffg')")


# ---- external data: only inside the model's folder, within its file ------------------------------
def _external_model(tmp_path, size=300, **kwargs):
    model = _weights_model(size)
    return _save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0, **kwargs)


def _set_external(path, **info):
    model = onnx.load(path, load_external_data=False)
    tensor = model.graph.initializer[0]
    entries = {e.key: e.value for e in tensor.external_data}
    entries.update(info)
    del tensor.external_data[:]
    for key, value in entries.items():
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_is_read_or_left_in_its_file(tmp_path):
    from normfold.io import read_model

    path = _external_model(tmp_path)
    model, locations = read_model(path)
    assert locations == ["m.data"] and model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), np.arange(300))
    lazy, locations = read_model(path, lazy=True)
    assert locations == ["m.data"] and lazy.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL


@pytest.mark.parametrize("location, message", [
    ("", "external data of a tensor has no location"),
    ("/etc/passwd", "external data location '/etc/passwd' points outside the model's folder; refused"),
    ("../m.data", "external data location '../m.data' points outside the model's folder; refused"),
    ("C:x.data", "external data location 'C:x.data' points outside the model's folder; refused"),
    ("a\0b", "external data location 'a\\x00b' points outside the model's folder; refused"),
    ("gone.data", "external data file 'gone.data' not found"),
    ("sub", "external data file 'sub': is a directory, not a model file; refused"),
])
def test_external_data_locations_are_checked_before_anything_is_opened(tmp_path, location, message):
    (tmp_path / "sub").mkdir()
    path = _set_external(_external_model(tmp_path), location=location)
    assert _refused(path) == message
    assert _refused(path, lazy=True) == message


def test_a_location_through_a_symlink_loop_cannot_be_resolved(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = _set_external(_external_model(tmp_path), location="loop/x")
    assert _refused(path) == "external data location 'loop/x' cannot be resolved; refused"


def test_a_location_symlinked_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "model"
    inside.mkdir()
    path = _external_model(inside)
    (outside / "m.data").write_bytes((inside / "m.data").read_bytes())
    (inside / "m.data").unlink()
    (inside / "m.data").symlink_to(outside / "m.data")
    assert _refused(path) == "external data location 'm.data' points outside the model's folder; refused"


@pytest.mark.parametrize("info, fits", [
    ({}, True),
    ({"offset": "0", "length": "1200"}, True),
    ({"offset": "4"}, False),                  # 1200 bytes from 4 run past the end
    ({"length": "1196"}, False),               # fewer bytes than the tensor needs
    ({"offset": "-1"}, False),
    ({"length": "-4"}, False),
    ({"offset": "x"}, None),
    ({"length": "12.5"}, None),
])
def test_lazy_external_tensors_must_lie_inside_their_file(tmp_path, info, fits):
    from normfold.io import read_model

    path = _set_external(_external_model(tmp_path), **info)
    if fits:
        read_model(path, lazy=True)
        return
    message = _refused(path, lazy=True)
    if fits is None:
        assert message == "cannot read external data: tensor 'w' has an offset or length that is not a number"
        return
    offset, length = int(info.get("offset", 0)), int(info.get("length", 1200))
    assert message == (f"cannot read external data: tensor 'w' ('m.data', offset {offset}, length {length}) does not "
                       f"fit the file (1200 bytes) or the tensor's 1200 bytes")
    assert _refused(path)  # and when it is loaded


def test_a_tensor_without_a_fixed_item_size_takes_the_rest_of_its_file(tmp_path):
    from normfold.io.external import _check_external_extents

    model = build("g (string[2] x) => (string[2] y) { y = Identity (x) }")
    tensor = model.graph.initializer.add()
    tensor.name, tensor.data_type, tensor.data_location = "s", onnx.TensorProto.STRING, onnx.TensorProto.EXTERNAL
    tensor.dims[:] = [2]
    for key, value in (("location", "s.data"), ("offset", "2")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "s.data").write_bytes(b"0123456789")
    _check_external_extents(tmp_path / "m.onnx", tmp_path, model)  # 8 bytes from 2: inside
    tensor.external_data[1].value = "11"
    with pytest.raises(Exception, match=r"offset 11, length -1\) does not fit the file \(10 bytes\) or the tensor's None bytes"):
        _check_external_extents(tmp_path / "m.onnx", tmp_path, model)


def test_external_locations_are_found_in_every_graph_and_function(tmp_path):
    from normfold.io import external_locations

    external = _external_tensor
    body = onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["c"], value=external("c", "branch.bin"))],
                                  "b", [], [onnx.helper.make_tensor_value_info("c", 1, [1])])
    node = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)
    graph = onnx.helper.make_graph([node], "g", [], [], initializer=[external("w", "main.bin")])
    model = onnx.helper.make_model(graph)
    info = model.training_info.add()
    info.initialization.CopyFrom(onnx.helper.make_graph([], "i", [], [], initializer=[external("t", "train.bin")]))
    info.algorithm.CopyFrom(onnx.helper.make_graph([], "a", [], [], initializer=[external("u", "algo.bin")]))
    model.functions.append(onnx.helper.make_function(
        "local", "f", [], ["k"], [onnx.helper.make_node("Constant", [], ["k"], value=external("k", "fn.bin"))], []))
    sparse = onnx.helper.make_sparse_tensor(external("v", "sparse_values.bin"), external("i", "sparse_idx.bin"), [4])
    model.graph.sparse_initializer.append(sparse)
    assert sorted(external_locations(model)) == sorted(["main.bin", "sparse_values.bin", "sparse_idx.bin", "branch.bin",
                                                        "branch.bin", "train.bin", "algo.bin", "fn.bin"])


def test_approximate_size_is_the_weights_plus_a_margin_per_node():
    from normfold.io import approximate_size

    model = _weights_model(300)
    assert approximate_size(model) == 1200 + 64 * 2 * 16
    model.graph.node.append(onnx.helper.make_node("Neg", ["y"], ["z"]))
    assert approximate_size(model) == 1200 + 64 * 3 * 16


def test_weights_move_to_one_external_file_and_small_or_constant_ones_stay(tmp_path):
    from normfold.io.external import EXTERNAL_THRESHOLD, write_external_data

    model = build("""g (float[256] x, float[255] z) => (float[256] a, float[255] b, float[300] c) {
        c = Constant <value = float[300] {%s}> ()
        a = Add (x, big)
        b = Add (z, small) }""" % ", ".join(["1.0"] * 300),
                  big=np.arange(EXTERNAL_THRESHOLD // 4, dtype=np.float32), small=np.ones(EXTERNAL_THRESHOLD // 4 - 1, np.float32))
    assert write_external_data(model, tmp_path / "w.bin", "w.bin", None)
    big, small = model.graph.initializer
    assert big.data_location == onnx.TensorProto.EXTERNAL and not big.HasField("raw_data")
    assert {e.key: e.value for e in big.external_data} == {"location": "w.bin", "offset": "0", "length": "1024"}
    assert small.data_location == onnx.TensorProto.DEFAULT and small.HasField("raw_data")
    assert model.graph.node[0].attribute[0].t.data_location == onnx.TensorProto.DEFAULT
    assert (tmp_path / "w.bin").read_bytes() == np.arange(256, dtype=np.float32).tobytes()
    nothing = _weights_model(3)
    assert not write_external_data(nothing, tmp_path / "n.bin", "n.bin", None) and not (tmp_path / "n.bin").exists()


def test_tensors_already_external_are_copied_file_to_file(tmp_path):
    from normfold.io.external import write_external_data

    src = tmp_path / "src"
    src.mkdir()
    model = build("g (float[N] x) => (float[N] y) { a = Add (x, u)\n y = Add (a, v) }",
                  u=np.arange(300, dtype=np.float32), v=np.arange(300, 600, dtype=np.float32))
    onnx.save(model, src / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    lazy = onnx.load(src / "m.onnx", load_external_data=False)
    entries = lazy.graph.initializer[1].external_data  # v without a length: to the end of the file
    kept = [(e.key, e.value) for e in entries if e.key != "length"]
    del entries[:]
    for key, value in kept:
        entry = entries.add()
        entry.key, entry.value = key, value
    before = (src / "m.data").read_bytes()
    assert write_external_data(lazy, tmp_path / "out.bin", "out.bin", src)
    assert (src / "m.data").read_bytes() == before  # the source is only read
    data = (tmp_path / "out.bin").read_bytes()
    assert data == np.arange(600, dtype=np.float32).tobytes()
    u, v = lazy.graph.initializer
    assert {e.key: e.value for e in u.external_data} == {"location": "out.bin", "offset": "0", "length": "1200"}
    assert {e.key: e.value for e in v.external_data} == {"location": "out.bin", "offset": "1200", "length": "1200"}


@pytest.mark.parametrize("kernel", [True, False])
def test_a_range_is_copied_by_the_kernel_or_by_reads(tmp_path, monkeypatch, kernel):
    import errno

    from normfold.io.external import copy_range

    if not kernel:
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    (tmp_path / "src").write_bytes(bytes(range(200)))
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "out", "wb") as out:
        out.write(b"head")
        copy_range(src, out, 10, 100, "w")
    assert (tmp_path / "out").read_bytes() == b"head" + bytes(range(10, 110))
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "out", "wb") as out:
        with pytest.raises(OSError, match="external data of 'w' ends early"):
            copy_range(src, out, 150, 100, "w")


def test_a_kernel_copy_error_that_is_not_a_refusal_is_raised(tmp_path, monkeypatch):
    import errno

    from normfold.io.external import copy_range

    def failing(*args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", failing, raising=False)
    (tmp_path / "src").write_bytes(b"x" * 10)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "out", "wb") as out:
        with pytest.raises(OSError, match="I/O error"):
            copy_range(src, out, 0, 10, "w")


# ---- what the first run of io's mutants left alive ---------------------------------------------------
def test_tensor_data_that_does_not_match_names_the_tensor_its_type_and_the_cut_reason(tmp_path):
    model = build("g (float[2] x) => (float[2] y) { y = Add (x, w) }", w=np.zeros(2, np.float32))
    good = model.graph.initializer[0]
    model.graph.initializer.append(onnx.TensorProto(name="big", data_type=1, dims=[2] * 40, float_data=[1.0, 2.0, 3.0]))
    assert good.HasField("raw_data")  # the first tensor passes: the second is still checked
    message = _refused(_save(model, tmp_path / "a.onnx"))
    head = f"invalid model: tensor 'big' (FLOAT {[2] * 40}) has data that does not match its type and shape: "
    assert message.startswith(head + "cannot reshape array of size 3 into shape (2,")
    assert len(message) == len(head) + 120 and message.endswith("...")  # the reason cut at 120 characters


def test_weights_in_raw_data_are_checked_by_size_never_decoded(tmp_path, monkeypatch):
    import normfold.io.validate as validate

    model = build("g (float[2] x) => (float[2] y) { a = Add (x, w)\n y = Add (a, v) }", w=np.zeros(2, np.float32),
                  v=np.zeros(2, np.float32))
    tensor = model.graph.initializer[1]
    tensor.ClearField("raw_data")
    tensor.float_data[:] = [1.0, 2.0]  # decoded: not in raw_data
    path = _save(model, tmp_path / "a.onnx")
    decoded = []
    real = validate.numpy_helper.to_array
    monkeypatch.setattr(validate.numpy_helper, "to_array", lambda t, *a: decoded.append(t.name) or real(t, *a))
    validate.read_model(path)
    assert decoded == ["v"]


def test_a_model_that_fails_onnxs_full_check_only_is_refused(tmp_path):
    """Add of a [2] and a [3]: the plain check lets it through, strict shape inference does not."""
    model = build("g (float[2] x) => (float[2] y) { y = Add (x, w) }", w=np.zeros(2, np.float32))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "w"))
    onnx.checker.check_model(model)
    message = _refused(_save(model, tmp_path / "a.onnx"))
    assert message.startswith("invalid model: ") and "Incompatible dimensions" in message and "\n" not in message
    external = tmp_path / "ext"
    external.mkdir()
    path = _save(model, external / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    assert "Incompatible dimensions" in _refused(path)


def test_value_info_that_contradicts_inference_is_read_as_annotation(tmp_path):
    from normfold.io import read_model

    model = build("g (float[2] x) => (float[2] y) { a = Neg (x)\n y = Neg (a) }")
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [5]))
    model, _ = read_model(_save(model, tmp_path / "a.onnx"))
    assert model.graph.node[0].op_type == "Neg"


def test_lazy_tensors_without_offset_or_length_and_empty_ones_fit(tmp_path):
    from normfold.io import read_model

    read_model(_set_external(_external_model(tmp_path), offset=None, length=None), lazy=True)
    model = build("g (float[0] x) => (float[0] y) { a = Add (x, w)\n y = Add (a, e) }",
                  w=np.zeros(0, np.float32), e=np.zeros(0, np.float32))
    folder = tmp_path / "empty"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    lazy = onnx.load(folder / "m.onnx", load_external_data=False)
    for tensor in lazy.graph.initializer:  # both external, both of length 0
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", "m.data"), ("offset", "0"), ("length", "0")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    (folder / "m.data").write_bytes(b"")
    (folder / "m.onnx").write_bytes(lazy.SerializeToString())
    loaded, files = read_model(folder / "m.onnx", lazy=True)  # accepted: no IssueError
    assert [t.name for t in loaded.graph.initializer] == ["w", "e"] and [os.path.basename(f) for f in files] == ["m.data"]


def test_every_external_tensor_is_checked_not_only_the_first(tmp_path):
    model = build("g (float[N] x) => (float[N] y) { a = Add (x, s)\n y = Add (a, w) }", s=np.zeros(1, np.float32),
                  w=np.arange(300, dtype=np.float32))
    path = _save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=100)
    lazy = onnx.load(path, load_external_data=False)
    assert lazy.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # inline first, then external
    for entry in lazy.graph.initializer[1].external_data:
        if entry.key == "length":
            entry.value = "1196"
    path.write_bytes(lazy.SerializeToString())
    assert "does not fit the file" in _refused(path, lazy=True)


def test_a_kernel_copy_that_stops_short_goes_on_from_where_it_stopped(tmp_path, monkeypatch):
    from normfold.io.external import copy_range

    real = os.copy_file_range
    calls = []

    def short_first(src, dst, count, offset):
        calls.append(count)
        return real(src, dst, min(count, 7) if len(calls) == 1 else count, offset)

    monkeypatch.setattr(os, "copy_file_range", short_first)
    (tmp_path / "src").write_bytes(bytes(range(200)))
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "out", "wb") as out:
        copy_range(src, out, 10, 100, "w")
    assert (tmp_path / "out").read_bytes() == bytes(range(10, 110))


def test_reads_of_more_than_one_chunk_copy_exactly_the_range(tmp_path, monkeypatch):
    import errno

    from normfold.io.external import copy_range

    monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    data = np.random.default_rng(0).integers(0, 256, (1 << 24) + 5000, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "out", "wb") as out:
        copy_range(src, out, 3, (1 << 24) + 1000, "w")
    assert (tmp_path / "out").read_bytes() == data[3:3 + (1 << 24) + 1000]


def _three_external(folder, offsets=True):
    model = build("g (float[N] x) => (float[N] y) { a = Add (x, u)\n b = Add (a, v)\n y = Add (b, t) }",
                  u=np.arange(300, dtype=np.float32), v=np.arange(300, 600, dtype=np.float32),
                  t=np.arange(600, 900, dtype=np.float32))
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    lazy = onnx.load(folder / "m.onnx", load_external_data=False)
    if not offsets:
        entries = lazy.graph.initializer[0].external_data  # the first at offset 0: no offset given
        kept = [(e.key, e.value) for e in entries if e.key != "offset"]
        del entries[:]
        for key, value in kept:
            entry = entries.add()
            entry.key, entry.value = key, value
    return lazy


@pytest.mark.parametrize("kernel", [True, False])
def test_three_external_tensors_are_laid_one_after_another(tmp_path, monkeypatch, kernel):
    import errno

    from normfold.io.external import write_external_data

    if not kernel:
        monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    src = tmp_path / "src"
    src.mkdir()
    lazy = _three_external(src, offsets=False)
    monkeypatch.chdir(src)  # no source_dir: relative to the working directory
    assert write_external_data(lazy, tmp_path / "out.bin", "out.bin", None)
    assert (tmp_path / "out.bin").read_bytes() == np.arange(900, dtype=np.float32).tobytes()
    assert [{e.key: e.value for e in t.external_data}["offset"] for t in lazy.graph.initializer] == ["0", "1200", "2400"]


def test_an_external_tensor_of_length_0_copies_nothing_and_one_byte_is_written(tmp_path):
    from normfold.io.external import write_external_data

    (tmp_path / "src.bin").write_bytes(b"\x07rest of the file")

    def external(name, dtype, dims, length):
        t = onnx.TensorProto(name=name, data_type=dtype, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "src.bin"), ("offset", "0"), ("length", length)):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[
        external("e", onnx.TensorProto.FLOAT, [0], "0"), external("b", onnx.TensorProto.UINT8, [1], "1")]))
    assert write_external_data(model, tmp_path / "out.bin", "out.bin", tmp_path)
    assert (tmp_path / "out.bin").read_bytes() == b"\x07"


def test_an_external_file_shorter_than_its_tensor_is_a_one_line_error(tmp_path, monkeypatch):
    import errno

    from normfold.errors import NormfoldError
    from normfold.io import StagedModel

    monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    src = tmp_path / "src"
    src.mkdir()
    lazy = _three_external(src)
    with open(src / "m.data", "r+b") as f:
        f.truncate(3000)
    (tmp_path / "s").mkdir()
    with pytest.raises(NormfoldError) as info:
        StagedModel(lazy, tmp_path / "out.onnx", tmp_path / "s", external_data=True, source_dir=src)
    assert str(info.value) == f"{tmp_path / 'out.onnx'}: cannot write (external data of 't' ends early)"
    assert list((tmp_path / "s").iterdir()) == []


def test_a_staged_model_copies_external_weights_from_the_source_folder(tmp_path, monkeypatch):
    from normfold.io import StagedModel

    src = tmp_path / "src"
    src.mkdir()
    lazy = _three_external(src)
    (tmp_path / "s").mkdir()
    monkeypatch.chdir(tmp_path)
    staged = StagedModel(lazy, tmp_path / "out.onnx", tmp_path / "s", external_data=True, source_dir=src)
    assert (staged.folder / "out.onnx.data").read_bytes() == np.arange(900, dtype=np.float32).tobytes()


def test_tensor_size_is_byte_size_with_every_header_field():
    from normfold.io import tensor_size

    t = onnx.numpy_helper.from_array(np.arange(300, dtype=np.float32), "w")
    t.doc_string = "weights"
    t.segment.begin, t.segment.end = 0, 300
    entry = t.metadata_props.add()
    entry.key, entry.value = "k", "v"
    assert tensor_size(t) == t.ByteSize()
    inline = onnx.helper.make_tensor("f", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    assert tensor_size(inline) == inline.ByteSize()


def test_new_files_get_0o666_less_the_umask():
    from normfold.io.staging import _default_mode

    old = os.umask(0)
    try:
        assert _default_mode() == 0o666
    finally:
        os.umask(old)


def test_discarding_twice_or_after_the_folder_went_is_harmless(tmp_path):
    from normfold.io import StagedModel
    from normfold.io.staging import make_staging_folder, remove_staging

    folder = make_staging_folder(tmp_path)
    staged = StagedModel(_weights_model(), tmp_path / "a.onnx", folder)
    staged.discard()
    staged.discard()
    remove_staging(folder)
    remove_staging(folder)
    assert list(tmp_path.iterdir()) == []


def test_a_commit_holds_interrupts_until_every_file_is_moved(tmp_path, monkeypatch):
    import signal

    from normfold.io import Transaction

    tx = Transaction()
    assert tx.committed is False
    tx.stage_text(tmp_path / "a.json", "{}")
    tx.stage_text(tmp_path / "b.json", "{}")
    blocked = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: blocked.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])) or real(a, b))
    tx.commit()
    assert len(blocked) == 2 and all({signal.SIGINT, signal.SIGTERM} <= mask for mask in blocked)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # unblocked after


def test_a_move_onto_a_folder_names_the_reason(tmp_path):
    from normfold.errors import NormfoldError
    from normfold.io import Transaction

    (tmp_path / "d").mkdir()
    tx = Transaction()
    tx.stage_text(tmp_path / "d", "{}")
    with pytest.raises(NormfoldError) as info:
        tx.commit()
    assert str(info.value) == f"{tmp_path / 'd'}: cannot move the result into place (Is a directory)"


# ---- what the second run of io's mutants left alive ---------------------------------------------------
def test_an_unnamed_constant_with_bad_data_is_named_as_unnamed(tmp_path):
    model = build("g (float[2] x) => (float[2] y) { y = Add (x, w) }", w=np.zeros(2, np.float32))
    bad = onnx.TensorProto(name="", data_type=1, dims=[2], raw_data=b"\0" * 12)
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["u"], value=bad))
    assert _refused(_save(model, tmp_path / "a.onnx")).startswith(
        "invalid model: tensor '<unnamed>' (FLOAT [2]) has data that does not match its type and shape: cannot reshape")


def test_the_newest_opset_onnx_knows_is_read(tmp_path):
    from normfold.io import load_model

    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }", opset=onnx.defs.onnx_opset_version())
    assert load_model(_save(model, tmp_path / "a.onnx")).graph.node[0].op_type == "Neg"


def test_a_bad_string_in_a_repeated_field_is_found_and_shown_cut_at_40_bytes(tmp_path):
    model = build("g (float[2] x) => (float[2] y) { y = Neg (x) }")
    long_name = "z" + "a" * 50
    model.graph.node[0].input[0] = long_name  # only in a repeated field (NodeProto.input)
    data = model.SerializeToString().replace(long_name.encode(), b"\xff" + b"a" * 50)
    (tmp_path / "a.onnx").write_bytes(data)
    shown = repr(b"\xff" + b"a" * 39)
    assert _refused(tmp_path / "a.onnx") == f"invalid model: NodeProto.input holds a string that is not valid UTF-8 ({shown})"


def test_a_graph_with_neither_nodes_nor_outputs_is_no_model(tmp_path):
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert _refused(_save(model, tmp_path / "a.onnx")) == "not an ONNX model (no graph)"


@pytest.mark.parametrize("error, shown", [(OSError(13, "Permission denied"), "Permission denied"),
                                          (OSError("disk gone"), "disk gone")])
def test_a_model_that_cannot_be_read_says_why(tmp_path, monkeypatch, error, shown):
    path = _save(build("g (float[2] x) => (float[2] y) { y = Neg (x) }"), tmp_path / "a.onnx")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(onnx, "load", fail)
    assert _refused(path) == f"cannot read ({shown})"


def test_bytes_that_are_no_protobuf_name_the_parse_error(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff")
    assert "Error parsing message" in _refused(tmp_path / "junk.onnx")


def test_external_data_that_cannot_be_loaded_names_the_reason(tmp_path):
    path = _set_external(_external_model(tmp_path, size=2), offset="4")
    assert _refused(path) == ("cannot read external data: External data length (8) exceeds available data "
                              "(4 bytes from offset 4) for tensor 'w'")


def test_a_tensor_without_a_location_key_has_no_location(tmp_path):
    path = _set_external(_external_model(tmp_path), location=None)
    assert _refused(path) == "external data of a tensor has no location"


def test_a_lazy_tensor_without_length_in_a_longer_file_takes_its_own_size(tmp_path):
    from normfold.io import read_model

    lazy = _three_external(tmp_path)
    for tensor in lazy.graph.initializer:
        kept = [(e.key, e.value) for e in tensor.external_data if e.key != "length"]
        del tensor.external_data[:]
        for key, value in kept:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    (tmp_path / "m.onnx").write_bytes(lazy.SerializeToString())
    loaded, files = read_model(tmp_path / "m.onnx", lazy=True)  # accepted: no IssueError
    assert len(loaded.graph.initializer) == len(lazy.graph.initializer) and files


def _external_tensor(name, location):
    t = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    return t


def test_tensors_in_every_kind_of_attribute_and_nested_graph_are_found():
    from normfold.io import external_locations
    from normfold.io.external import _all_graphs

    def branch(name, location):
        return onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["c"], value=_external_tensor("c", location))],
                                      name, [], [onnx.helper.make_tensor_value_info("c", 1, [1])])

    inner = onnx.helper.make_node("If", ["cond"], ["c"], then_branch=branch("inner", "nested.bin"),
                                  else_branch=branch("inner2", "nested2.bin"))
    outer = onnx.helper.make_graph([inner], "outer", [], [onnx.helper.make_tensor_value_info("c", 1, [1])])
    node = onnx.helper.make_node("If", ["cond"], ["y"], then_branch=outer, else_branch=branch("plain", "plain.bin"))
    ref = onnx.helper.make_node("Custom", [], ["r"], domain="x")
    ref.attribute.append(onnx.AttributeProto(name="t", ref_attr_name="outer_t", type=onnx.AttributeProto.TENSOR))
    ref.attribute.append(onnx.helper.make_attribute("ts", [_external_tensor("a", "tensors.bin")]))
    sparse = onnx.helper.make_sparse_tensor(_external_tensor("v", "sv.bin"), _external_tensor("i", "si.bin"), [4])
    ref.attribute.append(onnx.helper.make_attribute("s", sparse))
    many = onnx.helper.make_sparse_tensor(_external_tensor("v2", "mv.bin"), _external_tensor("i2", "mi.bin"), [4])
    ref.attribute.append(onnx.AttributeProto(name="ss", type=onnx.AttributeProto.SPARSE_TENSORS, sparse_tensors=[many]))
    fn_if = onnx.helper.make_node("If", ["cond"], ["k"], then_branch=branch("fn_then", "fn_branch.bin"),
                                  else_branch=branch("fn_else", "fn_else.bin"))
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    model.functions.append(onnx.helper.make_function("local", "f", ["cond"], ["k", "r"], [fn_if, ref], []))
    assert sorted(external_locations(model)) == sorted([
        "nested.bin", "nested2.bin", "plain.bin", "fn_branch.bin", "fn_else.bin", "tensors.bin", "sv.bin", "si.bin",
        "mv.bin", "mi.bin"])
    assert sorted(g.name for g in _all_graphs(model)) == sorted(["g", "outer", "inner", "inner2", "plain", "fn_then",
                                                                 "fn_else"])


def test_repeated_fields_are_told_also_by_label_on_older_protobuf():
    from types import SimpleNamespace

    from normfold.io.protobuf import _is_repeated

    assert _is_repeated(SimpleNamespace(label=3, LABEL_REPEATED=3)) is True
    assert _is_repeated(SimpleNamespace(label=1, LABEL_REPEATED=3)) is False
    assert _is_repeated(SimpleNamespace(is_repeated=False, label=3, LABEL_REPEATED=3)) is False


def test_paths_that_cannot_even_be_looked_at_say_why(tmp_path, monkeypatch):
    assert regular_file_problem(str(tmp_path / "a\0b")) == "cannot read (embedded null byte)"

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "stat", denied)
    assert regular_file_problem(tmp_path / "x") == "permission denied"


def test_a_stale_folder_with_more_dashes_is_still_its_runs(tmp_path):
    from normfold.io.staging import STAGING_PREFIX, remove_stale_staging

    name = f"{STAGING_PREFIX}{_dead_pid()}-ab-cd"
    (tmp_path / name).mkdir()
    assert remove_stale_staging(tmp_path) == [name] and not (tmp_path / name).exists()


def test_a_stale_folder_another_run_removed_meanwhile_is_no_error(tmp_path, monkeypatch):
    import shutil

    import normfold.io.staging as staging

    name = f"{staging.STAGING_PREFIX}{_dead_pid()}-0badc0de"
    (tmp_path / name).mkdir()
    real = os.scandir

    def scan_then_lose(folder):
        entries = list(real(folder))
        if os.fspath(folder) == os.fspath(tmp_path) and (tmp_path / name).exists():
            monkeypatch.setattr(staging.os, "scandir", real)
            shutil.rmtree(tmp_path / name)  # the other run was quicker
        return entries

    monkeypatch.setattr(staging.os, "scandir", scan_then_lose)
    assert staging.remove_stale_staging(tmp_path) == [name]


# ---- text in UTF-8 whatever the locale; onnx's check of a model with external data -----------------
def test_staged_text_is_utf_8_under_an_ascii_locale(tmp_path, monkeypatch):
    """The report names the user's files, which may not be ASCII: written as UTF-8 under the C
    locale too (whose default encoding is ASCII)."""
    import locale

    import normfold.io.staging as staging
    from normfold.io import Transaction

    monkeypatch.setattr(staging, "COMMITTED", False)  # (commit sets it process-wide)
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getpreferredencoding(False) != "UTF-8"
        with Transaction() as tx:
            tx.stage_text(tmp_path / "r.json", '{"model": "modèle.onnx"}\n')
            tx.commit()
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    assert (tmp_path / "r.json").read_bytes() == '{"model": "modèle.onnx"}\n'.encode("utf-8")


@pytest.mark.parametrize("lazy", [False, True])
def test_a_model_with_external_data_is_checked_by_onnx_from_its_file(tmp_path, lazy):
    """A weight large enough to be left out of the light copy, stored in w.data and also inline:
    onnx's checker, given the file, refuses the contradiction (on the light copy it would not see
    the weight at all)."""
    from normfold.errors import NormfoldError
    from normfold.io import read_model

    path = tmp_path / "m.onnx"
    onnx.save(_weights_model(2000), path, save_as_external_data=True, location="w.data", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    model.graph.initializer[0].raw_data = np.arange(2000, dtype=np.float32).tobytes()
    path.write_bytes(model.SerializeToString())
    with pytest.raises(NormfoldError, match=r": invalid model: Data of TensorProto \( tensor name: w\) is stored "
                                            r"externally and should not have data field\.raw_data$"):
        read_model(path, lazy=lazy)
