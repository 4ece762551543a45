"""The synthesis graph with scripted models: paths, answer filter, one-pass scoring."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import png_bytes, role_of, step, teacher

from insightv_agents import InvalidInputError
from insightv_agents.assessment import RuleScorer, ScoreRequest
from insightv_agents.graphs.synthesis import create_synthesis_graph
from insightv_agents.parsing import parse_scores
from insightv_agents.schema import PathScore
from insightv_agents.testing import ScriptedChatModel

ITEM = {"image": png_bytes(), "question": "How many dots?", "answer": "3", "id": "q1"}


def calls(model: ScriptedChatModel, role: str) -> list[Any]:
    return [messages for messages in model.calls if role_of(messages) == role]


def test_n_paths_each_progressive_then_scored_together_in_one_call() -> None:
    model = ScriptedChatModel([teacher(steps=3, scores=[90, 40, 70, 10])], cycle=True)
    graph = create_synthesis_graph(teacher=model, paths=4).compile()
    out = graph.invoke(ITEM)
    assert [p["index"] for p in out["paths"]] == [0, 1, 2, 3]
    assert all(p["status"] == "ok" and len(p["steps"]) == 3 for p in out["paths"])
    assert all(p["answer"] == "3" and p["check"]["correct"] for p in out["paths"])
    assert [p["score"] for p in out["paths"]] == [90, 40, 70, 10]
    # Progressive: every step is its own call, conditioned on the earlier steps.
    reasoning = calls(model, "reason")
    assert len(reasoning) == 4 * 3
    assert sorted(sum(m.type == "ai" for m in c) for c in reasoning) == [0] * 4 + [1] * 4 + [2] * 4
    # One scoring call holds all four paths, the ground truth and the image.
    (scoring,) = calls(model, "score")
    text = str(scoring[-1].content)
    assert all(f"=== Path {i} ===" in text for i in range(1, 5))
    assert "Ground-truth answer: 3" in text and "image_url" in str(scoring[-1].content)
    assert "4 reasoning paths" in str(scoring[0].content)


def test_rule_check_decides_without_the_judge() -> None:
    model = ScriptedChatModel([teacher(answer="(B) two")], cycle=True)
    judge = ScriptedChatModel([json.dumps({"correct": False, "reason": "no"})], cycle=True)
    graph = create_synthesis_graph(teacher=model, judge=judge, paths=2).compile()
    out = graph.invoke({**ITEM, "answer": "B", "choices": ["one", "two", "three"]})
    assert [p["check"]["method"] for p in out["paths"]] == ["choice", "choice"]
    assert all(p["check"]["correct"] for p in out["paths"])
    assert judge.calls == []
    # The options reach the teacher, lettered.
    assert "(B) two" in str(calls(model, "reason")[0][1].content)


def test_judge_decides_only_what_the_rules_cannot() -> None:
    model = ScriptedChatModel([teacher(answer="three dots in a row")], cycle=True)
    judge = ScriptedChatModel([json.dumps({"correct": True, "reason": "same count"})],
                              cycle=True)
    graph = create_synthesis_graph(teacher=model, judge=judge, paths=2).compile()
    out = graph.invoke({**ITEM, "answer": "3 dots"})
    assert len(judge.calls) == 2
    assert "Answer to check: three dots in a row" in str(judge.calls[0][-1].content)
    assert all(p["check"] == {"correct": True, "method": "judge", "detail": "same count"}
               for p in out["paths"])


def test_without_a_judge_undecided_answers_stay_undecided() -> None:
    model = ScriptedChatModel([teacher(answer="three dots in a row")], cycle=True)
    out = create_synthesis_graph(teacher=model, paths=1).compile().invoke(
        {**ITEM, "answer": "3 dots"})
    assert out["paths"][0]["check"]["correct"] is None
    assert out["paths"][0]["check"]["method"] == "undecided"


def test_a_wrong_answer_is_checked_false() -> None:
    model = ScriptedChatModel([teacher(answer="5")], cycle=True)
    out = create_synthesis_graph(teacher=model, paths=1).compile().invoke(ITEM)
    assert out["paths"][0]["check"]["correct"] is False


def test_garbage_path_is_recorded_failed_and_not_scored() -> None:
    good = teacher(steps=1, scores=[77])

    def reply(messages: list[Any]) -> str:
        # The teacher writes garbage for this question only.
        if role_of(messages) == "reason" and "PATH-GARBAGE" in str(messages[1].content):
            return "I refuse to write JSON."
        return good(messages)

    model = ScriptedChatModel([reply], cycle=True)
    graph = create_synthesis_graph(teacher=model, paths=1, max_retries=1).compile()
    bad = graph.invoke({**ITEM, "question": "PATH-GARBAGE how many?"})
    (path,) = bad["paths"]
    assert path["status"] == "failed" and path["steps"] == [] and path["answer"] == ""
    assert path["failures"][0]["kind"] == "unparsable"
    assert path["failures"][0]["attempts"] == 2
    assert path["score"] is None and "failed" in path["comment"]
    assert calls(model, "score") == []  # nothing to score
    good_out = graph.invoke(ITEM)
    assert good_out["paths"][0]["score"] == 77


def test_failed_paths_are_left_out_of_the_scoring_prompt() -> None:
    state = {"n": 0}
    good = teacher(steps=1, scores=[61, 62])

    def reply(messages: list[Any]) -> str:
        if role_of(messages) == "answer":
            state["n"] += 1
            if state["n"] == 2:
                return "{}"  # one path never gives a readable final answer
        return good(messages)

    model = ScriptedChatModel([reply], cycle=True)
    out = create_synthesis_graph(teacher=model, paths=3, max_retries=0).compile().invoke(ITEM)
    statuses = [p["status"] for p in out["paths"]]
    assert statuses.count("failed") == 1 and statuses.count("ok") == 2
    (scoring,) = calls(model, "score")
    assert str(scoring[-1].content).count("=== Path ") == 2
    assert sorted(p["score"] for p in out["paths"] if p["status"] == "ok") == [61, 62]


def test_long_paths_are_cut_in_the_scoring_request() -> None:
    base = teacher(steps=3)

    def reply(messages: list[Any]) -> str:
        if role_of(messages) == "reason":
            done = sum(1 for m in messages if m.type == "ai")
            return step(f"s{done + 1}", "x" * 5000, "summary" if done == 2 else "continue")
        return base(messages)

    model = ScriptedChatModel([reply], cycle=True)
    out = create_synthesis_graph(teacher=model, paths=4).compile().invoke(ITEM)
    assert [len(p["steps"]) for p in out["paths"]] == [3] * 4  # the paths keep every step
    (scoring,) = calls(model, "score")
    text = scoring[-1].content[-1]["text"]
    assert text.count("characters cut]") == 4 and len(text) < 4 * 6200
    assert [p["score"] for p in out["paths"]] == [50, 51, 52, 53]


@pytest.mark.parametrize(("reply", "expected"), [
    ('{"scores": [{"path": 2, "score": 80, "comment": "b"}]}', [None, 80, None]),
    ('{"scores": [10, 20, 30, 40, 50]}', [10, 20, 30]),
    ('{"scores": [{"path": 1, "score": 150}, {"path": 1, "score": 5}, {"path": 9, "score": 5},'
     ' {"path": 3, "score": "42"}]}', [100, None, 42]),
    ('Scores: [{"score": 0.4}, {"score": 99.6}, {"score": -3}]', [1, 100, 1]),
])
def test_score_parsing_is_robust_to_missing_and_extra_scores(reply: str,
                                                             expected: list[int | None]) -> None:
    assert [s["score"] for s in parse_scores(reply, 3)] == expected


def test_a_scorer_reply_with_missing_scores_leaves_those_paths_unscored() -> None:
    base = teacher(steps=1)

    def reply(messages: list[Any]) -> str:
        if role_of(messages) == "score":
            return '{"scores": [{"path": 1, "score": 33, "comment": "only one"}]}'
        return base(messages)

    model = ScriptedChatModel([reply], cycle=True)
    out = create_synthesis_graph(teacher=model, paths=2).compile().invoke(ITEM)
    assert [p["score"] for p in out["paths"]] == [33, None]
    assert "no score" in out["paths"][1]["comment"]
    assert out["scoring_failures"] == []


def test_an_unreadable_scorer_is_a_recorded_failure() -> None:
    base = teacher(steps=1)

    def reply(messages: list[Any]) -> str:
        return "no idea" if role_of(messages) == "score" else base(messages)

    model = ScriptedChatModel([reply], cycle=True)
    out = create_synthesis_graph(teacher=model, paths=2, max_retries=1).compile().invoke(ITEM)
    assert [p["score"] for p in out["paths"]] == [None, None]
    (failure,) = out["scoring_failures"]
    assert failure["node"] == "score" and failure["attempts"] == 2


def test_a_separate_scorer_model_and_a_custom_scorer() -> None:
    model = ScriptedChatModel([teacher(steps=2)], cycle=True)
    scorer = ScriptedChatModel([teacher(scores=[12, 34])], cycle=True)
    out = create_synthesis_graph(teacher=model, scorer=scorer, paths=2).compile().invoke(ITEM)
    assert [p["score"] for p in out["paths"]] == [12, 34]
    assert calls(model, "score") == [] and len(scorer.calls) == 1

    class LengthScorer:
        name = "length"

        def __init__(self) -> None:
            self.requests: list[ScoreRequest] = []

        def score_paths(self, request: ScoreRequest) -> list[PathScore]:
            self.requests.append(request)
            return [{"score": 10 * len(p["steps"]), "comment": "by length"}
                    for p in request["paths"]]

    custom = LengthScorer()
    out = create_synthesis_graph(teacher=model, scorer=custom, paths=2).compile().invoke(ITEM)
    assert [p["score"] for p in out["paths"]] == [20, 20]
    assert len(custom.requests) == 1 and custom.requests[0]["truth"] == "3"


def test_rule_scorer_ranks_correct_and_detailed_paths_higher() -> None:
    def path(correct: bool | None, steps: int) -> Any:
        return {"index": 0, "status": "ok", "answer": "x", "score": None, "comment": "",
                "failures": [], "seconds": 0.0,
                "check": {"correct": correct, "method": "number", "detail": ""},
                "steps": [{"summary": "s", "reasoning": "r" * 200, "action": "continue"}] * steps}

    scores = RuleScorer().score_paths({"question": "q", "truth": "t", "images": [], "paths": [
        path(True, 6), path(True, 1), path(None, 3), path(False, 6)]})
    values = [s["score"] or 0 for s in scores]
    assert values[0] > values[1] > values[2] > values[3]
    assert all(1 <= v <= 100 for v in values)


@pytest.mark.parametrize(("item", "field"), [
    ({"image": png_bytes(), "question": "q"}, "answer"),
    ({"image": png_bytes(), "question": "q", "answer": "  "}, "answer"),
    ({"image": png_bytes(), "question": "", "answer": "1"}, "question"),
    ({"image": b"not an image", "question": "q", "answer": "1"}, "image"),
    ({"image": png_bytes(), "question": "q", "answer": "1", "choices": "AB"}, "choices"),
    ({"image": png_bytes(), "question": "q", "answer": "1", "choices": []}, "choices"),
])
def test_bad_items_fail_before_any_model_call(item: dict[str, Any], field: str) -> None:
    model = ScriptedChatModel([teacher()], cycle=True)
    with pytest.raises(InvalidInputError) as caught:
        create_synthesis_graph(teacher=model, paths=2).compile().invoke(item)
    assert caught.value.field == field
    assert model.calls == []


def test_step_cap_still_asks_for_the_final_answer() -> None:
    model = ScriptedChatModel([teacher(steps=99)], cycle=True)
    out = create_synthesis_graph(teacher=model, paths=1, max_steps=3).compile().invoke(ITEM)
    (path,) = out["paths"]
    assert len(path["steps"]) == 3 and path["status"] == "ok" and path["answer"] == "3"
    assert path["failures"][0]["kind"] == "step_cap"


async def test_async_run_and_teacher_from_the_run_context() -> None:
    from dataclasses import dataclass

    @dataclass
    class Context:
        teacher: Any = None

    built_with = ScriptedChatModel([teacher()], cycle=True)
    swapped = ScriptedChatModel([teacher(answer="4", scores=[5, 6])], cycle=True)
    graph = create_synthesis_graph(teacher=built_with, paths=2).compile()
    out = await graph.ainvoke(ITEM, context=Context(teacher=swapped))
    assert built_with.calls == []
    assert [p["answer"] for p in out["paths"]] == ["4", "4"]
    assert [p["score"] for p in out["paths"]] == [5, 6]
    assert all(p["check"]["correct"] is False for p in out["paths"])


def test_parallel_paths_stream_their_steps() -> None:
    model = ScriptedChatModel([teacher(steps=2)], cycle=True)
    graph = create_synthesis_graph(teacher=model, paths=3).compile()
    events = [chunk for chunk in graph.stream(ITEM, stream_mode="custom", subgraphs=True)]
    steps = [event for _, event in events if event.get("event") == "step"]
    assert len(steps) == 6


def test_stated_final_answer_is_read_from_the_last_step_without_a_model_call() -> None:
    from insightv_agents.errors import ConfigError

    chains = [step("Count the dots", "One, two, three.") + "\n"
              + step("Give the count", "The answer is 3.", "summary"),
              step("Count the dots", "One, two.") + "\n"
              + step("Give the count", "So two.", "summary")]  # states no answer
    model = ScriptedChatModel(chains)
    graph = create_synthesis_graph(teacher=model, scorer=RuleScorer(), mode="chain", paths=2,
                                   final_answer="stated").compile()
    out = graph.invoke(ITEM, {"max_concurrency": 1})
    by_answer = sorted(out["paths"], key=lambda path: path["answer"])
    assert [(p["status"], p["answer"]) for p in by_answer] == [("failed", ""), ("ok", "3")]
    assert by_answer[1]["check"]["correct"] is True
    assert [role_of(messages) for messages in model.calls] == ["reason", "reason"]
    with pytest.raises(ConfigError, match="summarizer"):
        create_synthesis_graph(teacher=model, summarizer=model, final_answer="stated")
    with pytest.raises(ConfigError, match="final_answer"):
        create_synthesis_graph(teacher=model, final_answer="verdict")  # type: ignore[arg-type]
