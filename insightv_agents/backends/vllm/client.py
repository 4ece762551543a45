"""A chat model for vLLM's OpenAI-compatible server: :func:`vllm_chat_model` returns a
:class:`ChatVLLM` (a ``ChatOpenAI``) that constrains replies (structured outputs), continues a
final assistant message, and is safe to reuse across event loops and threads.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import model_validator

from insightv_agents.cards import CARD_FILE, AgentCard, Sampling, read_card
from insightv_agents.errors import ConfigError

try:
    import openai
    from langchain_openai import ChatOpenAI
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError("the vLLM client needs langchain-openai: "
                      "pip install 'insightv-agents[vllm]'") from missing

CONTINUATION = {"continue_final_message": True, "add_generation_prompt": False}
"""vLLM's request fields that continue a conversation's final assistant message."""


class ChatVLLM(ChatOpenAI):
    """``ChatOpenAI`` for a vLLM server: constrained replies (structured outputs), and a
    conversation ending with an assistant message continued from it.

    vLLM-only request fields travel in ``extra_body``, ``ChatOpenAI``'s public option for
    fields the OpenAI API does not have. :func:`vllm_chat_model` makes one.

    Each model owns its HTTP clients (unless given ``http_client``/``http_async_client``):
    one for synchronous calls, safe from several threads at once, and one for
    asynchronous calls that keeps a connection pool per event loop, so the same model
    serves one ``asyncio.run`` after another, or several threads each running its own
    loop. They connect directly: proxy environment variables are not used.

    ``agent_card`` is how the served agent is driven (:mod:`~insightv_agents.cards`), where
    known: the graphs follow it.
    """

    agent_card: AgentCard | None = None

    @model_validator(mode="before")
    @classmethod
    def _own_http_clients(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        library = _http_library()
        if values.get("http_client") is None:
            values["http_client"] = openai.DefaultHttpxClient(trust_env=False)
        if values.get("http_async_client") is None:
            pools: Any = _loop_local_transport(library)(lambda: library.AsyncHTTPTransport(
                limits=openai.DEFAULT_CONNECTION_LIMITS))
            values["http_async_client"] = openai.DefaultAsyncHttpxClient(
                transport=pools, trust_env=False)
        return values

    def bind_structured_outputs(self, constraint: Mapping[str, Any]
                                ) -> Runnable[LanguageModelInput, BaseMessage]:
        """This model with vLLM structured outputs: every reply follows ``constraint``,
        vLLM's ``structured_outputs`` field (``{"json": schema}``, ``{"regex": pattern}``,
        ``{"choice": [...]}``, ``{"grammar": ebnf}``).

        Keep it bounded (``maxLength`` on strings, ``maxItems`` on arrays, ``{0,n}`` in
        patterns): unbounded, a weak model can write one string until ``max_tokens``.
        """
        extra = {**(self.extra_body or {}), "structured_outputs": dict(constraint)}
        return self.bind(extra_body=extra)

    def bind_json_schema(self, schema: Mapping[str, Any]
                         ) -> Runnable[LanguageModelInput, BaseMessage]:
        """This model with every reply following the JSON ``schema`` (keep it bounded)."""
        return self.bind_structured_outputs({"json": dict(schema)})

    # langchain-core's four hooks of a chat model (what every BaseChatModel implements):
    # each adds the continuation fields, then lets ChatOpenAI send the request.

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        return super()._generate(messages, stop, run_manager,
                                 **self._request_options(messages, kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        return await super()._agenerate(messages, stop, run_manager,
                                        **self._request_options(messages, kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield from super()._stream(messages, stop, run_manager,
                                   **self._request_options(messages, kwargs))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in super()._astream(messages, stop, run_manager,
                                            **self._request_options(messages, kwargs)):
            yield chunk

    def _request_options(self, messages: list[BaseMessage],
                         options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with vLLM's continuation fields when ``messages`` end with an
        assistant message (a prefix to complete, not a turn to answer)."""
        if not messages or not isinstance(messages[-1], AIMessage):
            return options
        extra = {**(self.extra_body or {}), **(options.get("extra_body") or {}),
                 **CONTINUATION}
        return {**options, "extra_body": extra}


