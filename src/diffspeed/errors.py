"""User-facing errors.

Everything a user can get wrong (unknown model, bad config value, incompatible methods, NaN output)
raises a subclass of :class:`DiffspeedError`. The CLI turns these into one clear line and a
non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DiffspeedError(ValueError):
    """A problem with the user's input, named in one line."""


class UnsupportedModelError(DiffspeedError):
    """The model class has no registered adapter, or lacks what the adapter needs."""


class IncompatibleMethodsError(DiffspeedError):
    """Two methods in a recipe cannot be combined (the message says why)."""


class AlreadyAppliedError(DiffspeedError):
    """A method was applied twice to the same model."""


class NonFiniteOutputError(DiffspeedError):
    """A model produced NaN or Inf: refuse to return a silently wrong image."""


class WeightFileError(DiffspeedError):
    """A weight file is missing, truncated or does not match the config."""
