"""The public contract: the picture in the README, the public API, the README's claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import insightv_agents
from insightv_agents import create_insightv_graph
from insightv_agents.testing import ScriptedChatModel

ROOT = Path(__file__).resolve().parent.parent


def test_readme_picture_is_the_graph() -> None:
    mermaid = create_insightv_graph(reasoner=ScriptedChatModel([])).compile().get_graph()
    drawn = mermaid.draw_mermaid().strip()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", readme, re.S)
    assert block is not None
    assert block.group(1).strip() == drawn
    for edge in ("reason -. &nbsp;continue&nbsp; .-> reason", "reason -. &nbsp;summary&nbsp; .-> "
                 "summarize", "summarize -. &nbsp;flawed&nbsp; .-> revise",
                 "summarize -. &nbsp;done&nbsp; .-> __end__"):
        assert edge in drawn


def test_public_api_is_small_listed_and_importable() -> None:
    assert len(insightv_agents.__all__) <= 20
    for name in insightv_agents.__all__:
        assert hasattr(insightv_agents, name), name
    assert insightv_agents.vllm_chat_model.__module__ == "insightv_agents.backends.vllm.client"
    with pytest.raises(AttributeError):
        _ = insightv_agents.revise  # a node helper: from insightv_agents.nodes


def test_importing_the_library_loads_no_backend() -> None:
    """The top level stays light: no backend module, torch or OpenAI client until asked for
    (older langchain-core releases import transformers themselves, so it is not checked)."""
    code = ("import sys, insightv_agents; "
            "print(sorted(m for m in sys.modules if m in ('torch', 'openai', 'langchain_openai') "
            "or m.startswith(('insightv_agents.backends.vllm', "
            "'insightv_agents.backends.transformers'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_graph_is_uncompiled_and_compile_name_friendly() -> None:
    builder = create_insightv_graph(reasoner=ScriptedChatModel([]))
    assert type(builder).__name__ == "StateGraph"
    assert builder.compile(name="my-agent").get_name() == "my-agent"
    schema = builder.compile().get_input_jsonschema()
    assert set(schema["properties"]) == {"image", "question"}
    output = builder.compile().get_output_jsonschema()
    assert {"answer", "steps", "verdict", "reasoning", "status", "failures"} <= set(
        output["properties"])


def test_langgraph_json_points_at_a_compiled_graph_with_a_serializable_context() -> None:
    import importlib
    import json

    config = json.loads((ROOT / "langgraph.json").read_text())
    module, _, attribute = config["graphs"]["insightv"].partition(":")
    graph = getattr(importlib.import_module(module), attribute)
    assert graph.get_name() == "insightv"
    assert set(graph.get_input_jsonschema()["properties"]) == {"image", "question"}
    assert "base_url" in graph.get_context_jsonschema()["properties"]
