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



def step_json_schema(*, max_summary_chars: int = 300, max_reasoning_chars: int = 3000
                     ) -> dict[str, object]:
    """A bounded JSON schema of one :class:`ReasoningStep` (for constrained decoding).

    Every string has a ``maxLength``: with an unbounded schema a weak model can write one
    string until ``max_tokens``.
    """
    return {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "maxLength": max_summary_chars},
            "reasoning": {"type": "string", "maxLength": max_reasoning_chars},
            "action": {"type": "string", "enum": ["continue", "summary"]},
        },
        "required": ["summary", "reasoning", "action"],
        "additionalProperties": False,
    }


def chain_json_schema(*, max_steps: int, **step_limits: int) -> dict[str, object]:
    """A bounded JSON schema of a whole chain: ``{"steps": [step, ...]}``."""
    return {
        "type": "object",
        "properties": {"steps": {"type": "array", "items": step_json_schema(**step_limits),
                                 "minItems": 1, "maxItems": max_steps}},
        "required": ["steps"],
        "additionalProperties": False,
    }


def verdict_json_schema(*, max_critique_chars: int = 500, max_answer_chars: int = 300
                        ) -> dict[str, object]:
    """A bounded JSON schema of a :class:`Verdict`."""
    return {
        "type": "object",
        "properties": {
            "reasoning_correct": {"type": "boolean"},
            "critique": {"type": "string", "maxLength": max_critique_chars},
            "answer": {"type": "string", "minLength": 1, "maxLength": max_answer_chars},
        },
        "required": ["reasoning_correct", "critique", "answer"],
        "additionalProperties": False,
    }
