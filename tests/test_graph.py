"""The Insight-V graph: loops, caps, revisions, chain mode, models, failures, contract."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from helpers import png_bytes, step, verdict
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import Field

from insightv_agents import (
    ConfigError,
    InsightVContext,
    InvalidInputError,
    ModelCallError,
    Prompts,
    create_insightv_graph,
)
from insightv_agents.nodes import ReasoningNode, SummaryNode
from insightv_agents.parsing import format_chain, format_step, format_verdict
from insightv_agents.schema import ReasoningStep
from insightv_agents.testing import ScriptedChatModel


def run(model: ScriptedChatModel, inputs: dict[str, Any], **options: Any) -> dict[str, Any]:
    return create_insightv_graph(reasoner=model, **options).compile().invoke(inputs)


def test_continue_loop_then_summary(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([step("look"), step("count"), step("done", "3 squares", "summary"),
                               verdict("3")])
    out = run(model, inputs)
    assert out["answer"] == "3" and out["status"] == "ok" and out["failures"] == []
    assert [s["summary"] for s in out["steps"]] == ["look", "count", "done"]
    assert out["reasoning"].startswith("Step 1: look\ndetails\n\nStep 2: count")
    assert out["verdict"] == {"reasoning_correct": True, "critique": "", "answer": "3"}
    # Step mode is multi-turn: the third call carries the two earlier steps as assistant turns.
    third = model.calls[2]
    assert [type(m) for m in third[1:]] == [HumanMessage, AIMessage, HumanMessage, AIMessage,
                                            HumanMessage]
    assert '"summary": "count"' in third[4].text
    # The image and question reach the model in the first user turn.
    parts = third[1].content
    assert parts[0]["type"] == "image_url"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "How many red squares?" in parts[-1]["text"]
    # The summary agent sees the rendered reasoning.
    assert "Step 3: done\n3 squares" in model.calls[3][1].content[-1]["text"]


def test_step_cap_ends_reasoning(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([step("again")] * 3 + [verdict("7")])
    out = run(model, inputs, max_steps=3)
    assert len(out["steps"]) == 3 and out["answer"] == "7"
    assert [f["kind"] for f in out["failures"]] == ["step_cap"]
    assert len(model.calls) == 4


def test_one_pass_by_default_even_when_flawed(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([step("s", "2 squares", "summary"),
                               verdict("3", False, "miscounted")])
    out = run(model, inputs)
    assert out["answer"] == "3" and out["attempts"] == [] and len(model.calls) == 2


def test_revision_loop_carries_the_critique(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([
        step("first", "2 squares", "summary"), verdict("2", False, "you missed one square"),
        step("second", "3 squares", "summary"), verdict("3"),
    ])
    out = run(model, inputs, max_revisions=2)
    assert out["answer"] == "3" and [s["summary"] for s in out["steps"]] == ["second"]
    assert len(out["attempts"]) == 1
    assert out["attempts"][0]["verdict"]["critique"] == "you missed one square"
    assert out["attempts"][0]["steps"][0]["summary"] == "first"
    prompt = model.calls[2][1].content[-1]["text"]
    assert "you missed one square" in prompt and "Step 1: first" in prompt


def test_revisions_are_capped(inputs: dict[str, Any]) -> None:
    flawed = [step("s", "r", "summary"), verdict("x", False, "wrong")]
    model = ScriptedChatModel(flawed * 3)
    out = run(model, inputs, max_revisions=1)
    assert len(model.calls) == 4 and len(out["attempts"]) == 1 and out["answer"] == "x"


def test_separate_summarizer(inputs: dict[str, Any]) -> None:
    reasoner = ScriptedChatModel([step("only", "r", "summary")])
    summarizer = ScriptedChatModel([verdict("ok")])
    out = create_insightv_graph(reasoner=reasoner, summarizer=summarizer).compile().invoke(inputs)
    assert out["answer"] == "ok" and len(reasoner.calls) == 1 and len(summarizer.calls) == 1
    assert "summary agent" in summarizer.calls[0][0].text


def test_chain_mode_parses_a_whole_chain_from_one_generation(inputs: dict[str, Any]) -> None:
    chain = "\n".join([step("a"), step("b"), step("c", "it is 3", "summary")])
    model = ScriptedChatModel([chain, verdict("3")])
    out = run(model, inputs, mode="chain")
    assert [s["summary"] for s in out["steps"]] == ["a", "b", "c"] and len(model.calls) == 2
    assert "one JSON object per line" in model.calls[0][0].text


class ConstrainedModel(ScriptedChatModel):
    """A scripted model that, like vLLM's client, can be constrained; it records how."""

    constraints: list[dict[str, Any]] = Field(default_factory=list)

    def bind_structured_outputs(self, constraint: dict[str, Any]) -> ConstrainedModel:
        self.constraints.append(constraint)
        return self


