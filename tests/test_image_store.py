"""Images held once per run (insightv_agents.image_store): references in the state, the image
in LangGraph's store; nodes that check the state they are given."""

from __future__ import annotations

import asyncio
import base64
import io
import operator
import sqlite3
from pathlib import Path
from typing import Annotated, Any, ClassVar

import pytest
from helpers import step, verdict
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.store.memory import InMemoryStore
from PIL import Image
from typing_extensions import TypedDict

from insightv_agents import create_insightv_graph, create_synthesis_graph
from insightv_agents.errors import InvalidInputError
from insightv_agents.image_store import NAMESPACE, hold_images, resolve_images
from insightv_agents.nodes import ReasoningNode, SummaryNode, prepare_input
from insightv_agents.state import ReasoningNodeState
from insightv_agents.testing import ScriptedChatModel


def _png(side: int = 32, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buffer, "PNG")
    return buffer.getvalue()


def _sent_images(model: ScriptedChatModel) -> list[str]:
    return [part["image_url"]["url"] for messages in model.calls for message in messages
            if isinstance(message.content, list) for part in message.content
            if isinstance(part, dict) and part.get("type") == "image_url"]


SCRIPT = [step("look", "A red square.", "summary"), verdict("red")]
THREAD = {"configurable": {"thread_id": "t"}}


def test_with_a_store_the_state_holds_references_and_the_model_gets_the_image() -> None:
    model = ScriptedChatModel(SCRIPT)
    store = InMemoryStore()
    graph = create_insightv_graph(reasoner=model).compile(checkpointer=InMemorySaver(),
                                                          store=store)
    data = _png()
    out = graph.invoke({"image": data, "question": "What colour?"}, THREAD)
    assert out["answer"] == "red"
    values = graph.get_state(THREAD).values
    assert values["image"] is None  # the caller's payload is not kept
    (ref,) = values["images"]
    assert ref.startswith("sha256:") and len(ref) == 71
    (item,) = store.search(NAMESPACE)
    assert item.key == ref.removeprefix("sha256:")
    sent = _sent_images(model)
    assert len(sent) == 2 and all(url == item.value["url"] for url in sent)
    assert base64.b64decode(sent[0].split(",", 1)[1]) == data
    history = repr([snapshot.values for snapshot in graph.get_state_history(THREAD)])
    assert "base64," not in history and base64.b64encode(data).decode()[:60] not in history[200:]


def test_the_same_image_is_stored_once_across_runs() -> None:
    store = InMemoryStore()
    graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT, cycle=True)).compile(
        store=store)
    for _ in range(3):
        graph.invoke({"image": _png(), "question": "q"})
    graph.invoke({"image": [_png(), _png(color=(0, 0, 255))], "question": "q"})
    assert len(store.search(NAMESPACE, limit=100)) == 2


def test_without_a_store_the_state_holds_the_data_urls_and_clears_the_caller_image() -> None:
    graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile(
        checkpointer=InMemorySaver())
    graph.invoke({"image": _png(), "question": "q"}, THREAD)
    values = graph.get_state(THREAD).values
    assert values["image"] is None
    assert values["images"][0].startswith("data:image/png;base64,")


def test_a_resumed_run_sees_the_same_images(tmp_path: Path) -> None:
    """A run that crashed after its first step resumes from the SQLite checkpoint with the
    images from the store."""
    calls = {"n": 0}

    def flaky(messages: list[Any]) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("server went away")
        return step("look", "still looking", "continue") if calls["n"] == 1 else \
            step("look", "A red square.", "summary") if calls["n"] == 3 else verdict("red")

    model = ScriptedChatModel([flaky], cycle=True)
    store = InMemoryStore()
    with SqliteSaver.from_conn_string(str(tmp_path / "c.db")) as saver:
        graph = create_insightv_graph(reasoner=model).compile(checkpointer=saver, store=store)
        with pytest.raises(Exception, match="server went away"):
            graph.invoke({"image": _png(), "question": "q"}, THREAD, durability="sync")
        out = graph.invoke(None, THREAD, durability="sync")
    assert out["answer"] == "red" and len(out["steps"]) == 2
    sent = _sent_images(model)
    assert len(sent) == 4 and len(set(sent)) == 1


def test_a_reference_without_its_store_is_a_typed_error() -> None:
    (ref,) = hold_images(["data:image/png;base64," + base64.b64encode(_png()).decode()],
                         InMemoryStore())
    node = ReasoningNode(ScriptedChatModel(SCRIPT))
    with pytest.raises(InvalidInputError, match="no store"):
        node.invoke({"question": "q", "images": [ref], "steps": []})
    with pytest.raises(InvalidInputError, match="does not hold it"):
        resolve_images([ref], InMemoryStore())


@pytest.mark.parametrize("images", [
    ["/etc/passwd"], ["http://example.com/x.png"], [b"\x89PNG"], "data:image/png;base64,AAAA",
    ["sha256:abc"], [None], [{"url": "data:image/png;base64,AA"}],
    ["data:text/plain;base64,aGVsbG8="], ["data:image/png;base64,not base64 at all!"],
    ["data:image/png;base64,AAAA\nhttp://example.com"]])
def test_nodes_pass_only_prepared_images_to_models(images: Any) -> None:
    model = ScriptedChatModel(SCRIPT)
    with pytest.raises(InvalidInputError, match="images"):
        ReasoningNode(model).invoke({"question": "q", "images": images, "steps": []})
    with pytest.raises(InvalidInputError, match="images"):
        asyncio.run(SummaryNode(model).ainvoke({"question": "q", "images": images,
                                                "steps": []}))
    assert model.calls == []


