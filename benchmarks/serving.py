"""Serving benchmark: what the graph costs on top of the model backends.

Measured side by side in one run, on a tiny random Idefics3 built offline:
  1. vLLM throughput: ``graph.batch``/``abatch`` at concurrency 1, 8, 32 vs. the very same
     requests (recorded from the graph's run, replayed with greedy decoding, so replies and
     token counts are identical) sent straight to the server by the OpenAI client at the same
     concurrency. Every question is reasoned for STEPS steps (the schema the server enforces
     only allows ``continue``, so a random model cannot stop at once) and then summarized.
     Target: graph/direct throughput >= 0.9.
  2. vLLM prefix-cache hit rate over multi-step reasoning, from the server's /metrics:
     share of prompt tokens served from the cache on every call after a conversation's
     first. Target >= 80%.
  3. In-process (transformers): graph time vs. the same ``generate`` calls made directly.
     Target <= 1.05.

On a machine with few cores the client's own work would slow the server down, which is not
what a deployment looks like (the model runs on its accelerator): the server is pinned to
the first core and the client to the others, where the OS allows it.

    INSIGHTV_VLLM_PYTHON=.vllm-venv/bin/python python benchmarks/serving.py [--questions 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from openai import AsyncOpenAI

from insightv_agents import create_insightv_graph
from insightv_agents.backends.transformers import ChatTransformersVLM
from insightv_agents.backends.vllm import ChatVLLM, VLLMServer
from insightv_agents.parsing import format_step, format_verdict
from insightv_agents.schema import (
    answer_json_schema,
    json_text_regex,
    scores_json_schema,
    step_json_schema,
    verdict_json_schema,
)
from insightv_agents.testing import build_tiny_idefics3

STEPS = 6
ROUNDS = 5
MAX_TOKENS = 120
# Texts that tell which node a constraint comes from (each node pins its own format).
SAMPLE_STEP = format_step({"summary": "s", "reasoning": "r", "action": "summary"})
SAMPLE_VERDICT = format_verdict({"reasoning_correct": True, "critique": "c", "answer": "a"})
# In-process replies as long as a real reasoning step: with very short replies the graph's
# fixed cost per call (a few ms of LangGraph and LangChain bookkeeping) would be measured
# against an unrealistically cheap generation.
IN_PROCESS_TOKENS = 256
IMAGE = str(Path(__file__).resolve().parent.parent / "examples" / "shapes.png")


class Recorder(BaseCallbackHandler):
    """Records each chat-model request of a run, grouped by the graph run it belongs to."""

    def __init__(self) -> None:
        self.requests: list[tuple[UUID | None, list[BaseMessage], dict[str, Any]]] = []

    def on_chat_model_start(self, serialized: Any, messages: list[list[BaseMessage]], *,
                            run_id: UUID, parent_run_id: UUID | None = None,
                            invocation_params: dict[str, Any] | None = None,
                            **kwargs: Any) -> None:
        metadata = kwargs.get("metadata") or {}
        params = {**(invocation_params or {}), "node": metadata.get("langgraph_node")}
        self.requests.append((metadata.get("question_id"), messages[0], params))

    def conversations(self, node: str | None = None
                      ) -> list[list[tuple[list[BaseMessage], dict[str, Any]]]]:
        """The recorded requests per question, in order (only ``node``'s, if given)."""
        grouped: dict[Any, list[tuple[list[BaseMessage], dict[str, Any]]]] = {}
        for root, messages, params in self.requests:
            if node is None or params["node"] == node:
                grouped.setdefault(root, []).append((messages, params))
        return list(grouped.values())


def questions(count: int, first: int = 0) -> list[dict[str, Any]]:
    """``count`` questions, each about its own image (so caching across questions is nil)."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    items = []
    for i in range(first, first + count):
        image = Image.open(IMAGE).convert("RGB")
        x = i * 5 % 300
        ImageDraw.Draw(image).rectangle((x, 5, x + 8, 13), fill=(i % 256, 99, i // 256))
        buffer = BytesIO()
        image.save(buffer, format="PNG")
        items.append({"image": buffer.getvalue(),
                      "question": f"Question {i}: how many red shapes are there?"})
    return items


def configs(count: int, concurrency: int, recorder: Recorder | None) -> list[Any]:
    return [{"max_concurrency": concurrency, "metadata": {"question_id": i},
             "callbacks": [recorder] if recorder else []} for i in range(count)]


def run_graph(graph: Any, inputs: list[dict[str, Any]], concurrency: int,
              recorder: Recorder | None = None) -> float:
    started = time.perf_counter()
    graph.batch(inputs, configs(len(inputs), concurrency, recorder))
    return time.perf_counter() - started


async def arun_graph(graph: Any, inputs: list[dict[str, Any]], concurrency: int,
                     recorder: Recorder | None = None) -> float:
    started = time.perf_counter()
    await graph.abatch(inputs, configs(len(inputs), concurrency, recorder))
    return time.perf_counter() - started


async def replay(client: AsyncOpenAI, model: str,
                 conversations: list[list[tuple[list[BaseMessage], dict[str, Any]]]],
                 concurrency: int) -> float:
    """Send each recorded conversation's requests in order, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(conversation: list[tuple[list[BaseMessage], dict[str, Any]]]) -> None:
        async with gate:
            for messages, params in conversation:
                await client.chat.completions.create(
                    model=model, messages=convert_to_openai_messages(messages),
                    temperature=0, max_completion_tokens=params.get("max_completion_tokens"),
                    extra_body=params.get("extra_body"))

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in conversations))
    return time.perf_counter() - started


