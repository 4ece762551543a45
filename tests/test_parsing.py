"""Tolerant, bounded parsing of the agents' replies."""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insightv_agents.answers import extract_answer, match_answer
from insightv_agents.errors import ConfigError, ModelOutputError
from insightv_agents.parsing import (
    format_chain,
    format_step,
    format_verdict,
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
from insightv_agents.schema import ReasoningStep, chain_regex, json_text_regex


def test_our_key_set() -> None:
    steps = parse_steps('{"summary": "Look", "reasoning": "A red square.", "action": "continue"}')
    assert steps == [{"summary": "Look", "reasoning": "A red square.", "action": "continue"}]


def test_reference_key_set_with_final_answer() -> None:
    text = '{"title": "Final", "content": "It is 3.", "next_action": "final_answer"}'
    assert parse_steps(text) == [{"summary": "Final", "reasoning": "It is 3.", "action": "summary"}]


@pytest.mark.parametrize("text", [
    'Step:\n```json\n{"summary": "A", "reasoning": "B", "action": "summary"}\n```\nDone.',
    'Sure. {"summary": "A", "reasoning": "B", "action": "Summary"} Hope that helps!',
    '{"Summary": "A", "Reasoning": "B", "Action": "SUMMARY"}',
    '{"summary": "A", "reasoning": "B", "action": "final answer"}',
    '[1, 2] then {"summary": "A", "reasoning": "B", "action": "summary"}',
    '{"summary": "A", "reasoning": "B\u0001 with a raw\ncontrol", "action": "summary"}',
])
def test_json_in_prose_fences_and_case(text: str) -> None:
    steps = parse_steps(text)
    assert len(steps) == 1
    assert steps[0]["summary"] == "A" and steps[0]["action"] == "summary"
    assert steps[0]["reasoning"].startswith("B")


def test_chain_as_lines_array_and_steps_key() -> None:
    chain: list[ReasoningStep] = [
        {"summary": "one", "reasoning": "r1", "action": "continue"},
        {"summary": "two", "reasoning": "r2", "action": "continue"},
        {"summary": "three", "reasoning": "r3", "action": "summary"},
    ]
    assert parse_steps(format_chain(chain)) == chain
    assert parse_steps(json.dumps(chain)) == chain
    assert parse_steps(json.dumps({"steps": chain})) == chain


_step_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@given(st.lists(st.tuples(_step_text, _step_text), min_size=1, max_size=6))
@settings(max_examples=200, deadline=None)
def test_chain_regex_matches_every_canonical_chain(texts: list[tuple[str, str]]) -> None:
    """vLLM constrains chain-mode replies to this pattern: any chain as the agents are trained
    to write it (format_chain) must match, quotes, escapes and control characters included."""
    chain: list[ReasoningStep] = [
        {"summary": summary, "reasoning": reasoning,
         "action": "summary" if i == len(texts) - 1 else "continue"}
        for i, (summary, reasoning) in enumerate(texts)]
    assert re.fullmatch(chain_regex(max_steps=6), format_chain(chain))


def test_chain_regex_rejects_other_shapes_and_overlong_chains() -> None:
    def chain(*actions: str) -> list[ReasoningStep]:
        return [{"summary": "s", "reasoning": "r", "action": a} for a in actions]  # type: ignore[misc]

    pattern = chain_regex(max_steps=3, max_summary_chars=5)
    assert re.fullmatch(pattern, format_chain(chain("continue", "continue", "summary")))
    for text in (format_chain(chain("continue", "continue", "continue", "summary")),
                 format_chain(chain("summary", "summary")),
                 format_chain(chain("continue")),
                 json.dumps({"steps": chain("summary")}),
                 json.dumps(chain("summary")),
                 format_chain([{"summary": "sixsix", "reasoning": "", "action": "summary"}])):
        assert not re.fullmatch(pattern, text), text


@pytest.mark.parametrize(("schema", "message"), [
    ({"properties": {"text": {"type": "string"}}}, "needs a maxLength"),
    ({"properties": {"items": {"type": "array"}}}, "only strings, booleans and integers"),
])
def test_json_text_regex_refuses_unbounded_or_nested_schemas(schema: dict[str, Any],
                                                             message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        json_text_regex(schema)


def test_chain_regex_refuses_a_chain_of_no_steps() -> None:
    with pytest.raises(ConfigError, match="max_steps must be"):
        chain_regex(max_steps=0)


def test_format_round_trips() -> None:
    step: ReasoningStep = {"summary": "ü \"q\"", "reasoning": "a\nb {x}", "action": "continue"}
    assert parse_steps(format_step(step)) == [step]
    verdict = {"reasoning_correct": False, "critique": "bad count", "answer": "4"}
    assert parse_verdict(format_verdict(verdict)) == verdict  # type: ignore[arg-type]


def test_non_string_fields_are_coerced_and_capped() -> None:
    text = json.dumps({"summary": 3, "reasoning": {"k": [1]}, "action": "continue"})
    assert parse_steps(text)[0] == {"summary": "3", "reasoning": '{"k": [1]}', "action": "continue"}
    huge = json.dumps({"summary": "s", "reasoning": "x" * 100_000, "action": "continue"})
    assert len(parse_steps(huge)[0]["reasoning"]) == 16_000


@pytest.mark.parametrize(("text", "message"), [
    ("", "no JSON object"),
    ("I think the answer is 4.", "no JSON object"),
    ('{"summary": "A", "reasoning": "B"}', "no action"),
    ('{"summary": "A", "reasoning": "B", "action": "dance"}', "unknown action"),
    ('{"summary": "", "reasoning": "", "action": "continue"}', "neither a summary"),
    ('{"summary": "A", "reasoning": "B", "action": "continue"', "no JSON object"),
])
def test_unreadable_steps_raise_model_output_error(text: str, message: str) -> None:
    with pytest.raises(ModelOutputError, match=message) as info:
        parse_steps(text)
    assert info.value.raw == text[:2000]


@pytest.mark.parametrize(("text", "expected"), [
    ('{"reasoning_correct": true, "critique": "", "answer": "3"}', (True, "3")),
    ('{"correct": "no", "critique": "miscounted", "answer": 4}', (False, "4")),
    ('Verdict: ```{"is_correct": "Yes.", "final_answer": "B"}```', (True, "B")),
    ('{"reasoning_correct": 0, "answer": "x"}', (False, "x")),
])
def test_verdict_variants(text: str, expected: tuple[bool, str]) -> None:
    verdict = parse_verdict(text)
    assert (verdict["reasoning_correct"], verdict["answer"]) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("The answer is 3", "no JSON object"),
    ('{"reasoning_correct": true, "answer": ""}', "no non-empty 'answer'"),
    ('{"reasoning_correct": "maybe", "answer": "3"}', "no 'reasoning_correct'"),
    ('{"answer": "3"}', "no 'reasoning_correct'"),
])
def test_unreadable_verdicts(text: str, message: str) -> None:
    with pytest.raises(ModelOutputError, match=message):
        parse_verdict(text)