class Bare(TypedDict):
    """A user's state that has none of the keys the nodes use beyond the question."""

    image: Any
    question: str
    answer: str


def test_nodes_bring_the_state_keys_they_use_to_a_users_graph() -> None:
    model = ScriptedChatModel([step("look", "A red square.", "summary"), "", "", ""])
    reason, judge = ReasoningNode(model), SummaryNode(model)
    builder = StateGraph(Bare)
    builder.add_node("prepare", prepare_input)
    builder.add_node("reason", reason)
    builder.add_node("judge", judge)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "reason")
    builder.add_edge("reason", "judge")
    builder.add_edge("judge", END)
    graph = builder.compile(checkpointer=InMemorySaver())
    graph.invoke({"image": _png(), "question": "q"}, THREAD)
    assert len(model.calls) == 4  # a step, then a verdict asked 3 times
    assert all("base64," in repr(call) for call in model.calls)  # each with the image
    values = graph.get_state(THREAD).values
    assert values["status"] == "failed"
    assert [failure["node"] for failure in values["failures"]] == ["summarize"]


class _Tagged(ReasoningNodeState):
    tag: str


class _TaggingNode(ReasoningNode):
    """A user's subclass that reads a key of its own."""

    seen: ClassVar[list[str]] = []

    def _conversation(self, state: dict[str, Any]) -> Any:
        self.seen.append(state.get("tag", "<missing>"))
        return super()._conversation(state)


def test_a_subclass_reading_more_keys_is_added_with_an_input_schema() -> None:
    class Graph(Bare):
        tag: str

    builder = StateGraph(Graph)
    builder.add_node("prepare", prepare_input)
    model = ScriptedChatModel(SCRIPT)
    builder.add_node("reason", _TaggingNode(model), input_schema=_Tagged)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "reason")
    builder.add_edge("reason", END)
    builder.compile().invoke({"image": _png(), "question": "q", "tag": "mine"})
    assert _TaggingNode.seen == ["mine"] and _sent_images(model)  # its key, and the image


def test_a_state_defining_a_node_key_differently_is_refused_when_building() -> None:
    class Clashing(TypedDict):
        question: str
        failures: list[Any]  # no reducer: the nodes append to it

    builder = StateGraph(Clashing)
    with pytest.raises(ValueError, match="failures"):
        builder.add_node("reason", ReasoningNode(ScriptedChatModel(SCRIPT)))

    class Agreeing(TypedDict):
        question: str
        failures: Annotated[list[Any], operator.add]

    StateGraph(Agreeing).add_node("reason", ReasoningNode(ScriptedChatModel(SCRIPT)))


def test_prepare_input_refuses_a_state_that_is_not_a_mapping() -> None:
    with pytest.raises(InvalidInputError, match="must be a dict"):
        prepare_input("What is shown?")  # type: ignore[arg-type]


def test_failed_synthesis_paths_carry_their_failure() -> None:
    """A path whose reasoning states no answer (final_answer="stated") is failed, and says
    why."""
    teacher = ScriptedChatModel([step("look", "I see a shape.", "summary")], cycle=True)
    graph = create_synthesis_graph(teacher=teacher, paths=2, final_answer="stated",
                                   scorer=None).compile()
    out = graph.invoke({"image": _png(), "question": "q", "answer": "3"})
    assert [path["status"] for path in out["paths"]] == ["failed", "failed"]
    for path in out["paths"]:
        (failure,) = path["failures"]
        assert failure["kind"] == "no_answer" and "states none" in failure["error"]


def test_checkpoints_stay_flat_in_the_number_of_steps(tmp_path: Path) -> None:
    """SQLite checkpoints of runs of 2 and 12 steps with a store: the image is not in them."""
    sizes = []
    for steps in (2, 12):
        script = [step(f"s{i}", "r" * 50, "continue") for i in range(steps - 1)]
        script += [step("end", "done", "summary"), verdict("red")]
        path = tmp_path / f"{steps}.db"
        with SqliteSaver.from_conn_string(str(path)) as saver:
            graph = create_insightv_graph(reasoner=ScriptedChatModel(script)).compile(
                checkpointer=saver, store=InMemoryStore())
            graph.invoke({"image": _png(256), "question": "q"}, THREAD)
        with sqlite3.connect(path) as db:
            blobs = b"".join(row[0] for row in db.execute("SELECT checkpoint FROM checkpoints"))
        assert b"base64," not in blobs
        sizes.append(path.stat().st_size)
    assert sizes[1] < sizes[0] + 200_000


def test_with_a_store_node_events_carry_no_image_payload() -> None:
    """``astream_events`` of a run given base64 text: only the caller's own input (the root
    run and ``prepare``'s start) and the model calls hold the image."""
    payload = base64.b64encode(_png()).decode()

    async def events() -> list[tuple[str, str, bool]]:
        graph = create_insightv_graph(reasoner=ScriptedChatModel(SCRIPT)).compile(
            store=InMemoryStore())
        return [(event["event"], event["name"], _holds(event["data"].get("output")))
                async for event in graph.astream_events(
                    {"image": payload, "question": "q"}, version="v2")
                if _holds(event["data"])]

    def _holds(data: Any) -> bool:
        return payload[:60] in repr(data) or "base64," in repr(data)

    holding = asyncio.run(events())
    assert {name for _, name, _ in holding} == {"LangGraph", "prepare", "ScriptedChatModel"}
    assert ("on_chain_start", "prepare", False) in holding
    assert all(kind.startswith("on_chat_model") for kind, name, _ in holding
               if name == "ScriptedChatModel")
    assert not any(in_output for _, name, in_output in holding if name != "ScriptedChatModel")
