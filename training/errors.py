"""Errors that mean "this request cannot be trained as asked": retrying will not help.

The platform treats these as the requester's to fix (one sentence back, no retry, no charge for
retries); anything else out of training may be transient and worth another attempt.
"""

from __future__ import annotations


class TrainingRequestError(ValueError):
    """This request cannot be trained as asked; retrying will not help."""


class DataError(TrainingRequestError):
    """The data a request names is missing, empty, corrupt or too small for it."""


class DataUnavailable(RuntimeError):
    """The data could not be fetched (no local copy, and the download failed): this may pass on a retry."""
