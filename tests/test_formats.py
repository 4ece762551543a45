"""Format profiles: the released Insight-V agents' formats, LLaVA-CoT's tags, and a summary
agent that answers in plain text."""

from __future__ import annotations

import json
import time

import pytest
from helpers import png_bytes

from insightv_agents import ConfigError, create_insightv_graph
from insightv_agents.errors import ModelOutputError
from insightv_agents.formats import (
    PROFILES,
    format_profile,
    parse_summary,
    parse_tagged_stages,
    parse_thoughts,
)
from insightv_agents.testing import ScriptedChatModel

IMAGE = png_bytes()
STEP = json.dumps({"summary": "Count", "reasoning": "Two plus two is 4.", "action": "summary"})


def text_of(messages: list) -> str:
    """Every text part of a conversation, joined."""
    parts = []
    for message in messages:
        content = message.content
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(parts)


def test_the_insightv_reference_formats_run_through_the_graph() -> None:
    """A model speaking the released agents' formats: a free-text chain in <thoughts>, a bare
    answer from the summary agent. One reasoning call, one summary call, status ok."""
    reasoner = ScriptedChatModel(["<thoughts>There are two apples.\n\nAnother two come, so "
                                  "there are 4.</thoughts>"])
    summarizer = ScriptedChatModel(["4"])
    graph = create_insightv_graph(reasoner=reasoner, summarizer=summarizer,
                                  profile="insightv-reference").compile()
    result = graph.invoke({"image": IMAGE, "question": "How many apples?"})
    assert (result["answer"], result["status"], result["failures"]) == ("4", "ok", [])
    assert result["verdict"] == {"reasoning_correct": None, "critique": "", "answer": "4"}
    assert [step["reasoning"] for step in result["steps"]] == [
        "There are two apples.", "Another two come, so there are 4."]
    assert len(reasoner.calls) == 1 and len(summarizer.calls) == 1
    asked = text_of(reasoner.calls[0])
    assert asked.startswith("How many apples?\nPerform step-by-step reasoning of the problem.")
    shown = text_of(summarizer.calls[0])
    assert "QUESTION: How many apples?" in shown
    assert ("REASON PROCESS: <thoughts>There are two apples.\n\nAnother two come, so there "
            "are 4.</thoughts>") in shown
    assert not any(message.type == "system" for message in reasoner.calls[0])


@pytest.mark.parametrize(("reply", "answer"), [
    ("The answer is 4.", "4"), ("B", "B"), ("Answer: 12 apples", "12 apples"),
    ("  4.  ", "4"), ("The answer is [0, 1].", "[0, 1]")])
def test_a_plain_text_summary_is_the_answer_with_the_verdict_unknown(reply: str,
                                                                     answer: str) -> None:
    model = ScriptedChatModel([STEP, reply])
    graph = create_insightv_graph(reasoner=model, max_revisions=2).compile()
    result = graph.invoke({"image": IMAGE, "question": "What is 2 + 2?"})
    assert (result["answer"], result["status"], result["failures"]) == (answer, "ok", [])
    assert result["verdict"]["reasoning_correct"] is None
    assert len(model.calls) == 2  # no re-ask, and no revision of an unjudged chain


def test_a_summary_in_json_without_a_verdict_is_still_asked_again() -> None:
    model = ScriptedChatModel([STEP, '{"note": "thinking"}',
                               '{"reasoning_correct": true, "critique": "", "answer": "4"}'])
    result = create_insightv_graph(reasoner=model).compile().invoke(
        {"image": IMAGE, "question": "What is 2 + 2?"})
    assert (result["answer"], result["verdict"]["reasoning_correct"]) == ("4", True)
    assert len(model.calls) == 3


def test_llava_cot_tags_are_read_as_steps() -> None:
    reply = ("<SUMMARY>Add the apples.</SUMMARY><CAPTION>Two apples and two more."
             "</CAPTION><REASONING>2 + 2 = 4.</REASONING><CONCLUSION>4</CONCLUSION>")
    model = ScriptedChatModel([reply, "4"])
    result = create_insightv_graph(reasoner=model, profile="llava-cot").compile().invoke(
        {"image": IMAGE, "question": "How many apples?"})
    assert [step["summary"] for step in result["steps"]] == [
        "Summary", "Caption", "Reasoning", "Conclusion"]
    assert result["steps"][-1]["action"] == "summary" and result["answer"] == "4"
    assert "<REASONING>2 + 2 = 4.</REASONING>" in text_of(model.calls[1])


def test_free_text_chains_are_read_tolerantly() -> None:
    assert [s["reasoning"] for s in parse_thoughts("no tags at all")] == ["no tags at all"]
    cut = parse_thoughts("<thoughts>first\n\nsecond, cut short")  # no closing tag
    assert [s["action"] for s in cut] == ["continue", "summary"]
    with pytest.raises(ModelOutputError):
        parse_thoughts("<thoughts>  \n </thoughts>")
    assert parse_tagged_stages("4")[0] == {"summary": "Conclusion", "reasoning": "4",
                                           "action": "summary"}  # an untagged plain answer
    with pytest.raises(ModelOutputError):
        parse_tagged_stages(" <SUMMARY> </SUMMARY> ")
    assert parse_summary('{"reasoning_correct": false, "critique": "off", "answer": "3"}') == {
        "reasoning_correct": False, "critique": "off", "answer": "3"}
    with pytest.raises(ModelOutputError):
        parse_summary("   ")
    with pytest.raises(ModelOutputError):  # long prose that states no answer
        parse_summary("I am not sure. " * 40)
    started = time.perf_counter()  # linear on runaway whitespace
    assert parse_summary("Answer: 7" + " " * 150_000 + ".")["answer"] == "7"
    assert time.perf_counter() - started < 1


def test_profiles_are_chosen_by_name_and_checked() -> None:
    assert format_profile().name == "steps" and format_profile(mode="chain").name == "chain"
    assert format_profile("insightv-reference") is PROFILES["insightv-reference"]
    assert format_profile("chain", prompts={"question": "Q: {question}"}).prompts.question \
        == "Q: {question}"
    with pytest.raises(ConfigError, match="unknown format profile"):
        format_profile("json-please")
    with pytest.raises(ConfigError, match="chain mode"):
        format_profile("insightv-reference", mode="step")
    with pytest.raises(ConfigError, match="unknown prompt field"):
        format_profile("chain", prompts={"nonsense": "x"})
    with pytest.raises(ConfigError, match="mode"):
        create_insightv_graph(reasoner=ScriptedChatModel([]), mode="tree")  # type: ignore
    # our JSON formats are constrained where the backend can; free text is not
    assert PROFILES["chain"].reasoning_constraint(4) and PROFILES["steps"].summary_constraint()
    assert PROFILES["insightv-reference"].reasoning_constraint(4) == {}
    assert PROFILES["insightv-reference"].summary_constraint() == {}