@pytest.mark.parametrize("text", [
    "[" * 100_000,
    "{" * 100_000,
    '{"a": ' * 50_000,
    "1" * 300_000,
    "[" + "9" * 10_000 + "]",
    '{"summary": "' + "x" * 500_000,
])
def test_adversarial_text_is_bounded(text: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelOutputError):
        parse_steps(text)
    with pytest.raises(ModelOutputError):
        parse_verdict(text)
    assert time.perf_counter() - started < 5


def test_iter_json_objects_skips_prose() -> None:
    assert list(iter_json_objects('a {"x": 1} b [2] c {bad} {"y": 2}')) == [{"x": 1}, [2], {"y": 2}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["summary", "reasoning", "action", "title", "content", "next_action",
                         "answer", "reasoning_correct", "steps", "x"]), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), json_values.map(json.dumps),
                 st.tuples(st.text(max_size=50), json_values.map(json.dumps),
                           st.text(max_size=50)).map("".join)))
def test_fuzz_parsers_raise_only_model_output_error(text: str) -> None:
    strict = (parse_steps, parse_verdict, parse_answer, parse_judgement, parse_choice,
              parse_check, lambda reply: parse_scores(reply, 3))
    for parse in strict:
        try:
            result = parse(text)
        except ModelOutputError:
            continue
        assert result is not None
    # The tolerant readers never raise: they read what they can.
    stages = parse_stages(text)
    assert set(stages) == {"summary", "caption", "reasoning", "conclusion"}
    assert isinstance(stage_text(text, "reasoning"), str)
    assert isinstance(extract_answer(text), str)
    assert match_answer(text, "3")["correct"] in (True, False, None)


@pytest.mark.parametrize("text", ["{" * 100_000, "<reasoning>" * 20_000, "1 " * 200_000,
                                  "response " * 50_000, '{"scores": [' + "1," * 100_000,
                                  "\x00\x1b[31m" * 20_000])
def test_every_parser_is_fast_on_huge_text(text: str) -> None:
    started = time.perf_counter()
    for parse in (parse_answer, parse_judgement, parse_choice, parse_check,
                  lambda reply: parse_scores(reply, 3)):
        with contextlib.suppress(ModelOutputError):
            parse(text)
    parse_stages(text), stage_text(text, "conclusion"), extract_answer(text)
    match_answer(text, "3")
    assert time.perf_counter() - started < 10
