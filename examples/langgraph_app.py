"""The Insight-V graph for ``langgraph dev`` / LangGraph Server (see langgraph.json).

Models come from the environment: INSIGHTV_BASE_URL and INSIGHTV_MODEL for the reasoning
agent, optionally INSIGHTV_SUMMARY_BASE_URL and INSIGHTV_SUMMARY_MODEL for the summary agent.
"""

from __future__ import annotations

import os

from insightv_agents import create_insightv_graph
from insightv_agents.backends.vllm import vllm_chat_model

_base_url = os.environ.get("INSIGHTV_BASE_URL", "http://127.0.0.1:8000/v1")
_reasoner = vllm_chat_model(_base_url, os.environ.get("INSIGHTV_MODEL", "insightv-reason"))
_summary_model = os.environ.get("INSIGHTV_SUMMARY_MODEL")
_summarizer = (vllm_chat_model(os.environ.get("INSIGHTV_SUMMARY_BASE_URL", _base_url),
                               _summary_model) if _summary_model else None)

graph = create_insightv_graph(reasoner=_reasoner, summarizer=_summarizer).compile(
    name="insightv")
