"""The served graph under a real LangGraph Server (`langgraph dev`, in memory) driven by the
LangGraph SDK: assistants, per-run context over HTTP, streamed updates and custom events,
thread state; and the demo agents as the ready default."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeOpenAIServer, demo_example, langgraph_dev, png_bytes

from insightv_agents import create_insightv_graph
from insightv_agents.server import ServerContext, graph

STEP = {"summary": "Add", "reasoning": "2 + 2 = 4.", "action": "summary"}
VERDICT = {"reasoning_correct": True, "critique": "", "answer": "4"}


def reply(body: dict[str, Any]) -> str:
    system = json.dumps(body["messages"][0])
    return json.dumps(STEP if "reasoning agent" in system else VERDICT)


def test_the_served_graph_takes_its_agents_and_settings_from_the_context() -> None:
    """In-process, no server: the context picks the endpoint, the mode and the caps."""
    with FakeOpenAIServer(reply) as server:
        out = graph.invoke({"image": png_bytes(), "question": "What is 2 + 2?"},
                           context={"base_url": server.url, "model": "m", "mode": "chain",
                                    "max_steps": 3})
        assert (out["answer"], out["status"]) == ("4", "ok")
        assert "one JSON object per line" in json.dumps(server.requests[0])  # chain mode
        assert server.requests[0]["model"] == "m"
    schema = graph.get_context_jsonschema()
    assert {"base_url", "model", "summary_model", "local_model", "profile", "mode",
            "max_steps", "max_revisions", "temperature"} <= set(schema["properties"])
    with pytest.raises(Exception, match="base_url or local_model"):
        graph.invoke({"image": png_bytes(), "question": "q?"},
                     context=ServerContext(base_url="http://x/v1", local_model="m"))


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with langgraph_dev(tmp_path_factory.mktemp("langgraph") / "dev.log") as url:
        yield url


@pytest.mark.slow
def test_langgraph_server_runs_with_per_run_context_and_streams(server_url: str) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server_url)
    [assistant] = client.assistants.search(graph_id="insightv")
    schemas = client.assistants.get_schemas(assistant["assistant_id"])
    assert {"base_url", "model", "mode", "max_steps"} <= set(
        schemas["context_schema"]["properties"])  # what Studio shows as a form
    image = base64.b64encode(png_bytes()).decode()
    with FakeOpenAIServer(reply) as model_server:
        thread = client.threads.create()
        parts = list(client.runs.stream(
            thread["thread_id"], "insightv",
            input={"image": image, "question": "What is 2 + 2?"},
            context={"base_url": model_server.url, "model": "served-reasoner",
                     "mode": "chain", "max_steps": 4},
            stream_mode=["updates", "custom"], stream_subgraphs=True))
        assert model_server.requests[0]["model"] == "served-reasoner"
    custom = [part.data for part in parts if part.event.startswith("custom")]
    assert [event["event"] for event in custom] == ["step", "verdict"]
    updates = [part.data for part in parts if part.event.startswith("updates")]
    assert any("reason" in update for update in updates)  # the inner nodes stream too
    state = client.threads.get_state(thread["thread_id"])["values"]
    assert (state["answer"], state["status"], state["steps"]) == ("4", "ok", [STEP])


@pytest.mark.slow
def test_langgraph_server_answers_with_the_demo_agents_by_default(server_url: str) -> None:
    """No model server, no context: the demo agents in-process, as their cards say; the
    same steps and answer as the Python graph."""
    from langgraph_sdk import get_sync_client

    from insightv_agents.demo import demo_agents

    image, question, truth = demo_example()
    reasoner, summarizer = demo_agents()
    expected = create_insightv_graph(reasoner=reasoner, summarizer=summarizer).compile().invoke(
        {"image": str(image), "question": question})
    client = get_sync_client(url=server_url)
    thread = client.threads.create()
    encoded = base64.b64encode(Path(image).read_bytes()).decode()
    client.runs.wait(thread["thread_id"], "insightv",
                     input={"image": encoded, "question": question})
    state = client.threads.get_state(thread["thread_id"])["values"]
    assert state["status"] == "ok" and state["answer"].strip().lower() == truth
    assert state["steps"] == expected["steps"]
