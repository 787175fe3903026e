"""Errors the engine raises on purpose.

Every message is meant to be shown to an analyst as-is: one line that says what is wrong and
what to do about it. The CLI turns `InputError` into exit status 2; the plugin shows it in the
message bar. Anything else escaping the engine is a bug, not a user mistake.
"""

from __future__ import annotations


class CdiktError(Exception):
    """Base class for errors whose message is written for the user."""


class InputError(CdiktError):
    """The user's input cannot be used (missing file, raster without CRS, ...)."""


class Cancelled(CdiktError):
    """The job was cancelled; anything already written is consistent and resumable."""

    def __init__(self, message: str = "Cancelled by the user; finished work was kept and will be reused.") -> None:
        super().__init__(message)


class MissingDependency(CdiktError):
    """A package the job needs is not installed; the message says how to install it."""
