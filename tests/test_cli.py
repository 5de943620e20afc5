"""The `normfold fold` command as a pipeline sees it: exit codes, files written or not, the report."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import normfold
import normfold.api
from builders import build, load_report
from normfold import REASONS
from normfold.cli.main import main

RNG = np.random.default_rng(0)


def conv_bn_model() -> onnx.ModelProto:
    model = build("""g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      b = BatchNormalization (c, s, bb, m, v)
      y = Relu (b)
    }""", w=RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), s=RNG.standard_normal(4).astype(np.float32),
                  bb=RNG.standard_normal(4).astype(np.float32), m=RNG.standard_normal(4).astype(np.float32),
                  v=(RNG.random(4) + 0.5).astype(np.float32))
    model.doc_string = "a doc string to keep"
    onnx.helper.set_model_props(model, {"author": "tests"})
    return model


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "net.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def normfold_cmd(*args, module=False):
    """Run the installed command in a fresh process (from a neutral folder, so that the source tree
    does not shadow the installed package)."""
    script = Path(sys.executable).with_name("normfold")
    command = [sys.executable, "-m", "normfold"] if module or not script.exists() else [str(script)]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=120)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fold_writes_verified_model_and_report(model_path, tmp_path):
    before = digest(model_path)
    report_path = tmp_path / "report.json"
    result = normfold_cmd("fold", model_path, "--report", report_path, "-v")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "net.folded.onnx"
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert folded.doc_string == "a doc string to keep"
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "tests"}
    assert [o.name for o in folded.graph.output] == ["y"]
    assert digest(model_path) == before  # the input is never modified
    document = load_report(report_path)
    assert document["schema_version"] == normfold.SCHEMA_VERSION and document["command"] == "fold"
    [report] = document["models"]
    assert report["exit_code"] == 0 and report["written"] is True
    assert (report["nodes_before"], report["nodes_after"]) == (3, 2)
    assert [s["status"] for s in report["sites"]] == ["folded"]
    assert report["verification"]["status"] == "passed"
    assert report["verification"]["outputs"][0]["max_abs_error"] < 1e-4
    assert "1 folded" in result.stdout and "nodes 3 -> 2" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.folded.onnx", "net.onnx", "report.json"]


def test_same_input_gives_byte_identical_output(model_path, tmp_path):
    assert normfold_cmd("fold", model_path, "-o", tmp_path / "a.onnx").returncode == 0
    assert normfold_cmd("fold", model_path, "-o", tmp_path / "b.onnx").returncode == 0
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")


def test_mismatch_exits_1_and_writes_nothing(model_path, tmp_path, monkeypatch):
    real = normfold.api.run_rules

    def corrupting_run_rules(graph, *args, **kwargs):
        records = real(graph, *args, **kwargs)
        weight = next(t for t in graph.initializer if t.name == "w")
        value = onnx.numpy_helper.to_array(weight).copy()
        value.flat[0] += 1.0
        weight.CopyFrom(onnx.numpy_helper.from_array(value, "w"))
        return records

    monkeypatch.setattr(normfold.api, "run_rules", corrupting_run_rules)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["fold", str(model_path), "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "r.json"]
    [report] = load_report(tmp_path / "r.json")["models"]
    assert report["verification"]["status"] == "failed" and report["written"] is False
    assert "FAILED y" in result.output


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage-not-a-model" * 3, os.urandom(4096), b"hello world\n"],
                         ids=["empty", "garbage", "random", "text"])
def test_bad_input_exits_2_with_one_line(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    result = normfold_cmd("fold", bad)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("normfold: error:")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_truncated_model_exits_2(model_path, tmp_path):
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    result = normfold_cmd("fold", model_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "net.folded.onnx").exists()


def test_model_failing_the_checker_exits_2(tmp_path):
    model = conv_bn_model()
    model.graph.node[0].input[1] = "missing_weight"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    result = normfold_cmd("fold", path)
    assert result.returncode == 2 and "invalid model" in result.stderr


def test_missing_file_and_bad_usage_exit_2(tmp_path, model_path):
    assert normfold_cmd("fold", tmp_path / "nope.onnx").returncode == 2
    assert normfold_cmd("fold", model_path, "--passes", "nosuchpass").returncode == 2
    assert normfold_cmd("fold", model_path, "--shape", "x").returncode == 2
    result = normfold_cmd("fold", model_path, "--bogus-flag")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_output_equal_to_input_needs_in_place(model_path):
    before = digest(model_path)
    result = normfold_cmd("fold", model_path, "-o", model_path)
    assert result.returncode == 2 and "--in-place" in result.stderr
    assert digest(model_path) == before
    result = normfold_cmd("fold", model_path, "--in-place")
    assert result.returncode == 0
    assert [n.op_type for n in onnx.load(model_path).graph.node] == ["Conv", "Relu"]


def test_missing_output_folder_exits_2(model_path, tmp_path):
    result = normfold_cmd("fold", model_path, "-o", tmp_path / "no" / "such" / "dir.onnx")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_external_data_model_round_trips(tmp_path):
    model = conv_bn_model()
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(model, src / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    result = normfold_cmd("fold", src / "ext.onnx", "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob(".*tmp"))  # no staging folder left behind
    folded = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model = conv_bn_model()
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    evil = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    for tensor in evil.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    onnx.save(evil, tmp_path / "evil.onnx")
    result = normfold_cmd("fold", tmp_path / "evil.onnx")
    assert result.returncode == 2 and "outside" in result.stderr
    (tmp_path / "ext.data").unlink()
    result = normfold_cmd("fold", tmp_path / "ext.onnx")
    assert result.returncode == 2 and "not found" in result.stderr


def test_custom_domain_op_passes_through_and_needs_allow_unverified(tmp_path):
    model = conv_bn_model()
    model.graph.node.append(onnx.helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example", name="custom"))
    model.graph.output[0].name = "z"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    result = normfold_cmd("fold", path)
    assert result.returncode == 3 and "--allow-unverified" in result.stderr
    assert not (tmp_path / "custom.folded.onnx").exists()
    result = normfold_cmd("fold", path, "--allow-unverified")
    assert result.returncode == 0
    folded = onnx.load(tmp_path / "custom.folded.onnx")
    assert [(n.domain, n.op_type) for n in folded.graph.node] == [("", "Conv"), ("", "Relu"), ("com.example", "Frobnicate")]


def test_help_lists_exit_codes_and_readme_matches():
    text = normfold_cmd("fold", "--help").stdout
    for code in ("0", "1", "2", "3"):
        assert f"\n  {code} " in text.replace("\n    ", "\n  ") or f"  {code}   " in text
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for code, description in normfold.exit_codes.DESCRIPTIONS.items():
        assert f"| {code} |" in readme
    for reason in REASONS:
        assert f"`{reason}`" in readme, f"reason code {reason} is not documented in README"


def test_console_script_and_module_entry_agree():
    assert normfold_cmd("--version").stdout.strip().endswith(normfold.__version__)
    assert normfold_cmd("--version", module=True).stdout.strip().endswith(normfold.__version__)


def test_external_data_on_request_with_a_chosen_name(tmp_path):
    model = conv_bn_model()
    big = np.ones((64, 3, 3, 3), np.float32)  # over the 1 KiB threshold, so it goes to the data file
    model.graph.initializer.append(onnx.numpy_helper.from_array(big, "unused_big"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = normfold_cmd("fold", path, "-o", tmp_path / "out.onnx", "--external-data", "weights.bin")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "weights.bin").exists()
    out = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    assert normfold_cmd("fold", path, "-o", tmp_path / "o2.onnx", "--external-data").returncode == 0
    assert (tmp_path / "o2.onnx.data").exists()
    result = normfold_cmd("fold", path, "-o", tmp_path / "o3.onnx", "--external-data", "../escape.bin")
    assert result.returncode == 2 and "file name" in result.stderr


def test_models_near_two_gigabytes_are_written_with_external_data(tmp_path, monkeypatch):
    """The switch is by estimated size; pretend the limit is tiny to test it without writing 2 GB."""
    import normfold.io.staging

    model = conv_bn_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((64, 3, 3, 3), np.float32), "unused_big"))
    onnx.save(model, tmp_path / "m.onnx")
    monkeypatch.setattr(normfold.io.staging, "TWO_GB", 2**26 + 5000)
    report = normfold.fold_file(tmp_path / "m.onnx", tmp_path / "out.onnx")
    assert report.written and (tmp_path / "out.onnx.data").exists()


@pytest.mark.parametrize("name", ["torch/hf_bert_op14.onnx", "tf/keras3_mobilenetv2_op13.onnx", "torch/cnn_bn_op13.onnx"])
def test_streamed_writer_gives_the_same_message(name, tmp_path):
    """write_model puts the initializers last within the graph; the message must be the same."""
    import io

    from normfold.io import write_model

    model = onnx.load(Path(__file__).parents[1] / "models" / name)
    first, second = io.BytesIO(), io.BytesIO()
    write_model(model, first)
    write_model(model, second)
    parsed = onnx.ModelProto()
    parsed.ParseFromString(first.getvalue())
    assert parsed == model and len(first.getvalue()) == model.ByteSize()
    assert first.getvalue() == second.getvalue()


@settings(max_examples=200, deadline=None)
@given(dims=st.lists(st.integers(0, 40), max_size=4), dtype=st.sampled_from([1, 10, 11, 7, 9, 16]),
       name=st.text(max_size=300), doc=st.none() | st.text(max_size=200), raw=st.booleans(),
       segment=st.booleans(), external=st.booleans(), metadata=st.booleans())
def test_tensor_size_is_bytesize(dims, dtype, name, doc, raw, segment, external, metadata):
    """The writer's length prefixes come from tensor_size: one byte off and the file is corrupt."""
    from normfold.io import tensor_size

    count = int(np.prod(dims)) if dims else 1
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    values = (np.arange(count) % 3).astype(np_dtype).reshape(dims)
    tensor = onnx.helper.make_tensor(name, dtype, dims, values.tobytes() if raw else values.flatten().tolist(), raw=raw)
    if doc is not None:
        tensor.doc_string = doc
    if segment:
        tensor.segment.begin, tensor.segment.end = 1, 2
    if external:
        tensor.external_data.add(key="location", value="w.bin")
    if metadata and hasattr(tensor, "metadata_props"):
        tensor.metadata_props.add(key="k", value="v" * 200)
    assert tensor_size(tensor) == tensor.ByteSize()


