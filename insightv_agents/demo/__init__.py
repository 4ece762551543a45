"""The demo agents: a reasoning agent and a summary agent for the shapes world, trained from
scratch by our own pipeline (``make reproduce``) and shipped with the package.

They are tiny Idefics3 models (about 2 M parameters each, bfloat16 safetensors) that read
128 px pictures of shapes on a 4 x 4 grid (:mod:`insightv_research.shapes`) and answer the
world's questions with chain-mode reasoning. ``insightv run`` uses them when no backend is
given; ``demo.json`` says how they were made and how well they do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from insightv_agents.prompts import Prompts

DEMO_DIR = Path(__file__).resolve().parent
REASONER_DIR = DEMO_DIR / "reasoner"
SUMMARY_DIR = DEMO_DIR / "summary"
DEMO_FILE = DEMO_DIR / "demo.json"


def demo_available() -> bool:
    """Whether both demo agents are installed (weights and configuration)."""
    return all((folder / name).is_file() for folder in (REASONER_DIR, SUMMARY_DIR)
               for name in ("config.json", "model.safetensors"))


def demo_info() -> dict[str, Any]:
    """How the demo agents were made and what they scored (``demo.json``)."""
    info: dict[str, Any] = json.loads(DEMO_FILE.read_text())
    return info


def demo_prompts() -> Prompts:
    """The prompts the demo agents were trained with (``demo.json``'s ``prompts``, as their
    agent cards record them)."""
    return Prompts(**demo_info().get("prompts", {}))


def demo_agents(*, temperature: float | None = None, max_new_tokens: int | None = None,
                device: str = "auto") -> tuple[Any, Any]:
    """The (reasoner, summarizer) chat models, run in-process with transformers. Their agent
    cards (chain mode, their prompts, greedy sampling) make the graph drive them as they were
    trained: ``create_insightv_graph(reasoner=reasoner, summarizer=summarizer)``."""
    from insightv_agents.backends.transformers import ChatTransformersVLM

    given = {key: value for key, value in (("temperature", temperature),
                                           ("max_new_tokens", max_new_tokens))
             if value is not None}

    def agent(folder: Path) -> ChatTransformersVLM:
        return ChatTransformersVLM(model_path=str(folder), device=device, **given)

    return agent(REASONER_DIR), agent(SUMMARY_DIR)
