"""Site records and the fold report: one structure, rendered as text for people and JSON for machines.

Every site a pass looks at becomes a `SiteRecord`: what it was, whether it was rewritten, and, when
it was left alone, a reason code from the closed list `REASONS`. The JSON layout is versioned by
`SCHEMA_VERSION`; README documents it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

# The closed list of reasons a site can be left as it was. README repeats it; a test keeps the two equal.
REASONS: dict[str, str] = {
    "training-mode": "BatchNormalization runs in training mode (training_mode=1 or its statistics outputs are used)",
    "non-constant-parameters": "a norm parameter (scale, bias, mean, variance, epsilon) is not a constant",
    "non-constant-weights": "the producer's weight or bias is not a constant",
    "intermediate-used-elsewhere": "a tensor inside the pattern is used outside it or is a graph output",
    "no-linear-producer": ("the BatchNormalization, or Keras' per-channel Mul(C) -> Add(C) BatchNorm, does not "
                           "directly follow a Conv, ConvTranspose, Gemm or MatMul, and no Conv without padding, Gemm "
                           "or MatMul that takes its channels exactly (on [N, C]; a MatMul along its contracted axis "
                           "for the Mul/Add form) is its one reader"),
    "not-per-channel": "the constant does not broadcast along the producer's output-channel axis only",
    "unsupported-axis": "the reduction axes are not ones the fused op can express",
    "opset-too-old": "the fused op needs a newer opset than the model's (see --target-opset)",
    "invalid-statistics": "variance + epsilon is not positive, or a parameter is not finite",
    "unsupported-attribute": "an attribute value the rewrite does not handle",
    "unknown-shape": "a shape or rank the rewrite needs could not be inferred",
    "unsupported-dtype": "the tensor type is not a floating-point type the rewrite handles",
    "excluded": "the user excluded this node (--exclude-node)",
    "unrecognized-pattern": ("it computes norm statistics (a mean square or variance under an inverse square root, or a "
                             "mean subtracted) but is not a norm normfold can prove; the detail lists its ops"),
    "inconsistent-constants": "a constant's shape contradicts the ops that read it (a bias of the wrong length)",
}

STATUSES = ("folded", "fused", "left")
COMMANDS = ("fold", "inspect", "check", "verify")


@dataclass
class SiteRecord:
    """One place in the graph a pass considered."""

    pass_name: str
    kind: str  # what the site is, e.g. "BatchNormalization after Conv", "LayerNorm (decomposed)"
    status: str  # one of STATUSES
    nodes: list[str]  # names of the nodes the site is made of, in graph order
    detail: str  # a sentence a person can read
    reason: str | None = None  # a key of REASONS when status == "left"
    created: list[str] = field(default_factory=list)  # names of nodes the rewrite created or kept
    output: str | None = None  # the tensor the site writes (kept by the rewrite)
    graph: str = "main"  # which (sub)graph: "main" or "main/<node>:<attribute>"
    notes: list[str] = field(default_factory=list)  # side effects worth knowing, e.g. a cloned weight
    max_rounding: float | None = None  # largest |stored - exact float64| over the new constants
    max_abs_error: float | None = None  # error of the site's output tensor, with --verify=sites
    id: str = ""  # stable across runs: "<graph>:<output tensor>" (tensor names are unique in a graph)


    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.graph}:{self.output or (self.nodes[-1] if self.nodes else '')}"
        if self.status not in STATUSES:
            raise ValueError(f"unknown site status {self.status!r}")
        if (self.status == "left") != (self.reason is not None):
            raise ValueError("a site is left exactly when it has a reason")
        if self.reason is not None and self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}")


@dataclass
class OutputComparison:
    name: str
    dtype: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    passed: bool
    needed_atol: float  # the smallest atol that would have passed with this rtol
    # The float type whose DEFAULT_TOLERANCES set atol/rtol (the lowest precision on the paths to
    # this tensor); None when both were given explicitly, or for integer tensors.
    tolerance_dtype: str | None = None
    # "tolerance": |candidate - original| <= atol + rtol * |original|. "accuracy": failed that with
    # default tolerances, then judged against the original run in float64: passed when
    # candidate_error <= 2 * original_error + a few ulps of the output's scale (`allowed_error`).
    # "magnitude": no float64 run was possible; atol scaled by the output's largest magnitude.
    rule: str = "tolerance"
    original_error: float | None = None  # max |original - float64 original| (rule "accuracy")
    candidate_error: float | None = None  # max |candidate - float64 original| (rule "accuracy")
    allowed_error: float | None = None  # the bound candidate_error had to meet (rule "accuracy")


@dataclass
class Verification:
    status: str  # "passed", "failed", "skipped", "unavailable"
    rule: str = "|candidate - reference| <= atol + rtol * |reference|, NaN equal only to NaN"
    seed: int | None = None
    inputs: dict[str, list[int]] = field(default_factory=dict)
    outputs: list[OutputComparison] = field(default_factory=list)
    detail: str = ""
    batches: int = 1
    sites: list[OutputComparison] = field(default_factory=list)  # site tensors, worst first (--verify=sites)
    first_failing_site: str | None = None  # the earliest site tensor, in graph order, that differs
    # Site tensors only the original has (the rewrite removed them): not compared, not failures.
    removed_sites: list[str] = field(default_factory=list)
    # "whole": both models run on the same inputs; "local": every rewritten site run on its own
    # (--verify local, or chosen when the whole model would not fit in memory).
    mode: str = "whole"
    notes: list[str] = field(default_factory=list)  # e.g. the input shape a retry settled on


@dataclass
class Report:
    input: str | None = None
    output: str | None = None
    written: bool = False
    opset_before: int | None = None
    opset_after: int | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    sites: list[SiteRecord] = field(default_factory=list)
    verification: Verification | None = None
    conversion: Verification | None = None  # original vs opset-converted model (with --target-opset)
    benchmark: dict | None = None  # {"original"|"folded": {"disabled"|"all": {session_s, latency_ms}}}
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was done to the model as a whole (normfold.prepare)
    exit_code: int | None = None
    error: str | None = None

    def count(self, status: str) -> int:
        return sum(1 for s in self.sites if s.status == status)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, command: str = "fold") -> str:
        """This report alone in the JSON document every command writes."""
        return document_json(command, [self])

    def to_text(self, verbose: bool = False) -> str:
        lines = self._summary_lines() + self._site_lines(verbose)
        for label, v in (("opset conversion", self.conversion), ("verification", self.verification)):
            if v is None or (label == "opset conversion" and v.status == "passed"):
                continue
            lines += _verification_lines(label, v, verbose)
        return "\n".join(lines + self._outcome_lines())

    def _summary_lines(self) -> list[str]:
        """The counts and node totals (or, for `verify`, which two models), the opset, the notes."""
        if self.nodes_before or self.sites:
            folded, fused, left = self.count("folded"), self.count("fused"), self.count("left")
            lines = [f"{self.input}: {folded} folded, {fused} fused, {left} left; "
                     f"nodes {self.nodes_before} -> {self.nodes_after}"]
        else:
            lines = [f"{self.input} vs {self.output}:"]
        if self.opset_before != self.opset_after:
            lines.append(f"  opset {self.opset_before} -> {self.opset_after}")
        return lines + [f"  note: {note}" for note in self.notes]

    def _site_lines(self, verbose: bool) -> list[str]:
        """Every site left (and with `verbose` every site), then the largest rounding of a fold."""
        lines = []
        for site in self.sites:
            if site.status == "left" or verbose:
                where = "" if site.graph == "main" else f" [{site.graph}]"
                tag = site.status if site.status != "left" else f"left ({site.reason})"
                lines.append(f"  {tag}: {site.kind} at {site.nodes[0] if site.nodes else '?'}{where}: {site.detail}")
        rounding = [s.max_rounding for s in self.sites if s.max_rounding]
        if rounding and verbose:
            lines.append(f"  largest rounding change written by a fold: {max(rounding):.3g}")
        return lines

    def _outcome_lines(self) -> list[str]:
        """The benchmark, whether the model was written, the time taken."""
        lines = []
        if self.benchmark:
            for model, levels in self.benchmark.items():
                cells = ", ".join(f"{level}: {m['latency_ms']:.3f} ms (session {m['session_s']:.3f} s)"
                                  for level, m in levels.items())
                lines.append(f"  latency {model}: {cells}")
        if self.written:
            lines.append(f"  wrote {self.output}")
        elif self.output and self.nodes_before:
            lines.append("  nothing written")
        total = self.timings.get("total")
        if total is not None:
            lines.append(f"  time {total:.2f}s")
        return lines


def _verification_lines(label: str, v: Verification, verbose: bool) -> list[str]:
    """One comparison (the opset conversion's or the verification's): its notes, then a line per
    output and the worst sites when it ran, else its status and why."""
    lines = [f"  note: {note}" for note in v.notes]
    if v.status not in ("passed", "failed"):
        return lines + [f"  {label} {v.status}: {v.detail}"]
    lines += ["  " + _comparison_line(out) for out in v.outputs]
    if v.sites:
        shown = v.sites if verbose else v.sites[:5]
        lines.append(f"  sites, worst first ({len(shown)} of {len(v.sites)}):")
        lines.extend("    " + _comparison_line(c) for c in shown)
    if v.removed_sites:
        lines.append(f"  removed by the rewrite (not compared): {len(v.removed_sites)} site tensor(s): "
                     + ", ".join(v.removed_sites[:5]) + (" ..." if len(v.removed_sites) > 5 else ""))
    if v.first_failing_site:
        lines.append(f"  first site that differs, in graph order: {v.first_failing_site}")
    if v.status == "failed" and label == "opset conversion":
        lines.append(f"  {v.detail}")
    return lines


def _comparison_line(out: OutputComparison) -> str:
    verdict = "PASSED" if out.passed else "FAILED"
    source = f" from {out.tolerance_dtype} on its paths" if out.tolerance_dtype not in (None, out.dtype) else ""
    rule = " scaled by the output's magnitude" if out.rule == "magnitude" else ""
    line = (f"{verdict} {out.name}: max abs {out.max_abs_error:.3g}, max rel {out.max_rel_error:.3g} "
            f"(atol {out.atol:g}, rtol {out.rtol:g}{source}{rule}"
            + ("" if out.passed or out.rule != "tolerance" else f"; needed atol {out.needed_atol:.3g}") + ")")
    if out.rule == "accuracy":
        line += (f"; by accuracy against float64: error {out.candidate_error:.3g}, original's {out.original_error:.3g}"
                 f", allowed {out.allowed_error:.3g}")
    return line


def worst_exit_code(codes: list[int | None]) -> int:
    """The most severe of several models' exit codes (README: 'Exit codes')."""
    from normfold.exit_codes import SEVERITY

    known = [c for c in codes if c is not None]
    return max(known, key=SEVERITY.index) if known else 0


def document(command: str, reports: list[Report]) -> dict[str, Any]:
    """The one JSON layout of every command: an envelope with one report per model."""
    from normfold import __version__

    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    return {"schema_version": SCHEMA_VERSION, "tool": "normfold", "version": __version__, "command": command,
            "exit_code": worst_exit_code([r.exit_code for r in reports]),
            "models": [r.as_dict() for r in reports]}


def document_json(command: str, reports: list[Report]) -> str:
    return json.dumps(document(command, reports), indent=2) + "\n"
