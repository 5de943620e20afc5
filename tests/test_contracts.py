"""The report's contracts, written down exactly: the site record's rules, the JSON envelope, the
exit-code severity of a run over several models, and the text a person reads (README shows it).

These tests pin what mutation testing (tests/mutation/) found unchecked in normfold/report.py:
every line of the text rendering, every field of the envelope, every rule of a SiteRecord.
"""

from __future__ import annotations

import json

import pytest

import normfold
from normfold import exit_codes
from normfold.report import (COMMANDS, REASONS, SCHEMA_VERSION, OutputComparison, Report, SiteRecord,
                             Verification, document, document_json, worst_exit_code)


def site(status="folded", reason=None, **kw) -> SiteRecord:
    kw.setdefault("nodes", ["conv", "bn"])
    kw.setdefault("detail", "bn folded into Conv conv")
    return SiteRecord(pass_name="bn", kind="BatchNormalization after Conv", status=status, reason=reason, **kw)


def comparison(name="y", passed=True, **kw) -> OutputComparison:
    values = dict(name=name, dtype="float32", shape=[1, 4], max_abs_error=2.5e-7, max_rel_error=1.25e-6,
                  atol=1e-4, rtol=1e-4, passed=passed, needed_atol=0.0, tolerance_dtype="float32")
    values.update(kw)
    return OutputComparison(**values)


# --- SiteRecord --------------------------------------------------------------------------------

def test_site_id_is_graph_and_output_tensor_else_last_node():
    assert site(output="t").id == "main:t"
    assert site(output="t", graph="main/if:then_branch").id == "main/if:then_branch:t"
    assert site(output=None).id == "main:bn"
    assert site(output=None, nodes=[]).id == "main:"
    assert site(output="t", id="given").id == "given"


@pytest.mark.parametrize("status, reason", [("folded", "excluded"), ("fused", "excluded"), ("left", None)])
def test_a_site_is_left_exactly_when_it_has_a_reason(status, reason):
    with pytest.raises(ValueError, match="^a site is left exactly when it has a reason$"):
        site(status=status, reason=reason)


def test_site_status_and_reason_come_from_closed_lists():
    with pytest.raises(ValueError, match=r"^unknown site status 'done'$"):
        site(status="done")
    with pytest.raises(ValueError, match=r"^unknown reason code 'too-hard'$"):
        site(status="left", reason="too-hard")
    for reason in REASONS:
        assert site(status="left", reason=reason).reason == reason
    for status in ("folded", "fused"):
        assert site(status=status).status == status


def test_report_counts_sites_by_status():
    report = Report(sites=[site(), site("fused"), site("left", "excluded"), site("left", "unknown-shape")])
    assert (report.count("folded"), report.count("fused"), report.count("left")) == (1, 1, 2)
    assert Report().count("folded") == 0


# --- exit codes --------------------------------------------------------------------------------

@pytest.mark.parametrize("codes, worst", [
    ([], 0), ([None], 0), ([None, 0], 0), ([0, 0], 0),
    ([0, 3], 3), ([3, 0], 3),
    ([3, 1], 1), ([1, 3], 1), ([None, 1, 3, 0], 1),  # one model differs, another is unverifiable
    ([1, 2], 2), ([2, 1, 3], 2),
    ([2, 4], 4), ([4, 1], 4),
    ([4, 130], 130), ([130, 0], 130),
])
def test_worst_exit_code_follows_the_documented_severity(codes, worst):
    assert worst_exit_code(codes) == worst


def test_exit_code_values_are_the_documented_ones():
    assert (exit_codes.OK, exit_codes.OUTPUTS_DIFFER, exit_codes.BAD_INPUT, exit_codes.UNVERIFIED,
            exit_codes.INTERNAL_ERROR, exit_codes.INTERRUPTED) == (0, 1, 2, 3, 4, 130)
    assert exit_codes.SEVERITY == [0, 3, 1, 2, 4, 130]
    assert sorted(exit_codes.DESCRIPTIONS) == sorted(exit_codes.SEVERITY)


# --- the JSON envelope -------------------------------------------------------------------------

def test_document_is_the_versioned_envelope_with_the_worst_exit_code():
    reports = [Report(input="a.onnx", exit_code=0), Report(input="b.onnx", exit_code=3),
               Report(input="c.onnx", exit_code=1)]
    doc = document("fold", reports)
    assert list(doc) == ["schema_version", "tool", "version", "command", "exit_code", "models"]
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert doc["tool"] == "normfold" and doc["version"] == normfold.__version__
    assert doc["command"] == "fold" and doc["exit_code"] == 1
    assert [m["input"] for m in doc["models"]] == ["a.onnx", "b.onnx", "c.onnx"]
    assert doc["models"][1] == reports[1].as_dict()


