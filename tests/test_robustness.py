"""Bad input, as the real `normfold` command meets it: exit 2, one line on stderr starting with
`normfold: error:`, no traceback, and no new file (no output, no staging leftovers). Then a
bounded, seeded fuzz over the bytes of real sample models: the library raises only NormfoldError,
the command ends only with 0, 1, 2 or 3, and whatever is written passes onnx's full check.

(test_cli.py already covers an empty file, garbage, random bytes and text with the full contract;
the cases below are the ones it does not cover, or covers with weaker assertions.)
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import stat
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from normfold.api import fold_file
from normfold.errors import NormfoldError
from test_cli import conv_bn_model, normfold_cmd

MODELS = Path(__file__).parents[1] / "models"

# ---------------------------------------------------------------------------------------------
# helpers

def files_under(folder: Path) -> dict[str, str]:
    """Every entry below `folder`, hidden ones included: relative path -> content digest for regular
    files (so that a changed input shows too), the kind for the rest (FIFOs are never opened)."""
    entries = {}
    for p in folder.rglob("*"):
        mode = p.lstat().st_mode
        entries[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(mode)
                                               else stat.filemode(mode)[0])
    return entries


def assert_refused(result, folder: Path, before: dict[str, str], expect: str | tuple[str, ...]) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("normfold: error: "), result.stderr
    for text in (expect,) if isinstance(expect, str) else expect:
        assert text.lower() in lines[0].lower(), f"expected {text!r} in {lines[0]!r}"
    assert result.stdout == ""
    after = files_under(folder)
    assert after.keys() == before.keys(), f"new files: {sorted(after.keys() - before.keys())}"
    assert after == before, f"changed files: {sorted(k for k in after if after[k] != before[k])}"


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def with_external_data(folder: Path, name: str = "ext.onnx", model: onnx.ModelProto | None = None) -> Path:
    """`model` (conv_bn_model by default) saved with every initializer in `<name>.data` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model or conv_bn_model(), folder / name, save_as_external_data=True, location=f"{name}.data",
              size_threshold=0)
    return folder / name


