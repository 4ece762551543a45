"""Client side of a vLLM (or any OpenAI-compatible) server, as a LangChain chat model."""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel

from insightv_agents.errors import ConfigError


def vllm_chat_model(
    base_url: str,
    model: str,
    *,
    api_key: str = "EMPTY",
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 1024,
    timeout: float = 120.0,
    max_retries: int = 2,
    **vllm_options: Any,
) -> BaseChatModel:
    """A ``ChatOpenAI`` configured for a vLLM server's OpenAI-compatible API.

    Args:
        base_url: the server's API root, e.g. ``"http://127.0.0.1:8000/v1"``.
        model: the served model (or LoRA adapter) name.
        api_key: sent as a bearer token; vLLM ignores it unless started with ``--api-key``.
        temperature, top_p, max_tokens: sampling settings of every request.
        timeout: seconds to wait for one request; ``max_retries``: client retries on errors.
        **vllm_options: vLLM-only request fields (``top_k``, ``repetition_penalty``, ...),
            sent in the request body.

    Images reach the server as data URLs in ``image_url`` parts, as the nodes write them.
    """
    try:
        from langchain_openai import ChatOpenAI
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConfigError("the vLLM client needs langchain-openai: "
                          "pip install 'insightv-agents[vllm]'") from err
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must be an http(s) URL, not {base_url!r}.")
    return ChatOpenAI(
        base_url=base_url, model=model, api_key=api_key,
        temperature=temperature, top_p=top_p, max_completion_tokens=max_tokens,
        timeout=timeout, max_retries=max_retries, extra_body=vllm_options or None,
    )