def test_every_command_has_the_envelope_and_no_other_name_does():
    for command in COMMANDS:
        assert document(command, [])["command"] == command
        assert document(command, [])["exit_code"] == 0
    with pytest.raises(ValueError, match=r"^unknown command 'lint'$"):
        document("lint", [])


def test_json_is_indented_and_ends_with_a_newline():
    report = Report(input="m.onnx", exit_code=0, sites=[site(output="t")])
    text = document_json("inspect", [report])
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text.startswith('{\n  "schema_version": 1,\n  "tool": "normfold",')
    assert json.loads(text) == document("inspect", [report])
    assert report.to_json() == document_json("fold", [report])
    assert report.to_json("check") == document_json("check", [report])
    assert json.loads(report.to_json())["models"][0]["sites"][0]["id"] == "main:t"


# --- the text a person reads -------------------------------------------------------------------

def folded_report(**kw) -> Report:
    values = dict(input="m.onnx", output="m.folded.onnx", written=True, opset_before=13, opset_after=13,
                  nodes_before=27, nodes_after=20, timings={"total": 0.0612},
                  sites=[site(output="b1", max_rounding=3e-8),
                         site("left", "no-linear-producer", nodes=["bn6"], detail="bn6 follows Relu"),
                         site("fused", nodes=["mean", "sub"], detail="fused", graph="main/if:then_branch",
                              max_rounding=2.5e-9)],
                  verification=Verification(status="passed", outputs=[comparison()]))
    values.update(kw)
    return Report(**values)


def test_text_summary_as_readme_shows_it():
    assert folded_report().to_text() == "\n".join([
        "m.onnx: 1 folded, 1 fused, 1 left; nodes 27 -> 20",
        "  left (no-linear-producer): BatchNormalization after Conv at bn6: bn6 follows Relu",
        "  PASSED y: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001)",
        "  wrote m.folded.onnx",
        "  time 0.06s",
    ])


def test_verbose_text_lists_every_site_and_the_largest_rounding():
    assert folded_report().to_text(verbose=True) == "\n".join([
        "m.onnx: 1 folded, 1 fused, 1 left; nodes 27 -> 20",
        "  folded: BatchNormalization after Conv at conv: bn folded into Conv conv",
        "  left (no-linear-producer): BatchNormalization after Conv at bn6: bn6 follows Relu",
        "  fused: BatchNormalization after Conv at mean [main/if:then_branch]: fused",
        "  largest rounding change written by a fold: 3e-08",
        "  PASSED y: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001)",
        "  wrote m.folded.onnx",
        "  time 0.06s",
    ])


def test_text_of_a_failed_fold_with_notes_opset_change_and_sites():
    failing = comparison("y", passed=False, max_abs_error=0.5, max_rel_error=2.0, needed_atol=0.4999,
                         dtype="float32", tolerance_dtype="float16", atol=0.01, rtol=0.01)
    sites = [comparison(f"s{i}", passed=i > 2, max_abs_error=0.5 / (i + 1)) for i in range(7)]
    report = folded_report(
        written=False, opset_after=17, notes=["2 initializers removed from the graph inputs"],
        sites=[site(nodes=[], detail="no nodes")], timings={},
        verification=Verification(status="failed", outputs=[failing, comparison("z")], sites=sites,
                                  removed_sites=[f"r{i}" for i in range(6)], first_failing_site="s1",
                                  notes=["inputs retried at 16"]))
    assert report.to_text() == "\n".join([
        "m.onnx: 1 folded, 0 fused, 0 left; nodes 27 -> 20",
        "  opset 13 -> 17",
        "  note: 2 initializers removed from the graph inputs",
        "  note: inputs retried at 16",
        "  FAILED y: max abs 0.5, max rel 2 (atol 0.01, rtol 0.01 from float16 on its paths; needed atol 0.5)",
        "  PASSED z: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001)",
        "  sites, worst first (5 of 7):",
        "    FAILED s0: max abs 0.5, max rel 1.25e-06 (atol 0.0001, rtol 0.0001; needed atol 0)",
        "    FAILED s1: max abs 0.25, max rel 1.25e-06 (atol 0.0001, rtol 0.0001; needed atol 0)",
        "    FAILED s2: max abs 0.167, max rel 1.25e-06 (atol 0.0001, rtol 0.0001; needed atol 0)",
        "    PASSED s3: max abs 0.125, max rel 1.25e-06 (atol 0.0001, rtol 0.0001)",
        "    PASSED s4: max abs 0.1, max rel 1.25e-06 (atol 0.0001, rtol 0.0001)",
        "  removed by the rewrite (not compared): 6 site tensor(s): r0, r1, r2, r3, r4 ...",
        "  first site that differs, in graph order: s1",
        "  nothing written",
    ])
    verbose = report.to_text(verbose=True).splitlines()
    assert verbose[3] == "  folded: BatchNormalization after Conv at ?: no nodes"
    assert "  sites, worst first (7 of 7):" in verbose
    assert "    PASSED s6: max abs 0.0714, max rel 1.25e-06 (atol 0.0001, rtol 0.0001)" in verbose


