"""Our lmms-eval models (insightv_agents.harnesses.lmms_eval), registered through lmms-eval's
entry point: the real `lmms-eval` command line (from PyPI) on a task of 20 held-out shapes
questions that `insightv lmms-task` writes over a local dataset, with the demo agents
in-process and served by vLLM; the accuracy and every answer are `insightv eval`'s on the
same items. The models' request handling is checked first against a scripted server."""

from __future__ import annotations

import json
import os
import re
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
    for search in ("greedy", "insightv"):
        with pytest.raises(ConfigError, match="search must be one of stage-beam"):
            LlavaCoT(base_url="http://127.0.0.1:9/v1", search=search)
    for bad in ({"concurrency": 0}, {"concurrency": 2.5}, {"max_steps": "abc"},
                {"max_steps": True}, {"temperature": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            InsightV(base_url="http://127.0.0.1:9/v1", **bad)
    assert _urls("[http://a:1/v1, http://b:2/v1]") == ("http://a:1/v1", "http://b:2/v1")
    assert _urls("http://a:1/v1") == ("http://a:1/v1",) and _urls(None) == ()


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "benchmarks.md"
LOCAL_URLS = ("http://localhost:8000/v1", "http://localhost:8001/v1")


def guide_commands() -> list[list[str]]:
    """The guide's shell commands for the shapes world, in its order."""
    from helpers import shell_commands

    text = GUIDE.read_text()
    return [words for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
            for words in shell_commands(block)
            if (words[0] in ("insightv", "lmms-eval") and "shapes20" in " ".join(words))
            or words[:2] in (["insightv", "eval"], ["insightv", "serve"])]


def run(words: list[str], where: Path, urls: dict[str, str] | None = None) -> None:
    """One of the guide's commands, in ``where`` (its paths are relative), the served
    agents' URLs put for the guide's: ``insightv`` in-process, ``lmms-eval`` as a process
    (offline, nothing from a hub)."""
    for old, new in (urls or {}).items():
        words = [word.replace(old, new) for word in words]
    if words[0] == "insightv":
        previous = Path.cwd()
        os.chdir(where)
        try:
            result = CliRunner().invoke(app, words[1:])
        finally:
            os.chdir(previous)
        assert result.exit_code == 0, result.output
        return
    env = {**os.environ, "HF_HOME": str(where / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([LMMS_EVAL, *words[1:]], cwd=where, env=env, capture_output=True,
                          text=True, timeout=1200)
    out = where / words[words.index("--output_path") + 1]
    wrote = list(out.glob("**/*_results.json"))  # lmms-eval exits with 0 when it fails
    assert done.returncode == 0 and wrote, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding 20 held-out shapes questions (``shapes/test.jsonl``) and the guide's
    lmms-eval task over them (``insightv lmms-task``)."""
    from insightv_research.shapes import make_dataset

    folder = tmp_path_factory.mktemp("lmms")
    make_dataset(folder / "shapes", sizes={"test": 20}, seed=7)
    (task,) = [words for words in guide_commands() if words[:2] == ["insightv", "lmms-task"]]
    run(task, folder)
    return folder


def results(where: Path, out: str, log_dir: str, evaluated: str) -> dict[str, Any]:
    """What lmms-eval wrote in ``out`` (its accuracy, each doc's answer), our log of the
    predictions, and ``insightv eval``'s in ``evaluated`` (its accuracy, each answer in the
    form scorers read)."""
    found = list((where / out).glob("**/*_results.json"))
    assert len(found) == 1, f"lmms-eval wrote {len(found)} results in {out}"
    (samples,) = (where / out).glob("**/*_samples_shapes20.jsonl")
    order = [json.loads(line)["id"] for line in (where / "shapes" / "test.jsonl").open()]
    predicted = {row["id"]: row for row in
                 map(json.loads, (where / evaluated / "predictions.jsonl").open())}
    report = json.loads((where / evaluated / "report.json").read_text())
    return {"accuracy": json.loads(found[0].read_text())["results"]["shapes20"]["accuracy,none"],
            "answers": {row["doc_id"]: row["filtered_resps"]
                        for row in map(json.loads, samples.open())},
            "logged": [json.loads(line) for line in
                       (where / log_dir / "shapes20" / "predictions.jsonl").open()],
            "eval_accuracy": report["accuracy"]["all"]["accuracy"],
            "eval_answers": {index: benchmark_answer(predicted[identifier]["answer"])
                             for index, identifier in enumerate(order)}}


def same_as_insightv_eval(found: dict[str, Any]) -> None:
    assert len(found["eval_answers"]) == 20
    assert found["answers"] == found["eval_answers"]
    assert found["accuracy"] == pytest.approx(found["eval_accuracy"])
    assert len(found["logged"]) == 20
    assert all(row["status"] == "ok" and row["steps"] and row["verdict"]
               for row in found["logged"])


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_guides_lmms_eval_run_with_the_demo_agents_in_process(shapes: Path) -> None:
    local = [words for words in guide_commands()
             if (words[0] == "lmms-eval" and "base_url" not in option(words, "--model_args"))
             or (words[:2] == ["insightv", "eval"] and "--base-url" not in words)]
    assert [words[0] for words in local] == ["lmms-eval", "insightv"]
    for words in local:
        run(words, shapes)
    lmms, evaluated = local
    log_dir = option(lmms, "--model_args").split("log_dir=")[1].split(",")[0]
    same_as_insightv_eval(results(shapes, option(lmms, "--output_path"), log_dir,
                                  option(evaluated, "--out")))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_guides_lmms_eval_run_through_vllm(shapes: Path, tmp_path: Path) -> None:
    served = [words for words in guide_commands()
              if (words[0] == "lmms-eval" and "base_url" in option(words, "--model_args"))
              or (words[:2] == ["insightv", "eval"] and "--base-url" in words)]
    serve = [words for words in guide_commands() if words[:2] == ["insightv", "serve"]]
    assert [words[0] for words in served] == ["lmms-eval", "insightv"] and len(serve) == 2
    root = Path(__file__).resolve().parents[1]
    agents = [(root / option(words, "--model"), option(words, "--served-name"))
              for words in serve]
    with insightv_serve(*agents[0], tmp_path / "reasoner.log") as reasoning, \
            insightv_serve(*agents[1], tmp_path / "summary.log") as summary:
        for words in served:
            run(words, shapes, dict(zip(LOCAL_URLS, (reasoning, summary), strict=True)))
    lmms, evaluated = served
    log_dir = option(lmms, "--model_args").split("log_dir=")[1].split(",")[0]
    found = results(shapes, option(lmms, "--output_path"), log_dir, option(evaluated, "--out"))
    same_as_insightv_eval(found)


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