def prefix_cache_counters(server: VLLMServer) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://{server.host}:{server.port}/metrics") as response:
        text = response.read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text,
                                                re.M))

    return total("vllm:prefix_cache_hits_total"), total("vllm:prefix_cache_queries_total")


class CacheMeter(BaseCallbackHandler):
    """Reads the server's prefix-cache counters around each reasoning call (concurrency 1)."""

    def __init__(self, server: VLLMServer) -> None:
        self.server = server
        self.calls: dict[Any, int] = {}
        self.before: tuple[float, float] | None = None
        self.hits = self.queries = 0.0

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID,
                            **kwargs: Any) -> None:
        metadata = kwargs.get("metadata") or {}
        if metadata.get("langgraph_node") != "reason":
            self.before = None
            return
        question = metadata.get("question_id")
        self.calls[question] = self.calls.get(question, 0) + 1
        # A question's first call has nothing of its own to reuse: it is not counted.
        self.before = prefix_cache_counters(self.server) if self.calls[question] > 1 else None

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.before is not None:
            hits, queries = prefix_cache_counters(self.server)
            self.hits += hits - self.before[0]
            self.queries += queries - self.before[1]


def continuing_model(server: VLLMServer) -> ChatVLLM:
    """A client whose reasoning schema only allows ``continue``: every run takes STEPS steps."""

    class Continuing(ChatVLLM):
        def bind_structured_outputs(self, constraint: Any) -> Any:
            # Short strings, so that every reply is complete within MAX_TOKENS.
            pattern = constraint.get("regex")
            if pattern and re.fullmatch(pattern, SAMPLE_STEP):
                step: Any = step_json_schema(max_summary_chars=16, max_reasoning_chars=48)
                step["properties"]["action"]["enum"] = ["continue"]
                return super().bind_structured_outputs({"regex": json_text_regex(step)})
            if pattern and re.fullmatch(pattern, SAMPLE_VERDICT):
                verdict = verdict_json_schema(max_critique_chars=48, max_answer_chars=16)
                return super().bind_structured_outputs({"regex": json_text_regex(verdict)})
            schema = constraint["json"]
            properties = schema["properties"]
            if "scores" in properties:
                schema = scores_json_schema(paths=properties["scores"]["maxItems"],
                                            max_comment_chars=16)
            elif "answer" in properties:
                schema = answer_json_schema(max_answer_chars=16)
            return super().bind_structured_outputs({"json": schema})

    return Continuing(base_url=server.base_url, model=server.served_model_name,
                      api_key="EMPTY", temperature=0, max_completion_tokens=MAX_TOKENS)


class ModelClock(BaseCallbackHandler):
    """Adds up the time spent inside chat-model calls."""

    def __init__(self) -> None:
        self.started: dict[UUID, float] = {}
        self.seconds = 0.0

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID,
                            **kwargs: Any) -> None:
        self.started[run_id] = time.perf_counter()

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.seconds += time.perf_counter() - self.started.pop(run_id)


def in_process(model_path: Path, count: int) -> tuple[float, float, float, int]:
    """Medians over rounds of: the graph's time, the same calls made directly, and the
    graph's time outside its model calls; plus the number of calls per round. Each
    question's direct calls run right after its graph run, so noise hits both alike."""
    model = ChatTransformersVLM(model_path=str(model_path),
                                max_new_tokens=IN_PROCESS_TOKENS)
    graph = create_insightv_graph(reasoner=model, max_steps=STEPS, max_retries=0).compile()
    inputs = questions(count)
    graph.invoke(inputs[0])  # warm-up
    graph_times, direct_times, outside_times = [], [], []
    for _ in range(ROUNDS):
        graph_time = direct_time = outside = 0.0
        calls = 0
        for item in inputs:
            recorder, clock = Recorder(), ModelClock()
            started = time.perf_counter()
            graph.invoke(item, {"callbacks": [recorder, clock]})
            elapsed = time.perf_counter() - started
            graph_time += elapsed
            outside += elapsed - clock.seconds
            calls += len(recorder.requests)
            started = time.perf_counter()
            for _, messages, _ in recorder.requests:
                model.invoke(messages)
            direct_time += time.perf_counter() - started
        graph_times.append(graph_time)
        direct_times.append(direct_time)
        outside_times.append(outside)
    return (statistics.median(graph_times), statistics.median(direct_times),
            statistics.median(outside_times), calls)


