"""The package's exception types: every error a user can trigger is a `HalluscopeError` whose message
names the bad value, what was expected, and the fix."""

from __future__ import annotations

__all__ = ["HalluscopeError", "InputError", "ModelLoadError", "RunError"]


class HalluscopeError(Exception):
    """Base class for all errors raised by halluscope on bad input or bad state."""


class InputError(HalluscopeError, ValueError):
    """An argument, file or table that cannot be used as given."""


class ModelLoadError(HalluscopeError):
    """A checkpoint that cannot be found, reached or recognised."""


class RunError(HalluscopeError):
    """A run directory that is missing a needed table or belongs to a different run."""
