"""Graph factories. Each returns an uncompiled ``StateGraph``."""

from insightv_agents.graphs.insightv import create_insightv_graph

__all__ = ["create_insightv_graph"]
