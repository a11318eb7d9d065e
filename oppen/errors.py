"""The user's mistakes, as a type: refused with one clear sentence, never retried, never charged."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be run as asked (unknown team, more GPUs than the pool has, a bad name).

    Deterministic: retrying it would fail the same way, so tasks do not retry it, and a flow
    that meets one ends in a `Failed` state named `InvalidRequest` before anything is spent.
    """
