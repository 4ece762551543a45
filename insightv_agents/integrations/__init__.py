"""Model backends.

- :mod:`insightv_agents.integrations.vllm`: a client for a vLLM (OpenAI-compatible) server.
- :mod:`insightv_agents.integrations.transformers`: an in-process model (``hf`` extra).
"""
