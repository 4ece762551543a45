"""The graph as a LangGraph citizen: async, streaming, checkpoints, subgraphs, traces."""

from __future__ import annotations

import asyncio
import json
import operator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from helpers import step, verdict
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

from insightv_agents import ModelCallError, create_insightv_graph
from insightv_agents.nodes import ReasoningNode, SummaryNode
from insightv_agents.testing import ScriptedChatModel

SCRIPT = [step("look"), step("count", "3", "summary"), verdict("3")]


async def test_ainvoke_matches_invoke(inputs: dict[str, Any]) -> None:
    sync = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile().invoke(inputs)
    graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile()
    assert await graph.ainvoke(inputs) == sync


def scripted_by_turn(messages: list[BaseMessage]) -> str:
    """SCRIPT as a function of the conversation, so that concurrent runs can share a model."""
    if "summary agent" in messages[0].text:
        return SCRIPT[2]
    return SCRIPT[1] if any(isinstance(m, AIMessage) for m in messages) else SCRIPT[0]


class AsyncOnlyModel(BaseChatModel):
    """Replies only on the async path, after yielding to the event loop.

    With `gate` set, a call waits until `gate` calls are in flight at once: runs that were
    serialised would never get there, so the wait times out instead of passing by luck.
    """

    delay: float = 0.005
    gate: int = 0
    in_flight: int = 0
    peak: int = 0
    opened: Any = None

    @property
    def _llm_type(self) -> str:
        return "async-only"

    def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
        raise AssertionError("the async graph used the sync model path")

    async def _agenerate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any
                         ) -> ChatResult:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate:
                if self.opened is None:
                    self.opened = asyncio.Event()
                if self.in_flight >= self.gate:
                    self.opened.set()
                await asyncio.wait_for(self.opened.wait(), timeout=30)
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        text = scripted_by_turn(messages)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


async def test_async_path_is_truly_async_and_runs_concurrently(inputs: dict[str, Any]) -> None:
    model = AsyncOnlyModel(gate=8)
    graph = create_insightv_graph(reasoner=model).compile()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(graph.ainvoke(inputs) for _ in range(8)))
    task.cancel()
    assert [r["answer"] for r in results] == ["3"] * 8
    assert model.peak == 8  # the eight runs' model calls were all in flight together
    assert ticks > 8  # the event loop kept running while the model "worked"


def test_stream_updates_and_step_events_in_order(inputs: dict[str, Any]) -> None:
    graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile()
    seen = []
    for mode, chunk in graph.stream(inputs, stream_mode=["updates", "custom"]):
        if mode == "updates":
            seen.append(("update", next(iter(chunk))))
        else:
            seen.append((chunk["event"], chunk.get("index")))
    assert seen == [("update", "prepare"), ("step", 1), ("update", "reason"), ("step", 2),
                    ("update", "reason"), ("verdict", None), ("update", "summarize")]


def test_reason_updates_carry_only_the_new_step(inputs: dict[str, Any]) -> None:
    graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile()
    updates = [u["reason"] for u in graph.stream(inputs, stream_mode="updates") if "reason" in u]
    assert [[s["summary"] for s in u["steps"]] for u in updates] == [["look"], ["count"]]


async def test_astream_custom_events(inputs: dict[str, Any]) -> None:
    graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile()
    events = [chunk["event"] async for chunk in graph.astream(inputs, stream_mode="custom")]
    assert events == ["step", "step", "verdict"]


