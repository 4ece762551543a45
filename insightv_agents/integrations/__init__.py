"""Model backends: an OpenAI-compatible (vLLM) client and, later, in-process transformers."""
