"""Synthesis benchmark: items per second through the synthesis graph on a vLLM server.

Measured side by side in one run, on a tiny random Idefics3 built offline (greedy decoding,
so every replay gets the same replies and token counts):
  1. the synthesis runner (``insightv_agents.synthesize``: graph, records, fsync) at
     concurrency C vs. the very same requests (recorded from the graph's run) sent straight
     to the server by the OpenAI client with the same structure: C items at a time, an
     item's paths in parallel, each path's requests in order, then its scoring request.
     Target: graph/direct >= 0.9.
  2. the same requests sent one at a time, item after item and path after path (how the
     reference code's generation loop works); the speed-up is reported.

Every path reasons for STEPS steps (the schema the server enforces only allows
``continue``), then gives its answer; all paths of an item are scored in one request.

    INSIGHTV_VLLM_PYTHON=.vllm-venv/bin/python python benchmarks/synthesis.py [--items 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import continuing_model, pin, questions

from insightv_agents.backends.vllm import VLLMServer
from insightv_agents.graphs.synthesis import create_synthesis_graph
from insightv_agents.synthesize import Item, synthesize
from insightv_agents.testing import build_tiny_idefics3

STEPS = 3
PATHS = 4
ROUNDS = 3
Request = tuple[list[BaseMessage], dict[str, Any]]


class Recorder(BaseCallbackHandler):
    """Records each chat request with its item and its path (the Send task it ran in)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, list[BaseMessage], dict[str, Any]]] = []

    def on_chat_model_start(self, serialized: Any, messages: list[list[BaseMessage]], *,
                            run_id: UUID, invocation_params: dict[str, Any] | None = None,
                            **kwargs: Any) -> None:
        metadata = kwargs.get("metadata") or {}
        namespace = str(metadata.get("langgraph_checkpoint_ns", ""))
        task = namespace.split("|")[0]  # "path:<task id>" for a path, "score:..." for scoring
        self.requests.append((str(metadata.get("item")), task, messages[0],
                              invocation_params or {}))

    def plan(self) -> list[tuple[list[list[Request]], list[Request]]]:
        """Per item: its paths' request sequences, then its scoring requests."""
        items: dict[str, tuple[dict[str, list[Request]], list[Request]]] = {}
        for item, task, messages, params in self.requests:
            paths, scoring = items.setdefault(item, ({}, []))
            if task.startswith("path"):
                paths.setdefault(task, []).append((messages, params))
            else:
                scoring.append((messages, params))
        return [(list(paths.values()), scoring) for paths, scoring in items.values()]


class Tagged:
    """The compiled graph, run with the recorder and each item's id in its metadata."""

    def __init__(self, graph: Any, recorder: Recorder) -> None:
        self.graph, self.recorder = graph, recorder

    async def ainvoke(self, inputs: dict[str, Any]) -> Any:
        return await self.graph.ainvoke(inputs, {"callbacks": [self.recorder],
                                                 "metadata": {"item": inputs["id"]}})


async def send(client: AsyncOpenAI, model: str, request: Request) -> None:
    messages, params = request
    await client.chat.completions.create(
        model=model, messages=convert_to_openai_messages(messages), temperature=0,
        max_completion_tokens=params.get("max_completion_tokens"),
        extra_body=params.get("extra_body"))


async def direct(client: AsyncOpenAI, model: str,
                 plan: list[tuple[list[list[Request]], list[Request]]], concurrency: int
                 ) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def path(requests: list[Request]) -> None:
        for request in requests:
            await send(client, model, request)

    async def item(paths: list[list[Request]], scoring: list[Request]) -> None:
        async with gate:
            await asyncio.gather(*(path(requests) for requests in paths))
            for request in scoring:
                await send(client, model, request)

    started = time.perf_counter()
    await asyncio.gather(*(item(paths, scoring) for paths, scoring in plan))
    return time.perf_counter() - started


async def sequential(client: AsyncOpenAI, model: str,
                     plan: list[tuple[list[list[Request]], list[Request]]]) -> float:
    started = time.perf_counter()
    for paths, scoring in plan:
        for requests in paths:
            for request in requests:
                await send(client, model, request)
        for request in scoring:
            await send(client, model, request)
    return time.perf_counter() - started


async def measure(server: VLLMServer, count: int, concurrency: int, folder: Path) -> None:
    graph = create_synthesis_graph(teacher=continuing_model(server), paths=PATHS,
                                   max_steps=STEPS, max_retries=0).compile()
    client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY")
    model = server.served_model_name
    items = [Item(id=f"q{i}", image=q["image"], image_ref="", image_root="out",
                  question=q["question"], answer="3", choices=None, category=None, line=i)
             for i, q in enumerate(questions(count))]
    await synthesize(Tagged(graph, Recorder()), items[:2], folder / "warm-up", concurrency=2)
    times: dict[str, list[float]] = {"graph": [], "direct": []}
    plan: list[Any] = []
    for index in range(ROUNDS):  # interleaved, so machine noise hits both alike
        recorder = Recorder()
        report = await synthesize(Tagged(graph, recorder), items, folder / f"round-{index}",
                                  concurrency=concurrency)
        assert report.written == count and not report.errors, report
        times["graph"].append(report.seconds)
        plan = recorder.plan()
        times["direct"].append(await direct(client, model, plan, concurrency))
    one_by_one = await sequential(client, model, plan)
    requests = sum(len(r) for paths, scoring in plan for r in [*paths, scoring])
    graph_s, direct_s = statistics.median(times["graph"]), statistics.median(times["direct"])
    print(f"{count} items x {PATHS} paths x {STEPS} steps (+ answers, + one scoring request "
          f"per item) = {requests} requests; concurrency {concurrency} items\n")
    print(f"{'':>34} {'seconds':>8} {'items/s':>8}")
    for name, seconds in (("synthesis runner (graph)", graph_s),
                          ("same requests, direct", direct_s),
                          ("same requests, one at a time", one_by_one)):
        print(f"{name:>34} {seconds:>8.2f} {count / seconds:>8.2f}")
    print(f"\ngraph/direct throughput: {direct_s / graph_s:.2f} (target >= 0.9; medians of "
          f"{ROUNDS} interleaved rounds)")
    print(f"speed-up over one request at a time: {one_by_one / graph_s:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="insightv-bench-"))
    model_path = build_tiny_idefics3(folder / "model")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    if len(cores) > 1:  # server on the first core, client on the others (see serving.py)
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[0])
        pin({cores[0]})
    server = VLLMServer(model_path, served_model_name="tiny", dtype="float32",
                        max_model_len=2048, enforce_eager=True,
                        extra_args=["--block-size", "32"], env=env)
    with server:
        if len(cores) > 1:
            pin(set(cores[1:]))
        asyncio.run(measure(server, args.items, args.concurrency, folder))


if __name__ == "__main__":
    main()