def test_written_files_get_ordinary_permissions(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert normfold_cmd("fold", model_path, "-o", out, "--report", tmp_path / "r.json",
                        "--external-data").returncode == 0
    mask = os.umask(0)
    os.umask(mask)
    for path in (out, tmp_path / "r.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_external_data_model_with_opset_conversion(tmp_path):
    """Weights stay in their file while the conversion is checked and the model folded."""
    model = onnx.load(Path(__file__).parents[1] / "models" / "torch" / "hf_bert_op14.onnx")
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(model, src / "bert.onnx", save_as_external_data=True, location="bert.weights", size_threshold=256)
    report = normfold.fold_file(src / "bert.onnx", tmp_path / "out.onnx",
                                options=normfold.FoldOptions(target_opset=17),
                                verify=normfold.VerifyOptions(shapes={"input_ids": [2, 8]}))
    # the converted model alone is run only when the final comparison fails (to name the converter)
    assert report.written and report.conversion is None and report.verification.status == "passed"
    assert report.ops_after["LayerNormalization"] == 5
    assert (tmp_path / "out.onnx.data").stat().st_size > 50_000  # the weights, moved file to file
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


# One sample value per option of the shared groups. A new option must be added here, and then
# it must change the options the command builds: an option parsed but never used fails.
GROUP_SAMPLES = {
    "--target-opset": ["17"], "--allow-contrib": [], "--allow-transpose": [], "--passes": ["bn"],
    "--skip": ["bn"], "--exclude-node": ["n1"], "--initializer-inputs": ["constant"], "--external-data": ["w.bin"],
    "--shape": ["x:1x3"], "--dim": ["batch=2"], "--int-range": ["ids:0:5"], "--inputs": ["@npz"],
    "--batches": ["3"], "--seed": ["7"], "--atol": ["0.5"], "--rtol": ["0.5"], "--ort-opt-level": ["all"],
    "--timeout": ["9"],
}


@pytest.mark.parametrize("group", ["fold", "verify"])
def test_every_group_option_reaches_the_options(group, tmp_path):
    import click

    from normfold.cli import options as o

    decorate, build_options = ((o.fold_options, o.fold_options_from) if group == "fold"
                               else (o.verification_options, o.verify_options))
    captured = {}

    @click.command()
    @decorate
    def command(**kwargs):
        captured["options"] = build_options(dict(kwargs))

    names = [p.opts[0] for p in command.params if p.opts[0].startswith("--")]
    assert set(names) <= set(GROUP_SAMPLES), f"add a sample for {sorted(set(names) - set(GROUP_SAMPLES))}"
    np.savez(tmp_path / "in.npz", x=np.zeros(1, np.float32))
    CliRunner().invoke(command, [], catch_exceptions=False)
    default = captured["options"]
    for name in names:
        values = [str(tmp_path / "in.npz") if v == "@npz" else v for v in GROUP_SAMPLES[name]]
        CliRunner().invoke(command, [name, *values], catch_exceptions=False)
        assert captured["options"] != default, f"{name} {' '.join(values)} changed nothing"


def test_a_group_option_without_a_field_is_refused_at_import():
    from normfold.cli import options as o

    with pytest.raises(TypeError, match=r"options without a field: \['timeout'\]; fields without an option: \[\]"):
        o._check_fields({k: v for k, v in o._VERIFY_FIELDS.items() if k != "timeout"}, o.VERIFY_KEYS)
    with pytest.raises(TypeError, match=r"options without a field: \[\]; fields without an option: \['x'\]"):
        o._check_fields({**o._FOLD_FIELDS, "x": None}, o.FOLD_KEYS)
    o._check_fields(o._FOLD_FIELDS, o.FOLD_KEYS)


def test_every_command_with_a_group_builds_its_options():
    """A command decorated with an option group must turn the group's values into options: one
    that took them into **groups and never called the converter would ignore all of them."""
    import inspect as python_inspect

    from normfold.cli import options as o
    from normfold.cli.main import main as group

    commands = {name: group.get_command(None, name) for name in group.list_commands(None)}
    assert {"fold", "inspect", "check", "verify"} <= set(commands)
    for name, command in commands.items():
        params = {p.name for p in command.params}
        called = python_inspect.unwrap(command.callback).__code__.co_names
        for keys, converter in ((o.FOLD_KEYS, "fold_options_from"), (o.VERIFY_KEYS, "verify_options")):
            if set(keys) & params:
                assert set(keys) <= params, f"{name} has only part of a group"
                assert converter in called, f"{name} takes the options of {converter} but never calls it"
