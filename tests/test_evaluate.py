"""The evaluation harness, with scripted models: known numbers, resume, reports, CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from insightv_research.shapes import SceneIndex, make_dataset, parse_question, plan_path
from insightv_research.shapes.questions import ANSWER_RULES
from insightv_research.shapes.scenes import image_key
from insightv_research.shapes.scorer import reasoning_check
from langchain_core.messages import BaseMessage

from insightv_agents import ConfigError, InvalidInputError, create_insightv_graph
from insightv_agents.answers import AnswerRules
from insightv_agents.evaluate import (
    DatasetChecks,
    accuracy_interval,
    chain_predictor,
    compare_predictions,
    direct_predictor,
    evaluate,
    graph_predictor,
    sign_test,
)
from insightv_agents.images import data_url_bytes
from insightv_agents.parsing import format_chain, format_verdict
from insightv_agents.prompts import DEFAULT_PROMPTS
from insightv_agents.records import read_records
from insightv_agents.synthesize import load_items
from insightv_agents.testing import ScriptedChatModel

SIZES = {"test": 30}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eval") / "shapes", sizes=SIZES, seed=7)


def agents(data: Path) -> ScriptedChatModel:
    """A reasoning + summary fake that knows each image's row: sound reasoning everywhere but
    on compare questions (where it states nothing); the summary answers right on perception,
    count and compare questions (flagging the compare reasoning) and wrongly elsewhere."""
    index = SceneIndex.from_folder(data)
    by_image = {}
    for line in (data / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_image[image_key(data / row["image"])] = row

    def row_of(messages: list[BaseMessage]) -> dict[str, Any]:
        part = next(p for p in messages[1].content if p["type"] == "image_url")
        return by_image[image_key(data_url_bytes(part["image_url"]["url"]))]

    def reply(messages: list[BaseMessage]) -> str:
        row = row_of(messages)
        if messages[0].content == DEFAULT_PROMPTS.summary_system:
            right = row["category"] in ("perception", "count", "compare")
            return format_verdict({"reasoning_correct": row["category"] != "compare",
                                   "critique": "", "answer": row["answer"] if right else "purple"})
        if row["category"] == "compare":
            return json.dumps({"summary": "Guess", "reasoning": "It looks like 3 > 5.",
                               "action": "summary"})
        scene = index.lookup(data / row["image"])
        return format_chain(plan_path(scene, parse_question(row["question"])).steps)

    return ScriptedChatModel([reply], cycle=True)


def run(predict: Any, data: Path, out: Path, **kwargs: Any) -> dict[str, Any]:
    items, _ = load_items(data / "test.jsonl")
    return asyncio.run(evaluate(predict, items, out, concurrency=4, **kwargs))


def test_insightv_known_numbers_recovery_and_reports(data: Path, tmp_path: Path) -> None:
    model = agents(data)
    graph = create_insightv_graph(reasoner=model, summarizer=model, mode="chain").compile()
    report = run(graph_predictor(graph), data, tmp_path / "out", settings={"method": "insightv"},
                 reasoning_check=reasoning_check(SceneIndex.from_folder(data)))
    accuracy = report["accuracy"]
    assert next(iter(accuracy)) == "all" and accuracy["all"]["n"] == 30
    assert accuracy["all"]["correct"] == 18 and accuracy["all"]["accuracy"] == pytest.approx(0.6)
    for category, expected in [("perception", 1.0), ("count", 1.0), ("compare", 1.0),
                               ("arithmetic", 0.0), ("spatial", 0.0)]:
        assert accuracy[category] == {"n": 6, "correct": int(6 * expected),
                                      "accuracy": expected, "interval": pytest.approx(
                                          list(accuracy_interval(int(6 * expected), 6)))}
    assert report["flawed_reasoning"] == {"items": 6, "answer_right": 6, "flagged": 6,
                                          "recovery_rate": 1.0}
    # the compare chains state no answer; the others are right, kept on perception and count
    # questions and replaced by "purple" on arithmetic and spatial ones
    assert report["summary_agent"] == {"chains": 24, "chain_right": 24, "kept": 12, "lost": 12,
                                       "fixed": 0}
    assert report["failed"] == 0 and report["undecided"] == 12  # "purple": no rule decides
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["accuracy"] == accuracy and saved["settings"] == {"method": "insightv"}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| all | 30 | 18 | 60.0% | 42.3-75.4% |" in markdown
    assert "| compare | 6 | 6 | 100.0% | 61.0-100.0% |" in markdown
    assert "kept the stated answer 12 times, lost 12 right ones and fixed 0" in markdown
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all({"reasoning", "verdict", "answer", "truth", "check", "steps"}
                                   <= set(row) for row in rows)
    assert "base64" not in (tmp_path / "out" / "predictions.jsonl").read_text()


def test_a_run_over_ray_is_resumed_without_it(data: Path, tmp_path: Path) -> None:
    """Predictions a Ray run left in its workers' shards are merged in, not made again."""
    model = ScriptedChatModel([lambda m: "The answer is 1."], cycle=True)
    out = tmp_path / "out"
    items, _ = load_items(data / "test.jsonl")
    asyncio.run(evaluate(direct_predictor(model), items[:10], out, settings={"m": "direct"}))
    (out / "predictions.jsonl").rename(out / "predictions.3.jsonl")  # as a worker left it
    report = asyncio.run(evaluate(direct_predictor(model), items, out, settings={"m": "direct"}))
    assert len(model.calls) == 30 and report["items"] == 30
    assert not (out / "predictions.3.jsonl").exists()
    assert len(list(read_records(out / "predictions.jsonl"))) == 30


