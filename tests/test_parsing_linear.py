"""Every reader of model output is linear in its input: under a second on any reply up to
1 MB, whatever runs of spaces, tag fragments, brackets or keywords it repeats.

:data:`PARSERS` lists them all; a reader added later is one line there (and the
completeness test below fails until it is listed).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from collections.abc import Callable
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insightv_agents import answers, formats, parsing
from insightv_agents.answers import (
    choice_letter,
    extract_answer,
    match_answer,
    normalize_answer,
    parse_number,
    stated_answer,
)
from insightv_agents.errors import ModelOutputError
from insightv_agents.formats import PROFILES, parse_summary, parse_tagged_stages, parse_thoughts
from insightv_agents.parsing import (
    iter_json_objects,
    parse_answer,
    parse_check,
    parse_choice,
    parse_judgement,
    parse_scores,
    parse_stages,
    parse_steps,
    parse_verdict,
    stage_text,
)
from insightv_agents.schema import STAGES

MB = 1_000_000
LIMIT_S = 1.0

PARSERS: dict[str, Callable[[str], object]] = {
    "iter_json_objects": lambda text: list(iter_json_objects(text)),
    "parse_steps": parse_steps,
    "parse_verdict": parse_verdict,
    "parse_answer": parse_answer,
    "parse_judgement": parse_judgement,
    "parse_scores": lambda text: parse_scores(text, 3),
    "parse_stages": parse_stages,
    "stage_text": lambda text: [stage_text(text, stage) for stage in STAGES],
    "parse_choice": parse_choice,
    "parse_check": parse_check,
    "parse_summary": parse_summary,
    "parse_thoughts": parse_thoughts,
    "parse_tagged_stages": parse_tagged_stages,
    "normalize_answer": normalize_answer,
    "parse_number": parse_number,
    "choice_letter": lambda text: choice_letter(text, ["a cat", "a dog", "two"]),
    "match_answer": lambda text: match_answer(text, "3"),
    "match_answer_choices": lambda text: match_answer(text, "B",
                                                      choices=["a cat", "a dog", "two"]),
    "extract_answer": extract_answer,
    "stated_answer": stated_answer,
}
"""Every reader of untrusted model text, by the name of its public function."""


def _elapsed(parse: Callable[[str], object], text: str) -> float:
    """Seconds ``parse`` takes on ``text``; over :data:`LIMIT_S`, the faster of two tries (a
    pause of a loaded machine is not the parser's; a super-linear parser is slow twice)."""
    def once() -> float:
        started = time.perf_counter()
        with contextlib.suppress(ModelOutputError):
            parse(text)
        return time.perf_counter() - started

    first = once()
    return first if first < LIMIT_S else min(first, once())


def _public_readers(module: ModuleType) -> set[str]:
    readers = ("parse_", "iter_json_objects", "stage_text", "stated_answer", "extract_answer",
               "choice_letter", "match_answer", "normalize_answer")
    return {name for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__
            and name.startswith(readers)}


def test_every_reader_is_listed() -> None:
    for module in (parsing, formats, answers):
        assert _public_readers(module) <= set(PARSERS), module.__name__
    listed = set(PARSERS.values())
    for profile in PROFILES.values():
        assert {profile.parse_reasoning, profile.parse_summary} <= listed, profile.name


def _repeat(unit: str, size: int = MB) -> str:
    return (unit * (size // len(unit) + 1))[:size]


WORST_CASES: dict[str, Callable[[], str]] = {
    # Found by an independent tester: 35 s and 6 s before the patterns were made linear.
    "I choose + 2k spaces": lambda: "I choose" + " " * 2000,
    "16k spaces": lambda: " " * 16_000,
    "< + 16k spaces": lambda: "<" + " " * 16_000,
    "I choose + spaces": lambda: "I choose" + " " * (MB - 8),
    "I would + spaces": lambda: "I would" + " " * (MB - 7),
    "choose is + spaces": lambda: "choose is" + " " * (MB - 9),
    "choose + newlines": lambda: "choose" + "\n" * (MB - 6),
    "choosechoose...": lambda: _repeat("choose"),
    "response + spaces": lambda: "response" + " " * (MB - 9) + "x",
    "response 1 + spaces": lambda: "response 1" + " " * (MB - 11) + "x",
    "spaces": lambda: " " * MB,
    "< + spaces": lambda: "<" + " " * (MB - 1),
    "< / + spaces + summary": lambda: "< /" + " " * (MB // 2) + "summary" + " " * (MB // 2),
    "<SUMMARY>...": lambda: _repeat("<SUMMARY>"),
    "<thoughts>...": lambda: _repeat("<thoughts>"),
    "{...": lambda: _repeat("{"),
    "[...": lambda: _repeat("["),
    "quotes": lambda: _repeat('"'),
    "{}{}...": lambda: _repeat("{}"),
    "[{},{},...]": lambda: "[" + _repeat("{},", MB - 2) + "]",
    '{"choice": ...': lambda: _repeat('{"choice": '),
    "digits": lambda: _repeat("1"),
    "- + spaces + !": lambda: "-" + " " * (MB - 2) + "!",
    "1 / + spaces + !": lambda: "1 /" + " " * (MB - 4) + "!",
    "option + spaces + !": lambda: "option" + " " * (MB - 7) + "!",
    "the answer is + spaces + !": lambda: "the answer is" + " " * (MB - 14) + "!",
    "newlines": lambda: "\n" * MB,
    "unicode": lambda: _repeat("é\u2212\u00a0中"),
}


@pytest.fixture(scope="module")
def worst_texts() -> dict[str, str]:
    return {name: build() for name, build in WORST_CASES.items()}


@pytest.mark.parametrize("case", list(WORST_CASES))
@pytest.mark.parametrize("reader", list(PARSERS))
def test_worst_cases_take_under_a_second(reader: str, case: str,
                                         worst_texts: dict[str, str]) -> None:
    assert _elapsed(PARSERS[reader], worst_texts[case]) < LIMIT_S


FRAGMENTS = ["I choose", "I would ", "choose", "response", "Response 1", " is better", "#",
             "<SUMMARY>", "</CONCLUSION>", "< ", "<", "/", "summary", ">", "<thoughts>",
             "{", "}", "[", "]", '"', '{"summary": ', ":", "1", "-", "the answer is",
             "Answer:", "option", "the ", "since", "("]
SPACES = [" ", "\n", "\t", "\u00a0", "\r\n"]
FILLERS = ["1", "{", "[", '"', "<", "a", "é", "\\"]


@st.composite
def adversarial_text(draw: st.DrawFn) -> str:
    """Fragments, each followed by a run (1 to 65,536 long) of one filler (most often a
    space of some kind), repeated to 1 MB (or 100 kB, or once)."""
    filler = st.sampled_from(SPACES) | st.sampled_from(FILLERS) | st.characters()
    run = st.integers(0, 16).map(lambda power: 2 ** power)
    pieces = draw(st.lists(st.tuples(st.sampled_from(FRAGMENTS), filler, run),
                           min_size=1, max_size=30))
    unit = "".join(fragment + char * count for fragment, char, count in pieces)
    return _repeat(unit, draw(st.sampled_from([MB, 100_000, len(unit)])))


@pytest.mark.parametrize("reader", list(PARSERS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=adversarial_text())
def test_generated_inputs_take_under_a_second(reader: str, text: str) -> None:
    assert _elapsed(PARSERS[reader], text) < LIMIT_S


# --- The linear patterns read what the backtracking ones did ---------------------------------
# The patterns they replaced (before runs of spaces were matched possessively): on short
# texts, where these are fast, both must find the same matches.

_BEFORE_STAGE_TAG = re.compile(r"<\s*(/?)\s*(summary|caption|reasoning|conclusion)\s*>", re.I)
_BEFORE_CHOICE = re.compile(r"(?:\bI\s+(?:would\s+|will\s+)?)?(?:choose|choice|pick|select|"
                            r"prefer)\w*\s*(?:is\s*|:\s*)?(?:the\s+)?(?:response|candidate|"
                            r"option|answer)?\s*[\[(#]?\s*([12])\b", re.I)
_BEFORE_BETTER = re.compile(r"(?:response|candidate)\s*[\[(#]?\s*([12])\s*[\])]?\s+is\s+"
                            r"(?:the\s+)?better", re.I)
_BEFORE_NUMBER = re.compile(
    r"^[^\d+\-.]{0,3}?(?P<sign>[-+\u2212]?)\s*(?P<int>\d{1,3}(?:,\d{3})+|\d+)?(?P<frac>\.\d+)?"
    r"(?:\s*/\s*(?P<den>\d+))?\s*(?P<unit>%|[a-z]{1,12}\.?)?$")
_BEFORE_LETTERS = (
    re.compile(r"^(?:option|choice|answer)\s*(?:is\s*)?:?\s*\(?([a-z])\)?[.:)]?(?:\s|$)"),
    re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s+is\s*:?\s*\(?([a-z])\)?"
               r"(?:[.:)\s]|$)"),
)
_BEFORE_STATED = re.compile(r"the\s+(?:final\s+)?answer\s+is|answer\s*:", re.I)

_SPACE = st.sampled_from([" ", "  ", "\n", " \t ", "\u00a0"])
_GLUE = st.sampled_from(["", " ", "  ", "\n", " \t "])


def _tokens(words: list[str], separator: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(st.tuples(st.sampled_from(words), separator), max_size=10).map(
        lambda parts: "".join(word + space for word, space in parts))


def _found(pattern: re.Pattern[str], text: str) -> list[tuple[int, int, tuple[str | None, ...]]]:
    return [(m.start(), m.end(), m.groups()) for m in pattern.finditer(text)]


@settings(max_examples=300, deadline=None)
@given(_tokens(["<", ">", "/", "summary", "CAPTION", "Reasoning", "conclusion", "x"], _GLUE))
def test_stage_tags_as_before(text: str) -> None:
    assert _found(parsing._STAGE_TAG, text) == _found(_BEFORE_STAGE_TAG, text)


# Words stand apart (a digit glued to "choose" is no normal reply).
@settings(max_examples=500, deadline=None)
@given(_tokens(["I", "i", "would", "will", "choose", "chooses", "choice", "pick", "select",
                "prefer", "preferred", "is", ":", "the", "response", "Response", "candidate",
                "option", "answer", "[1]", "(2)", "#1", "1", "2", "12", "3", "1.", "2,", "]",
                ")", "better", "since", "x"], _SPACE))
def test_choices_as_before(text: str) -> None:
    assert _found(parsing._CHOICE, text) == _found(_BEFORE_CHOICE, text)
    assert _found(parsing._BETTER, text) == _found(_BEFORE_BETTER, text)


@settings(max_examples=500, deadline=None)
@given(_tokens(["-", "+", "\u2212", "$", "1", "12", ",", ",000", ".5", "/", "%", "kg", "m.",
                "x", "!", "option", "choice", "answer", "the", "correct", "is", ":", "b", "(b)",
                "b.", "final"], _GLUE))
def test_answer_patterns_as_before(text: str) -> None:
    for text_ in (text, text.lower()):
        new, old = answers._NUMBER.match(text_), _BEFORE_NUMBER.match(text_)
        assert (new and new.groupdict()) == (old and old.groupdict())
        for new_form, old_form in zip(answers._LETTER_FORMS[3:], _BEFORE_LETTERS, strict=True):
            new, old = new_form.match(text_), old_form.match(text_)
            assert (new and new.groups()) == (old and old.groups())
        assert _found(answers._STATED, text_) == _found(_BEFORE_STATED, text_)
