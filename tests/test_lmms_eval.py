"""Our lmms-eval models (insightv_agents.harnesses.lmms_eval), registered through lmms-eval's
entry point: the real `lmms-eval` command line (from PyPI) on a task of 20 held-out shapes
questions that `insightv lmms-task` writes over a local dataset, with the demo agents
in-process and served by vLLM; the accuracy and every answer are `insightv eval`'s on the
same items. The models' request handling is checked first against a scripted server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import FakeOpenAIServer, insightv_serve, png_bytes
from typer.testing import CliRunner

from insightv_agents.cli import app
from insightv_agents.errors import ConfigError
from insightv_agents.harnesses import lmms_eval_models
from insightv_agents.harnesses.agent import benchmark_answer
from insightv_agents.harnesses.lmms_eval import InsightV, LlavaCoT, _urls
from insightv_agents.parsing import format_chain, format_verdict
from insightv_agents.prompts import DEFAULT_PROMPTS, DEFAULT_STAGE_PROMPTS

LMMS_EVAL = str(Path(sys.executable).parent / "lmms-eval")
STAGES = ("<SUMMARY> Count them. </SUMMARY>\n\n<CAPTION> Shapes. </CAPTION>\n\n<REASONING> "
          "There are three. </REASONING>\n\n<CONCLUSION> {answer} </CONCLUSION>")


def requests(task: str, docs: list[dict[str, Any]]) -> list[Any]:
    """lmms-eval's ``generate_until`` instances for ``docs`` (only ``args`` is read)."""
    return [SimpleNamespace(args=(doc["question"], {"max_new_tokens": 16},
                                  lambda doc: [doc["image"]], index, task, "test"))
            for index, doc in enumerate(docs)]


def wire_agents(body: dict[str, Any]) -> str:
    """Both Insight-V agents and a LLaVA-CoT model, by the system prompt they get."""
    system = body["messages"][0]["content"]
    question = json.dumps(body["messages"])
    answer = "(B) 3" if "(B)" in question else "3"
    if system == DEFAULT_PROMPTS.summary_system:
        return format_verdict({"reasoning_correct": True, "critique": "", "answer": answer})
    if system == DEFAULT_STAGE_PROMPTS.judge_system:
        return "Since the first is clearer, I choose response 1."
    if system == DEFAULT_STAGE_PROMPTS.check_system:
        return "Correct."
    if system == DEFAULT_PROMPTS.reasoning_chain_system:
        return format_chain([{"summary": "Count", "reasoning": f"The answer is {answer}.",
                              "action": "summary"}])
    return STAGES.format(answer=answer)


def test_the_entry_point_names_both_models_and_lmms_eval_loads_them() -> None:
    from lmms_eval.models import get_model

    assert [m.model_id for m in lmms_eval_models()] == ["insightv", "llava_cot"]
    assert get_model("insightv") is InsightV and get_model("llava_cot") is LlavaCoT


def test_requests_are_answered_in_order_grouped_by_task_and_logged(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (24, 16), "red")
    docs = [{"question": "How many?", "image": image},
            {"question": "How many?\nOptions:\n(A) 2\n(B) 3", "image": image}]
    with FakeOpenAIServer(wire_agents) as server:
        model = InsightV(base_url=f"[{server.url}]", concurrency=2, log_dir=str(tmp_path),
                         batch_size=1, device="cpu")  # the last two: lmms-eval's own
        model.task_dict = {"one": {"test": docs}, "two": {"test": docs[::-1]}}
        answers = model.generate_until(requests("one", docs) + requests("two", docs[::-1]))
        cot = LlavaCoT(base_url=server.url, search="stage-beam", beam_size=2)
        cot.task_dict = {"one": {"test": docs}}
        assert cot.generate_until(requests("one", docs)) == ["3", "B"]
        model.clean()
        cot.clean()
    assert answers == ["3", "B", "B", "3"]
    logged = [json.loads(line) for line in (tmp_path / "two" / "predictions.jsonl").open()]
    assert {row["id"] for row in logged} == {"test/0", "test/1"}
    assert all(row["verdict"] and row["steps"] for row in logged)
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["harness"] == "lmms-eval"


