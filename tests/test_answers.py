"""The rule-based answer check."""

from __future__ import annotations

import pytest

from insightv_agents.answers import AnswerRules, choice_letter, match_answer, parse_number


@pytest.mark.parametrize(("prediction", "truth", "choices", "correct", "method"), [
    ("B", "B", None, True, "choice"),
    ("(b)", "B", None, True, "choice"),
    ("B. a cat", "B", ["a dog", "a cat"], True, "choice"),
    ("Option C", "B", ["x", "y", "z"], False, "choice"),
    ("The answer is B", "b", ["x", "y"], True, "choice"),
    ("a cat", "B", ["a dog", "a cat"], True, "choice"),
    ("A cat.", "a cat", ["a dog", "a cat"], True, "choice"),
    ("12", "12.0", None, True, "number"),
    ("1,234", "1234", None, True, "number"),
    ("3.14", "3.1416", None, True, "number"),
    ("3.5", "3.1416", None, False, "number"),
    ("50%", "50", None, True, "number"),
    ("$7", "7", None, True, "number"),
    ("-2", "2", None, False, "number"),
    ("3/4", "0.75", None, True, "number"),
    ("The Eiffel Tower!", "eiffel tower", None, True, "exact"),
    ("Yes, it is red.", "yes", None, True, "yes_no"),
    ("no", "Yes", None, False, "yes_no"),
    ("", "3", None, False, "empty"),
    ("three", "3", None, None, "undecided"),
    ("a large red circle", "red circle", None, None, "undecided"),
])
def test_match_answer(prediction: str, truth: str, choices: list[str] | None,
                      correct: bool | None, method: str) -> None:
    check = match_answer(prediction, truth, choices=choices)
    assert (check["correct"], check["method"]) == (correct, method), check


def test_tolerance_is_configurable() -> None:
    assert match_answer("105", "100")["correct"] is False
    assert match_answer("105", "100", rules=AnswerRules(rel_tol=0.05))["correct"] is True


def test_letters_beyond_the_options_are_not_letters() -> None:
    assert choice_letter("E", ["a", "b"]) is None
    assert choice_letter("I think so", ["a", "b"]) is None


def test_numbers_in_prose_are_not_numbers() -> None:
    assert parse_number("there are 3 of them") is None
    assert parse_number("1/0") is None
    assert parse_number("2 cm") == 2


def test_stated_answer_is_the_last_one_stated_or_empty() -> None:
    from insightv_agents.answers import extract_answer, stated_answer

    assert stated_answer("The answer is 2. Wait: the answer is 3.") == "3"
    assert stated_answer("Answer: large") == "large"
    assert stated_answer("So two.") == ""
    assert extract_answer("So two.") == "So two"  # a bare reply is its own answer


def test_labels_decide_what_the_rules_leave_open() -> None:
    rules = AnswerRules(labels=frozenset({"Yes", "no", "red", "large"}))
    assert match_answer("red", "3")["correct"] is None  # open-ended: no rule applies
    assert match_answer("red", "3", rules=rules)["correct"] is False
    assert match_answer("3", "large", rules=rules)["method"] == "labels"
    assert match_answer("Red.", "red", rules=rules)["correct"] is True
    assert match_answer("a red one", "large", rules=rules)["correct"] is None  # not a label
