"""Text for people: colours (on a terminal, never with NO_COLOR) and the batch summary table."""

from __future__ import annotations

import os
import re
import sys

import click

from normfold.report import Report

_STYLES = [(re.compile(r"\bPASSED\b"), "green"), (re.compile(r"\bFAILED\b"), "red"),
           (re.compile(r"\bleft \([a-z-]+\)"), "yellow"), (re.compile(r"\berror\b"), "red")]


def use_colour(stream=None) -> bool:
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and stream.isatty()


def colour(text: str, stream=None) -> str:
    if not use_colour(stream):
        return text
    for pattern, fg in _STYLES:
        text = pattern.sub(lambda m: click.style(m.group(0), fg=fg), text)
    return text


def summary_table(reports: list[Report]) -> str:
    rows = [("model", "result", "folded", "fused", "left", "nodes", "max error", "time")]
    for r in reports:
        v = r.verification
        err = max((o.max_abs_error for o in v.outputs), default=0.0) if v and v.outputs else None
        result = {0: "ok", 1: "DIFFERS", 2: "bad input", 3: "unverified", 4: "internal error"}.get(r.exit_code, "?")
        rows.append((str(r.input), result, str(r.count("folded")), str(r.count("fused")), str(r.count("left")),
                     f"{r.nodes_before} -> {r.nodes_after}" if r.error is None else "-",
                     "-" if err is None else f"{err:.2g}", f"{r.timings.get('total', 0):.2f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    total = len(reports)
    ok = sum(1 for r in reports if r.exit_code == 0)
    lines.append(f"{ok} of {total} models done; {sum(r.count('folded') for r in reports)} folded, "
                 f"{sum(r.count('fused') for r in reports)} fused, {sum(r.count('left') for r in reports)} left")
    return "\n".join(lines)