def test_resume_skips_done_items_and_other_settings_are_refused(data: Path,
                                                                tmp_path: Path) -> None:
    model = ScriptedChatModel([lambda m: "The answer is 1."], cycle=True)
    out = tmp_path / "out"
    items, _ = load_items(data / "test.jsonl")
    asyncio.run(evaluate(direct_predictor(model), items[:10], out, settings={"m": "direct"}))
    with (out / "predictions.jsonl").open("ab") as handle:
        handle.write(b'{"id": "test-00010", "rec')  # a write cut short by a crash
    report = asyncio.run(evaluate(direct_predictor(model), items, out, settings={"m": "direct"}))
    assert len(model.calls) == 30 and report["items"] == 30
    again = asyncio.run(evaluate(direct_predictor(model), items, out, settings={"m": "direct"}))
    assert len(model.calls) == 30 and again["accuracy"] == report["accuracy"]
    expected = sum(item.answer == "1" for item in items)
    assert report["accuracy"]["all"]["correct"] == expected
    with pytest.raises(InvalidInputError, match="other settings"):
        asyncio.run(evaluate(direct_predictor(model), items, out, settings={"m": "other"}))


def test_direct_reads_the_answer_from_free_text_and_a_failing_backend_is_one_item(
        data: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    answers = {image_key(data / row["image"]): row["answer"] for row in rows}
    calls = {"n": 0}

    def reply(messages: list[BaseMessage]) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("backend went away")
        url = next(p["image_url"]["url"] for p in messages[0].content if p["type"] != "text")
        return f"Looking at the picture.\nSo the answer is {answers[image_key(url)]}."

    report = run(direct_predictor(ScriptedChatModel([reply], cycle=True)), data, tmp_path / "o")
    assert report["failed"] == 1 and report["accuracy"]["all"]["correct"] == 29
    failed = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text()
              .splitlines() if json.loads(line)["status"] == "failed"]
    assert "backend went away" in failed[0]["failures"][0]["error"]


def test_chain_reads_the_answer_from_the_reasoners_last_step(data: Path, tmp_path: Path) -> None:
    model = agents(data)
    report = run(chain_predictor(model), data, tmp_path / "o",
                 reasoning_check=reasoning_check(SceneIndex.from_folder(data)))
    # Sound chains everywhere but on compare questions, where the last step states no answer.
    assert report["accuracy"]["all"]["correct"] == 24
    assert report["accuracy"]["compare"]["correct"] == 0
    assert report["flawed_reasoning"]["items"] == 6
    assert report["flawed_reasoning"]["answer_right"] == 0
    assert all(call[0].content == DEFAULT_PROMPTS.reasoning_chain_system
               for call in model.calls)  # the reasoning agent's chain prompt, nothing else
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text()
            .splitlines()]
    assert all(row["steps"] and row["response"] for row in rows)


def test_a_closed_answer_set_decides_wrong_labels(data: Path, tmp_path: Path) -> None:
    """With the shapes world's labels a wrong colour, size or kind is wrong, not undecided;
    the accuracy is the same either way."""
    model = ScriptedChatModel([lambda m: "The answer is red."], cycle=True)
    items, _ = load_items(data / "test.jsonl")
    plain = asyncio.run(evaluate(direct_predictor(model), items, tmp_path / "plain"))
    closed = asyncio.run(evaluate(direct_predictor(model), items, tmp_path / "closed",
                                  rules=ANSWER_RULES))
    wrong = sum(item.answer != "red" for item in items)  # numbers, yes/no, other words
    assert plain["undecided"] == wrong > 0 and closed["undecided"] == 0
    assert closed["accuracy"] == plain["accuracy"]
    assert closed["accuracy"]["all"]["correct"] == sum(item.answer == "red" for item in items)


