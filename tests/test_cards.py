"""Agent cards: written beside a model, read by the backends, followed by the graph and the
command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeOpenAIServer, png_bytes
from typer.testing import CliRunner

from insightv_agents import ConfigError, create_insightv_graph
from insightv_agents.answers import AnswerRules
from insightv_agents.backends.vllm import served_card, vllm_chat_model
from insightv_agents.cards import CARD_FILE, AgentCard, Sampling, card_of, read_card
from insightv_agents.cli import app
from insightv_agents.testing import ScriptedChatModel

STEP = {"summary": "Add", "reasoning": "2 + 2 = 4.", "action": "summary"}
CHAIN_CARD = AgentCard(role="reasoning", profile="chain",
                       prompts={"question": "Q: {question}", "images_after_text": True},
                       sampling=Sampling(temperature=0.0, max_tokens=300), max_model_len=2048)
REFERENCE_CARD = AgentCard(role="summary", profile="insightv-reference",
                           sampling=Sampling(temperature=0.2))


def test_a_card_is_saved_and_read_back(tmp_path: Path) -> None:
    assert read_card(tmp_path) is None and read_card(None) is None
    path = CHAIN_CARD.save(tmp_path)
    assert path == tmp_path / CARD_FILE and read_card(tmp_path) == CHAIN_CARD
    assert "answer_rules" not in json.loads(path.read_text())  # defaults left out
    path.write_text('{"role": "oracle"}')
    with pytest.raises(ConfigError, match="not a valid agent card"):
        read_card(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid agent card"):
        read_card(tmp_path)


def test_the_graph_follows_each_agents_card_unless_told_otherwise() -> None:
    reasoner = ScriptedChatModel([json.dumps(STEP)], agent_card=CHAIN_CARD)
    summarizer = ScriptedChatModel(["4"], agent_card=REFERENCE_CARD)
    graph = create_insightv_graph(reasoner=reasoner, summarizer=summarizer).compile()
    result = graph.invoke({"image": png_bytes(), "question": "What is 2 + 2?"})
    assert (result["answer"], result["status"]) == ("4", "ok")
    asked = reasoner.calls[0][-1].content
    assert asked[0] == {"type": "text", "text": "Q: What is 2 + 2?"}  # images after the text
    assert "one JSON object per line" in reasoner.calls[0][0].content  # the chain system prompt
    assert "REASON PROCESS: <thoughts>2 + 2 = 4.</thoughts>" in str(summarizer.calls[0])
    # a mode given wins over the card's mode; the card's prompts stay
    stepped = ScriptedChatModel([json.dumps(STEP), "4"], agent_card=CHAIN_CARD)
    create_insightv_graph(reasoner=stepped, mode="step").compile().invoke(
        {"image": png_bytes(), "question": "What is 2 + 2?"})
    assert "ONE step per reply" in stepped.calls[0][0].content
    assert stepped.calls[0][-1].content[0]["text"] == "Q: What is 2 + 2?"
    # a mode is the reasoner's: the summarizer keeps its own card
    told = ScriptedChatModel(["4"], agent_card=REFERENCE_CARD)
    create_insightv_graph(reasoner=ScriptedChatModel([json.dumps(STEP)]), summarizer=told,
                          mode="chain").compile().invoke(
        {"image": png_bytes(), "question": "What is 2 + 2?"})
    assert "REASON PROCESS: <thoughts>" in str(told.calls[0])
    with pytest.raises(ConfigError, match="no step mode"):
        create_insightv_graph(reasoner=ScriptedChatModel([], agent_card=REFERENCE_CARD),
                              mode="step")
    assert card_of(reasoner.bind(stop=["x"])) == CHAIN_CARD


def test_the_client_finds_the_card_of_a_model_served_from_this_machine(tmp_path: Path) -> None:
    (tmp_path / "reasoner").mkdir()
    CHAIN_CARD.save(tmp_path / "reasoner")
    models = [{"id": "reasoner", "root": str(tmp_path / "reasoner")},
              {"id": "remote", "root": "/nowhere/on/this/machine"}]
    with FakeOpenAIServer(lambda body: "ok", models=models) as server:
        assert served_card(server.url, "reasoner") == CHAIN_CARD
        assert served_card(server.url, "remote") is None
        assert served_card(server.url, "absent") is None
        model = vllm_chat_model(server.url, "reasoner")
        assert model.agent_card == CHAIN_CARD
        assert (model.temperature, model.max_tokens) == (0.0, 300)  # the card's sampling
        told = vllm_chat_model(server.url, "reasoner", temperature=0.9, max_tokens=50)
        assert (told.temperature, told.max_tokens) == (0.9, 50)
        assert vllm_chat_model(server.url, "reasoner", card=None).agent_card is None
        assert vllm_chat_model(server.url, "x", card=tmp_path / "reasoner").agent_card \
            == CHAIN_CARD
    with FakeOpenAIServer(lambda body: "ok") as bare:  # no /models route
        assert served_card(bare.url, "reasoner") is None
        assert vllm_chat_model(bare.url, "reasoner").temperature == 0.7
    with pytest.raises(ConfigError, match="no agent card"):
        vllm_chat_model("http://127.0.0.1:9/v1", "m", card=tmp_path)


def test_the_cli_drives_served_agents_as_their_cards_say(tmp_path: Path) -> None:
    """`insightv run --base-url ... --summary-model ...` with no format flags: each served
    agent gets its card's prompts, format and sampling."""
    for name, card in (("reasoner", CHAIN_CARD), ("summary", REFERENCE_CARD)):
        (tmp_path / name).mkdir()
        card.save(tmp_path / name)
    models = [{"id": name, "root": str(tmp_path / name)} for name in ("reasoner", "summary")]

    def reply(body: dict[str, Any]) -> str:
        return json.dumps(STEP) if body["model"] == "reasoner" else "The answer is 4."

    image = tmp_path / "image.png"
    image.write_bytes(png_bytes())
    with FakeOpenAIServer(reply, models=models) as server:
        result = CliRunner().invoke(app, [
            "run", "-i", str(image), "-q", "What is 2 + 2?", "--base-url", server.url,
            "--model", "reasoner", "--summary-model", "summary", "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert (out["answer"], out["status"]) == ("4", "ok")
        reasoning, summary = server.requests
        assert reasoning["temperature"] == 0.0 and reasoning["max_completion_tokens"] == 300
        assert reasoning["messages"][-1]["content"][0]["text"] == "Q: What is 2 + 2?"
        assert "structured_outputs" in reasoning  # our chain JSON: constrained
        assert summary["temperature"] == 0.2 and "structured_outputs" not in summary
        assert "REASON PROCESS: <thoughts>" in json.dumps(summary["messages"])


def test_answer_rules_come_from_plain_values() -> None:
    rules = AnswerRules.from_mapping({"labels": ["Yes", "no"], "rel_tol": 0.05})
    assert rules == AnswerRules(labels=frozenset({"yes", "no"}), rel_tol=0.05)
    with pytest.raises(ConfigError, match="invalid answer rules"):
        AnswerRules.from_mapping({"colour": "red"})


def test_training_data_and_outputs_carry_the_card(tmp_path: Path) -> None:
    """`insightv build-data` writes the card of the agent its data trains; the trainers
    carry it (or one read off the data) to their output, with the model's context length."""
    import datasets
    from helpers import write_output

    from insightv_agents.prompts import Prompts
    from insightv_agents.trainers.common import dataset_card, output_card

    card = dataset_card("sft-reason", mode="chain", prompts=Prompts(question="Q: {question}"))
    assert (card.role, card.profile, card.prompts) == ("reasoning", "chain",
                                                       {"question": "Q: {question}"})
    assert dataset_card("sft-summary").role == "summary"
    assert dataset_card("dpo").profile == "chain"

    records = write_output(tmp_path / "records", {"a": [(90, True), (10, False)]})
    built = CliRunner().invoke(app, ["build-data", "sft-reason", "--from", str(records),
                                     "--out", str(tmp_path / "data"), "--mode", "chain"])
    assert built.exit_code == 0, built.output
    assert read_card(tmp_path / "data") == dataset_card("sft-reason", mode="chain")

    carried = output_card("reasoning", sources=[None, tmp_path / "data"], dtype="bf16-mixed")
    assert carried.profile == "chain" and carried.dtype is None
    assert output_card("reasoning", card=CHAIN_CARD, profile="steps",
                       dtype="bfloat16").model_dump() == {
        **CHAIN_CARD.model_dump(), "profile": "steps", "dtype": "bfloat16"}

    def rows(turns: int) -> datasets.Dataset:
        messages = [{"role": "user", "content": "q"}]
        messages += [{"role": "assistant", "content": "s"},
                     {"role": "user", "content": "next"}] * (turns - 1)
        messages += [{"role": "assistant", "content": "s"}]
        return datasets.Dataset.from_list([{"messages": messages}])

    assert output_card("reasoning", data=rows(3)).profile == "steps"
    assert output_card("reasoning", data=rows(1)).profile == "chain"
    given = AgentCard(role="both", profile="llava-cot", max_model_len=512)
    assert output_card("summary", card=given) == given.model_copy(update={"role": "summary"})


def test_an_in_process_agent_takes_its_cards_sampling_unless_told(tmp_path: Path) -> None:
    from insightv_agents.backends.transformers import ChatTransformersVLM
    from insightv_agents.testing import build_tiny_idefics3

    folder = build_tiny_idefics3(tmp_path / "model")
    AgentCard(role="reasoning", profile="chain", dtype="float32",
              sampling=Sampling(temperature=0.3, max_tokens=100_000)).save(folder)
    agent = ChatTransformersVLM(model_path=str(folder))
    assert (agent.temperature, agent.max_new_tokens, agent.dtype) == (0.3, 32_768, "float32")
    assert agent.agent_card is not None and agent.agent_card.profile == "chain"
    told = ChatTransformersVLM(model_path=str(folder), temperature=0.0, max_new_tokens=8)
    assert (told.temperature, told.max_new_tokens) == (0.0, 8)
    (folder / CARD_FILE).write_text('{"role": 3}')
    with pytest.raises(ConfigError, match="not a valid agent card"):
        ChatTransformersVLM(model_path=str(folder))