@pytest.mark.parametrize("mode", ["step", "chain"])
def test_replies_are_constrained_to_the_text_the_agents_are_trained_on(
        inputs: dict[str, Any], mode: str) -> None:
    """Each reply's constraint is a pattern of exactly the canonical text the trainers teach
    (format_step / format_chain / format_verdict): a chain is one JSON step per line (not one
    JSON document), and the separators are json.dumps' own (vLLM's JSON-schema mode writes
    compact ones, which a trained agent has never seen)."""
    chain: list[ReasoningStep] = [
        {"summary": "a", "reasoning": 'r1c1 "x"\nü', "action": "continue"},
        {"summary": "b", "reasoning": "it is 3", "action": "summary"}]
    replies = [format_chain(chain)] if mode == "chain" else [format_step(s) for s in chain]
    judged = format_verdict({"reasoning_correct": True, "critique": "fine", "answer": "3"})
    model = ConstrainedModel([*replies, judged])
    out = run(model, inputs, mode=mode)
    assert out["steps"] == chain and out["answer"] == "3"
    assert len(model.constraints) == len(replies) + 1
    for constraint, reply in zip(model.constraints, [*replies, judged], strict=True):
        assert re.fullmatch(constraint["regex"], reply)
        assert not re.fullmatch(constraint["regex"],
                                json.dumps(json.loads(reply.split("\n")[0]), separators=(",", ":")))


