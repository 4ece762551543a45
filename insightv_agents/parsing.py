"""The text format of the agents' replies, read tolerantly and written canonically.

Reading: JSON objects anywhere in the reply (in prose, in code fences, one per line, or a
JSON array), under either key set — ``summary``/``reasoning``/``action`` (ours) or
``title``/``content``/``next_action`` (the Insight-V reference code, where
``final_answer`` means ``summary``). Parsing is bounded in time and memory whatever the
text; anything that cannot be read raises :class:`ModelOutputError`, never anything else.

Writing: :func:`format_step` is the exact form the reasoning node asks for and the dataset
builders train on, so what the library writes it can always read back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from insightv_agents.errors import ModelOutputError
from insightv_agents.schema import Action, ReasoningStep, Verdict

MAX_REPLY_CHARS = 200_000
"""Only this much of a reply is read; the rest is ignored (a runaway generation)."""
MAX_FIELD_CHARS = 16_000
"""Longer step fields are cut to this length, so state stays bounded."""
_MAX_DECODE_TRIES = 64

_DECODER = json.JSONDecoder(strict=False)

_ACTIONS: dict[str, Action] = {
    "continue": "continue", "next": "continue", "proceed": "continue", "next_step": "continue",
    "summary": "summary", "summarize": "summary", "summarise": "summary", "final_answer": "summary",
    "final": "summary", "answer": "summary", "stop": "summary", "done": "summary",
    "finish": "summary", "conclude": "summary",
}
_SUMMARY_KEYS = ("summary", "title", "brief", "step_summary")
_REASONING_KEYS = ("reasoning", "content", "detail", "details", "thought", "response")
_ACTION_KEYS = ("action", "next_action", "next")
_JUDGEMENT_KEYS = ("reasoning_correct", "correct", "is_correct", "valid", "reasoning_valid",
                   "judgement", "judgment")
_ANSWER_KEYS = ("answer", "final_answer")
_CRITIQUE_KEYS = ("critique", "feedback", "explanation", "comment")
_TRUE = {"true", "yes", "correct", "valid", "right", "1", "sound", "holds"}
_FALSE = {"false", "no", "incorrect", "invalid", "wrong", "0", "flawed"}


def iter_json_objects(text: str) -> Iterator[Any]:
    """Yield the JSON objects and arrays found in ``text``, in order, skipping prose.

    Bounded: reads at most :data:`MAX_REPLY_CHARS` and gives up after a fixed number of
    failed attempts, so adversarial text cannot make it slow or recurse without end.
    """
    text = text[:MAX_REPLY_CHARS]
    position, failures = 0, 0
    while failures < _MAX_DECODE_TRIES:
        starts = [i for i in (text.find("{", position), text.find("[", position)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            failures += 1
            position = start + 1
            continue
        yield value
        position = end


def parse_steps(text: str) -> list[ReasoningStep]:
    """Read every reasoning step in a reply (one step, or a whole chain).

    Raises:
        ModelOutputError: when the reply holds no readable step.
    """
    steps: list[ReasoningStep] = []
    problems: list[str] = []
    for value in iter_json_objects(text):
        for candidate in _flatten(value):
            try:
                steps.append(step_from_mapping(candidate))
            except ModelOutputError as err:
                problems.append(str(err))
    if steps:
        return steps
    why = problems[0] if problems else "no JSON object found"
    raise ModelOutputError(f"no reasoning step could be read ({why}). Expected a JSON object "
                           'like {"summary": "...", "reasoning": "...", "action": "continue"}.',
                           raw=text)


def step_from_mapping(value: Mapping[str, Any]) -> ReasoningStep:
    """Read one step from a mapping under either key set."""
    keys = {str(key).strip().lower(): item for key, item in value.items()}
    summary = _text(_first(keys, _SUMMARY_KEYS))
    reasoning = _text(_first(keys, _REASONING_KEYS))
    raw_action = _first(keys, _ACTION_KEYS)
    if not summary and not reasoning:
        raise ModelOutputError("a step has neither a summary nor a reasoning text")
    if raw_action is None:
        raise ModelOutputError("a step has no action (expected 'continue' or 'summary')")
    label = str(raw_action).strip().lower().replace(" ", "_").replace("-", "_")
    action = _ACTIONS.get(label)
    if action is None:
        raise ModelOutputError(f"unknown action {str(raw_action)[:40]!r} "
                               "(expected 'continue' or 'summary')")
    return {"summary": summary, "reasoning": reasoning, "action": action}


def parse_verdict(text: str) -> Verdict:
    """Read the summary agent's verdict: whether the reasoning holds, a critique, the answer.

    Raises:
        ModelOutputError: when no object with an answer and a judgement can be read.
    """
    problem = "no JSON object found"
    for value in iter_json_objects(text):
        if not isinstance(value, Mapping):
            continue
        keys = {str(key).strip().lower(): item for key, item in value.items()}
        answer = _text(_first(keys, _ANSWER_KEYS))
        judgement = _truth(_first(keys, _JUDGEMENT_KEYS))
        if not answer:
            problem = "the verdict has no non-empty 'answer'"
        elif judgement is None:
            problem = "the verdict has no 'reasoning_correct' true/false"
        else:
            return {"reasoning_correct": judgement,
                    "critique": _text(_first(keys, _CRITIQUE_KEYS)), "answer": answer}
    raise ModelOutputError(f"no verdict could be read ({problem}). Expected a JSON object like "
                           '{"reasoning_correct": true, "critique": "...", "answer": "..."}.',
                           raw=text)


def format_step(step: ReasoningStep) -> str:
    """The canonical text of one step: one line of JSON, as the reasoning agent writes it."""
    return json.dumps({"summary": step["summary"], "reasoning": step["reasoning"],
                       "action": step["action"]}, ensure_ascii=False)


def format_chain(steps: list[ReasoningStep]) -> str:
    """The canonical text of a whole chain: one JSON step per line."""
    return "\n".join(format_step(step) for step in steps)


def format_verdict(verdict: Verdict) -> str:
    """The canonical text of a verdict, as the summary agent writes it."""
    return json.dumps(dict(verdict), ensure_ascii=False)


def _flatten(value: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        inner = value.get("steps")
        if isinstance(inner, list):
            yield from (item for item in inner if isinstance(item, Mapping))
        else:
            yield value
    elif isinstance(value, list):
        yield from (item for item in value if isinstance(item, Mapping))


def _first(keys: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    return next((keys[name] for name in names if keys.get(name) is not None), None)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False)[:MAX_FIELD_CHARS]
    return text.strip()[:MAX_FIELD_CHARS]


def _truth(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower().rstrip(".")
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return None
