"""The records that flow through the graphs: reasoning steps, verdicts, failures.

They are plain ``TypedDict`` s so that graph state stays checkpoint-safe (msgpack without
custom types). Model output becomes one of these only through :mod:`insightv_agents.parsing`.
"""

from __future__ import annotations

from typing import Literal

from typing_extensions import TypedDict

Action = Literal["continue", "summary"]
"""What the reasoning agent wants next: another step, or to hand over to the summary agent."""


class ReasoningStep(TypedDict):
    """One step of the reasoning agent: a brief summary, the detailed reasoning, and an action."""

    summary: str
    reasoning: str
    action: Action


class Verdict(TypedDict):
    """The summary agent's judgement of a reasoning chain, and its answer."""

    reasoning_correct: bool
    critique: str
    answer: str


class Failure(TypedDict):
    """A recorded, typed failure: what went wrong in which node, never silently dropped."""

    node: str
    revision: int
    kind: Literal["unparsable", "step_cap"]
    error: str
    attempts: int
    raw: str


class Attempt(TypedDict):
    """A finished reasoning pass that the summary agent sent back for revision."""

    steps: list[ReasoningStep]
    verdict: Verdict

