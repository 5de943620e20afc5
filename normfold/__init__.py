"""normfold: fold BatchNorm and fuse decomposed norms in ONNX models, verified with onnxruntime.

Library use:

    import onnx, normfold
    folded, report = normfold.fold(onnx.load("model.onnx"))
    print(report.to_text())
    normfold.compare_models("model.onnx", "model.folded.onnx")   # -> Verification
"""

__version__ = "0.1.0"

from normfold.errors import NormfoldError, VerificationUnavailable  # noqa: E402
from normfold.api import FoldOptions, VerifyOptions, fold, fold_file  # noqa: E402
from normfold.io import load_model  # noqa: E402
from normfold.report import REASONS, SCHEMA_VERSION, Report, SiteRecord  # noqa: E402
from normfold.verify import compare_models  # noqa: E402

__all__ = ["fold", "fold_file", "FoldOptions", "VerifyOptions", "compare_models", "load_model", "Report",
           "SiteRecord", "REASONS", "SCHEMA_VERSION", "NormfoldError", "VerificationUnavailable", "__version__"]
