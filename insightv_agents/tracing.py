"""LangSmith tracing that records no image payloads.

Every node of the library's graphs already records a redacted copy of its input and output
(LangGraph's ``TracePolicy`` with :func:`~insightv_agents.images.redact_images`). The root
graph run, a subgraph's own run (the synthesis paths) and chat-model runs are recorded by the
tracer as they are, with every image as a ``data:`` URL; LangSmith's client-side hooks
(``hide_inputs`` / ``hide_outputs``) redact those too. Use :func:`langsmith_tracer` as a
callback, or pass :func:`langsmith_client` to your own tracer::

    graph.invoke(inputs, {"callbacks": [langsmith_tracer(project_name="insightv")]})

API keys never reach a trace: the chat models keep them as secrets.
"""

from __future__ import annotations

from typing import Any

from insightv_agents.images import redact_images


def langsmith_client(**options: Any) -> Any:
    """A ``langsmith.Client`` that replaces image payloads in every run's inputs and
    outputs by short placeholders (``options`` go to the client: ``api_url``, ...)."""
    from langsmith import Client

    return Client(hide_inputs=redact_images, hide_outputs=redact_images, **options)


def langsmith_tracer(project_name: str | None = None, **options: Any) -> Any:
    """A ``LangChainTracer`` on :func:`langsmith_client`."""
    from langchain_core.tracers.langchain import LangChainTracer

    return LangChainTracer(project_name=project_name, client=langsmith_client(**options))
