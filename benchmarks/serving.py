"""Serving benchmark: what the graph costs on top of the model backends.

Measured side by side in one run, on a tiny random Idefics3 built offline:
  1. vLLM throughput: ``graph.batch`` at concurrency 1, 8, 32 vs. the very same requests
     (recorded from the graph's run, replayed with greedy decoding, so replies and token
     counts are identical) sent straight to the server by the OpenAI client at the same
     concurrency. Target: graph/direct throughput >= 0.9.
  2. vLLM prefix-cache hit rate over multi-step reasoning, from the server's /metrics:
     share of prompt tokens served from the cache on every call after a conversation's
     first. Target >= 80%.
  3. In-process (transformers): graph time vs. the same ``generate`` calls made directly.
     Target <= 1.05.

    INSIGHTV_VLLM_PYTHON=.vllm-venv/bin/python python benchmarks/serving.py [--questions 32]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_openai.chat_models.base import _convert_message_to_dict
from openai import AsyncOpenAI

from insightv_agents import ModelOutputError, create_insightv_graph, load_images, parse_steps
from insightv_agents.integrations.transformers import ChatTransformersVLM
from insightv_agents.integrations.vllm import VLLMServer
from insightv_agents.prompts import DEFAULT_PROMPTS, reasoning_messages
from insightv_agents.schema import step_json_schema
from insightv_agents.testing import build_tiny_idefics3

STEPS = 6
ROUNDS = 3
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


def questions(count: int) -> list[dict[str, Any]]:
    """``count`` questions, each about its own image (so caching across questions is nil)."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    items = []
    for i in range(count):
        image = Image.open(IMAGE).convert("RGB")
        ImageDraw.Draw(image).rectangle((i * 5 % 300, 5, i * 5 % 300 + 8, 13), fill=(i, 99, 7))
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
                    model=model, messages=[_convert_message_to_dict(m) for m in messages],
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


async def prefix_cache_rate(server: VLLMServer, client: AsyncOpenAI,
                            inputs: list[dict[str, Any]]) -> tuple[float, int]:
    """Prefix-cache hit rate of multi-step reasoning in the reasoning node's message layout.

    The server writes STEPS steps per question (a continue-only schema keeps a random model
    going); every call after a question's first is counted.
    """
    schema = step_json_schema(max_summary_chars=40, max_reasoning_chars=120)
    schema["properties"]["action"]["enum"] = ["continue"]  # type: ignore[index]
    hits = queries = 0.0
    for item in inputs:
        images = load_images(item["image"])
        steps: list[Any] = []
        for index in range(STEPS):
            messages = reasoning_messages(prompts=DEFAULT_PROMPTS, mode="step",
                                          question=item["question"], images=images,
                                          steps=steps)
            before = prefix_cache_counters(server)
            reply = await client.chat.completions.create(
                model=server.served_model_name, temperature=0, max_completion_tokens=200,
                messages=[_convert_message_to_dict(m) for m in messages],
                extra_body={"structured_outputs": {"json": schema}})
            after = prefix_cache_counters(server)
            if index:
                hits, queries = hits + after[0] - before[0], queries + after[1] - before[1]
            try:
                steps += parse_steps(reply.choices[0].message.content or "")[:1]
            except ModelOutputError:
                steps.append({"summary": "?", "reasoning": "?", "action": "continue"})
    return (hits / queries if queries else float("nan")), int(queries)


def in_process(model_path: Path, count: int) -> tuple[float, float]:
    """Medians over interleaved rounds: the graph, then its recorded calls made directly."""
    model = ChatTransformersVLM(model_path=str(model_path), max_new_tokens=48)
    graph = create_insightv_graph(reasoner=model, max_steps=STEPS, max_retries=0).compile()
    inputs = questions(count)
    graph.invoke(inputs[0])  # warm-up
    graph_times, direct_times = [], []
    for _ in range(ROUNDS * 2):
        recorder = Recorder()
        started = time.perf_counter()
        for index, item in enumerate(inputs):
            graph.invoke(item, {"callbacks": [recorder], "metadata": {"question_id": index}})
        graph_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _, messages, _ in recorder.requests:
            model.invoke(messages)
        direct_times.append(time.perf_counter() - started)
    return statistics.median(graph_times), statistics.median(direct_times)


async def served(server: VLLMServer, inputs: list[dict[str, Any]]) -> None:
    chat = server.chat_model(max_tokens=48, temperature=0)
    graph = create_insightv_graph(reasoner=chat, max_steps=STEPS, max_retries=0).compile()
    client = AsyncOpenAI(base_url=server.base_url, api_key="EMPTY")
    await arun_graph(graph, inputs[:2], 2)  # warm-up
    print("1. vLLM throughput: graph (batch, abatch) vs the same requests sent directly")
    print(f"{'concurrency':>12} {'requests':>9} {'batch s':>8} {'abatch s':>9} {'direct s':>9} "
          f"{'batch/direct':>13} {'abatch/direct':>14}")
    for concurrency in (1, 8, 32):
        times: dict[str, list[float]] = {"batch": [], "abatch": [], "direct": []}
        for _ in range(ROUNDS):  # interleaved, so machine noise hits all three alike
            recorder = Recorder()
            times["batch"].append(
                await asyncio.to_thread(run_graph, graph, inputs, concurrency, recorder))
            times["abatch"].append(await arun_graph(graph, inputs, concurrency))
            times["direct"].append(
                await replay(client, "tiny", recorder.conversations(), concurrency))
        batch, abatch, direct = (statistics.median(times[k]) for k in ("batch", "abatch",
                                                                       "direct"))
        print(f"{concurrency:>12} {len(recorder.requests):>9} {batch:>8.2f} {abatch:>9.2f} "
              f"{direct:>9.2f} {direct / batch:>13.2f} {direct / abatch:>14.2f}")
    rate, tokens = await prefix_cache_rate(server, client, inputs[:8])
    print(f"\n2. prefix-cache hits over {STEPS}-step reasoning (calls after each question's "
          f"first): {rate:.1%} of {tokens} prompt tokens (target >= 80%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="insightv-bench-"))
    model_path = build_tiny_idefics3(folder / "model")
    print(f"tiny Idefics3 at {model_path}; {args.questions} questions; step mode, "
          f"max_steps={STEPS}; greedy decoding\n")
    # vLLM's CPU backend caches prefixes in blocks of 128 tokens by default (GPUs: 16); on
    # these short tiny-model prompts that rounding alone hides up to 127 tokens per call,
    # so the server uses 32, the smallest size the CPU backend handles at full speed.
    with VLLMServer(model_path, served_model_name="tiny", dtype="float32",
                    max_model_len=2048, enforce_eager=True, extra_args=["--block-size", "32"],
                    env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as server:
        asyncio.run(served(server, questions(args.questions)))
    graph_time, direct_time = in_process(model_path, min(args.questions, 8))
    print(f"\n3. in-process transformers: graph {graph_time:.2f} s vs direct calls "
          f"{direct_time:.2f} s (medians of {ROUNDS * 2} rounds): ratio "
          f"{graph_time / direct_time:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