def vllm_chat_model(
    base_url: str,
    model: str,
    *,
    api_key: str = "EMPTY",
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    n: int = 1,
    timeout: float = 120.0,
    max_retries: int = 2,
    card: AgentCard | str | Path | None = "auto",
    **vllm_options: Any,
) -> ChatVLLM:
    """A chat model for a vLLM server's OpenAI-compatible API.

    Args:
        base_url: the server's API root, e.g. ``"http://127.0.0.1:8000/v1"``.
        model: the served model (or LoRA adapter) name.
        api_key: sent as a bearer token; vLLM ignores it unless started with ``--api-key``.
        temperature, top_p, max_tokens: sampling settings of every request (default: the
            agent card's recommendation, else 0.7, 0.95 and 1024).
        n: samples per request (``model.generate(...)`` returns them all; ``invoke`` the first).
        timeout: seconds to wait for one request; ``max_retries``: client retries on errors.
        card: the agent's card (:mod:`~insightv_agents.cards`): a card, the folder holding
            it, ``None``, or ``"auto"``: the card in the folder the server names for
            ``model`` (its ``/models`` entry's ``root``), where that folder is on this
            machine (a server started here, e.g. by ``insightv serve``).
        **vllm_options: vLLM-only request fields (``top_k``, ``repetition_penalty``, ...),
            sent in the request body.

    Images reach the server as data URLs in ``image_url`` parts, as the nodes write them.
    A conversation ending with an assistant message is continued from that message.
    The nodes constrain replies to their bounded formats through ``bind_structured_outputs``.
    The model owns its HTTP clients; one model is safe to reuse across event loops and
    threads (:class:`ChatVLLM`).
    """
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must be an http(s) URL, not {base_url!r}.")
    if timeout <= 0:
        raise ConfigError(f"timeout must be positive, not {timeout!r}.")
    if card == "auto":
        agent_card = served_card(base_url, model, api_key=api_key)
    elif isinstance(card, str | Path):
        agent_card = read_card(card)
        if agent_card is None:
            raise ConfigError(f"card: {card} holds no agent card ({CARD_FILE}).")
    else:
        agent_card = card
    sampling = agent_card.sampling if agent_card is not None else Sampling()

    def chosen(given: Any, recommended: Any, default: Any) -> Any:
        return given if given is not None else recommended if recommended is not None \
            else default

    return ChatVLLM(
        base_url=base_url, model=model, api_key=api_key,
        temperature=chosen(temperature, sampling.temperature, 0.7),
        top_p=chosen(top_p, sampling.top_p, 0.95),
        max_completion_tokens=chosen(max_tokens, sampling.max_tokens, 1024), n=n,
        max_retries=max_retries, timeout=timeout, extra_body=vllm_options or None,
        agent_card=agent_card,
    )


def served_card(base_url: str, model: str, *, api_key: str = "EMPTY",
                timeout: float = 5.0) -> AgentCard | None:
    """The agent card of ``model`` as served at ``base_url``: the card in the folder the
    server's ``/models`` entry names (vLLM's ``root``: the model's or adapter's folder),
    where that folder is on this machine; ``None`` when there is none or the server does
    not answer."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                           max_retries=0, http_client=openai.DefaultHttpxClient(
                               trust_env=False))
    try:
        entries = list(client.models.list())
    except (openai.OpenAIError, ValueError):
        return None
    finally:
        client.close()
    for entry in entries:
        root = getattr(entry, "root", None)
        if entry.id == model and isinstance(root, str) and Path(root).is_dir():
            return read_card(root)
    return None


@functools.cache
def _http_library() -> ModuleType:
    """The HTTP library the installed ``openai`` builds its clients on: ``httpx2`` from
    openai 3, ``httpx`` before."""
    for name in ("httpx2", "httpx"):
        try:
            library = importlib.import_module(name)
        except ImportError:
            continue
        if issubclass(openai.DefaultAsyncHttpxClient, library.AsyncClient):
            return library
    raise ConfigError(f"cannot tell which HTTP library openai {openai.__version__} uses.")


class _LoopLocal:
    """An async transport that keeps one inner transport (one connection pool) per running
    event loop. A pooled connection belongs to the loop that opened it; shared, it would fail
    under the next loop ("Event loop is closed") or under another thread's loop."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._pools: dict[asyncio.AbstractEventLoop, Any] = {}

    def _pool(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            for closed in [other for other in self._pools if other.is_closed()]:
                del self._pools[closed]  # its connections cannot serve another loop
            pool = self._pools.get(loop)
            if pool is None:
                pool = self._pools[loop] = self._make()
            return pool

    async def handle_async_request(self, request: Any) -> Any:
        return await self._pool().handle_async_request(request)

    async def aclose(self) -> None:
        with self._lock:
            pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.aclose()


@functools.cache
def _loop_local_transport(library: ModuleType) -> type[_LoopLocal]:
    """:class:`_LoopLocal` as an ``AsyncBaseTransport`` of ``library`` (httpx or httpx2)."""
    return type("LoopLocalTransport", (_LoopLocal, library.AsyncBaseTransport), {})
