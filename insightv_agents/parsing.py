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

import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from insightv_agents.errors import ModelOutputError
from insightv_agents.schema import (
    STAGES,
    Action,
    PathScore,
    ReasoningStep,
    Stage,
    Stages,
    Verdict,
)

MAX_REPLY_CHARS = 200_000
"""Only this much of a reply is read; the rest is ignored (a runaway generation)."""
MAX_FIELD_CHARS = 16_000
"""Longer step fields are cut to this length, so state stays bounded."""
MAX_PLAIN_ANSWER_CHARS = 300
"""A reply without JSON is taken as the final answer only if it is this short."""
MAX_JSON_VALUES = 1024
"""Only this many JSON values, and steps of one chain, are read from a reply."""
_MAX_DECODE_TRIES = 64
_OPENING = re.compile(r"[{[]")

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

    Bounded: reads at most :data:`MAX_REPLY_CHARS`, yields at most :data:`MAX_JSON_VALUES`
    values and gives up after a fixed number of failed attempts, so adversarial text cannot
    make it slow or recurse without end.
    """
    text = text[:MAX_REPLY_CHARS]
    position, failures, found = 0, 0, 0
    while failures < _MAX_DECODE_TRIES and found < MAX_JSON_VALUES:
        opening = _OPENING.search(text, position)
        if opening is None:
            return
        try:
            value, end = _DECODER.raw_decode(text, opening.start())
        except (ValueError, RecursionError):
            failures += 1
            position = opening.start() + 1
            continue
        found += 1
        yield value
        position = end


def parse_steps(text: str) -> list[ReasoningStep]:
    """Read every reasoning step in a reply (one step, or a whole chain).

    Raises:
        ModelOutputError: when the reply holds no readable step.
    """
    steps: list[ReasoningStep] = []
    problem = ""
    candidates = (item for value in iter_json_objects(text) for item in _flatten(value))
    for candidate in itertools.islice(candidates, MAX_JSON_VALUES):
        try:
            steps.append(step_from_mapping(candidate))
        except ModelOutputError as err:
            problem = problem or str(err)
    if steps:
        return steps
    why = problem or "no JSON object found"
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


def parse_answer(text: str) -> str:
    """Read a final answer: ``{"answer": ...}`` (or the reference code's
    ``{"title": "FINAL ANSWER", "content": ...}``); a short reply with no JSON is the answer.

    Raises:
        ModelOutputError: for an empty reply, or JSON without an answer.
    """
    found_json = False
    for value in iter_json_objects(text):
        found_json = True
        if isinstance(value, Mapping):
            keys = {str(key).strip().lower(): item for key, item in value.items()}
            answer = _text(_first(keys, (*_ANSWER_KEYS, "content", "final")))
            if answer:
                return answer
    plain = text.strip()
    if not found_json and plain and len(plain) <= MAX_PLAIN_ANSWER_CHARS:
        return plain
    raise ModelOutputError('no final answer could be read. Expected a JSON object like '
                           '{"answer": "..."}.', raw=text)


def parse_judgement(text: str) -> tuple[bool, str]:
    """Read the answer judge's reply: ``{"correct": true|false, "reason": ...}``, or a bare
    ``1``/``0``/``yes``/``no`` (the reference prompt's format). Returns (correct, reason).

    Raises:
        ModelOutputError: when no judgement can be read.
    """
    for value in iter_json_objects(text):
        if isinstance(value, Mapping):
            keys = {str(key).strip().lower(): item for key, item in value.items()}
            judgement = _truth(_first(keys, _JUDGEMENT_KEYS))
            if judgement is not None:
                return judgement, _text(_first(keys, ("reason", *_CRITIQUE_KEYS)))
    judgement = _truth(text.strip().strip("\"'`"))
    if judgement is not None:
        return judgement, ""
    raise ModelOutputError('no judgement could be read. Expected a JSON object like '
                           '{"correct": true, "reason": "..."}.', raw=text)


def parse_scores(text: str, paths: int) -> list[PathScore]:
    """Read the path scorer's reply: a score from 1 to 100 for each of ``paths`` paths.

    Tolerant of what a model gets wrong: entries may be objects with a ``path`` number, or
    plain numbers in path order; scores are rounded and clamped to 1-100; extra entries and
    repeats of a path are ignored; a path the reply leaves out gets ``score=None`` with a
    comment saying so.

    Raises:
        ModelOutputError: when not one score can be read.
    """
    found: dict[int, PathScore] = {}
    for value in iter_json_objects(text):
        entries = value.get("scores") if isinstance(value, Mapping) else value
        if not isinstance(entries, list):
            continue
        for position, entry in enumerate(entries[: paths * 4], 1):
            index, raw_score, comment = position, entry, ""
            if isinstance(entry, Mapping):
                keys = {str(key).strip().lower(): item for key, item in entry.items()}
                index = _integer(_first(keys, ("path", "index", "id", "path_index"))) or position
                raw_score = _first(keys, ("score", "rating", "value"))
                comment = _text(_first(keys, ("comment", "reason", *_CRITIQUE_KEYS)))
            score = _integer(raw_score)
            if score is not None and 1 <= index <= paths and index not in found:
                found[index] = {"score": min(100, max(1, score)), "comment": comment[:2000]}
        if found:
            break
    if not found:
        raise ModelOutputError(f'no scores could be read. Expected {{"scores": [{{"path": 1, '
                               f'"score": <1-100>, "comment": "..."}}, ...]}} for {paths} '
                               "path(s).", raw=text)
    return [found.get(i) or {"score": None, "comment": "the scorer gave no score for this path"}
            for i in range(1, paths + 1)]


# --- LLaVA-CoT's four tagged stages ----------------------------------------------------------

# Every run of spaces is matched possessively (``\s*+``: never given back) and word tails are
# bounded, so no pattern backtracks: each is linear in the text, whatever runs of spaces or
# repeated keywords a model writes.
_STAGE_TAG = re.compile(r"<\s*+(/?)\s*+(summary|caption|reasoning|conclusion)\s*+>",
                        re.IGNORECASE)
_CHOICE = re.compile(r"(?:\bI\s++(?:would\s++|will\s++)?)?(?:choose|choice|pick|select|prefer)"
                     r"[^\W\d]{0,12}+\s*+(?:is\s*+|:\s*+)?(?:the\s++)?"
                     r"(?:response|candidate|option|answer)?\s*+[\[(#]?\s*+([12])\b",
                     re.IGNORECASE)
_BETTER = re.compile(r"(?:response|candidate)\s*+[\[(#]?\s*+([12])(?:\s*+[\])])?\s++is\s++"
                     r"(?:the\s++)?better", re.IGNORECASE)
_CHOICE_KEYS = ("choice", "choose", "winner", "better", "response", "selected")


def open_tag(stage: Stage) -> str:
    """``<SUMMARY>``, ``<CAPTION>``, ``<REASONING>`` or ``<CONCLUSION>``."""
    return f"<{stage.upper()}>"


def close_tag(stage: Stage) -> str:
    """``</SUMMARY>``, ``</CAPTION>``, ``</REASONING>`` or ``</CONCLUSION>``."""
    return f"</{stage.upper()}>"


def parse_stages(text: str) -> Stages:
    """Read a LLaVA-CoT response into its four stages, tolerantly.

    Tags are matched in any case and with stray spaces (``< Caption >``). A stage runs from
    its opening tag to its closing tag, or, when that is missing (unclosed), to the next tag
    or the end of the text. A stage that never opens is empty; when a stage appears twice the
    first non-empty one counts; text outside the tags is ignored. A reply with no tag at all
    is taken as the conclusion (a model answering plainly). Never raises.
    """
    text = text[:MAX_REPLY_CHARS]
    found: dict[str, str] = {}
    current, start, tagged = None, 0, False
    for match in _STAGE_TAG.finditer(text):
        tagged = True
        if current is not None and not found.get(current):
            found[current] = text[start:match.start()].strip()
        current = None
        if match.group(1) != "/":
            current, start = match.group(2).lower(), match.end()
    if current is not None and not found.get(current):
        found[current] = text[start:].strip()
    if not tagged:
        found["conclusion"] = text.strip()
    stages = {stage: found.get(stage, "")[:MAX_FIELD_CHARS] for stage in STAGES}
    return stages  # type: ignore[return-value]


def stage_text(text: str, stage: Stage) -> str:
    """The content of ``stage`` in a generation that continued a prefix ending in its opening
    tag: cut at its closing tag or at any other tag (a run-on into the next stage); when the
    model restarted the response instead of continuing it, what follows the stage's own
    opening tag. Never raises."""
    text = text[:MAX_REPLY_CHARS]
    opening = [m for m in _STAGE_TAG.finditer(text)
               if m.group(1) != "/" and m.group(2).lower() == stage]
    if opening:
        text = text[opening[0].end():]
    following = _STAGE_TAG.search(text)
    if following:
        text = text[:following.start()]
    return text.strip()[:MAX_FIELD_CHARS]


def format_stages(stages: Mapping[str, Any], upto: Stage | None = None) -> str:
    """The canonical tagged text of the stages written so far (all, or those before
    ``upto``), as LLaVA-CoT writes them: ``<SUMMARY> ... </SUMMARY>`` blocks, blank-line
    separated."""
    chosen = STAGES[: STAGES.index(upto)] if upto else STAGES
    return "\n\n".join(f"{open_tag(stage)} {stages.get(stage, '')} {close_tag(stage)}"
                       for stage in chosen if stages.get(stage))


def parse_choice(text: str) -> tuple[Literal[1, 2], str]:
    """Read a pairwise judgement: which of two responses is better, and why.

    Accepts LLaVA-CoT's form ``"Since <reason>, I choose response 2."`` (the last choice
    stated wins), ``"Response 1 is better"``, a bare ``1``/``2``, or JSON such as
    ``{"choice": 2, "reason": "..."}``. Returns (choice, reason).

    Raises:
        ModelOutputError: when no choice of 1 or 2 can be read.
    """
    text = text[:MAX_REPLY_CHARS]
    for value in iter_json_objects(text):
        if isinstance(value, Mapping):
            keys = {str(key).strip().lower(): item for key, item in value.items()}
            choice = _integer(_first(keys, _CHOICE_KEYS))
            if choice in (1, 2):
                return choice, _text(_first(keys, ("reason", *_CRITIQUE_KEYS)))[:2000]  # type: ignore[return-value]
    matches = [*_CHOICE.finditer(text), *_BETTER.finditer(text)]
    bare = text.strip().strip("\"'`.[]() ").lower().removeprefix("response").strip()
    if matches:
        last = max(matches, key=lambda m: m.start())
        choice, before = int(last.group(1)), text[:last.start()]
    elif bare in ("1", "2"):
        choice, before = int(bare), ""
    else:
        raise ModelOutputError("no choice could be read. End the reply with "
                               "'Since <reason>, I choose response 1' (or 2).", raw=text)
    reason = re.sub(r"^\W*since\s+", "", before.strip(), flags=re.IGNORECASE)
    return (1 if choice == 1 else 2), reason.rstrip(" ,;:")[:2000]


def parse_check(text: str) -> bool:
    """Read a correctness check of one reasoning: ``Correct``/``Incorrect`` (or yes/no,
    true/false) as the first word, or JSON ``{"correct": true}``.

    Raises:
        ModelOutputError: when neither can be read.
    """
    try:
        return parse_judgement(text)[0]
    except ModelOutputError:
        pass
    words = re.findall(r"[a-z]+", text[:2000].lower())
    if words:
        if words[0] == "not" and len(words) > 1 and _truth(words[1]) is True:
            return False
        first = _truth(words[0])
        if first is not None:
            return first
    raise ModelOutputError("no check could be read. Start the reply with 'Correct' or "
                           "'Incorrect'.", raw=text)


def format_step(step: ReasoningStep) -> str:
    """The canonical text of one step: one line of JSON, as the reasoning agent writes it."""
    return json.dumps({"summary": step["summary"], "reasoning": step["reasoning"],
                       "action": step["action"]}, ensure_ascii=False)


def format_chain(steps: list[ReasoningStep]) -> str:
    """The canonical text of a whole chain: one JSON step per line."""
    return "\n".join(format_step(step) for step in steps)


def format_verdict(verdict: Verdict) -> str:
    """The canonical text of a verdict, as the summary agent writes it."""
    return json.dumps({"reasoning_correct": verdict["reasoning_correct"],
                       "critique": verdict["critique"], "answer": verdict["answer"]},
                      ensure_ascii=False)


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


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return round(value)
    if isinstance(value, str):
        try:
            number = float(value.strip().rstrip("%"))
        except ValueError:
            return None
        return round(number) if math.isfinite(number) else None
    return None


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
