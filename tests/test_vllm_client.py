"""The vLLM client against a loopback OpenAI-compatible server: the request body vLLM
receives (sampling, vLLM-only fields, structured outputs, continuation), on every way of
calling a chat model; and one model reused across event loops and threads while the server
keeps its connections alive, as vLLM's does."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from helpers import WAYS, FakeOpenAIServer
from helpers import call_way as call
from langchain_core.messages import AIMessage, HumanMessage

from insightv_agents.backends.vllm import ChatVLLM, vllm_chat_model
from insightv_agents.errors import ConfigError


def echo(body: dict[str, Any]) -> str:
    """Replies with the text of the request's last message (so each reply is checkable)."""
    return f"re: {body['messages'][-1]['content']}"




@pytest.mark.parametrize("way", WAYS)
def test_the_request_body_holds_sampling_and_vllm_only_fields(way: str) -> None:
    with FakeOpenAIServer(echo, keep_alive=True) as server:
        model = vllm_chat_model(server.url, "reasoner", temperature=0.2, top_p=0.9,
                                max_tokens=33, top_k=5, repetition_penalty=1.1)
        assert call(model, [HumanMessage("Q")], way) == "re: Q"
    [body] = server.requests
    assert body["model"] == "reasoner"
    assert body["messages"] == [{"role": "user", "content": "Q"}]
    assert (body["temperature"], body["top_p"], body["max_completion_tokens"]) == (0.2, 0.9, 33)
    assert (body["top_k"], body["repetition_penalty"]) == (5, 1.1)
    assert "continue_final_message" not in body and "structured_outputs" not in body
    assert body.get("stream", False) is way.endswith("stream")


@pytest.mark.parametrize("way", WAYS)
def test_a_final_assistant_message_is_continued_under_a_constraint(way: str) -> None:
    with FakeOpenAIServer(echo, keep_alive=True) as server:
        model = vllm_chat_model(server.url, "reasoner", top_k=5)
        bound = model.bind_structured_outputs({"regex": "[a-z]{1,8}"})  # type: ignore[attr-defined]
        assert call(bound, [HumanMessage("Q"), AIMessage("<SUMMARY>")], way) == "re: <SUMMARY>"
        assert call(bound, [HumanMessage("Q")], way) == "re: Q"
    continued, answered = server.requests
    assert continued["messages"][-1] == {"role": "assistant", "content": "<SUMMARY>"}
    assert continued["continue_final_message"] is True
    assert continued["add_generation_prompt"] is False
    for body in (continued, answered):
        assert body["structured_outputs"] == {"regex": "[a-z]{1,8}"}
        assert body["top_k"] == 5  # the model's own vLLM fields stay beside the bound ones
    assert "continue_final_message" not in answered and "add_generation_prompt" not in answered


def test_a_json_schema_constraint_is_sent_as_structured_outputs() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}}
    with FakeOpenAIServer(lambda body: '{"answer": "3"}') as server:
        model = vllm_chat_model(server.url, "m").bind_json_schema(schema)  # type: ignore[attr-defined]
        assert model.invoke([HumanMessage("Q")]).content == '{"answer": "3"}'
    assert server.requests[0]["structured_outputs"] == {"json": schema}


def made_directly(url: str) -> Any:
    """A subclass of ChatVLLM built with its constructor, as benchmarks and users do."""
    class Mine(ChatVLLM):
        pass
    return Mine(base_url=url, model="m", api_key="EMPTY", timeout=10, max_retries=0)


@pytest.mark.parametrize("make", [
    lambda url: vllm_chat_model(url, "m", timeout=10, max_retries=0, card=None),
    made_directly])
def test_one_model_serves_20_event_loops_in_turn_over_kept_alive_connections(
        make: Callable[[str], Any]) -> None:
    errors: list[BaseException] = []
    with FakeOpenAIServer(echo, keep_alive=True) as server:
        model = make(server.url)

        async def three(run: int) -> list[str]:
            return [str((await model.ainvoke([HumanMessage(f"{run}.{i}")])).content)
                    for i in range(3)]

        for run in range(20):
            try:
                assert asyncio.run(three(run)) == [f"re: {run}.{i}" for i in range(3)]
            except Exception as error:  # counted, then asserted to be none
                errors.append(error)
        assert model.invoke([HumanMessage("sync")]).content == "re: sync"
    assert errors == []
    assert len(server.requests) == 61
    # Each loop's three requests shared one kept-alive connection, and the sync client its own.
    assert server.connections == 21


def test_one_model_serves_4_threads_at_once_sync_and_async() -> None:
    errors: list[BaseException] = []
    replies: list[str] = []
    with FakeOpenAIServer(echo, delay=0.02, keep_alive=True) as server:
        model = vllm_chat_model(server.url, "m", timeout=10, max_retries=0)
        start = threading.Barrier(4)

        def worker(index: int) -> None:
            start.wait()
            try:
                for turn in range(5):
                    message = [HumanMessage(f"{index}.{turn}")]
                    replies.append(call(model, message, WAYS[(index + turn) % len(WAYS)]))
            except Exception as error:  # counted, then asserted to be none
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    assert sorted(replies) == sorted(f"re: {i}.{t}" for i in range(4) for t in range(5))


@pytest.mark.parametrize("bad", [
    lambda: vllm_chat_model("127.0.0.1:8000", "m"),
    lambda: vllm_chat_model("http://127.0.0.1:8000/v1", "m", timeout=0),
])
def test_bad_settings_are_refused_before_any_request(bad: Callable[[], Any]) -> None:
    with pytest.raises(ConfigError):
        bad()
