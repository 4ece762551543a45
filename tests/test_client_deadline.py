"""The vLLM client's retries under one deadline per call, against loopback servers: a call
given ``timeout=T`` ends within about ``T`` however the server fails (429 with Retry-After,
5xx, hanging, refusing connections, a stream that does not end); it retries what resending
can fix within the deadline and nothing else. Options out of range, and adapters held only
as pickles, are refused before any request (the catalogue cases of
``tests/bad_inputs_options.py``)."""

from __future__ import annotations

import asyncio
import email.utils
import http.server
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from helpers import WAYS, FakeOpenAIServer, Refusal, call_way, png_bytes
from langchain_core.messages import HumanMessage

from insightv_agents import ModelCallError, create_insightv_graph
from insightv_agents.backends.vllm import ChatVLLM, vllm_chat_model

SLACK = 0.5  # seconds a call may run past its deadline (a loaded 2-core machine included)


def call(model: Any, way: str, text: str = "Q") -> str:
    """One reply to ``text`` through ``way``: invoke, ainvoke, stream or astream."""
    return call_way(model, [HumanMessage(text)], way)


def timed(action: Callable[[], Any]) -> tuple[BaseException, float]:
    """The error ``action`` raises, and the seconds it took."""
    started = time.perf_counter()
    with pytest.raises(Exception) as caught:
        action()
    return caught.value, time.perf_counter() - started


def model(url: str, timeout: float, retries: int = 3) -> Any:
    return vllm_chat_model(url, "m", timeout=timeout, max_retries=retries, card=None)


def failing_first(count: int, fault: Any) -> Callable[[dict[str, Any]], Any]:
    """A reply function answering ``fault`` to the first ``count`` requests, then "ok"."""
    served = itertools.count()
    return lambda body: fault if next(served) < count else "ok"


@pytest.mark.parametrize("way", WAYS)
def test_a_429_asking_for_more_than_the_deadline_fails_at_once(way: str) -> None:
    slow_down = Refusal(429, "slow down", {"Retry-After": "5"})
    with FakeOpenAIServer(lambda body: slow_down) as server:
        error, seconds = timed(lambda: call(model(server.url, timeout=1), way))
    assert isinstance(error, openai.RateLimitError)
    assert "Retry-After" in " ".join(getattr(error, "__notes__", []))
    assert len(server.requests) == 1 and seconds < 1 + SLACK


@pytest.mark.parametrize("asked", ["1e308", "3600"])
def test_a_retry_after_over_two_minutes_is_never_waited_for(asked: str) -> None:
    slow_down = Refusal(429, "slow down", {"Retry-After": asked})
    with FakeOpenAIServer(lambda body: slow_down) as server:
        error, seconds = timed(lambda: call(model(server.url, timeout=86_400), "invoke"))
    assert isinstance(error, openai.RateLimitError)
    assert "longer than 120 s" in " ".join(getattr(error, "__notes__", []))
    assert len(server.requests) == 1 and seconds < SLACK


def test_a_graph_node_wraps_the_refused_retry_as_a_model_call_error() -> None:
    slow_down = Refusal(429, "slow down", {"Retry-After": "5"})
    with FakeOpenAIServer(lambda body: slow_down) as server:
        graph = create_insightv_graph(reasoner=model(server.url, timeout=1)).compile()
        error, seconds = timed(lambda: graph.invoke({"image": png_bytes(), "question": "Q?"}))
    assert isinstance(error, ModelCallError) and error.node == "reason"
    assert isinstance(error.__cause__, openai.RateLimitError) and "429" in str(error)
    assert seconds < 1 + SLACK


def test_retry_after_within_the_deadline_is_waited_for() -> None:
    slow_down = Refusal(429, "slow down", {"Retry-After": "1"})
    with FakeOpenAIServer(failing_first(1, slow_down)) as server:
        started = time.perf_counter()
        assert call(model(server.url, timeout=5), "invoke") == "ok"
        seconds = time.perf_counter() - started
    assert len(server.requests) == 2
    assert 1.0 <= seconds < 1 + SLACK  # the server's second, not the 0.5 s backoff


@pytest.mark.parametrize(("when", "requests", "answered"), [(60, 1, False), (-60, 2, True)])
def test_retry_after_as_an_http_date(when: int, requests: int, answered: bool) -> None:
    date = email.utils.formatdate(time.time() + when, usegmt=True)
    fault = Refusal(503, "maintenance", {"Retry-After": date})
    with FakeOpenAIServer(failing_first(1, fault)) as server:
        chat = model(server.url, timeout=2)
        if answered:  # a date past: retried at once
            assert call(chat, "invoke") == "ok"
        else:  # a minute ahead: beyond the deadline, not retried
            error, seconds = timed(lambda: call(chat, "invoke"))
            assert isinstance(error, openai.InternalServerError) and seconds < SLACK
    assert len(server.requests) == requests


