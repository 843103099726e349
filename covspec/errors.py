"""Errors that name what was wrong. Every user-facing failure is a CovspecError: these, and the
ones of their own modules (BundleError, ExportUnsupported, SessionError, EdgeRefused, the
conformance suite's CheckFailed; tests/project/test_layout.py keeps it so)."""


class CovspecError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class ModelLoadError(CovspecError):
    """A checkpoint folder is missing, of another family, or has a broken config."""


class ImageError(CovspecError):
    """An image could not be read, or is too large."""


class PromptError(CovspecError):
    """A prompt is empty or does not fit the model."""