def rewrite_external(path: Path, out: Path, **entries) -> Path:
    """Copy of the external-data model at `path` with external_data entries (location, offset,
    length) replaced in every tensor; the data itself is not touched."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key in entries:
                entry.value = str(entries[entry.key])
    return save(model, out)


# ---------------------------------------------------------------------------------------------
# the cases: each takes the test's folder and returns (command-line arguments, text the one error
# line must contain). Unless a case is about the output, -o points into the same folder.

def _truncated(fraction):
    def case(d):
        data = save(conv_bn_model(), d / "net.onnx").read_bytes()
        cut = {"first-10-bytes": 10, "half": len(data) // 2, "all-but-last-byte": len(data) - 1}[fraction]
        (d / "net.onnx").write_bytes(data[:cut])
        return ["fold", d / "net.onnx", "-o", d / "out.onnx"], "not a readable ONNX model"
    return case


def case_tensor_proto(d):
    tensor = onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    (d / "tensor.onnx").write_bytes(tensor.SerializeToString())
    return ["fold", d / "tensor.onnx", "-o", d / "out.onnx"], "tensor.onnx: not a readable ONNX model"


def case_graph_proto(d):
    # A GraphProto's fields mostly clash with ModelProto's wire types, which protobuf keeps as
    # unknown fields: it parses as a ModelProto without a graph.
    (d / "graph.onnx").write_bytes(conv_bn_model().graph.SerializeToString())
    return ["fold", d / "graph.onnx", "-o", d / "out.onnx"], "graph.onnx: not an ONNX model (no graph)"


def case_node_proto(d):
    (d / "node.onnx").write_bytes(conv_bn_model().graph.node[0].SerializeToString())
    return ["fold", d / "node.onnx", "-o", d / "out.onnx"], "not an ONNX model"


def case_model_without_opset(d):
    model = conv_bn_model()
    del model.opset_import[:]
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "no opset import"


def case_cycle(d):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["a"], name="first"),
                               helper.make_node("Relu", ["a"], ["b"], name="second"),
                               helper.make_node("Identity", ["b"], ["y"], name="out")], "cycle", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return ["fold", save(model, d / "cycle.onnx"), "-o", d / "out.onnx"], "topologically sorted"


def case_nodes_out_of_order(d):
    model = conv_bn_model()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "topologically sorted"


def case_ir_version_too_new(d):
    model = conv_bn_model()
    model.ir_version = 99
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "ir_version 99"


def case_opset_too_new(d):
    model = conv_bn_model()
    model.opset_import[0].version = 99
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "opset 99 of the default domain is newer"


def case_ml_opset_too_new(d):
    model = conv_bn_model()
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 99))
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "opset 99 of domain 'ai.onnx.ml'"


def case_shapes_contradict_ops(d):
    # Conv with pads 1 keeps 8x8; the graph output's recorded shape says 9x9 (a graph output is
    # interface, not annotation: a contradicting value_info is dropped instead, see test_prepare.py)
    model = conv_bn_model()
    model.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 9
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "Inferred shape and existing shape differ"


def _fold_with_bad_utf8(d, model, mark: str):
    """Save `model` with the string `mark` (set somewhere in it) replaced by bytes that are not UTF-8."""
    data = model.SerializeToString().replace(mark.encode(), mark[:-2].encode() + b"\xff\xfe")
    (d / "m.onnx").write_bytes(data)
    return ["fold", d / "m.onnx", "-o", d / "out.onnx"]


def case_name_not_utf8(d):
    model = conv_bn_model()
    model.graph.node[0].name = "NAME@"
    return _fold_with_bad_utf8(d, model, "NAME@"), "NodeProto.name holds a string that is not valid UTF-8"


def case_tensor_doc_not_utf8(d):
    model = conv_bn_model()
    model.graph.initializer[0].doc_string = "DOC@"
    return _fold_with_bad_utf8(d, model, "DOC@"), "TensorProto.doc_string holds a string that is not valid UTF-8"


def case_unknown_tensor_dtype(d):
    model = conv_bn_model()
    model.graph.initializer[0].data_type = 77
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "tensor 'w' has an unknown data type 77"


def case_unknown_input_elem_type(d):
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.elem_type = 77
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "'x' has an unknown element type 77"


def case_tensor_data_too_short(d):
    model = conv_bn_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "raw_data size"


def case_typed_tensor_data_too_short(d):
    model = conv_bn_model()
    tensor = model.graph.initializer[1]  # 's', float32 [4]: as float_data, one value missing
    values = onnx.numpy_helper.to_array(tensor)
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values[:-1].tolist())
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], ("m.onnx: invalid model", "float_data")


def case_negative_tensor_dim(d):
    model = conv_bn_model()
    model.graph.initializer[0].dims[0] = -1  # numpy would happily reshape to (-1, 3, 3, 3)
    return ["fold", save(model, d / "m.onnx"), "-o", d / "out.onnx"], "negative dimension"


def case_external_absolute_location(d):
    model = with_external_data(d / "model")
    outside = with_external_data(d / "elsewhere")  # readable data: only the refusal keeps it unread
    rewrite_external(model, model, location=f"{outside}.data")
    return ["fold", model, "-o", d / "out.onnx"], "points outside the model's folder; refused"


def case_external_parent_location(d):
    model = with_external_data(d / "model")
    with_external_data(d, "outside.onnx")
    rewrite_external(model, model, location="../outside.onnx.data")
    return ["fold", model, "-o", d / "out.onnx"], "points outside the model's folder; refused"


def case_external_symlink_outside(d):
    model = with_external_data(d / "model")
    outside = with_external_data(d / "elsewhere")
    (d / "model" / "link.data").symlink_to(f"{outside}.data")
    rewrite_external(model, model, location="link.data")
    return ["fold", model, "-o", d / "out.onnx"], "'link.data' points outside the model's folder; refused"


def case_external_data_is_fifo(d):
    model = with_external_data(d / "model")
    os.mkfifo(d / "model" / "pipe.data")  # opening it would block until a writer comes
    rewrite_external(model, model, location="pipe.data")
    return ["fold", model, "-o", d / "out.onnx"], "'pipe.data': is a FIFO"


def case_external_data_is_directory(d):
    model = with_external_data(d / "model")
    (d / "model" / "sub").mkdir()
    rewrite_external(model, model, location="sub")
    return ["fold", model, "-o", d / "out.onnx"], "'sub': is a directory"


def case_external_data_shorter_than_offsets(d):
    model = with_external_data(d / "model")
    data = (d / "model" / "ext.onnx.data")
    data.write_bytes(data.read_bytes()[:100])
    return ["fold", model, "-o", d / "out.onnx"], "cannot read external data"


def case_external_offset_beyond_file(d):
    model = with_external_data(d / "model")
    rewrite_external(model, model, offset=10**9)
    return ["fold", model, "-o", d / "out.onnx"], "external data"


def case_model_is_directory_without_models(d):
    (d / "dir.onnx").mkdir()  # a folder is searched for models; this one has none
    return ["fold", d / "dir.onnx", "-o", d / "out.onnx"], "no .onnx files in this folder"


def case_model_is_fifo(d):
    os.mkfifo(d / "pipe.onnx")
    return ["fold", d / "pipe.onnx", "-o", d / "out.onnx"], "pipe.onnx: is a FIFO"


def case_model_is_dev_zero(d):
    return ["fold", "/dev/zero", "-o", d / "out.onnx"], "/dev/zero: is a character device"


def case_model_is_broken_symlink(d):
    (d / "link.onnx").symlink_to(d / "gone.onnx")
    return ["fold", d / "link.onnx", "-o", d / "out.onnx"], "no such file"


def case_output_under_a_file(d):
    model = save(conv_bn_model(), d / "net.onnx")  # a regular file used as a folder in the path
    return ["fold", model, "-o", d / "net.onnx" / "out.onnx"], "out.onnx"


def case_output_in_read_only_folder(d):
    # Tests run as root, where a chmod'ed folder stays writable; /proc is a folder in which even
    # root cannot create a file.
    model = save(conv_bn_model(), d / "net.onnx")
    out = Path("/proc") / f"normfold-test-{os.getpid()}-{d.name}.onnx"
    return ["fold", model, "-o", out], "cannot write to '/proc'"


def case_output_is_input_through_symlink(d):
    model = save(conv_bn_model(), d / "net.onnx")
    (d / "alias.onnx").symlink_to(model)
    return ["fold", model, "-o", d / "alias.onnx"], "--in-place"


def case_output_is_input_spelled_differently(d):
    model = save(conv_bn_model(), d / "net.onnx")
    (d / "sub").mkdir()
    return ["fold", model, "-o", d / "sub" / ".." / "net.onnx"], "--in-place"


def case_output_is_the_inputs_external_data(d):
    model = with_external_data(d / "model")
    return ["fold", model, "-o", d / "model" / "ext.onnx.data"], "ext.onnx.data"


def case_report_in_missing_folder(d):
    model = save(conv_bn_model(), d / "net.onnx")
    return ["fold", model, "-o", d / "out.onnx", "--report", d / "no" / "such" / "report.json"], "does not exist"


CASES = [
    pytest.param(_truncated("first-10-bytes"), id="truncated-first-10-bytes"),
    pytest.param(_truncated("half"), id="truncated-half"),
    pytest.param(_truncated("all-but-last-byte"), id="truncated-all-but-last-byte"),
    pytest.param(case_tensor_proto, id="tensor-proto"),
    pytest.param(case_graph_proto, id="graph-proto-parses-as-model"),
    pytest.param(case_node_proto, id="node-proto"),
    pytest.param(case_model_without_opset, id="no-opset-import"),
    pytest.param(case_cycle, id="graph-cycle"),
    pytest.param(case_nodes_out_of_order, id="nodes-out-of-order"),
    pytest.param(case_ir_version_too_new, id="ir-version-too-new"),
    pytest.param(case_opset_too_new, id="opset-too-new"),
    pytest.param(case_ml_opset_too_new, id="ml-opset-too-new"),
    pytest.param(case_shapes_contradict_ops, id="full-check-shape-contradiction"),
    pytest.param(case_name_not_utf8, id="name-not-utf8"),
    pytest.param(case_tensor_doc_not_utf8, id="tensor-doc-not-utf8"),
    pytest.param(case_unknown_tensor_dtype, id="tensor-dtype-invalid"),
    pytest.param(case_unknown_input_elem_type, id="input-elem-type-invalid"),
    pytest.param(case_tensor_data_too_short, id="raw-data-too-short"),
    pytest.param(case_typed_tensor_data_too_short, id="float-data-too-short"),
    pytest.param(case_negative_tensor_dim, id="negative-tensor-dim"),
    pytest.param(case_external_absolute_location, id="external-absolute-location"),
    pytest.param(case_external_parent_location, id="external-parent-location"),
    pytest.param(case_external_symlink_outside, id="external-symlink-outside"),
    pytest.param(case_external_data_is_fifo, id="external-data-fifo"),
    pytest.param(case_external_data_is_directory, id="external-data-directory"),
    pytest.param(case_external_data_shorter_than_offsets, id="external-data-short"),
    pytest.param(case_external_offset_beyond_file, id="external-offset-beyond-file"),
    pytest.param(case_model_is_directory_without_models, id="model-is-empty-directory"),
    pytest.param(case_model_is_fifo, id="model-is-fifo"),
    pytest.param(case_model_is_dev_zero, id="model-is-dev-zero"),
    pytest.param(case_model_is_broken_symlink, id="model-broken-symlink"),
    pytest.param(case_output_under_a_file, id="output-under-a-file"),
    pytest.param(case_output_in_read_only_folder, id="output-read-only-folder-proc"),
    pytest.param(case_output_is_input_through_symlink, id="output-is-input-symlink"),
    pytest.param(case_output_is_input_spelled_differently, id="output-is-input-other-spelling"),
    pytest.param(case_output_is_the_inputs_external_data, id="output-is-the-inputs-external-data"),
    pytest.param(case_report_in_missing_folder, id="report-in-missing-folder"),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_cleanly(case, tmp_path):
    args, expect = case(tmp_path)
    before = files_under(tmp_path)
    result = normfold_cmd(*args)
    assert_refused(result, tmp_path, before, expect)
    if "/proc" in map(str, (Path(a).parent for a in args[1:])):
        assert not list(Path("/proc").glob(f"*normfold-test-{os.getpid()}-*"))


# ---------------------------------------------------------------------------------------------
# bounded fuzz: seeded byte mutations of small real models

FUZZ_MODELS = ["torch/conv1d3d_bn_op13.onnx", "torch/cf_layernorm_op14.onnx", "torch/linear_rmsnorm_dynamo_op18.onnx",
               "tf/keras3_bn_conv3d_op13.onnx", "tf/keras3_conv_ln_c_op17.onnx", "tf/keras3_ln_last_fp16_op13.onnx"]
FUZZ_LIBRARY = 130  # mutants through normfold.api.fold_file, in this process
FUZZ_CLI = 20  # mutants through the installed command
FUZZ_EXIT_CODES = {0, 1, 2, 3}


def mutant(index: int) -> tuple[str, bytes, list[str]]:
    """Mutant number `index`: a sample model with 1 to 8 byte edits (flip a bit, set a byte,
    insert, delete, duplicate a run, truncate). The same index always gives the same bytes."""
    rng = random.Random(index)
    name = FUZZ_MODELS[index % len(FUZZ_MODELS)]
    data = bytearray((MODELS / name).read_bytes())
    edits = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
        op = rng.choice(["flip", "set", "insert", "delete", "duplicate", "truncate"])
        at = rng.randrange(len(data)) if data else 0
        if op == "flip" and data:
            data[at] ^= 1 << rng.randrange(8)
        elif op == "set" and data:
            data[at] = rng.randrange(256)
        elif op == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == "delete":
            del data[at:at + rng.randint(1, 4)]
        elif op == "duplicate":
            data[at:at] = data[at:at + rng.randint(1, 16)]
        elif op == "truncate":
            del data[at:]
        edits.append(f"{op}@{at}")
    return name, bytes(data), edits


def fold_mutant_in_process(index: int, folder: Path) -> tuple[int, str | None]:
    """(exit code, failure or None) for one mutant through the library."""
    name, data, edits = mutant(index)
    folder.mkdir()
    src, out = folder / "m.onnx", folder / "out.onnx"
    src.write_bytes(data)
    label = f"mutant {index} of {name} ({', '.join(edits)})"
    try:
        code = _fold_keeping_input(src, out, data, label)
    except NormfoldError as exc:
        code = 2
        if "\n" in str(exc) or not str(exc).strip():
            return code, f"{label}: error message is not one line: {str(exc)!r}"
    except Exception as exc:  # anything else is a normfold bug
        return -1, f"{label}: {''.join(traceback.format_exception_only(exc)).strip()}"
    if code not in FUZZ_EXIT_CODES:
        return code, f"{label}: exit code {code}"
    failure = check_written(out, code, label)
    leftovers = sorted(files_under(folder).keys() - {"m.onnx", "out.onnx"})
    if leftovers:
        failure = failure or f"{label}: left {leftovers}"
    return code, failure


def _fold_keeping_input(src: Path, out: Path, data: bytes, label: str) -> int:
    try:
        return fold_file(src, out).exit_code
    finally:
        assert src.read_bytes() == data, f"{label}: the input was changed"


def check_written(out: Path, code: int, label: str) -> str | None:
    if out.exists() != (code == 0):
        return f"{label}: exit {code} but output {'written' if out.exists() else 'missing'}"
    if out.exists():
        try:
            onnx.checker.check_model(str(out), full_check=True)
        except Exception as exc:
            return f"{label}: written model fails onnx's full check: {' '.join(str(exc).split())[:300]}"
    return None


def test_fuzz_mutated_models(tmp_path):
    codes: collections.Counter = collections.Counter()
    failures = []
    written = 0
    for index in range(FUZZ_LIBRARY):
        code, failure = fold_mutant_in_process(index, tmp_path / f"lib{index}")
        codes[code] += 1
        written += (tmp_path / f"lib{index}" / "out.onnx").exists()
        if failure:
            failures.append(failure)

    def run_cli(index):
        name, data, edits = mutant(index)
        folder = tmp_path / f"cli{index}"
        folder.mkdir()
        (folder / "m.onnx").write_bytes(data)
        return index, name, edits, folder, normfold_cmd("fold", folder / "m.onnx", "-o", folder / "out.onnx", "-q")

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(run_cli, range(FUZZ_LIBRARY, FUZZ_LIBRARY + FUZZ_CLI)))
    cli_codes: collections.Counter = collections.Counter()
    for index, name, edits, folder, result in runs:
        label = f"CLI mutant {index} of {name} ({', '.join(edits)})"
        cli_codes[result.returncode] += 1
        if (folder / "m.onnx").read_bytes() != mutant(index)[1]:
            failures.append(f"{label}: the input was changed")
        written += (folder / "out.onnx").exists()
        if result.returncode not in FUZZ_EXIT_CODES or "Traceback" in result.stderr:
            failures.append(f"{label}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
            continue
        if result.returncode == 2:
            lines = result.stderr.splitlines()
            if len(lines) != 1 or not lines[0].startswith("normfold: error: "):
                failures.append(f"{label}: stderr is not one error line: {result.stderr!r}")
        failure = check_written(folder / "out.onnx", result.returncode, label)
        leftovers = sorted(files_under(folder).keys() - {"m.onnx", "out.onnx"})
        failures += [f for f in (failure, f"{label}: left {leftovers}" if leftovers else None) if f]

    print(f"fuzz: library {dict(sorted(codes.items()))}, cli {dict(sorted(cli_codes.items()))}, "
          f"{written} written models passed the full check")
    assert not failures, "\n".join(failures[:20])
    # The mutation mix must keep reaching past the parser, or the fuzz tests nothing but it.
    assert codes[0] + cli_codes[0] >= 10 and codes[2] + cli_codes[2] >= 50, (codes, cli_codes)
