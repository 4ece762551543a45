"""vLLM: a chat-model client for its OpenAI-compatible server, and a launcher for that server.

- :func:`vllm_chat_model` / :class:`ChatVLLM` (:mod:`.client`): a chat model for a running server;
  :func:`served_card`: the agent card of a model it serves.
- :class:`VLLMServer` (:mod:`.server`): a server run as a child process.
"""

from insightv_agents.backends.vllm.client import ChatVLLM, served_card, vllm_chat_model
from insightv_agents.backends.vllm.server import VLLM_PYTHON_ENV, VLLMServer

__all__ = ["VLLM_PYTHON_ENV", "ChatVLLM", "VLLMServer", "served_card", "vllm_chat_model"]
