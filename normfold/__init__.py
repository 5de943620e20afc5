"""normfold: fold BatchNorm and fuse decomposed norms in ONNX models, verified with onnxruntime.

Library use:

    import onnx, normfold
    folded, report = normfold.fold(onnx.load("model.onnx"))
    print(report.to_text())
    normfold.compare_models("model.onnx", "model.folded.onnx")   # -> Verification

The names below are imported on first use, so that `import normfold.cli.main` (the command's
entry point) stays cheap until its interrupt handlers are in place.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "NormfoldError": "normfold.errors", "VerificationUnavailable": "normfold.errors",
    "FoldOptions": "normfold.api", "VerifyOptions": "normfold.api", "fold": "normfold.api",
    "fold_file": "normfold.api", "load_model": "normfold.io", "REASONS": "normfold.report",
    "SCHEMA_VERSION": "normfold.report", "Report": "normfold.report", "SiteRecord": "normfold.report",
    "compare_models": "normfold.verify",
}

__all__ = ["fold", "fold_file", "FoldOptions", "VerifyOptions", "compare_models", "load_model", "Report",
           "SiteRecord", "REASONS", "SCHEMA_VERSION", "NormfoldError", "VerificationUnavailable", "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normfold' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