async def served(server: VLLMServer, count: int) -> None:
    graph = create_insightv_graph(reasoner=continuing_model(server), max_steps=STEPS,
                                  max_retries=0).compile()
    client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY")
    print("1. vLLM throughput: graph (batch, abatch) vs the same requests sent directly "
          f"(medians of {ROUNDS} interleaved rounds)")
    print(f"{'concurrency':>12} {'questions':>10} {'requests':>9} {'batch s':>8} "
          f"{'abatch s':>9} {'direct s':>9} {'batch/direct':>13} {'abatch/direct':>14}")
    for concurrency in (1, 8, 32):
        # Enough questions for every concurrency level to keep the server busy.
        inputs = questions(max(count, concurrency))
        await arun_graph(graph, inputs, concurrency)  # warm-up: every mode sees a warm cache
        times: dict[str, list[float]] = {"batch": [], "abatch": [], "direct": []}
        for _ in range(ROUNDS):  # interleaved, so machine noise hits all three alike
            recorder = Recorder()
            times["batch"].append(await asyncio.to_thread(
                run_graph, graph, inputs, concurrency, recorder))
            times["abatch"].append(await arun_graph(graph, inputs, concurrency))
            times["direct"].append(await replay(client, server.served_model_name,
                                                recorder.conversations(), concurrency))
        batch, abatch, direct = (statistics.median(times[k])
                                 for k in ("batch", "abatch", "direct"))
        print(f"{concurrency:>12} {len(inputs):>10} {len(recorder.requests):>9} {batch:>8.2f} "
              f"{abatch:>9.2f} {direct:>9.2f} {direct / batch:>13.2f} {direct / abatch:>14.2f}")
    # Fresh images: nothing of these questions is in the cache yet.
    meter = CacheMeter(server)
    fresh = questions(8, first=1000)
    graph.batch(fresh, [{"callbacks": [meter], "metadata": {"question_id": i}}
                        for i in range(len(fresh))], max_concurrency=1)
    rate = meter.hits / meter.queries if meter.queries else float("nan")
    print(f"\n2. prefix-cache hits over {STEPS}-step reasoning (the graph's own requests, every "
          f"reasoning call after a question's first): {rate:.1%} of {int(meter.queries)} prompt "
          "tokens (target >= 80%)")


def pin(cores: set[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8,
                        help="questions per run (at least the concurrency)")
    parser.add_argument("--part", choices=["all", "vllm", "in-process"], default="all",
                        help="which part to run (default: all)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="insightv-bench-"))
    model_path = build_tiny_idefics3(folder / "model")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cores, client_cores = ({cores[0]}, set(cores[1:])) if len(cores) > 1 else (None, None)
    print(f"tiny Idefics3 at {model_path}; step mode, {STEPS} steps then a summary; greedy "
          f"decoding; server on cores {server_cores or 'any'}, client on {client_cores or 'any'}"
          "\n")
    # vLLM's CPU backend caches prefixes in blocks of 128 tokens by default (GPUs: 16); on
    # these short tiny-model prompts that rounding alone hides up to 127 tokens per call,
    # so the server uses 32, the smallest size the CPU backend handles at full speed.
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    if server_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(min(server_cores))
        pin(server_cores)  # the server's processes inherit this
    server = VLLMServer(model_path, served_model_name="tiny", dtype="float32",
                        max_model_len=2048, enforce_eager=True,
                        extra_args=["--block-size", "32"], env=env)
    if args.part in ("all", "vllm"):
        with server:
            if client_cores:
                pin(client_cores)
            asyncio.run(served(server, args.questions))
    if args.part == "vllm":
        return
    if cores:
        pin(set(cores))  # the in-process model gets every core
    graph_time, direct_time, outside, calls = in_process(model_path, min(args.questions, 4))
    print(f"\n3. in-process transformers ({calls} calls of up to {IN_PROCESS_TOKENS} new tokens "
          f"per round): graph {graph_time:.2f} s vs the same calls made directly "
          f"{direct_time:.2f} s (medians of {ROUNDS} rounds, interleaved per question): "
          f"ratio {graph_time / direct_time:.3f} (target <= 1.05); time the graph spends "
          f"outside model calls: {outside / calls * 1000:.1f} ms per call")


if __name__ == "__main__":
    main()