def test_chain_mode_continues_a_chain_that_stopped_early(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([step("a") + "\n" + step("b"), step("c", "r", "summary"),
                               verdict("3")])
    out = run(model, inputs, mode="chain")
    assert [s["summary"] for s in out["steps"]] == ["a", "b", "c"]
    second = model.calls[1]
    assert isinstance(second[-2], AIMessage) and '"summary": "b"' in second[-2].text
    assert second[-1].text == Prompts().continue_chain


def test_chain_mode_truncates_at_the_cap(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel(["\n".join(step(str(i)) for i in range(10)), verdict("3")])
    out = run(model, inputs, mode="chain", max_steps=4)
    assert len(out["steps"]) == 4 and out["failures"][0]["kind"] == "step_cap"


def test_unreadable_reply_is_reasked_with_the_error(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel(["I refuse to use JSON.", step("ok", "r", "summary"), verdict("1")])
    out = run(model, inputs)
    assert out["answer"] == "1" and out["failures"] == []
    retry = model.calls[1]
    assert retry[-2].text == "I refuse to use JSON."
    assert "could not be read" in retry[-1].text and "no JSON object" in retry[-1].text


def test_unreadable_reasoning_is_recorded_and_summary_still_answers(
        inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel(["garbage", "more garbage", verdict("5")])
    out = run(model, inputs, max_retries=1)
    assert out["status"] == "ok" and out["answer"] == "5" and out["steps"] == []
    [failure] = out["failures"]
    assert failure["node"] == "reason" and failure["kind"] == "unparsable"
    assert failure["attempts"] == 2 and failure["raw"] == "more garbage"
    assert "(no reasoning was produced)" in model.calls[2][1].content[-1]["text"]


def test_unreadable_verdict_fails_the_run_with_a_typed_record(inputs: dict[str, Any]) -> None:
    # (a short plain-text reply would be its answer: these state none)
    model = ScriptedChatModel([step("s", "r", "summary"), "{}", "", '{"note": "none"}'])
    out = run(model, inputs)
    assert out["status"] == "failed" and out["answer"] == "" and out["verdict"] is None
    assert out["failures"][0]["node"] == "summarize" and out["failures"][0]["attempts"] == 3


def test_context_swaps_models_per_run(inputs: dict[str, Any]) -> None:
    built_with = ScriptedChatModel([])
    runtime = ScriptedChatModel([step("s", "r", "summary"), verdict("from context")])
    graph = create_insightv_graph(reasoner=built_with).compile()
    out = graph.invoke(inputs, context=InsightVContext(reasoner=runtime))
    assert out["answer"] == "from context" and built_with.calls == []
    assert len(runtime.calls) == 2  # with no summarizer, the reasoner plays both roles


def test_multiple_images_reach_the_model(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([step("s", "r", "summary"), verdict("2")])
    run(model, {**inputs, "image": [png_bytes(), png_bytes((4, 4), "blue")]})
    parts = model.calls[0][1].content
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]


def test_prompts_are_overridable(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([step("s", "r", "summary"), verdict("2")])
    run(model, inputs, prompts=Prompts(question="Q>> {question}", summary_system="JUDGE"))
    assert model.calls[0][1].content[-1]["text"] == "Q>> How many red squares?"
    assert model.calls[1][0].text == "JUDGE"


@pytest.mark.parametrize("mode", ["step", "chain"])
def test_an_empty_system_prompt_sends_no_system_turn(inputs: dict[str, Any], mode: str) -> None:
    """Agents trained without a system prompt (the shapes world's) are asked without one."""
    model = ScriptedChatModel([step("s", "r", "summary"), verdict("2")])
    prompts = Prompts(reasoning_step_system="", reasoning_chain_system="", summary_system="")
    out = run(model, inputs, prompts=prompts, mode=mode)
    assert out["answer"] == "2"
    for call in model.calls:
        assert [m.type for m in call] == ["human"]
        assert "Question: How many red squares?" in call[0].content[-1]["text"]


def test_images_can_follow_the_text_of_every_user_turn(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([step("s", "r", "summary"), verdict("2")])
    run(model, inputs, prompts=Prompts(images_after_text=True))
    for call in model.calls:  # the reasoning agent's turn, then the summary agent's
        assert [p["type"] for p in call[1].content] == ["text", "image_url"]


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("no question", {"image": png_bytes()}, "`question` is required"),
    ("None question", {"image": png_bytes(), "question": None}, "`question` is required"),
    ("empty question", {"image": png_bytes(), "question": ""}, "`question` is empty"),
    ("blank question", {"image": png_bytes(), "question": " \n\t"}, "`question` is empty"),
    ("int question", {"image": png_bytes(), "question": 7}, "must be a string, not int"),
    ("list question", {"image": png_bytes(), "question": ["a"]}, "must be a string, not list"),
    ("huge question", {"image": png_bytes(), "question": "x" * 1_000_001}, "the limit is 20000"),
    ("no image", {"question": "q"}, "`image` is required"),
    ("missing file", {"image": "/nope.png", "question": "q"}, "no such file"),
    ("corrupt bytes", {"image": b"\x89PNG\r\n\x1a\nxx", "question": "q"}, "not an image"),
    ("url", {"image": "https://example.com/x.png", "question": "q"}, "URLs are not allowed"),
    ("wrong type", {"image": 1.5, "question": "q"}, "unsupported type float"),
]


@pytest.mark.parametrize(("inputs", "message"), [(i, m) for _, i, m in BAD_INPUTS],
                         ids=[n for n, _, _ in BAD_INPUTS])
async def test_bad_input_is_refused_before_any_model_call(inputs: dict[str, Any],
                                                          message: str) -> None:
    model = ScriptedChatModel([step("s", "r", "summary"), verdict("1")], cycle=True)
    graph = create_insightv_graph(reasoner=model).compile()
    with pytest.raises(InvalidInputError, match=message):
        graph.invoke(inputs)
    with pytest.raises(InvalidInputError, match=message):
        await graph.ainvoke(inputs)
    assert model.calls == []


@pytest.mark.parametrize("options", [
    {"max_steps": 0}, {"max_steps": -1}, {"max_steps": 10_000}, {"max_steps": "3"},
    {"max_steps": True}, {"max_revisions": -1}, {"max_revisions": 100}, {"max_retries": 11},
    {"mode": "tree"}, {"max_question_chars": 0},
])
def test_bad_options_raise_config_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        create_insightv_graph(reasoner=ScriptedChatModel([]), **options)


def test_a_model_is_required() -> None:
    with pytest.raises(ConfigError, match="needs a chat model"):
        create_insightv_graph(reasoner=None)  # type: ignore[arg-type]


def test_a_failed_model_call_is_a_typed_error_naming_the_node(inputs: dict[str, Any]) -> None:
    def boom(_: Any) -> str:
        raise ConnectionError("server down")

    with pytest.raises(ModelCallError, match="node 'reason' failed: ConnectionError: server "
                       "down") as caught:
        run(ScriptedChatModel([boom]), inputs)
    assert caught.value.node == "reason" and isinstance(caught.value.__cause__, ConnectionError)


def test_nodes_run_alone_outside_any_graph() -> None:
    model = ScriptedChatModel([])
    node = ReasoningNode(model, max_steps=1)
    full = {"question": "q", "images": [], "steps": [{"summary": "s", "reasoning": "r",
                                                       "action": "continue"}]}
    update = node.invoke(full)
    assert update["failures"][0]["kind"] == "step_cap" and model.calls == []
    assert node.is_done({**full, **update})
    judge = SummaryNode(ScriptedChatModel([verdict("B", False, "step 1 misreads the axis")]))
    out = judge.invoke({"question": "q", "images": [], "steps": full["steps"]})
    assert out["answer"] == "B" and out["verdict"]["critique"] == "step 1 misreads the axis"
    assert out["reasoning"] == "Step 1: s\nr"