def test_removed_sites_list_has_no_ellipsis_up_to_five():
    report = folded_report(verification=Verification(status="passed", removed_sites=["a", "b", "c", "d", "e"]))
    assert "  removed by the rewrite (not compared): 5 site tensor(s): a, b, c, d, e" in report.to_text().splitlines()


def test_a_model_without_sites_still_gets_its_summary_line():
    report = Report(input="m.onnx", output="m.folded.onnx", nodes_before=5, nodes_after=5)
    assert report.to_text() == "m.onnx: 0 folded, 0 fused, 0 left; nodes 5 -> 5\n  nothing written"
    no_nodes = Report(input="m.onnx", sites=[site("left", "excluded", detail="excluded")])
    assert no_nodes.to_text().splitlines()[0] == "m.onnx: 0 folded, 0 fused, 1 left; nodes 0 -> 0"


def test_text_of_verify_unavailable_skipped_and_conversion():
    report = Report(input="a.onnx", output="b.onnx", verification=Verification(status="unavailable",
                                                                                 detail="custom op"))
    assert report.to_text() == "a.onnx vs b.onnx:\n  verification unavailable: custom op"
    skipped = folded_report(verification=Verification(status="skipped", detail="--no-verify"), timings={})
    assert skipped.to_text().splitlines()[2:] == ["  verification skipped: --no-verify", "  wrote m.folded.onnx"]
    converted = folded_report(
        opset_after=17, timings={},
        conversion=Verification(status="failed", outputs=[comparison(passed=False, needed_atol=1.0)],
                                detail="the opset converter changed the outputs", notes=["converted to 17"]),
        verification=Verification(status="failed", outputs=[comparison(passed=False, needed_atol=1.0)]))
    assert converted.to_text().splitlines()[3:] == [
        "  note: converted to 17",
        "  FAILED y: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001; needed atol 1)",
        "  the opset converter changed the outputs",
        "  FAILED y: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001; needed atol 1)",
        "  wrote m.folded.onnx",
    ]
    passed_conversion = folded_report(conversion=Verification(status="passed", outputs=[comparison("c")],
                                                              notes=["hidden"]))
    assert passed_conversion.to_text() == folded_report().to_text()
    unavailable_conversion = folded_report(conversion=Verification(status="unavailable", detail="no runtime"),
                                           timings={})
    assert "  opset conversion unavailable: no runtime" in unavailable_conversion.to_text().splitlines()


def test_text_of_a_benchmark_and_of_nothing_to_write():
    bench = {"original": {"disabled": {"latency_ms": 1.23456, "session_s": 0.5}, "all": {"latency_ms": 1.0,
                                                                                          "session_s": 0.25}},
             "folded": {"disabled": {"latency_ms": 0.5, "session_s": 0.125}}}
    lines = folded_report(benchmark=bench, written=False, output="o.onnx", timings={}).to_text().splitlines()
    assert lines[-3:] == [
        "  latency original: disabled: 1.235 ms (session 0.500 s), all: 1.000 ms (session 0.250 s)",
        "  latency folded: disabled: 0.500 ms (session 0.125 s)",
        "  nothing written",
    ]
    # no output path, or a verify-only report (no nodes): no "nothing written" line
    assert "nothing written" not in folded_report(written=False, output=None).to_text()
    assert Report(input="a", output="b").to_text() == "a vs b:"


def test_text_of_accuracy_and_magnitude_rules():
    accurate = comparison(rule="accuracy", passed=True, original_error=1e-3, candidate_error=1.5e-3,
                          allowed_error=2e-3, tolerance_dtype=None)
    failed_accuracy = comparison(rule="accuracy", passed=False, original_error=1e-3, candidate_error=0.5,
                                 allowed_error=2e-3)
    magnitude = comparison(rule="magnitude", passed=False, tolerance_dtype="float16")
    report = folded_report(verification=Verification(status="failed",
                                                     outputs=[accurate, failed_accuracy, magnitude]), timings={})
    assert report.to_text().splitlines()[2:5] == [
        "  PASSED y: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001); by accuracy against float64:"
        " error 0.0015, original's 0.001, allowed 0.002",
        "  FAILED y: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001); by accuracy against float64:"
        " error 0.5, original's 0.001, allowed 0.002",
        "  FAILED y: max abs 2.5e-07, max rel 1.25e-06 (atol 0.0001, rtol 0.0001 from float16 on its paths"
        " scaled by the output's magnitude)",
    ]
