"""Checking an answer against the ground truth by rule.

:func:`match_answer` is the first half of the answer filter (an LLM judge decides what the
rules cannot) and the scorer of the evaluation harness. It says ``True`` or ``False`` only
when a rule really applies — multiple-choice letters, numbers (with a tolerance), yes/no, or
equal normalised text — and ``None`` ("cannot decide") otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from insightv_agents.schema import AnswerCheck

# Where a reasoning path's final answer comes from: asked of the model after its reasoning,
# or read from what its last step states (:func:`stated_answer`).
FinalAnswer = Literal["ask", "stated"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation if c not in "%"})
_NUMBER = re.compile(
    r"^[^\d+\-.]{0,3}?(?P<sign>[-+\u2212]?)\s*+(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?"
    r"(?:\s*+/\s*+(?P<den>\d+))?\s*+(?P<unit>%|[a-z]{1,12}\.?)?$")
_LETTER_FORMS = (
    re.compile(r"^\(?([a-z])\)?[.:)]?$"),  # B, (B), B., B)
    re.compile(r"^\(?([a-z])\)?[.:)]\s+\S"),  # B. text, (B) text, B: text
    re.compile(r"^\(([a-z])\)\s+\S"),
    re.compile(r"^(?:option|choice|answer)\s*+(?:is\s*+)?:?\s*+\(?([a-z])\)?[.:)]?(?:\s|$)"),
    re.compile(r"^(?:the\s++)?(?:correct\s++)?(?:answer|option|choice)\s++is\s*+:?\s*+"
               r"\(?([a-z])\)?(?:[.:)\s]|$)"),
)
_YES = {"yes", "true", "correct", "right"}
_NO = {"no", "false", "incorrect", "wrong"}


@dataclass(frozen=True)
class AnswerRules:
    """Settings of the rule check.

    Args:
        rel_tol: relative tolerance between two numbers (0.01: within 1%).
        abs_tol: absolute tolerance between two numbers (for answers near zero).
        labels: a closed answer set (e.g. ``{"yes", "no", "red", "blue"}``): when the
            truth and the answer are each a label or a number, and not the same, the answer
            is wrong (without it, "red" for "3" is undecided: the rules cannot tell that an
            open-ended answer means something else).
    """

    rel_tol: float = 0.01
    abs_tol: float = 1e-6
    labels: frozenset[str] = frozenset()

    def __post_init__(self) -> None:  # normalised once, not on every check
        object.__setattr__(self, "labels",
                           frozenset(normalize_answer(label) for label in self.labels))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AnswerRules:
        """Rules from plain values (an agent card's ``answer_rules``: ``labels`` a list).

        Raises:
            ConfigError: for an unknown field or a bad value.
        """
        from insightv_agents.errors import ConfigError

        try:
            settings = dict(values)
            if "labels" in settings:
                settings["labels"] = frozenset(str(label) for label in settings["labels"])
            return cls(**settings)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid answer rules {dict(values)!r}: {err}") from None

    @classmethod
    def from_card(cls, card: Any) -> AnswerRules | None:
        """The rules an agent card gives (its ``answer_rules``), ``None`` where it gives none
        (or there is no card).

        Raises:
            ConfigError: for a bad value.
        """
        values = getattr(card, "answer_rules", None)
        return cls.from_mapping(values) if values else None


DEFAULT_RULES = AnswerRules()


def normalize_answer(text: str) -> str:
    """Lower case, accents folded, punctuation and articles dropped, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower().strip()
    text = _ARTICLES.sub(" ", text.translate(_PUNCTUATION))
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """The number an answer states, if it is nothing but a number (with a unit or %).

    >>> parse_number("1,234.5"), parse_number("$3.50"), parse_number("3/4"), parse_number("50%")
    (1234.5, 3.5, 0.75, 50.0)
    >>> parse_number("3 red squares") is None
    True
    """
    match = _NUMBER.match(unicodedata.normalize("NFKC", text).strip().lower().rstrip("."))
    if match is None or (match["int"] is None and match["frac"] is None):
        return None
    value = float((match["int"] or "0").replace(",", "") + (match["frac"] or ""))
    if match["den"] is not None:
        denominator = float(match["den"])
        if denominator == 0:
            return None
        value /= denominator
    return -value if match["sign"] in ("-", "\u2212") else value


def choice_letter(text: str, choices: Sequence[str] | None = None) -> str | None:
    """The option letter an answer picks (``"B"``, ``"(b)"``, ``"B. a cat"``, ``"Option B"``,
    or the text of option B), upper case; ``None`` if it names none.

    >>> choice_letter("(b) two", ["one", "two"]), choice_letter("two", ["one", "two"])
    ('B', 'B')
    """
    lowered = unicodedata.normalize("NFKC", text).strip().lower()
    count = len(choices) if choices else 26
    for form in _LETTER_FORMS:
        found = form.match(lowered)
        if found and ord(found[1]) - ord("a") < count:
            return found[1].upper()
    if choices:
        target = normalize_answer(text)
        matches = [i for i, choice in enumerate(choices) if normalize_answer(choice) == target]
        if len(matches) == 1:
            return string.ascii_uppercase[matches[0]]
    return None


def match_answer(prediction: str, truth: str, *, choices: Sequence[str] | None = None,
                 rules: AnswerRules = DEFAULT_RULES) -> AnswerCheck:
    """Compare ``prediction`` with the ground truth ``truth`` by rule.

    Returns an :class:`~insightv_agents.schema.AnswerCheck` whose ``correct`` is ``None``
    when no rule applies (a judge should decide).

    >>> match_answer("B", "b. a cat", choices=["a dog", "a cat"])["correct"]
    True
    >>> match_answer("12.0", "12")["correct"], match_answer("13", "12")["correct"]
    (True, False)
    >>> match_answer("a red circle", "circle")["correct"] is None
    True
    """
    if not prediction.strip():
        return _check(False, "empty", "the answer is empty")
    letter = _is_letter(truth)
    # Every rule reads NFKC text: normalised once here, a second normalisation is a quick check.
    prediction, truth = (unicodedata.normalize("NFKC", text) for text in (prediction, truth))
    if choices or letter:
        want = choice_letter(truth, choices)
        got = choice_letter(prediction, choices)
        if want is not None and got is not None:
            return _check(want == got, "choice", f"picked {got}, expected {want}")
    want_number, got_number = parse_number(truth), parse_number(prediction)
    if want_number is not None and got_number is not None:
        close = math.isclose(got_number, want_number, rel_tol=rules.rel_tol,
                             abs_tol=rules.abs_tol)
        return _check(close, "number", f"{got_number:g} vs {want_number:g}")
    want_text, got_text = normalize_answer(truth), normalize_answer(prediction)
    if want_text and want_text == got_text:
        return _check(True, "exact", "same text after normalisation")
    if want_text in _YES | _NO:
        first = got_text.split(" ", 1)[0] if got_text else ""
        if first in _YES | _NO:
            return _check((first in _YES) == (want_text in _YES), "yes_no",
                          f"said {first!r}, expected {want_text!r}")
    if rules.labels and all(text in rules.labels or parse_number(text) is not None
                            for text in (want_text, got_text)):
        return _check(False, "labels", f"said {got_text!r}, expected {want_text!r}")
    return _check(None, "undecided", "no rule applies")


def _is_letter(text: str) -> bool:
    return bool(re.fullmatch(r"\(?[A-Za-z]\)?\.?", text.strip()))


def _check(correct: bool | None, method: str, detail: str) -> AnswerCheck:
    return {"correct": correct, "method": method, "detail": detail}  # type: ignore[typeddict-item]


_MAX_STATED_CHARS = 200_000  # as parsing.MAX_REPLY_CHARS: longer replies are cut
_STATED = re.compile(r"the\s++(?:final\s++)?answer\s++is|answer\s*+:", re.I)


def extract_answer(reply: str) -> str:
    """The answer a free-form reply states: a JSON ``{"answer": ...}``, else the last
    "the answer is X" / "Answer: X" (in a reasoning chain: in its last step), else the whole
    reply (a bare short answer), without a final full stop. How the evaluation harness reads
    single-model (direct) replies."""
    from insightv_agents.errors import ModelOutputError
    from insightv_agents.parsing import iter_json_objects, parse_answer, parse_steps

    text = reply
    if any(True for _ in iter_json_objects(reply)):
        try:
            return parse_answer(reply)
        except ModelOutputError:
            pass
        with contextlib.suppress(ModelOutputError, IndexError):  # a chain: its last step
            text = parse_steps(reply)[-1]["reasoning"]
    return stated_answer(text) or text.strip().rstrip(".").strip()


def stated_answer(text: str) -> str:
    """The answer ``text`` states in words: what follows its last "the answer is X" /
    "Answer: X", up to a full stop or line end followed by a space (or the end), without a
    final full stop; ``""`` when it states none. Linear in the length of ``text``."""
    text = text[:_MAX_STATED_CHARS]
    marker = collections.deque(_STATED.finditer(text), maxlen=1)  # the last one
    if not marker:
        return ""
    tail = text[marker[0].end():].lstrip()
    end = next((index for index, char in enumerate(tail) if char in ".\n"
                and (index + 1 == len(tail) or tail[index + 1].isspace())), len(tail))
    return tail[:end].strip().rstrip(".").strip()
