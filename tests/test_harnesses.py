"""Our methods inside the evaluation harnesses, with a scripted OpenAI-compatible server: the
answers the harness models give (the form scorers read), their logs and resumption, their
failures, and VLMEvalKit's interface driven as its inference loop drives it
(tests/vlmevalkit_like.py) giving the answers `insightv eval` gives on the same items. The
real lmms-eval command line is in test_lmms_eval.py."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import vlmevalkit_like as vlmeval
from helpers import FakeOpenAIServer, Refusal, png_bytes
from typer.testing import CliRunner

from insightv_agents.answers import match_answer
from insightv_agents.cli import app
from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.harnesses.agent import (
    HarnessAgent,
    HarnessQuestion,
    HarnessSettings,
    benchmark_answer,
    prompt_options,
)
from insightv_agents.harnesses.vlmevalkit import REGISTRATION, InsightVModel
from insightv_agents.images import data_url_bytes
from insightv_agents.parsing import format_chain, format_verdict
from insightv_agents.prompts import DEFAULT_PROMPTS

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def key(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


class Agents:
    """The two agents on the wire: each picture has the answer they give (the truth on
    even items, a wrong one on odd items); counts requests and the most in flight."""

    def __init__(self, says: dict[str, str], delay: float = 0.0) -> None:
        self.says, self.delay = says, delay
        self.in_flight = self.most = self.requests = 0
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str | Refusal:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(self.delay)
            messages = body["messages"]
            url = next(part["image_url"]["url"] for message in messages
                       if isinstance(message["content"], list)
                       for part in message["content"] if part["type"] == "image_url")
            said = self.says.get(key(data_url_bytes(url)))
            if said is None:
                return Refusal(400, "unknown picture")
            if messages[0]["content"] == DEFAULT_PROMPTS.summary_system:
                return format_verdict({"reasoning_correct": True, "critique": "",
                                       "answer": said})
            return format_chain([
                {"summary": "Look", "reasoning": "I look at the picture.", "action": "continue"},
                {"summary": "Answer", "reasoning": f"The answer is {said}.",
                 "action": "summary"}])
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def items(tmp_path: Path) -> dict[str, Any]:
    """Eight items, each its own picture: four free-form, four multiple-choice (answer given
    as the letter); the agents are right on the even ones."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows, says = [], {}
    for index, color in enumerate(COLORS):
        image = png_bytes((20 + index, 16), color)
        (folder / f"{index}.png").write_bytes(image)
        truth = str(index + 2)
        row: dict[str, Any] = {"id": f"q{index}", "image": f"{index}.png",
                               "question": f"How many {color} cells are there?"}
        if index < 4:
            row["answer"] = truth
        else:
            row["choices"] = [str(index + 1), truth, str(index + 3)]
            row["answer"] = "B"
        says[key(image)] = truth if index % 2 == 0 else "99"
        rows.append(row)
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"folder": folder, "rows": rows, "says": says}


def insightv_eval(items: dict[str, Any], url: str, out: Path) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(app, ["eval", "--data", str(items["folder"] / "items.jsonl"),
                                      "--out", str(out), "--base-url", url])
    assert result.exit_code == 0, result.output
    return {row["id"]: row for row in map(json.loads, (out / "predictions.jsonl").open())}


def benchmarks(items: dict[str, Any], root: Path) -> tuple[vlmeval.Dataset, vlmeval.Dataset]:
    """The items as VLMEvalKit benchmarks: a multiple-choice one and a free-form one."""
    mcq, vqa = [], []
    for index, row in enumerate(items["rows"]):
        image = (items["folder"] / row["image"]).read_bytes()
        if "choices" in row:
            mcq.append(vlmeval.row(index, row["question"], row["answer"], image, row["choices"]))
        else:
            vqa.append(vlmeval.row(index, row["question"], row["answer"], image))
    return (vlmeval.Dataset("ShapesMCQ", vlmeval.MCQ, mcq, root),
            vlmeval.Dataset("ShapesVQA", vlmeval.VQA, vqa, root))


def scored(dataset: vlmeval.Dataset, predictions: dict[int, str]) -> dict[int, bool]:
    """Right or wrong as VLMEvalKit's scorers read them: the option letter for a
    multiple-choice item, the short answer for a free-form one."""
    return {line["index"]: predictions[line["index"]] == line["answer"]
            if dataset.kind == vlmeval.MCQ
            else match_answer(predictions[line["index"]], line["answer"])["correct"] is True
            for line in dataset.rows}


