"""The typed exceptions users catch.

Every error the library raises on purpose derives from :class:`InsightVError`, so
``except InsightVError`` catches them all. Messages say what to fix.
"""

from __future__ import annotations

from typing import Any


class InsightVError(Exception):
    """Base class of every error raised on purpose by insightv-agents."""


class InvalidInputError(InsightVError, ValueError):
    """The caller's input (image, question, option) cannot be used.

    Raised before any model is called. ``field`` names the offending input.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelOutputError(InsightVError):
    """A model's reply could not be read as what was asked for.

    ``raw`` holds (a bounded excerpt of) the offending text.
    """

    def __init__(self, message: str, *, raw: str = "") -> None:
        super().__init__(message)
        self.raw = raw[:2000]


class ConfigError(InsightVError, ValueError):
    """A factory or command option is out of range or inconsistent."""


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}.")


class BackendError(InsightVError):
    """A model backend could not be started or stopped (the message includes its log tail)."""
