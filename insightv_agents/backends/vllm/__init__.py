"""vLLM: a chat-model client for its OpenAI-compatible server, and a launcher for that server.

- :func:`vllm_chat_model` / :class:`ChatVLLM` (:mod:`.client`): a chat model for a running server.
- :class:`VLLMServer` (:mod:`.server`): a server run as a child process.
"""

from insightv_agents.backends.vllm.client import ChatVLLM, vllm_chat_model
from insightv_agents.backends.vllm.server import VLLM_PYTHON_ENV, VLLMServer

__all__ = ["VLLM_PYTHON_ENV", "ChatVLLM", "VLLMServer", "vllm_chat_model"]
