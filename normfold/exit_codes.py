"""Exit codes of the `normfold` command (README lists them; `normfold --help` too)."""

OK = 0  # done: model written (or nothing needed writing)
OUTPUTS_DIFFER = 1  # the folded model's outputs differ from the original's; nothing written
BAD_INPUT = 2  # bad usage, or an unreadable/invalid model or path; nothing written
UNVERIFIED = 3  # onnxruntime could not run a model, so nothing was written (see --allow-unverified)
INTERNAL_ERROR = 4  # a bug in normfold; nothing written
INTERRUPTED = 130  # Ctrl-C or SIGTERM; nothing written

DESCRIPTIONS = {
    OK: "done",
    OUTPUTS_DIFFER: "outputs differ; nothing written",
    BAD_INPUT: "bad usage or unreadable/invalid model; nothing written",
    UNVERIFIED: "verification not possible (onnxruntime cannot run a model); nothing written",
    INTERNAL_ERROR: "internal error; nothing written",
    INTERRUPTED: "interrupted; nothing written",
}

# From least to most severe: the exit code of a run over several models is the most severe one.
SEVERITY = [OK, UNVERIFIED, OUTPUTS_DIFFER, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED]
