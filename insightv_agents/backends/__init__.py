"""Model backends, and what the nodes may ask of a model beyond LangChain's chat interface.

- :mod:`insightv_agents.backends.protocol`: the optional capabilities a backend declares.
- :mod:`insightv_agents.backends.vllm`: a client for a vLLM (OpenAI-compatible) server, and a
  launcher for that server (``vllm`` extra).
- :mod:`insightv_agents.backends.transformers`: an in-process model (``hf`` extra).
"""