def test_vlmevalkit_messages_give_insightv_evals_answers(items: dict[str, Any],
                                                         tmp_path: Path) -> None:
    with FakeOpenAIServer(Agents(items["says"])) as server:
        expected = insightv_eval(items, server.url, tmp_path / "eval")
        model = InsightVModel(base_url=server.url, log_dir=str(tmp_path / "logs"))
        mcq, vqa = benchmarks(items, tmp_path / "LMUData")
        predictions = {**vlmeval.infer(model, mcq), **vlmeval.infer(model, vqa)}
        right = {**scored(mcq, predictions), **scored(vqa, predictions)}
        model.close()
    for index, row in enumerate(items["rows"]):
        ours = expected[row["id"]]
        assert right[index] is ours["correct"], (row, predictions[index], ours)
        if "choices" in row:  # the option letter, for the agents' answer of its text
            assert predictions[index] == ("B" if index % 2 == 0 else "99")
        else:
            assert predictions[index] == ours["answer"]
    assert sum(right.values()) == 4 == sum(row["correct"] for row in expected.values())
    logged = [json.loads(line) for line in (tmp_path / "logs" / "ShapesMCQ" /
                                            "predictions.jsonl").open()]
    assert len(logged) == 4 and all(len(row["steps"]) == 2 and row["verdict"] for row in logged)
    assert {row["agent_answer"] for row in logged} == {"6", "8", "99"}  # before the letter
    assert "base64" not in (tmp_path / "logs" / "ShapesMCQ" / "predictions.jsonl").read_text()


def test_vlmevalkits_own_prompts_give_the_same_answers(items: dict[str, Any],
                                                       tmp_path: Path) -> None:
    with FakeOpenAIServer(Agents(items["says"])) as server:
        ours = InsightVModel(base_url=server.url)
        theirs = InsightVModel(base_url=server.url, custom_prompt=False)
        for dataset in benchmarks(items, tmp_path / "LMUData"):
            assert vlmeval.infer(ours, dataset) == vlmeval.infer(theirs, dataset)
            prompt = dataset.build_prompt(dataset.rows[0])[-1]["value"]
            assert ("Please select" in prompt) is (dataset.kind == vlmeval.MCQ)
        ours.close()
        theirs.close()


def test_a_rerun_into_the_same_log_asks_no_model_and_other_settings_are_refused(
        items: dict[str, Any], tmp_path: Path) -> None:
    agents = Agents(items["says"])
    with FakeOpenAIServer(agents) as server:
        mcq, _ = benchmarks(items, tmp_path / "LMUData")
        first = InsightVModel(base_url=server.url, log_dir=str(tmp_path / "logs"))
        answers = vlmeval.infer(first, mcq)
        first.close()
        asked = agents.requests
        again = InsightVModel(base_url=server.url, log_dir=str(tmp_path / "logs"))
        assert vlmeval.infer(again, mcq) == answers and agents.requests == asked
        again.close()
        other = InsightVModel(base_url=server.url, log_dir=str(tmp_path / "logs"), mode="step")
        with pytest.raises(InvalidInputError, match="other settings"):
            vlmeval.infer(other, mcq)
        other.close()


def test_questions_are_asked_concurrently_within_the_limit_in_order(
        items: dict[str, Any]) -> None:
    agents = Agents(items["says"], delay=0.2)
    with FakeOpenAIServer(agents) as server:
        agent = HarnessAgent(HarnessSettings(base_url=(server.url,), concurrency=3),
                             harness="test")
        questions = [HarnessQuestion(id=row["id"], prompt=row["question"],
                                     images=[str(items["folder"] / row["image"])])
                     for row in items["rows"]]
        started = time.perf_counter()
        rows = agent.answer(questions)
        seconds = time.perf_counter() - started
        agent.close()
    assert [row["id"] for row in rows] == [row["id"] for row in items["rows"]]
    assert agents.most == 3  # never more than the limit, and the limit used
    assert seconds < 16 * 0.2 * 0.75  # 16 calls (two agents) of 0.2 s, three at a time


