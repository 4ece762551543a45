"""insightv-agents: Insight-V multi-agent visual reasoning as LangGraph graphs.

This module is the map of the public API: the graph factories, their state, input, output
and context types, the prompts, the image policy, the errors, and the backend constructors.
Everything else is imported from its module: the nodes from :mod:`insightv_agents.nodes`,
record types from :mod:`insightv_agents.schema`, parsers from :mod:`insightv_agents.parsing`,
data, training and evaluation from :mod:`insightv_agents.synthesize`,
:mod:`insightv_agents.trainers` and :mod:`insightv_agents.evaluate`.

The backend constructors load on first use: ``vllm_chat_model`` needs the ``vllm`` extra,
``ChatTransformersVLM`` the ``hf`` extra.
"""

from typing import TYPE_CHECKING, Any

from insightv_agents.errors import (
    BackendError,
    ConfigError,
    InsightVError,
    InvalidInputError,
    ModelCallError,
    ModelOutputError,
)
from insightv_agents.graphs import (
    create_insightv_graph,
    create_stage_beam_graph,
    create_synthesis_graph,
)
from insightv_agents.graphs.stage_beam import StageBeamContext, StageBeamOutput
from insightv_agents.images import ImagePolicy
from insightv_agents.prompts import Prompts
from insightv_agents.state import InsightVContext, InsightVInput, InsightVOutput, InsightVState

if TYPE_CHECKING:
    from insightv_agents.backends.transformers import ChatTransformersVLM
    from insightv_agents.backends.vllm import vllm_chat_model

__version__ = "0.1.0"

_BACKENDS = {"vllm_chat_model": "insightv_agents.backends.vllm",
             "ChatTransformersVLM": "insightv_agents.backends.transformers"}


def __getattr__(name: str) -> Any:
    """The backend constructors, imported when first asked for (their extras are optional)."""
    if name in _BACKENDS:
        import importlib

        return getattr(importlib.import_module(_BACKENDS[name]), name)
    raise AttributeError(f"module 'insightv_agents' has no attribute {name!r}")


__all__ = [
    "BackendError",
    "ChatTransformersVLM",
    "ConfigError",
    "ImagePolicy",
    "InsightVContext",
    "InsightVError",
    "InsightVInput",
    "InsightVOutput",
    "InsightVState",
    "InvalidInputError",
    "ModelCallError",
    "ModelOutputError",
    "Prompts",
    "StageBeamContext",
    "StageBeamOutput",
    "create_insightv_graph",
    "create_stage_beam_graph",
    "create_synthesis_graph",
    "vllm_chat_model",
]
