"""Graph factories. Each returns an uncompiled ``StateGraph``."""

from insightv_agents.graphs.insightv import create_insightv_graph
from insightv_agents.graphs.stage_beam import create_stage_beam_graph
from insightv_agents.graphs.synthesis import create_path_graph, create_synthesis_graph

__all__ = ["create_insightv_graph", "create_path_graph", "create_stage_beam_graph",
           "create_synthesis_graph"]
