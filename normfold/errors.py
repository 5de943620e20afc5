"""Errors normfold raises on purpose. Each carries a one-line message meant for the user."""


class NormfoldError(Exception):
    """Bad input or an impossible request: the CLI prints the message on one line and exits 2."""


class VerificationUnavailable(NormfoldError):
    """onnxruntime could not run a model, so equivalence could not be checked."""
