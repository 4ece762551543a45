"""A chat model for vLLM's OpenAI-compatible server: :func:`vllm_chat_model` returns a
:class:`ChatVLLM` (a ``ChatOpenAI``) that constrains replies (structured outputs), continues a
final assistant message, retries failed requests within one deadline per call, and is safe
to reuse across event loops and threads.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import importlib
import math
import random
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import ModuleType
from typing import Any, Self, TypeVar, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ValidationError, model_validator

from insightv_agents.backends.vllm.pool import EndpointPool
from insightv_agents.cards import (
    CARD_FILE,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    AgentCard,
    Sampling,
    read_card,
)
from insightv_agents.errors import ConfigError, check_int, check_number, validation_problem

try:
    import openai
    from langchain_openai import ChatOpenAI
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError("the vLLM client needs langchain-openai: "
                      "pip install 'insightv-agents[vllm]'") from missing

T = TypeVar("T")

CONTINUATION = {"continue_final_message": True, "add_generation_prompt": False}
"""vLLM's request fields that continue a conversation's final assistant message."""
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses a request is retried after (with connection errors and timeouts); a
refusal of the request itself (400, 413, 422) never is."""
DEFAULT_RETRIES = 2
MAX_N, MAX_RETRIES, MAX_TIMEOUT = 64, 10, 86_400.0
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 8.0
MAX_RETRY_AFTER_S = 120.0  # a longer Retry-After is not waited for, even with no deadline


def _number(low: float, high: float, above: bool = False) -> Callable[[str, Any], None]:
    return lambda name, value: check_number(name, value, low, high, above=above)


def _integer(low: int, high: int) -> Callable[[str, Any], None]:
    return lambda name, value: check_int(name, value, low, high)


_OPTION_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "temperature": _number(0, MAX_TEMPERATURE),
    "top_p": _number(0, 1, above=True),
    "max_tokens": _integer(1, MAX_TOKENS),
    "max_completion_tokens": _integer(1, MAX_TOKENS),
    "n": _integer(1, MAX_N),
    "timeout": _number(0, MAX_TIMEOUT, above=True),
    "request_timeout": _number(0, MAX_TIMEOUT, above=True),
    "max_retries": _integer(0, MAX_RETRIES),
    # vLLM's own sampling fields, sent in the request body
    "top_k": _integer(-1, MAX_TOKENS),
    "min_p": _number(0, 1),
    "repetition_penalty": _number(0, 10, above=True),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
}


