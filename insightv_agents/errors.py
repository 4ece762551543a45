"""The typed exceptions users catch.

Every error the library raises on purpose derives from :class:`InsightVError`, so
``except InsightVError`` catches them all. Messages say what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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


class ModelCallError(InsightVError):
    """A model call failed for good: the server answered an error, timed out or dropped the
    connection, after the client's retries with backoff, all within the call's deadline
    (``vllm_chat_model(timeout=..., max_retries=...)``). ``node`` names the graph node; the
    client's exception is the ``__cause__``."""

    def __init__(self, message: str, *, node: str = "") -> None:
        super().__init__(message)
        self.node = node


@contextmanager
def model_call(node: str) -> Iterator[None]:
    """Raise :class:`ModelCallError` (naming ``node``) for whatever a model call raises, but
    the library's own errors and LangGraph's control flow (interrupts), which pass through."""
    from langgraph.errors import GraphBubbleUp

    try:
        yield
    except (InsightVError, GraphBubbleUp):
        raise
    except Exception as err:
        raise ModelCallError(f"the model call of node {node!r} failed: "
                             f"{type(err).__name__}: {err}"[:2000], node=node) from err


class ConfigError(InsightVError, ValueError):
    """A factory or command option is out of range or inconsistent."""


def check_int(name: str, value: Any, low: int, high: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}.")


def check_number(name: str, value: Any, low: float, high: float, *, above: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number (not a bool) in
    ``[low, high]``, or ``(low, high]`` with ``above``."""
    fits = (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value) and (value > low if above else value >= low)
            and value <= high)
    if not fits:
        lower = f"above {low:g} up" if above else f"from {low:g}"
        raise ConfigError(f"{name} must be a number {lower} to {high:g}, not {value!r}.")


def validation_problem(err: Exception) -> str:
    """The first problem of a pydantic ``ValidationError``: ``field: what is wrong (value)``."""
    errors = getattr(err, "errors", None)
    problems = errors() if callable(errors) else []
    if not problems:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    problem = f"{first.get('msg', 'invalid')} (got {repr(first.get('input'))[:80]})"
    return f"{where}: {problem}" if where else problem


class BackendError(InsightVError):
    """A model backend could not be started or stopped (the message includes its log tail)."""
