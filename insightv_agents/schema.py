"""The records that flow through the graphs: reasoning steps, verdicts, failures.

They are plain ``TypedDict`` s so that graph state stays checkpoint-safe (msgpack without
custom types). Model output becomes one of these only through :mod:`insightv_agents.parsing`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal, NotRequired

from typing_extensions import TypedDict

from insightv_agents.errors import ConfigError, check_int

Action = Literal["continue", "summary"]
"""What the reasoning agent wants next: another step, or to hand over to the summary agent."""


class ReasoningStep(TypedDict):
    """One step of the reasoning agent: a brief summary, the detailed reasoning, and an action."""

    summary: str
    reasoning: str
    action: Action


class Verdict(TypedDict):
    """The summary agent's judgement of a reasoning chain, and its answer.
    ``reasoning_correct`` is ``None`` when the agent answered without judging (a plain-text
    answer)."""

    reasoning_correct: bool | None
    critique: str
    answer: str


class Failure(TypedDict):
    """A recorded, typed failure: what went wrong in which node, never silently dropped."""

    node: str
    revision: int
    kind: Literal["unparsable", "step_cap", "no_answer", "rejected"]
    """``unparsable``: no readable reply within the retries; ``step_cap``: the reasoning hit
    its step cap; ``no_answer``: no answer could be read; ``rejected``: the server refused
    the request itself (an HTTP 4xx such as a prompt longer than the model's context)."""
    error: str
    attempts: int
    raw: str


CheckMethod = Literal["choice", "number", "exact", "yes_no", "empty", "undecided", "judge"]


class AnswerCheck(TypedDict):
    """The answer filter's verdict on one final answer: ``correct`` is ``None`` when neither
    the rules nor a judge could decide; ``method`` says which decided."""

    correct: bool | None
    method: CheckMethod
    detail: str


class PathScore(TypedDict):
    """The scorer's mark for one reasoning path: 1-100, or ``None`` when it gave none."""

    score: int | None
    comment: str


class PathResult(TypedDict):
    """One synthesized reasoning path: its steps, final answer, check and score.

    ``status`` is ``failed`` when the path has no usable reasoning or final answer (the
    ``failures`` say why); such paths are kept in the records, never dropped.
    """

    index: int
    status: Literal["ok", "failed"]
    steps: list[ReasoningStep]
    answer: str
    check: AnswerCheck | None
    score: int | None
    comment: str
    failures: list[Failure]
    seconds: float
    verdict: NotRequired[Verdict | None]
    revisions: NotRequired[int]


Stage = Literal["summary", "caption", "reasoning", "conclusion"]
"""A LLaVA-CoT stage, written between its tags (``<SUMMARY>`` ... ``</SUMMARY>``)."""
STAGES: tuple[Stage, ...] = ("summary", "caption", "reasoning", "conclusion")
"""The four stages, in the order a response writes them."""


class Stages(TypedDict):
    """A LLaVA-CoT response read into its four stages (empty text for a missing stage)."""

    summary: str
    caption: str
    reasoning: str
    conclusion: str


class Judgement(TypedDict):
    """One match of a knockout tournament between two candidates (0-based indices).

    ``decided_by``: ``judge`` (the judge model chose), ``check`` (the reasoning pre-check
    found exactly one of the two incorrect), ``empty`` (one candidate was empty), or
    ``fallback`` (the judge's reply stayed unreadable after the re-asks: the documented rule
    picks the first-sampled of the two).
    """

    round: int
    pair: list[int]
    winner: int
    decided_by: Literal["judge", "check", "empty", "fallback"]
    reason: str
    attempts: int


MAX_SENTENCE_CHARS = 2_000
"""Longest sentence candidate sentence-level beam search keeps; a longer one is cut."""
MAX_RESPONSE_CHARS = 65_000
"""Longest whole response a search keeps (room for four tagged stages as long as step
fields); a longer reply is cut, and sentence-level beam search stops growing its response
there."""


class SearchRecord(TypedDict):
    """One search step: the candidates sampled, how they were judged and which one won.

    ``target`` is the stage (stage-level beam search), ``response`` (best-of-N) or
    ``sentence N`` (sentence-level beam search). ``checks`` holds the reasoning pre-check
    of each candidate (``None``: not checked, or the reply could not be read).
    """

    target: str
    candidates: list[str]
    checks: list[bool | None]
    judgements: list[Judgement]
    winner: int


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


_JSON_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
"""One character of a JSON string's body, escapes included."""


def json_text_regex(schema: Mapping[str, Any]) -> str:
    """A regular expression of exactly the text ``json.dumps`` writes for an object of the
    flat, bounded JSON ``schema``: its properties in the schema's order, ``", "`` and
    ``": "`` between them. That is the text our agents are trained on
    (:func:`~insightv_agents.parsing.format_step`, ``format_verdict``), so a server
    constrained by it never pushes a trained agent off its own format, as a JSON-schema
    constraint with other separators (vLLM: ``","`` and ``":"``) does.

    Properties may be strings (``enum``, or ``minLength``/``maxLength``; a string without
    ``maxLength`` raises: the pattern must be bounded), booleans or integers; all required.
    """
    parts = []
    for key, spec in schema["properties"].items():
        if "enum" in spec:
            value = "(?:" + "|".join(re.escape(json.dumps(v, ensure_ascii=False))
                                     for v in spec["enum"]) + ")"
        elif spec.get("type") == "string":
            if "maxLength" not in spec:
                raise ConfigError(f"string property {key!r} needs a maxLength.")
            value = f'"{_JSON_CHAR}{{{spec.get("minLength", 0)},{spec["maxLength"]}}}"'
        elif spec.get("type") == "boolean":
            value = "(?:true|false)"
        elif spec.get("type") == "integer":
            value = "-?(?:0|[1-9][0-9]{0,17})"
        else:
            raise ConfigError(f"property {key!r}: only strings, booleans and integers, "
                              f"not {spec!r}.")
        parts.append(re.escape(json.dumps(key) + ": ") + value)
    return r"\{" + re.escape(", ").join(parts) + r"\}"


def chain_regex(*, max_steps: int, max_summary_chars: int = 300,
                max_reasoning_chars: int = 3000) -> str:
    """A bounded regular expression of a whole chain in its canonical text
    (:func:`~insightv_agents.parsing.format_chain`, what chain-mode agents are trained on):
    one JSON step per line, every step but the last with action ``continue``, the last with
    ``summary``, at most ``max_steps`` steps. (A JSON schema cannot describe this text: it is
    not one JSON document.)
    """
    check_int("max_steps", max_steps, 1, 100_000)

    def step(action: str) -> str:
        schema: Any = step_json_schema(max_summary_chars=max_summary_chars,
                                       max_reasoning_chars=max_reasoning_chars)
        schema["properties"]["action"]["enum"] = [action]
        return json_text_regex(schema)

    return "(?:" + step("continue") + r"\n)" + f"{{0,{max_steps - 1}}}" + step("summary")


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


def answer_json_schema(*, max_answer_chars: int = 300) -> dict[str, object]:
    """A bounded JSON schema of a final answer: ``{"answer": "..."}``."""
    return {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": 1,
                                  "maxLength": max_answer_chars}},
        "required": ["answer"],
        "additionalProperties": False,
    }


def judgement_json_schema(*, max_reason_chars: int = 300) -> dict[str, object]:
    """A bounded JSON schema of the answer judge's reply: ``{"correct": bool, "reason": ...}``."""
    return {
        "type": "object",
        "properties": {"correct": {"type": "boolean"},
                       "reason": {"type": "string", "maxLength": max_reason_chars}},
        "required": ["correct", "reason"],
        "additionalProperties": False,
    }


def scores_json_schema(*, paths: int, max_comment_chars: int = 300) -> dict[str, object]:
    """A bounded JSON schema of the path scorer's reply: one score (1-100) per path."""
    return {
        "type": "object",
        "properties": {"scores": {
            "type": "array", "minItems": paths, "maxItems": paths,
            "items": {
                "type": "object",
                "properties": {
                    "path": {"type": "integer", "minimum": 1, "maximum": paths},
                    "score": {"type": "integer", "minimum": 1, "maximum": 100},
                    "comment": {"type": "string", "maxLength": max_comment_chars},
                },
                "required": ["path", "score", "comment"],
                "additionalProperties": False,
            },
        }},
        "required": ["scores"],
        "additionalProperties": False,
    }