def test_in_memory_checkpoint_interrupt_and_resume(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel(SCRIPT)
    graph = create_insightv_graph(reasoner=model).compile(
        checkpointer=InMemorySaver(), interrupt_before=["summarize"])
    config = {"configurable": {"thread_id": "t1"}}
    graph.invoke(inputs, config)
    state = graph.get_state(config)
    assert state.next == ("summarize",) and len(state.values["steps"]) == 2
    out = graph.invoke(None, config)
    assert out["answer"] == "3" and len(model.calls) == 3


def test_sqlite_thread_resumes_in_a_new_process_after_a_crash(
        tmp_path: Path, inputs: dict[str, Any]) -> None:
    database = str(tmp_path / "threads.sqlite")
    config = {"configurable": {"thread_id": "job-7"}}

    def crash(_: Any) -> str:
        raise ConnectionError("summary server went away")

    first = ScriptedChatModel([step("look"), step("count", "3", "summary"), crash])
    with SqliteSaver.from_conn_string(database) as saver:
        graph = create_insightv_graph(reasoner=first).compile(checkpointer=saver)
        with pytest.raises(ModelCallError):
            graph.invoke(inputs, config)
    # A fresh saver and graph, as after a restart: the finished steps are not redone.
    second = ScriptedChatModel([verdict("3")])
    with SqliteSaver.from_conn_string(database) as saver:
        graph = create_insightv_graph(reasoner=second).compile(checkpointer=saver)
        out = graph.invoke(None, config)
    assert out["answer"] == "3" and [s["summary"] for s in out["steps"]] == ["look", "count"]
    assert len(second.calls) == 1


def test_a_reused_thread_starts_each_question_clean(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel(SCRIPT * 2)
    graph = create_insightv_graph(reasoner=model).compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    graph.invoke(inputs, config)
    out = graph.invoke({**inputs, "question": "Another?"}, config)
    assert len(out["steps"]) == 2 and out["failures"] == []


class Parent(TypedDict, total=False):
    image: Any
    question: str
    answer: str
    log: Annotated[list[str], operator.add]


def test_embeds_as_a_subgraph_node(inputs: dict[str, Any]) -> None:
    model = ScriptedChatModel([scripted_by_turn], cycle=True)
    insightv = create_insightv_graph(reasoner=model).compile(name="insightv")

    def report(state: Parent) -> dict[str, Any]:
        return {"log": [f"answered {state['answer']}"]}

    parent = StateGraph(Parent)
    parent.add_node("insightv", insightv)
    parent.add_node("report", report)
    parent.add_edge(START, "insightv")
    parent.add_edge("insightv", "report")
    parent.add_edge("report", END)
    app = parent.compile()
    out = app.invoke(inputs)
    assert out["answer"] == "3" and out["log"] == ["answered 3"]
    namespaces = {ns for ns, _ in app.stream(inputs, stream_mode="custom", subgraphs=True)}
    assert len(namespaces) == 1 and next(iter(namespaces))[0].startswith("insightv:")


def test_nodes_compose_in_a_custom_graph() -> None:
    """The nodes alone, in a user's own graph with its own state keys."""

    class Mine(TypedDict, total=False):
        question: str
        images: list[str]
        steps: Annotated[list[dict[str, Any]], operator.add]
        answer: str
        verdict: Any
        reasoning: str
        status: str
        failures: Annotated[list[Any], operator.add]

    reason = ReasoningNode(ScriptedChatModel([step("a", "r", "summary")]), name="think")
    judge = SummaryNode(ScriptedChatModel([verdict("yes")]), name="judge")
    graph = StateGraph(Mine)
    graph.add_node("think", reason)
    graph.add_node("judge", judge)
    graph.add_edge(START, "think")
    graph.add_conditional_edges("think", lambda s: "judge" if reason.is_done(s) else "think")
    graph.add_edge("judge", END)
    out = graph.compile().invoke({"question": "q?", "images": []})
    assert out["answer"] == "yes" and out["steps"][0]["summary"] == "a"


class Recorder(BaseTracer):
    """A tracer like LangSmith's: records every run's inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        pass

    def _end_trace(self, run: Run) -> None:
        self.runs.append(run)
        super()._end_trace(run)


def test_graph_traces_hold_no_image_payloads(image_path: Path) -> None:
    recorder = Recorder()
    graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile()
    graph.invoke({"image": str(image_path), "question": "q"}, {"callbacks": [recorder]})
    chain_runs = [run for run in recorder.runs if run.run_type == "chain"]
    names = {run.name for run in chain_runs}
    assert {"prepare", "reason", "summarize"} <= names
    leaking = [run.name for run in chain_runs
               if "base64," in repr(run.inputs) + repr(run.outputs)]
    assert leaking == []
    assert any("<image: " in repr(run.inputs) for run in chain_runs)


@pytest.mark.parametrize("redacted", [True, False])
def test_langsmith_tracer_sends_no_image_payloads(image_path: Path, redacted: bool) -> None:
    """What a LangSmith tracer posts for a synthesis run (root, subgraph and model runs
    included), captured by a loopback stand-in of the LangSmith API."""
    from helpers import FakeOpenAIServer, teacher
    from langchain_core.tracers.langchain import LangChainTracer
    from langsmith import Client

    from insightv_agents import create_synthesis_graph
    from insightv_agents.tracing import langsmith_client

    with FakeOpenAIServer(lambda body: "{}") as server:
        options = {"api_url": server.url.removesuffix("/v1"), "api_key": "test-key",
                   "auto_batch_tracing": False}
        client = langsmith_client(**options) if redacted else Client(**options)
        tracer = LangChainTracer(project_name="t", client=client)
        graph = create_synthesis_graph(
            teacher=ScriptedChatModel([teacher(steps=1)], cycle=True), paths=2).compile()
        graph.invoke({"image": str(image_path), "question": "q", "answer": "3"},
                     {"callbacks": [tracer]})
        tracer.wait_for_futures()
    sent = json.dumps(server.requests)
    assert len(server.requests) > 5  # the runs were posted
    assert ("base64," in sent) is not redacted  # the plain client leaks the pictures
    assert "test-key" not in sent
    if redacted:
        assert "<image: " in sent