def test_bad_model_args_are_refused_before_any_question() -> None:
    with pytest.raises(ConfigError, match="unknown model_args for InsightV: beam_size"):
        InsightV(base_url="http://127.0.0.1:9/v1", beam_size=4)
    with pytest.raises(ConfigError, match="method"):
        LlavaCoT(base_url="http://127.0.0.1:9/v1", search="greedy")
    with pytest.raises(ConfigError, match="concurrency"):
        InsightV(base_url="http://127.0.0.1:9/v1", concurrency=0)
    assert _urls("[http://a:1/v1, http://b:2/v1]") == ("http://a:1/v1", "http://b:2/v1")
    assert _urls("http://a:1/v1") == ("http://a:1/v1",) and _urls(None) == ()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """20 held-out shapes questions and the lmms-eval task over them (`insightv lmms-task`)."""
    from insightv_research.shapes import make_dataset

    folder = tmp_path_factory.mktemp("lmms")
    data = make_dataset(folder / "shapes", sizes={"test": 20}, seed=7) / "test.jsonl"
    written = CliRunner().invoke(app, ["lmms-task", "--data", str(data), "--out",
                                       str(folder / "tasks"), "--name", "shapes20"])
    assert written.exit_code == 0, written.output
    return {"data": data, "tasks": folder / "tasks"}


def lmms_eval(shapes: dict[str, Path], out: Path, model_args: str) -> dict[str, Any]:
    """``lmms-eval eval`` on the shapes task (a process of its own, offline); its accuracy,
    each doc's answer, and our log of the predictions."""
    env = {**os.environ, "HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [LMMS_EVAL, "eval", "--model", "insightv", "--model_args",
         f"{model_args},log_dir={out / 'insightv'}", "--include_path", str(shapes["tasks"]),
         "--tasks", "shapes20", "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=1200)
    results = list(out.glob("*_results.json"))  # lmms-eval exits 0 even when it fails
    assert done.returncode == 0 and len(results) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    (samples,) = out.glob("*_samples_shapes20.jsonl")
    return {"accuracy": json.loads(results[0].read_text())["results"]["shapes20"]["accuracy,none"],
            "answers": {row["doc_id"]: row["filtered_resps"]
                        for row in map(json.loads, samples.open())},
            "logged": [json.loads(line) for line in
                       (out / "insightv" / "shapes20" / "predictions.jsonl").open()]}


def insightv_eval(shapes: dict[str, Path], out: Path, *options: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["eval", "--data", str(shapes["data"]), "--out", str(out),
                                      *options])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    order = [json.loads(line)["id"] for line in shapes["data"].open()]
    by_id = {row["id"]: row for row in rows}
    return {"accuracy": json.loads((out / "report.json").read_text())["accuracy"]["all"][
        "accuracy"], "answers": {index: benchmark_answer(by_id[identifier]["answer"])
                                 for index, identifier in enumerate(order)}}


def same_as_insightv_eval(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert len(theirs["answers"]) == 20
    assert ours["answers"] == theirs["answers"]
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"])
    assert len(ours["logged"]) == 20
    assert all(row["steps"] and row["verdict"] for row in ours["logged"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lmms_eval_with_the_demo_agents_in_process(shapes: dict[str, Path],
                                                    tmp_path: Path) -> None:
    ours = lmms_eval(shapes, tmp_path / "lmms", "concurrency=4")
    same_as_insightv_eval(ours, insightv_eval(shapes, tmp_path / "eval"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lmms_eval_with_the_demo_agents_served_by_vllm(shapes: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from insightv_agents.demo import REASONER_DIR, SUMMARY_DIR

    with insightv_serve(REASONER_DIR, "reasoner", tmp_path / "reasoner.log") as reasoning, \
            insightv_serve(SUMMARY_DIR, "summary", tmp_path / "summary.log") as summary:
        ours = lmms_eval(shapes, tmp_path / "lmms", f"base_url={reasoning},model=reasoner,"
                         f"summary_base_url={summary},summary_model=summary,concurrency=8")
        theirs = insightv_eval(shapes, tmp_path / "eval", "--base-url", reasoning, "--model",
                               "reasoner", "--summary-base-url", summary, "--summary-model",
                               "summary")
    same_as_insightv_eval(ours, theirs)
    assert {row["agent_answer"] for row in ours["logged"]} != {""}


def test_a_task_over_a_dataset_of_ours_refuses_bad_input(tmp_path: Path) -> None:
    bad = CliRunner().invoke(app, ["lmms-task", "--data", str(tmp_path / "none.jsonl"),
                                   "--out", str(tmp_path / "t")])
    assert bad.exit_code != 0
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q?",
                                                  "answer": "1"}) + "\n")
    named = CliRunner().invoke(app, ["lmms-task", "--data", str(tmp_path / "d.jsonl"),
                                     "--out", str(tmp_path / "t"), "--name", "bad name!"])
    assert named.exit_code != 0 and "task name" in named.output
