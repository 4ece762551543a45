"""Faults injected for real on loopback: a server that answers 500, hangs past the client's
timeout, or drops the connection. The client retries with backoff within the call's deadline,
then the graph raises a typed ModelCallError, never hanging past the deadline; when the
server is killed during synthesis, the failed items are logged and a rerun on a restarted
server writes exactly one group of records per item. (tests/test_client_deadline.py tests
the deadline itself: Retry-After, streams, refused connections.)"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import Drop, FakeOpenAIServer, Refusal, png_bytes, verdict, wire_teacher

from insightv_agents import ModelCallError, create_insightv_graph, create_synthesis_graph
from insightv_agents.backends.vllm import vllm_chat_model
from insightv_agents.records import read_records
from insightv_agents.synthesize import load_items, synthesize, write_run_file

TIMEOUT, RETRIES = 1.0, 2


def client(server: FakeOpenAIServer, timeout: float = TIMEOUT) -> Any:
    return vllm_chat_model(server.url, "m", temperature=0.0, timeout=timeout,
                           max_retries=RETRIES)


@pytest.mark.parametrize(("fault", "cause", "timeout", "requests"), [
    (Refusal(500, "internal error"), "Error code: 500", 5.0, 1 + RETRIES),
    (Refusal(503, "overloaded"), "Error code: 503", 5.0, 1 + RETRIES),
    (Drop(), "Connection error", 5.0, 1 + RETRIES),
    ("hang", "timed out", TIMEOUT, 1),
])
def test_a_failing_server_gives_a_typed_error_within_the_deadline(
        fault: Any, cause: str, timeout: float, requests: int) -> None:
    delay = 30.0 if fault == "hang" else 0.0
    with FakeOpenAIServer(lambda body: "never sent" if fault == "hang" else fault,
                          delay=delay) as server:
        graph = create_insightv_graph(reasoner=client(server, timeout)).compile()
        started = time.perf_counter()
        with pytest.raises(ModelCallError, match=cause) as caught:
            graph.invoke({"image": png_bytes(), "question": "How many?"})
        seconds = time.perf_counter() - started
        assert caught.value.node == "reason"
        # A fast failure is retried (backoff 0.5 s, then 1 s); a hang uses up the deadline
        # at once, so it is not retried: never (1 + RETRIES) x timeout.
        assert len(server.requests) == requests
    assert seconds < (timeout if fault == "hang" else 1.5) + 1


def test_a_server_that_recovers_within_the_retries_is_not_an_error() -> None:
    failures = itertools.count()
    teach = wire_teacher(steps=2)

    def flaky(body: dict[str, Any]) -> str | Refusal:
        if next(failures) < RETRIES:
            return Refusal(500, "warming up")
        summary = "summary agent" in str(body["messages"][0]["content"])
        return verdict("3") if summary else teach(body)

    with FakeOpenAIServer(flaky) as server:
        graph = create_insightv_graph(reasoner=client(server, timeout=5.0)).compile()
        out = graph.invoke({"image": png_bytes(), "question": "How many?"})
    assert out["status"] == "ok" and out["answer"] == "3"


def make_data(folder: Path, count: int) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = []
    for index in range(count):
        colour = ("red", "blue", "green", "white")[index % 4]
        (folder / "images" / f"{index}.png").write_bytes(png_bytes((8 + index, 8), colour))
        lines.append(f'{{"id": "q{index}", "image": "images/{index}.png", '
                     f'"question": "How many?", "answer": "3"}}')
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_synthesis_survives_a_server_killed_mid_run_and_restarted(tmp_path: Path) -> None:
    """The server is killed partway (its socket closed: connections refused), the run logs
    the items it could not finish; a new server on the same port, the same command again:
    exactly one group of records per item, no half record."""
    items, root = load_items(make_data(tmp_path / "data", 8))
    out = tmp_path / "out"
    write_run_file(out, {"data_root": str(root), "paths": 2})
    teach = wire_teacher(steps=2)
    served = itertools.count()
    servers: list[FakeOpenAIServer] = []

    def kill() -> None:
        servers[0].shutdown()
        servers[0].server_close()

    def reply(body: dict[str, Any]) -> str | Drop:
        if next(served) == 20:  # the server dies after 20 answers
            threading.Thread(target=kill, daemon=True).start()
            return Drop()
        return teach(body)

    servers.append(FakeOpenAIServer(reply).__enter__())
    port = servers[0].server_address[1]
    graph = create_synthesis_graph(teacher=client(servers[0]), paths=2, max_steps=4).compile()
    first = asyncio.run(synthesize(graph, items, out, concurrency=3, fsync=False))
    assert first.errors and first.written + len(first.errors) == len(items)
    assert all("ModelCallError" in message for _, message in first.errors)
    with FakeOpenAIServer(teach, port=port):  # restarted, same address
        second = asyncio.run(synthesize(graph, items, out, concurrency=3, fsync=False))
    assert not second.errors and second.skipped == first.written
    assert second.written == len(first.errors)
    records = list(read_records(out / "records.jsonl"))
    assert Counter(record["id"] for record in records) == {item.id: 2 for item in items}
    assert len({(record["id"], record["path_index"]) for record in records}) == 2 * len(items)
