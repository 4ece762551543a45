"""vLLM: a chat-model client for its OpenAI-compatible server, and a launcher for that server.

- :func:`vllm_chat_model` / :class:`ChatVLLM` (:mod:`.client`): a chat model for a running server;
  :func:`served_card`: the agent card of a model it serves.
- :class:`EndpointPool` (:mod:`.pool`): several replicas of a served model behind one chat model.
- :class:`VLLMServer` (:mod:`.server`): a server run as a child process.
"""

from insightv_agents.backends.vllm.client import (
    ChatVLLM,
    endpoints,
    served_card,
    vllm_chat_model,
)
from insightv_agents.backends.vllm.pool import EndpointPool, ReplicaStats
from insightv_agents.backends.vllm.server import VLLM_PYTHON_ENV, VLLMServer

__all__ = ["VLLM_PYTHON_ENV", "ChatVLLM", "EndpointPool", "ReplicaStats", "VLLMServer",
           "endpoints", "served_card", "vllm_chat_model"]
