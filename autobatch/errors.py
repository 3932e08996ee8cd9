"""Exceptions autobatch raises on purpose: each message names what is wrong and the fix."""

from __future__ import annotations


class AutobatchError(Exception):
    """Base class for errors autobatch raises itself (never for errors from the user's code)."""


class InvalidInputError(AutobatchError, ValueError):
    """A parameter, task field or command-line value that cannot work; the message says the fix."""


class BatchSizeOneDoesNotFit(AutobatchError, RuntimeError):
    """Even a single sample does not fit in the memory available."""


class StudyInterrupted(AutobatchError, KeyboardInterrupt):
    """Ctrl-C during a study: finished trials are kept and the study can be resumed."""