def test_cli_eval_needs_a_model_and_checks_the_data_first(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from insightv_agents.cli import app

    monkeypatch.setattr("insightv_agents.demo.demo_available", lambda: False)
    result = CliRunner().invoke(app, ["eval", "--data", str(data / "test.jsonl"), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs a model" in result.output
    (tmp_path / "bad.jsonl").write_text('{"image": "nope.png", "question": "q", "answer": "1"}\n')
    result = CliRunner().invoke(app, ["eval", "--data", str(tmp_path / "bad.jsonl"), "--out",
                                      str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/v1"])
    assert result.exit_code == 2 and "1 bad item(s)" in result.output
    result = CliRunner().invoke(app, ["eval", "--data", str(data / "test.jsonl"), "--out",
                                      str(tmp_path / "o"), "--method", "magic"])
    assert result.exit_code == 2 and "--method" in result.output
    result = CliRunner().invoke(app, ["eval", "--data", str(data / "test.jsonl"), "--out",
                                      str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/v1",
                                      "--labels", " , "])
    assert result.exit_code == 2 and "--labels names no answer" in result.output


def test_cli_labels_give_the_closed_answer_set() -> None:
    from insightv_agents.methods import answer_rules as _answer_rules

    assert _answer_rules(" Yes, no ,,red").labels == {"yes", "no", "red"}
    assert _answer_rules(None) is None


SHAPES_CHECKS = "insightv_research.shapes.checks:for_dataset"
PLAIN_CHECKS = DatasetChecks(rules=AnswerRules(labels=frozenset({"a", "b"})))


def test_a_dataset_brings_its_checks_by_name(data: Path, tmp_path: Path) -> None:
    from insightv_agents.evaluate import load_checks

    shapes = load_checks(SHAPES_CHECKS, data)  # a function of the data folder
    assert shapes.rules is ANSWER_RULES and shapes.reasoning_check is not None
    by_name = load_checks("shapes", data)  # the research package's entry point
    assert by_name.rules is ANSWER_RULES and by_name.reasoning_check is not None
    (tmp_path / "data.jsonl").write_text("")
    assert load_checks(SHAPES_CHECKS, tmp_path).reasoning_check is None  # no scenes.jsonl
    assert load_checks(f"{__name__}:PLAIN_CHECKS", tmp_path) is PLAIN_CHECKS  # an object
    for bad, problem in [("no_such_module_xyz:f", "cannot load"),
                         (f"{__name__}:missing", "cannot load"),
                         ("no-such-entry-point", "no checks named"),
                         (f"{__name__}:SHAPES_CHECKS", "not DatasetChecks")]:
        with pytest.raises(ConfigError, match=problem):
            load_checks(bad, tmp_path)


def test_cli_eval_refuses_checks_it_cannot_load_before_any_model_call(
        data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from insightv_agents.cli import app

    result = CliRunner().invoke(app, ["eval", "--data", str(data / "test.jsonl"), "--out",
                                      str(tmp_path / "o"), "--base-url", "http://127.0.0.1:9/v1",
                                      "--checks", "no_such_module_xyz:checks"])
    assert result.exit_code == 2 and "cannot load the checks" in result.output


def test_two_evaluations_compared_question_by_question(data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from insightv_agents.cli import app

    def answering(right: Callable[[str], bool]) -> Any:
        async def predict(item: Any) -> dict[str, Any]:
            return {"answer": item.answer if right(item.category) else "purple", "status": "ok"}
        return predict

    # the first is right on perception and count questions, the second on count and compare
    run(answering(lambda c: c in ("perception", "count")), data, tmp_path / "first")
    run(answering(lambda c: c in ("count", "compare")), data, tmp_path / "second")
    items, _ = load_items(data / "test.jsonl")
    per = {c: sum(item.category == c for item in items) for c in ("perception", "count",
                                                                  "compare")}
    paired = compare_predictions(tmp_path / "first", tmp_path / "second")
    assert (paired.items, paired.both_right, paired.only_first, paired.only_second,
            paired.both_wrong) == (30, per["count"], per["perception"], per["compare"],
                                   30 - sum(per.values()))
    assert paired.difference == pytest.approx((per["perception"] - per["compare"]) / 30)
    assert paired.p_value == sign_test(per["perception"], per["compare"])
    only = compare_predictions(tmp_path / "first" / "predictions.jsonl", tmp_path / "second",
                               categories=["perception"])
    assert (only.items, only.only_first, only.only_second, only.p_value) == (
        per["perception"], per["perception"], 0, sign_test(per["perception"], 0))
    with pytest.raises(InvalidInputError, match="no evaluated item"):
        compare_predictions(tmp_path / "first", tmp_path / "second", categories=["colour"])
    with pytest.raises(InvalidInputError, match="no predictions"):
        compare_predictions(tmp_path / "first", tmp_path / "nothing")
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "first"),
                                      str(tmp_path / "second"), "--category", "perception"])
    assert result.exit_code == 0 and f"{per['perception']} items: both right 0" in result.output
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "first"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "no predictions" in result.output


def test_the_chains_stated_answers_compared_apart_from_the_final_ones(data: Path,
                                                                     tmp_path: Path) -> None:
    """``stated=True`` compares what the reasoning chains concluded, not what the summary
    agents answered: here the final answers are all right in both, the chains are not."""
    from typer.testing import CliRunner

    from insightv_agents.cli import app

    def two_agents(chain_right: Callable[[str], bool], states: bool = True) -> Any:
        async def predict(item: Any) -> dict[str, Any]:
            stated = item.answer if chain_right(item.category) else "purple"
            return {"answer": item.answer, "status": "ok",
                    "steps": [{"summary": "Conclude", "action": "conclude",
                               "reasoning": f"The answer is {stated}." if states
                               else "Nothing to conclude."}],
                    "verdict": {"reasoning_correct": True, "critique": "",
                                "answer": item.answer}}
        return predict

    run(two_agents(lambda c: c in ("perception", "count")), data, tmp_path / "first")
    run(two_agents(lambda c: c == "count"), data, tmp_path / "second")
    run(answering_right(), data, tmp_path / "direct")
    count = sum(item.category == "count" for item in load_items(data / "test.jsonl")[0])
    perception = sum(item.category == "perception"
                     for item in load_items(data / "test.jsonl")[0])
    final = compare_predictions(tmp_path / "first", tmp_path / "second")
    assert (final.both_right, final.only_first, final.only_second) == (30, 0, 0)
    chains = compare_predictions(tmp_path / "first", tmp_path / "second", stated=True)
    assert (chains.items, chains.both_right, chains.only_first, chains.only_second,
            chains.both_wrong) == (30, count, perception, 0, 30 - count - perception)
    assert chains.p_value == sign_test(perception, 0)
    run(two_agents(lambda c: True, states=False), data, tmp_path / "silent")
    silent = compare_predictions(tmp_path / "first", tmp_path / "silent", stated=True)
    assert (silent.only_first, silent.only_second) == (count + perception, 0)  # none stated
    with pytest.raises(InvalidInputError, match="not an evaluation of a reasoning agent"):
        compare_predictions(tmp_path / "first", tmp_path / "direct", stated=True)

    async def alone(item: Any) -> dict[str, Any]:  # a reasoning agent answering alone
        answer = item.answer if item.category == "count" else "purple"
        return {"answer": answer, "status": "ok", "steps": [
            {"summary": "Conclude", "action": "conclude",
             "reasoning": f"The answer is {answer}."}]}

    run(alone, data, tmp_path / "alone")
    versus = compare_predictions(tmp_path / "first", tmp_path / "alone", stated=True)
    assert (versus.both_right, versus.only_first, versus.only_second) == (count, perception, 0)
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "first"),
                                      str(tmp_path / "second"), "--stated"])
    output = result.output.replace("\n", "")
    assert result.exit_code == 0 and f"only {tmp_path / 'first'} {perception}," in output
    assert "(the answers their chains stated)" in " ".join(result.output.split())


def answering_right() -> Any:
    async def predict(item: Any) -> dict[str, Any]:
        return {"answer": item.answer, "status": "ok"}
    return predict


def test_the_accuracy_interval_is_wilsons() -> None:
    """Reference values of the Wilson score interval (95%)."""
    assert accuracy_interval(18, 30) == pytest.approx((0.4232, 0.7541), abs=1e-4)
    assert accuracy_interval(21, 60) == pytest.approx((0.2417, 0.4764), abs=1e-4)
    assert accuracy_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert accuracy_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert accuracy_interval(0, 0) == (0.0, 1.0)
    # four times the items, half the width
    low, high = accuracy_interval(21, 60)
    low4, high4 = accuracy_interval(84, 240)
    assert (high4 - low4) == pytest.approx((high - low) / 2, rel=0.05)


def test_the_sign_test_is_exact() -> None:
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test(12, 7) == pytest.approx(0.3593, abs=1e-4)
