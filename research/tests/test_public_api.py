"""The research package is built on the library's public names: it imports no private name
(one with a leading underscore) of insightv_agents, so the library can change its insides
without breaking it."""

from __future__ import annotations

import ast
from pathlib import Path

RESEARCH = Path(__file__).resolve().parents[1]


def private_imports(source: str) -> list[str]:
    """The private names of insightv_agents that ``source`` imports or reaches."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("insightv_agents"):
            parts = [*node.module.split("."), *(alias.name for alias in node.names)]
            found += [f"{node.module}: {part}" for part in parts if part.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names
                      if alias.name.startswith("insightv_agents")
                      and any(part.startswith("_") for part in alias.name.split("."))]
    return found


def test_the_check_sees_a_private_import() -> None:
    assert private_imports("from insightv_agents.cli import _answer_rules\n") == [
        "insightv_agents.cli: _answer_rules"]
    assert private_imports("import insightv_agents._hidden\n") == ["insightv_agents._hidden"]
    assert private_imports("from insightv_agents.nodes import ReasoningNode\n") == []


def test_research_imports_only_public_names_of_the_library() -> None:
    offending = {str(path.relative_to(RESEARCH)): found
                 for path in RESEARCH.glob("**/*.py")
                 if (found := private_imports(path.read_text()))}
    assert offending == {}