def test_a_failing_question_is_one_failed_answer(items: dict[str, Any], tmp_path: Path) -> None:
    with FakeOpenAIServer(Agents(items["says"])) as server:
        agent = HarnessAgent(HarnessSettings(base_url=(server.url,)), harness="test")
        unknown = tmp_path / "unknown.png"
        unknown.write_bytes(png_bytes((5, 5), "pink"))
        rows = agent.answer([
            HarnessQuestion(id="a", images=[str(unknown)], prompt="Which?"),  # a 400 reply
            HarnessQuestion(id="b", images=[], prompt="Text only?"),
            HarnessQuestion(id="c", images=[str(tmp_path / "missing.png")], prompt="Where?"),
            HarnessQuestion(id="d", images=[str(items["folder"] / "0.png")], prompt="How many?"),
        ])
        agent.close()
    assert [row["status"] for row in rows] == ["failed", "failed", "failed", "ok"]
    assert [row["answer"] for row in rows] == ["", "", "", "2"]
    assert "no image" in rows[1]["failures"][0]["error"]
    with pytest.raises(ConfigError, match="closed"):
        agent.answer([])


def test_bad_settings_are_refused_before_any_model_is_built() -> None:
    with pytest.raises(ConfigError, match="method"):
        HarnessSettings(method="magic")
    with pytest.raises(ConfigError, match="concurrency"):
        HarnessSettings(concurrency=0)
    with pytest.raises(InvalidInputError, match="unexpected keyword"):
        InsightVModel(base_url="http://127.0.0.1:9/v1", colour="red")


def test_the_registration_snippet_names_working_models() -> None:
    guide = Path(__file__).resolve().parents[1] / "docs" / "guides" / "benchmarks.md"
    assert f"```py\n{REGISTRATION}```" in guide.read_text()  # the guide shows these lines
    supported_VLM: dict[str, Any] = {}
    exec(REGISTRATION, {"supported_VLM": supported_VLM})  # as vlmeval/config.py runs it
    assert set(supported_VLM) == {"insightv-demo", "insightv", "llava-cot-beam"}
    for entry in supported_VLM.values():
        assert isinstance(entry, partial) and entry.func is InsightVModel
        settings = dict(entry.keywords)
        urls = settings.pop("base_url", ())
        HarnessSettings(base_url=(urls,) if isinstance(urls, str) else tuple(urls), **settings)


@pytest.mark.parametrize(("answer", "options", "form"), [
    ("B", ["x", "y"], "B"), ("(b)", ["x", "y"], "B"), ("y", ["x", "y"], "B"),
    ("Option A. x", ["x", "y"], "A"), ("z", ["x", "y"], "z"), ("3", [], "3"),
    ("No, it is not", ["Yes", "No"], "B"), ("12 squares", ["10", "12"], "B"),
    ("3.0", [], "3.0"), ("-2.50", [], "-2.50"), ("75%", [], "75"), ("12 apples", [], "12"),
    ("1,000", [], "1000"), ("1,2", [], "1,2"), ("007", [], "007"), ("2nd", [], "2nd"),
    ("B12", [], "B12"), ("mp3", [], "mp3"), ("No 5", [], "No 5"), ("D.C.", [], "D.C"),
    ("3/4", [], "3/4"), ("No.", [], "No"), ("yes, it is", [], "Yes"),
    ("no smoking", [], "no smoking"), ("  a cat. ", [], "a cat"), ("", [], ""),
])
def test_answers_take_the_form_scorers_read(answer: str, options: list[str], form: str) -> None:
    assert benchmark_answer(answer, options) == form


def test_options_are_read_from_every_layout_in_linear_time() -> None:
    assert prompt_options("Q?\nA. one\nB. two\nPlease select.") == ["one", "two"]
    assert prompt_options("Q?\n(A) one\n(B) two\n(C) three") == ["one", "two", "three"]
    assert prompt_options("A) one\nB) two") == ["one", "two"]
    assert prompt_options("Hint: A. is a letter\nQuestion: B. what?") == []  # A then no B
    assert prompt_options("old\nA. x\nB. y\nnew\nA. p\nB. q\nC. r") == ["p", "q", "r"]
    assert prompt_options("Q?\nA. only one") == []
    assert prompt_options("Q? Options: A: 1, B: 2, C: 3\nAnswer with a letter.") == [
        "1", "2", "3"]  # MMStar's layout
    assert prompt_options("Q?\nChoices: (A) red (B) a blue cube") == ["red", "a blue cube"]
    started = time.perf_counter()
    prompt_options(("A. " + " " * 5000 + "\n") * 40 + "B.\t" * 50_000)
    prompt_options("(" * 200_000)
    prompt_options("Options: " + "A: " * 100_000)
    assert time.perf_counter() - started < 1.0