@pytest.mark.parametrize("way", WAYS)
def test_a_503_then_a_reply_within_the_deadline_succeeds(way: str) -> None:
    with FakeOpenAIServer(failing_first(1, Refusal(503, "overloaded"))) as server:
        assert call(model(server.url, timeout=5), way) == "ok"
    assert len(server.requests) == 2


def test_a_server_that_keeps_failing_is_given_up_at_the_deadline() -> None:
    with FakeOpenAIServer(lambda body: Refusal(503, "overloaded")) as server:
        error, seconds = timed(lambda: call(model(server.url, timeout=1.5, retries=10),
                                            "invoke"))
    assert isinstance(error, openai.InternalServerError)
    # 10 retries with backoff would take minutes; the deadline stops them after a few.
    assert 2 <= len(server.requests) <= 4 and seconds < 1.5 + SLACK


@pytest.mark.parametrize("way", WAYS)
def test_a_hanging_server_costs_one_deadline_not_one_per_retry(way: str) -> None:
    with FakeOpenAIServer(lambda body: "late", delay=20) as server:
        error, seconds = timed(lambda: call(model(server.url, timeout=1), way))
    assert isinstance(error, openai.APITimeoutError | TimeoutError)
    assert len(server.requests) == 1 and seconds < 1 + SLACK


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refused_request_is_never_retried(status: int) -> None:
    with FakeOpenAIServer(lambda body: Refusal(status, "prompt too long")) as server:
        error, _ = timed(lambda: call(model(server.url, timeout=5), "invoke"))
    assert getattr(error, "status_code", None) == status
    assert len(server.requests) == 1


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1"


@pytest.mark.parametrize(("timeout", "retries", "bound"), [(1.0, 10, 1.0), (60.0, 2, 1.5)])
def test_a_refused_connection_is_bounded_by_the_deadline_or_the_retries(
        timeout: float, retries: int, bound: float) -> None:
    chat = model(closed_port_url(), timeout=timeout, retries=retries)
    for way in ("invoke", "astream"):
        error, seconds = timed(lambda: call(chat, way))  # noqa: B023 - called at once
        assert isinstance(error, openai.APIConnectionError)
        assert seconds < bound + SLACK  # 2 retries: 0.5 s + 1 s of backoff at most


def test_a_deadline_given_at_the_call_replaces_the_models() -> None:
    with FakeOpenAIServer(lambda body: "late", delay=20) as server:
        chat = model(server.url, timeout=60).bind(timeout=0.5)
        error, seconds = timed(lambda: call(chat, "invoke"))
    assert isinstance(error, openai.APITimeoutError) and seconds < 0.5 + SLACK


def test_a_model_made_directly_retries_within_its_deadline() -> None:
    with FakeOpenAIServer(lambda body: Refusal(429, "busy", {"Retry-After": "5"})) as server:
        chat = ChatVLLM(base_url=server.url, model="m", api_key="EMPTY", timeout=1,
                        max_retries=5)
        error, seconds = timed(lambda: call(chat, "invoke"))
    assert isinstance(error, openai.RateLimitError)
    assert len(server.requests) == 1 and seconds < 1 + SLACK


class _TricklingHandler(http.server.BaseHTTPRequestHandler):
    """Streams a reply of 30 words, one every 0.05 s, then ends (a stream of 1.5 s)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # no length: the body ends when the connection closes
        try:
            for index in range(30):
                delta = {"role": "assistant", "content": f"w{index} "}
                event = {"id": "x", "object": "chat.completion.chunk", "created": 0,
                         "model": "m", "choices": [{"index": 0, "delta": delta,
                                                    "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client gave up
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def trickling() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TricklingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("way", ["stream", "astream"])
def test_the_deadline_covers_a_stream_to_its_end(way: str, trickling: str) -> None:
    """Chunks keep coming (no read ever times out), but the stream outlasts the deadline:
    it is cut there, after the chunks that came in time."""
    received: list[str] = []
    chat = model(trickling, timeout=1)

    def consume() -> None:
        if way == "stream":
            received.extend(str(chunk.content) for chunk in chat.stream([HumanMessage("Q")]))
            return

        async def run() -> None:
            async for chunk in chat.astream([HumanMessage("Q")]):
                received.append(str(chunk.content))
        asyncio.run(run())

    error, seconds = timed(consume)
    assert isinstance(error, TimeoutError) and "deadline" in str(error)
    assert 3 <= len(received) < 30 and seconds < 1 + SLACK
    assert call(model(trickling, timeout=10), way).split() == [f"w{i}" for i in range(30)]
