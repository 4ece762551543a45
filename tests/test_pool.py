"""Endpoint pools: several replicas of a served model behind one chat model, least busy
first, a failing replica taken out and probed back, a request it failed sent to another;
and a synthesis that loses one of two servers (SIGKILL) midway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeOpenAIServer, Refusal
from test_synthesize import make_data, synthesize_args

from insightv_agents.backends.vllm import EndpointPool, endpoints, vllm_chat_model
from insightv_agents.backends.vllm import pool as pool_module
from insightv_agents.errors import ConfigError
from insightv_agents.records import read_records

TESTS = Path(__file__).parent


def replying(name: str) -> Any:
    return lambda body: name


def test_a_pool_refuses_bad_endpoint_lists() -> None:
    for urls in ([], "http://a/v1", ["ftp://a"], ["http://a/v1", "http://a/v1/"], [3]):
        with pytest.raises(ConfigError):
            EndpointPool(urls)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        vllm_chat_model([], "m", card=None)
    assert endpoints("http://a/v1") == endpoints(["http://a/v1"]) == "http://a/v1"
    assert endpoints(["http://a/v1", "http://b/v1"]).urls == [  # type: ignore[union-attr]
        "http://a/v1", "http://b/v1"]


def test_requests_go_to_the_least_busy_replica() -> None:
    with FakeOpenAIServer(replying("A"), delay=0.2) as a, \
            FakeOpenAIServer(replying("B"), delay=0.2) as b:
        model = vllm_chat_model([a.url, b.url], "m", card=None, timeout=10)

        async def many() -> list[str]:
            replies = await asyncio.gather(*(model.ainvoke("x") for _ in range(10)))
            return [str(reply.content) for reply in replies]

        assert Counter(asyncio.run(many())) == {"A": 5, "B": 5}  # all in flight at once
        assert sorted(str(model.invoke("x").content) for _ in range(4)) == ["A", "A", "B", "B"]
        stats = model.pool.stats()  # type: ignore[union-attr]
        assert [s.requests for s in stats] == [7, 7] and all(s.up for s in stats)
        assert all(s.in_flight == 0 and s.errors == 0 and s.latency_s >= 0.2 for s in stats)
        assert "0 in flight" in model.pool.describe()  # type: ignore[union-attr]


@pytest.mark.parametrize("way", ["invoke", "ainvoke", "stream", "astream"])
def test_a_dead_replica_is_passed_over_at_once_and_probed_back(
        way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "FIRST_PROBE_S", 0.3)
    with FakeOpenAIServer(replying("B")) as b:
        a = FakeOpenAIServer(replying("A"))
        port = a.server_address[1]
        a.server_close()  # nothing listens there: connections are refused
        model = vllm_chat_model([f"http://127.0.0.1:{port}/v1", b.url], "m", card=None,
                                timeout=10, max_retries=0)  # no retries: the pool alone
        from helpers import call_way

        assert {call_way(model, ["x"], way) for _ in range(4)} == {"B"}
        first, second = model.pool.stats()  # type: ignore[union-attr]
        assert not first.up and first.errors == 1 and second.requests == 4
        with FakeOpenAIServer(replying("A"), port=port, models=[{"id": "m"}]) as again:
            time.sleep(0.35)  # the probe is due
            assert {call_way(model, ["x"], way) for _ in range(6)} == {"A", "B"}
            assert model.pool.stats()[0].up and again.requests  # type: ignore[union-attr]
        # every response was closed: nothing counts as in flight
        assert [s.in_flight for s in model.pool.stats()] == [0, 0]  # type: ignore[union-attr]


def test_a_replica_answering_503_is_taken_out_and_the_request_sent_on_at_once() -> None:
    with FakeOpenAIServer(lambda body: Refusal(503, "shutting down")) as a, \
            FakeOpenAIServer(replying("B")) as b:
        model = vllm_chat_model([a.url, b.url], "m", card=None, timeout=10, max_retries=0)
        assert {str(model.invoke("x").content) for _ in range(5)} == {"B"}
        first, _ = model.pool.stats()  # type: ignore[union-attr]
        assert not first.up and first.errors == 1 and len(a.requests) == 1


def test_a_request_refused_for_itself_is_not_sent_elsewhere() -> None:
    with FakeOpenAIServer(lambda body: Refusal(400, "bad request")) as a, \
            FakeOpenAIServer(lambda body: Refusal(400, "bad request")) as b:
        model = vllm_chat_model([a.url, b.url], "m", card=None, timeout=10)
        with pytest.raises(Exception, match="bad request"):
            model.invoke("x")
        assert len(a.requests) + len(b.requests) == 1
        assert all(s.up for s in model.pool.stats())  # type: ignore[union-attr]


def test_when_every_replica_is_down_the_call_fails_with_a_connection_error() -> None:
    import openai

    ports = []
    for _ in range(2):
        server = FakeOpenAIServer(replying("x"))
        ports.append(server.server_address[1])
        server.server_close()
    model = vllm_chat_model([f"http://127.0.0.1:{port}/v1" for port in ports], "m",
                            card=None, timeout=3, max_retries=0)
    started = time.monotonic()
    with pytest.raises(openai.APIConnectionError):
        model.invoke("x")
    assert time.monotonic() - started < 2


SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers import FakeOpenAIServer, wire_teacher
with FakeOpenAIServer(wire_teacher(steps=2), delay=0.01, keep_alive=True) as server:
    print(server.url, flush=True)
    time.sleep(3600)
"""


def start_server() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-c", SERVER.format(tests=str(TESTS))],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


