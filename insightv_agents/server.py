"""The Insight-V graph for LangGraph Server and Studio (``langgraph dev`` with the repository's
``langgraph.json``), configured per run by a serializable context.

Every run picks its agents and settings over HTTP: ``context={"base_url": ..., "model": ...,
"summary_model": ..., "mode": ..., "max_steps": ...}`` (Studio shows :class:`ServerContext` as
a form). With no model named, the demo agents answer in-process, so the served graph works
with no model server running. Agents are driven as their agent cards say
(:mod:`~insightv_agents.cards`) unless the context sets a profile or a mode.

The context names what the server process connects to and loads (``base_url``,
``local_model``, ``allow_urls``): serve it to trusted callers only, as ``langgraph dev`` does
on 127.0.0.1.

Example::

    from langgraph_sdk import get_sync_client

    client = get_sync_client(url="http://127.0.0.1:2024")
    thread = client.threads.create()
    for part in client.runs.stream(thread["thread_id"], "insightv",
                                   input={"image": "chart.png", "question": "..."},
                                   context={"base_url": "http://127.0.0.1:8000/v1",
                                            "model": "reasoner"},
                                   stream_mode=["updates", "custom"], stream_subgraphs=True):
        print(part.event, part.data)
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig, RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime, get_runtime
from pydantic import TypeAdapter, ValidationError

from insightv_agents.errors import ConfigError
from insightv_agents.graphs.insightv import REDACT_IMAGES, create_insightv_graph
from insightv_agents.images import ImagePolicy
from insightv_agents.state import InsightVInput, InsightVOutput


class ServedState(InsightVInput, InsightVOutput):
    """The served graph's state: the run's input and the Insight-V graph's output (each
    run's output replaces the last one's on a thread)."""


@dataclass(frozen=True)
class ServerContext:
    """What a run of the served graph uses (every field a plain value, so LangGraph Server
    takes it over HTTP and Studio shows it as a form).

    Args:
        base_url: API root of the reasoning agent's OpenAI-compatible server (vLLM), or a
            list of the roots of its replicas (an endpoint pool); with neither it nor
            ``local_model``, the demo agents run in-process.
        model: the reasoning agent's served name.
        summary_base_url, summary_model: the summary agent's server and name (default: the
            reasoning agent plays both roles; ``summary_base_url`` defaults to ``base_url``).
        local_model: a model folder run in-process as both agents (its agent card says how).
        profile: the agents' format profile (``steps``, ``chain``, ``insightv-reference``,
            ``llava-cot``); default: as each agent's card says.
        mode: ``step`` or ``chain`` (our formats); default: the card's.
        max_steps, max_revisions: caps of the reasoning and of the summary agent's revisions.
        temperature, max_tokens: sampling (default: the cards' recommendation).
        allow_urls: accept http(s) image URLs.
    """

    base_url: str | Sequence[str] | None = None
    model: str = "insightv-reason"
    summary_base_url: str | Sequence[str] | None = None
    summary_model: str | None = None
    local_model: str | None = None
    profile: str | None = None
    mode: Literal["step", "chain"] | None = None
    max_steps: int = 16
    max_revisions: int = 0
    temperature: float | None = None
    max_tokens: int | None = None
    allow_urls: bool = False

    def __post_init__(self) -> None:  # a list of URLs kept as a tuple: contexts are hashed
        for name in ("base_url", "summary_base_url"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))


def agents(context: ServerContext) -> tuple[Any, Any]:
    """The (reasoner, summarizer) chat models ``context`` names (``summarizer`` ``None``: the
    reasoner plays both roles); the same models again for the same fields."""
    return _agents(context.base_url, context.model, context.summary_base_url,
                   context.summary_model, context.local_model, context.temperature,
                   context.max_tokens)


@functools.lru_cache(maxsize=8)
def _agents(base_url: str | Sequence[str] | None, model: str,
            summary_base_url: str | Sequence[str] | None,
            summary_model: str | None, local_model: str | None, temperature: float | None,
            max_tokens: int | None) -> tuple[Any, Any]:
    if base_url is not None and local_model is not None:
        raise ConfigError("give base_url or local_model, not both.")
    if local_model is not None:
        from insightv_agents.backends.transformers import ChatTransformersVLM

        given = {key: value for key, value in (("temperature", temperature),
                                               ("max_new_tokens", max_tokens))
                 if value is not None}
        return ChatTransformersVLM(model_path=local_model, **given), None
    if base_url is None:
        from insightv_agents import demo

        if not demo.demo_available():
            raise ConfigError("no model given and the demo agents are not installed: set "
                              "base_url (and model) or local_model in the run's context.")
        return demo.demo_agents(temperature=temperature, max_new_tokens=max_tokens)
    from insightv_agents.backends.vllm import vllm_chat_model

    reasoner = vllm_chat_model(base_url, model, temperature=temperature, max_tokens=max_tokens)
    if summary_model is None and summary_base_url is None:
        return reasoner, None
    # the same servers: one pool, so the two agents' load is counted together
    return reasoner, vllm_chat_model(summary_base_url or reasoner.pool or base_url,
                                     summary_model or model, temperature=temperature,
                                     max_tokens=max_tokens)


_building = threading.Lock()  # one build at a time: models are loaded once


def insightv_graph(context: ServerContext) -> Any:
    """The compiled Insight-V graph for ``context`` (built once per distinct context, the 32
    most recent kept)."""
    with _building:
        return _insightv_graph(context)


@functools.lru_cache(maxsize=32)
def _insightv_graph(context: ServerContext) -> Any:
    reasoner, summarizer = agents(context)
    return create_insightv_graph(
        reasoner=reasoner, summarizer=summarizer, profile=context.profile, mode=context.mode,
        max_steps=context.max_steps, max_revisions=context.max_revisions,
        image_policy=ImagePolicy(allow_urls=context.allow_urls),
    ).compile(name="insightv")


def _context(runtime: Runtime[Any] | None) -> ServerContext:
    """The run's context as a :class:`ServerContext` (a mapping of its fields is one too).

    Raises:
        ConfigError: for a field it does not have.
    """
    context = getattr(runtime, "context", None)
    if context is None or isinstance(context, ServerContext):
        return context or ServerContext()
    try:
        values = context if isinstance(context, dict) else asdict(context)
        return TypeAdapter(ServerContext).validate_python(values)
    except (TypeError, ValidationError) as err:
        raise ConfigError(f"invalid context: {err}") from None


def _inputs(state: ServedState) -> dict[str, Any]:
    return {"image": state.get("image"), "question": state.get("question")}


def _run(state: ServedState, config: RunnableConfig) -> Any:
    result = insightv_graph(_context(get_runtime())).invoke(_inputs(state), config)
    return {**result, "image": None}  # the thread keeps no copy of the caller's image


async def _arun(state: ServedState, config: RunnableConfig) -> Any:
    # building the agents reads files and asks servers: off the event loop
    graph = await asyncio.to_thread(insightv_graph, _context(get_runtime()))
    return {**await graph.ainvoke(_inputs(state), config), "image": None}


def create_server_graph() -> StateGraph[ServedState, ServerContext, InsightVInput,
                                        InsightVOutput]:
    """The served graph: one node running the Insight-V graph (as a subgraph: its steps and
    events stream with ``stream_subgraphs``) that the run's :class:`ServerContext` picks."""
    builder = StateGraph(ServedState, context_schema=ServerContext,
                         input_schema=InsightVInput, output_schema=InsightVOutput)
    builder.add_node("insightv", RunnableLambda(_run, afunc=_arun, name="insightv"),
                     trace_policy=REDACT_IMAGES)
    builder.add_edge(START, "insightv")
    builder.add_edge("insightv", END)
    return builder


graph = create_server_graph().compile(name="insightv")
"""The graph ``langgraph.json`` serves."""
