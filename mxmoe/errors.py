"""User-facing errors: one readable message that says what was wrong and what to do.

The CLI prints these without a traceback and exits with code 2.
"""


class MxMoEError(ValueError):
    """Base class for bad input or a missing resource that the user can fix."""


class DataUnavailable(MxMoEError):
    """A data set is neither in MXMOE_DATA_DIR nor reachable on the Hugging Face hub."""


class ModelNotFound(MxMoEError):
    """A model name is neither a zoo name, a local path nor a loadable Hugging Face id."""


class NotMoEModel(MxMoEError):
    """A model has no Mixture-of-Experts block that mxmoe knows how to read."""


class SeqLenTooLong(MxMoEError):
    """A sequence length exceeds the model's context."""