@pytest.mark.slow
def test_synthesis_finishes_on_the_survivor_when_one_of_two_servers_is_killed(
        tmp_path: Path) -> None:
    """Two loopback scripted servers, one SIGKILLed in the middle of a 200-item synthesis:
    the run completes on the other, every (id, path) exactly once, no item in error."""
    count = 200
    data = make_data(tmp_path / "data", count)
    out = tmp_path / "out"
    records = out / "records.jsonl"
    (first, first_url), (second, second_url) = start_server(), start_server()
    try:
        command = [sys.executable, "-m", "insightv_agents.cli",
                   *synthesize_args(data, out, first_url, "--teacher-url", second_url,
                                    "--concurrency", "16")]
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            if records.exists() and records.read_bytes().count(b"\n") >= count // 4 * 3:
                break
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        output, _ = run.communicate(timeout=300)
    finally:
        for process in (first, second):
            process.kill()
    assert run.returncode == 0, output
    assert f"{count} item(s) written" in output and "0 item error(s)" in output
    parsed = [json.loads(line) for line in records.read_bytes().splitlines()]
    assert Counter((r["id"], r["path_index"]) for r in parsed) == Counter(
        {(f"q{i}", p): 1 for i in range(count) for p in range(3)})
    assert all(r["status"] == "ok" for r in parsed)
    assert not (out / "errors.jsonl").exists()
    assert "DOWN" in output  # the pool's state, as the progress display showed it
    assert len(list(read_records(records))) == count * 3


class Stub:
    """An async HTTP transport answering by host: ``fail`` hosts refuse connections,
    ``hang`` hosts never answer; the others answer 200. Records each request."""

    def __init__(self) -> None:
        self.fail: set[str] = set()
        self.hang: set[str] = set()
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: Any) -> Any:
        import httpx

        host = request.url.host
        self.seen.append((host, request.url.path))
        if host in self.fail:
            raise httpx.ConnectError("refused", request=request)
        if host in self.hang:
            await asyncio.sleep(3600)
        return httpx.Response(200, json={"ok": host})

    async def aclose(self) -> None:
        pass


def send(transport: Any, url: str) -> Any:
    import httpx

    async def run() -> Any:
        response = await transport.handle_async_request(
            httpx.Request("POST", url, content=b"{}"))
        await response.aread()
        await response.aclose()
        return response.json()["ok"]
    return asyncio.run(run())


def test_a_probe_cut_short_by_a_cancelled_call_is_tried_again_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    monkeypatch.setattr(pool_module, "FIRST_PROBE_S", 0.0)
    pool = EndpointPool(["http://a/v1", "http://b/v1"])
    stub = Stub()
    transport = pool.async_transport(httpx, stub)
    stub.fail.add("a")
    replies = [send(transport, "http://a/v1/chat/completions") for _ in range(2)]
    assert replies == ["b", "b"]  # the one sent to a, refused, was sent on to b
    assert [s.up for s in pool.stats()] == [False, True]
    stub.fail.clear()
    stub.hang.add("a")  # a's probe now hangs, and the call is cancelled meanwhile

    async def cancelled() -> None:
        task = asyncio.ensure_future(transport.handle_async_request(
            httpx.Request("POST", "http://a/v1/chat/completions", content=b"{}")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert stub.seen[-1] == ("a", "/v1/models")
    stub.hang.clear()
    assert send(transport, "http://a/v1/chat/completions") == "a"  # probed again, back up
    assert [(s.up, s.in_flight) for s in pool.stats()] == [(True, 0), (True, 0)]


def test_replica_urls_are_matched_as_the_http_library_writes_them() -> None:
    import httpx

    pool = EndpointPool(["http://Replica-A:80/v1", "http://replica-b:8000/v1/"])
    stub = Stub()
    transport = pool.async_transport(httpx, stub)
    hosts = [send(transport, "http://replica-a/v1/chat/completions") for _ in range(4)]
    assert sorted(hosts) == ["replica-a", "replica-a", "replica-b", "replica-b"]
    assert {path for _, path in stub.seen} == {"/v1/chat/completions"}


def test_a_replica_out_for_long_is_probed_every_30_s_at_most() -> None:
    pool = EndpointPool(["http://a/v1", "http://b/v1"])
    replica = pool._replicas[0]
    for _ in range(5000):  # a night of failed probes
        pool._probed(replica, False)
    waits = replica.probe_at - time.monotonic()
    assert 29 < waits <= pool_module.MAX_PROBE_S
    pool._probed(replica, None)  # a probe cut short changes nothing
    assert not replica.up and not replica.probing


def test_a_server_context_takes_a_list_of_replicas() -> None:
    from pydantic import TypeAdapter

    from insightv_agents.server import ServerContext, agents

    context = TypeAdapter(ServerContext).validate_python(
        {"base_url": ["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"],
         "summary_model": "summary"})
    hash(context)  # contexts are cached by value
    reasoner, summarizer = agents(context)
    assert reasoner.pool is summarizer.pool and reasoner.pool.urls == list(context.base_url)


def test_ray_options_are_checked_before_any_work(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Ray installed, --ray is refused before the data is read or a server asked;
    bad numbers are refused before a cluster is joined."""
    import importlib.util

    from typer.testing import CliRunner

    from insightv_agents.cli import app
    from insightv_agents.distributed import run_on_ray

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with FakeOpenAIServer(replying("x")) as server:
        result = CliRunner().invoke(app, synthesize_args(
            tmp_path / "missing.jsonl", tmp_path / "out", server.url, "--ray", "auto"))
        assert result.exit_code == 2 and "pip install 'insightv-agents[ray]'" in result.output
        assert server.requests == []
    monkeypatch.undo()
    for bad in ({"workers": 0}, {"concurrency": 0}, {"gpus_per_worker": -1}):
        with pytest.raises(ConfigError):
            run_on_ray(print, [], tmp_path, stem="records", size="num_paths", **bad)
