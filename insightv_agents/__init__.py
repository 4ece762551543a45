"""insightv-agents: Insight-V multi-agent visual reasoning as LangGraph graphs.

This module is the map of the public API: everything a user imports is listed here.
"""

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
from insightv_agents.images import ImagePolicy, load_images
from insightv_agents.nodes import (
    FinalAnswerNode,
    ReasoningNode,
    SummaryNode,
    prepare_input,
    revise,
)
from insightv_agents.parsing import parse_stages, parse_steps, parse_verdict
from insightv_agents.prompts import (
    DEFAULT_PROMPTS,
    DEFAULT_STAGE_PROMPTS,
    PROMPTS_VERSION,
    Prompts,
    StagePrompts,
)
from insightv_agents.schema import (
    AnswerCheck,
    Attempt,
    Failure,
    PathResult,
    PathScore,
    ReasoningStep,
    SearchRecord,
    Stages,
    Verdict,
)
from insightv_agents.state import InsightVContext, InsightVInput, InsightVOutput, InsightVState

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_STAGE_PROMPTS",
    "PROMPTS_VERSION",
    "AnswerCheck",
    "Attempt",
    "BackendError",
    "ConfigError",
    "Failure",
    "FinalAnswerNode",
    "ImagePolicy",
    "InsightVContext",
    "InsightVError",
    "InsightVInput",
    "InsightVOutput",
    "InsightVState",
    "InvalidInputError",
    "ModelCallError",
    "ModelOutputError",
    "PathResult",
    "PathScore",
    "Prompts",
    "ReasoningNode",
    "ReasoningStep",
    "SearchRecord",
    "StageBeamContext",
    "StageBeamOutput",
    "StagePrompts",
    "Stages",
    "SummaryNode",
    "Verdict",
    "__version__",
    "create_insightv_graph",
    "create_stage_beam_graph",
    "create_synthesis_graph",
    "load_images",
    "parse_stages",
    "parse_steps",
    "parse_verdict",
    "prepare_input",
    "revise",
]