def check_options(options: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for a sampling or client option out of its range (the
    ones this module knows; ``None`` means unset): ``temperature`` 0 to 10, ``top_p`` above
    0 up to 1, ``max_tokens`` 1 to 1,000,000, ``n`` 1 to 64, ``timeout`` above 0 up to a
    day, ``max_retries`` 0 to 10, and vLLM's ``top_k``, ``min_p``, ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty``."""
    extra = options.get("extra_body")
    for name, value in {**(extra if isinstance(extra, Mapping) else {}), **options}.items():
        check = _OPTION_CHECKS.get(name)
        if check is not None and value is not None:
            check(name, value)


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

    ``timeout`` (seconds) is the deadline of a whole call: its first request, up to
    ``max_retries`` (default 2) retries after a connection error, a timeout or a 408, 429,
    500, 502, 503 or 504 (never after a 400, 413 or 422), and the pauses between them (the
    server's ``Retry-After``, in seconds or as an HTTP date, else exponential backoff with
    jitter). A pause that would end past the deadline is not taken: the call raises the last
    error at once. The OpenAI SDK's own retries are off. A stream is retried only before its
    first chunk, and the deadline covers it to its last chunk (a :class:`TimeoutError` past
    it); an async call is cut at the deadline, a sync one by the HTTP read timeout (the
    time left when its request was sent). Options out of range raise :class:`ConfigError`
    (:func:`check_options`), at construction and at each call.

    ``agent_card`` is how the served agent is driven (:mod:`~insightv_agents.cards`), where
    known: the graphs follow it.

    ``pool``, when given, holds the replicas of the served model (``base_url`` is its first):
    each request goes to the least busy replica that is up, and one whose replica fails
    before answering is sent to another at once (:class:`EndpointPool`).
    """

    agent_card: AgentCard | None = None
    pool: EndpointPool | None = None

    def __init__(self, **options: Any) -> None:
        check_options(options)
        try:
            super().__init__(**options)
        except ValidationError as err:
            raise ConfigError(f"ChatVLLM: {validation_problem(err)}") from None

    @model_validator(mode="before")
    @classmethod
    def _own_http_clients(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        library = _http_library()
        pool = values.get("pool")
        if values.get("http_client") is None:
            if isinstance(pool, EndpointPool):
                values["http_client"] = openai.DefaultHttpxClient(
                    transport=pool.transport(library, library.HTTPTransport(
                        limits=openai.DEFAULT_CONNECTION_LIMITS)), trust_env=False)
            else:
                values["http_client"] = openai.DefaultHttpxClient(trust_env=False)
        if values.get("http_async_client") is None:
            pools: Any = _loop_local_transport(library)(lambda: library.AsyncHTTPTransport(
                limits=openai.DEFAULT_CONNECTION_LIMITS))
            if isinstance(pool, EndpointPool):
                pools = pool.async_transport(library, pools)
            values["http_async_client"] = openai.DefaultAsyncHttpxClient(
                transport=pools, trust_env=False)
        return values

    @model_validator(mode="after")
    def _no_sdk_retries(self) -> Self:
        """The OpenAI clients without retries of their own: this model retries, within each
        call's deadline."""
        if self.root_client is not None:
            self.root_client = self.root_client.with_options(max_retries=0)
            self.client = self.root_client.chat.completions
        if self.root_async_client is not None:
            self.root_async_client = self.root_async_client.with_options(max_retries=0)
            self.async_client = self.root_async_client.chat.completions
        return self

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
    # each adds the continuation fields, then lets ChatOpenAI send the request, retrying
    # within the call's deadline.

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        options = self._request_options(messages, kwargs)
        attempts = self._attempts(options)
        generate = super()._generate
        while True:
            try:
                return generate(messages, stop, run_manager, **options, **attempts.timeout())
            except Exception as err:
                pause = attempts.pause(err)
                if pause is None:
                    raise
                time.sleep(pause)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        options = self._request_options(messages, kwargs)
        attempts = self._attempts(options)
        generate = super()._agenerate
        while True:
            try:
                return await attempts.within(
                    generate(messages, stop, run_manager, **options, **attempts.timeout()))
            except Exception as err:
                pause = attempts.pause(err)
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        options = self._request_options(messages, kwargs)
        attempts = self._attempts(options)
        stream = super()._stream
        while True:
            chunks = cast(Generator[ChatGenerationChunk, None, None], stream(
                messages, stop, run_manager, **options, **attempts.timeout()))
            try:
                first = next(chunks)
                break
            except StopIteration:
                return
            except Exception as err:
                pause = attempts.pause(err)
                if pause is None:
                    raise
                time.sleep(pause)
        try:
            yield first
            for chunk in chunks:
                attempts.check()
                yield chunk
        finally:
            chunks.close()

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        options = self._request_options(messages, kwargs)
        attempts = self._attempts(options)
        stream = super()._astream
        while True:
            chunks = cast(AsyncGenerator[ChatGenerationChunk, None], stream(
                messages, stop, run_manager, **options, **attempts.timeout()))
            try:
                first = await attempts.within(anext(chunks))
                break
            except StopAsyncIteration:
                return
            except Exception as err:
                pause = attempts.pause(err)
                if pause is None:
                    raise
                await asyncio.sleep(pause)
        try:
            yield first
            while True:
                try:
                    chunk = await attempts.within(anext(chunks))
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await chunks.aclose()

    def _attempts(self, options: dict[str, Any]) -> _Attempts:
        """The attempts of one call; its deadline is ``options``' ``timeout`` (taken out of
        them), else the model's."""
        timeout = options.pop("timeout", self.request_timeout)
        return _Attempts(timeout, DEFAULT_RETRIES if self.max_retries is None
                         else self.max_retries)

    def _request_options(self, messages: list[BaseMessage],
                         options: dict[str, Any]) -> dict[str, Any]:
        """``options`` (checked: :func:`check_options`) with vLLM's continuation fields when
        ``messages`` end with an assistant message (a prefix to complete, not a turn to
        answer)."""
        check_options(options)
        if not messages or not isinstance(messages[-1], AIMessage):
            return options
        extra = {**(self.extra_body or {}), **(options.get("extra_body") or {}),
                 **CONTINUATION}
        return {**options, "extra_body": extra}


def vllm_chat_model(
    base_url: str | Sequence[str] | EndpointPool,
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
        base_url: the server's API root, e.g. ``"http://127.0.0.1:8000/v1"``; or the API
            roots of several replicas of the served model (a list, or an
            :class:`EndpointPool` that several models share): each request goes to the least
            busy replica that is up, one that fails is taken out and probed again later, and
            a request it failed is sent to another.
        model: the served model (or LoRA adapter) name.
        api_key: sent as a bearer token; vLLM ignores it unless started with ``--api-key``.
        temperature, top_p, max_tokens: sampling settings of every request (default: the
            agent card's recommendation, else 0.7, 0.95 and 1024).
        n: samples per request (``model.generate(...)`` returns them all; ``invoke`` the first).
        timeout: the deadline of each call, in seconds, across its retries and their pauses
            (:class:`ChatVLLM`); ``max_retries``: retries of a failed request within it.
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

    Raises:
        ConfigError: for an option out of range (:func:`check_options`), before any request.
    """
    where = endpoints(base_url)
    pool = where if isinstance(where, EndpointPool) else None
    url = pool.urls[0] if pool is not None else str(where)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must be an http(s) URL, not {where!r}.")
    check_options({"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                   "n": n, "timeout": timeout, "max_retries": max_retries, **vllm_options})
    if card == "auto":
        agent_card = served_card(where, model, api_key=api_key)
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
        base_url=url, model=model, api_key=api_key,
        temperature=chosen(temperature, sampling.temperature, 0.7),
        top_p=chosen(top_p, sampling.top_p, 0.95),
        max_completion_tokens=chosen(max_tokens, sampling.max_tokens, 1024), n=n,
        max_retries=max_retries, timeout=timeout, extra_body=vllm_options or None,
        agent_card=agent_card, pool=pool,
    )


def endpoints(base_url: str | Sequence[str] | EndpointPool) -> str | EndpointPool:
    """What ``base_url`` names: one API root, or an :class:`EndpointPool` (given, or made of
    a list of two or more roots; a list of one is that root).

    Raises:
        ConfigError: for an empty list, or one holding a URL twice or a non-http(s) URL.
    """
    if isinstance(base_url, EndpointPool | str):
        return base_url
    if not isinstance(base_url, Sequence):
        raise ConfigError(f"base_url must be an http(s) URL or a list of them, not "
                          f"{base_url!r}.")
    urls = list(base_url)
    if len(urls) == 1 and isinstance(urls[0], str):
        return urls[0]
    return EndpointPool(urls)


def served_card(base_url: str | Sequence[str] | EndpointPool, model: str, *,
                api_key: str = "EMPTY", timeout: float = 5.0) -> AgentCard | None:
    """The agent card of ``model`` as served at ``base_url``: the card in the folder the
    server's ``/models`` entry names (vLLM's ``root``: the model's or adapter's folder),
    where that folder is on this machine; ``None`` when there is none or the server does
    not answer. Of several replicas (a list or a pool), the first that gives one."""
    where = endpoints(base_url)
    if isinstance(where, EndpointPool):
        return next(filter(None, (served_card(url, model, api_key=api_key, timeout=timeout)
                                  for url in where.urls)), None)
    client = openai.OpenAI(base_url=where, api_key=api_key, timeout=timeout,
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


class _Attempts:
    """The attempts of one call: a first request and up to ``retries`` more, each after a
    pause (the server's ``Retry-After``, else exponential backoff with jitter), all within
    ``timeout`` seconds of the start (``None``: no deadline)."""

    def __init__(self, timeout: float | None, retries: int) -> None:
        self.seconds = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.retries = retries
        self.retried = 0

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def timeout(self) -> dict[str, float]:
        """The next request's timeout option: the time left."""
        left = self.left()
        return {} if left is None else {"timeout": max(left, 0.01)}

    def pause(self, err: BaseException) -> float | None:
        """The seconds to wait before retrying after ``err``, or ``None``: raise it (not
        retryable, no retries left, or the pause would end past the deadline)."""
        if self.retried >= self.retries or not _retryable(err):
            return None
        asked = _retry_after(err)
        if asked is not None and asked > MAX_RETRY_AFTER_S:
            err.add_note(f"Not retried: the server asked to wait {asked:g} s (Retry-After), "
                         f"longer than {MAX_RETRY_AFTER_S:g} s.")
            return None
        pause = asked if asked is not None else \
            min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** self.retried) * random.uniform(0.75, 1)
        left = self.left()
        if left is not None and pause >= left:
            if left > 0:
                err.add_note(f"Not retried: the pause of {pause:.1f} s "
                             f"({'Retry-After' if asked is not None else 'backoff'}) would "
                             f"end past the call's {self.seconds:g} s deadline (timeout).")
            return None
        self.retried += 1
        return pause

    def expired(self) -> TimeoutError:
        return TimeoutError(f"the model call did not finish within its {self.seconds:g} s "
                            "deadline (timeout).")

    def check(self) -> None:
        """Raise :meth:`expired` once the deadline has passed."""
        left = self.left()
        if left is not None and left <= 0:
            raise self.expired()

    async def within(self, step: Awaitable[T]) -> T:
        """``await step``, cancelled at the deadline (raising :meth:`expired`)."""
        timer = asyncio.timeout(self.left())
        try:
            async with timer:
                return await step
        except TimeoutError:
            if timer.expired():
                raise self.expired() from None
            raise


def _retryable(err: BaseException) -> bool:
    """Whether resending may succeed after ``err``: a connection error, a timeout, or a
    status of :data:`RETRY_STATUSES`."""
    if isinstance(err, openai.APIConnectionError | TimeoutError | _http_library().TransportError):
        return True
    return getattr(err, "status_code", None) in RETRY_STATUSES


def _retry_after(err: BaseException) -> float | None:
    """The seconds the server asked to wait (``Retry-After``, in seconds or as an HTTP
    date), if it did."""
    headers = getattr(getattr(err, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


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
