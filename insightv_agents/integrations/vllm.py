"""vLLM: a chat-model client for its OpenAI-compatible server, and a launcher for that server.

- :func:`vllm_chat_model` returns a :class:`ChatVLLM` (a ``ChatOpenAI``) for a running server.
- :class:`VLLMServer` starts ``python -m vllm.entrypoints.openai.api_server`` as a child
  process (from any Python, so vLLM can live in its own virtualenv), waits until it is
  healthy, serves LoRA adapters, and stops it cleanly.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import model_validator

from insightv_agents.errors import BackendError, ConfigError
from insightv_agents.trained import adapter_rank, resolve_model, vllm_lora_rank

try:
    import openai
    from langchain_openai import ChatOpenAI
except ImportError:  # pragma: no cover - depends on the environment
    ChatOpenAI = None  # type: ignore[assignment,misc]

VLLM_PYTHON_ENV = "INSIGHTV_VLLM_PYTHON"
"""Environment variable naming the Python that has vLLM installed (default: this one)."""

CONTINUATION = {"continue_final_message": True, "add_generation_prompt": False}
"""vLLM's request fields that continue a conversation's final assistant message."""


if ChatOpenAI is not None:

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
        """

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
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 1024,
    n: int = 1,
    timeout: float = 120.0,
    max_retries: int = 2,
    **vllm_options: Any,
) -> BaseChatModel:
    """A chat model for a vLLM server's OpenAI-compatible API.

    Args:
        base_url: the server's API root, e.g. ``"http://127.0.0.1:8000/v1"``.
        model: the served model (or LoRA adapter) name.
        api_key: sent as a bearer token; vLLM ignores it unless started with ``--api-key``.
        temperature, top_p, max_tokens: sampling settings of every request.
        n: samples per request (``model.generate(...)`` returns them all; ``invoke`` the first).
        timeout: seconds to wait for one request; ``max_retries``: client retries on errors.
        **vllm_options: vLLM-only request fields (``top_k``, ``repetition_penalty``, ...),
            sent in the request body.

    Images reach the server as data URLs in ``image_url`` parts, as the nodes write them.
    A conversation ending with an assistant message is continued from that message.
    The nodes constrain replies to their bounded formats through ``bind_structured_outputs``.
    The model owns its HTTP clients; one model is safe to reuse across event loops and
    threads (:class:`ChatVLLM`).
    """
    if ChatOpenAI is None:  # pragma: no cover - depends on the environment
        raise ConfigError("the vLLM client needs langchain-openai: "
                          "pip install 'insightv-agents[vllm]'")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must be an http(s) URL, not {base_url!r}.")
    if timeout <= 0:
        raise ConfigError(f"timeout must be positive, not {timeout!r}.")
    return ChatVLLM(
        base_url=base_url, model=model, api_key=api_key, temperature=temperature, top_p=top_p,
        max_completion_tokens=max_tokens, n=n, max_retries=max_retries, timeout=timeout,
        extra_body=vllm_options or None,
    )


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


class VLLMServer:
    """A vLLM OpenAI-compatible server run as a child process, bound to 127.0.0.1.

    Args:
        model: folder (or hub id) of the model to serve, or a LoRA adapter folder (an
            ``insightv train`` output): its base model is served, and the adapter under
            ``served_model_name`` (default: the folder's name), the default of :meth:`chat_model`.
        served_model_name: the name clients ask for (default: ``model``).
        python: the Python with vLLM installed (default: ``$INSIGHTV_VLLM_PYTHON``, else this
            interpreter).
        port: the port (default: a free one).
        adapters: LoRA adapters to serve, ``{name: folder}``; clients select one by name.
        max_lora_rank: the largest adapter rank the server accepts (raised to fit the
            adapters given).
        runtime_lora: allow loading and unloading adapters while running
            (:meth:`load_adapter`, :meth:`unload_adapter`).
        dtype, max_model_len, enforce_eager: engine settings (``enforce_eager`` starts faster).
        load_format: how vLLM reads the weights: ``safetensors`` (default: never a pickle).
        extra_args: more command-line arguments for the server.
        env: more environment variables for the server.
        startup_timeout: seconds to wait for ``/health`` before giving up.
        log_path: where the server's output goes (default: a temporary file).

    Example::

        with VLLMServer("path/to/model", adapters={"reason": "out/adapter"}) as server:
            model = server.chat_model("reason")
    """

    def __init__(
        self,
        model: str | Path,
        *,
        served_model_name: str | None = None,
        python: str | None = None,
        port: int | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        max_lora_rank: int = 16,
        runtime_lora: bool = False,
        dtype: str = "auto",
        max_model_len: int = 4096,
        enforce_eager: bool = False,
        load_format: str = "safetensors",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 600.0,
        log_path: str | Path | None = None,
    ) -> None:
        if startup_timeout <= 0:
            raise ConfigError("startup_timeout must be positive.")
        base, trained_adapter = resolve_model(model)
        adapters = dict(adapters or {})
        default = None
        if trained_adapter is not None:  # an adapter output: serve its base, and it by name
            default = served_model_name or Path(trained_adapter).name
            adapters.setdefault(default, trained_adapter)
            served_model_name = None
        max_lora_rank = vllm_lora_rank(max_lora_rank,
                                       *(adapter_rank(folder) for folder in adapters.values()))
        self.model = base
        self.served_model_name = served_model_name or self.model
        self.default_model = default or self.served_model_name
        self.python = python or os.environ.get(VLLM_PYTHON_ENV) or sys.executable
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        for name, folder in adapters.items():
            if not Path(folder).is_dir():
                raise ConfigError(f"adapter {name!r}: {str(folder)!r} is not a folder.")
        self.adapters = {name: str(folder) for name, folder in adapters.items()}
        self.runtime_lora = runtime_lora
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else _new_log_file()
        self.command = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(self.port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--load-format", load_format,
            # Stops whitespace runaways of constrained decoding (the per-request field is ignored).
            "--structured-outputs-config",
            json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        ]
        if enforce_eager:
            self.command.append("--enforce-eager")
        if self.adapters or runtime_lora:
            self.command += ["--enable-lora", "--max-lora-rank", str(max_lora_rank)]
        if self.adapters:
            self.command += ["--lora-modules",
                             *(f"{name}={folder}" for name, folder in self.adapters.items())]
        self.command += list(extra_args)
        self.env = {**os.environ, **(env or {})}
        if runtime_lora:
            self.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> VLLMServer:
        """Start the server and wait until it is healthy.

        Raises:
            BackendError: if the server exits or is not healthy within ``startup_timeout``
                (the message holds the tail of its log).
        """
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BackendError(f"the vLLM server exited with status {code} while starting."
                                   f"\n{self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise BackendError(f"the vLLM server was not ready after {self.startup_timeout:.0f} s."
                           f"\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and every process it started (SIGTERM, then SIGKILL).

        vLLM runs its engine in child processes of the API server; they share its process
        group, and this returns only when the whole group is gone.
        """
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        group = process.pid
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(group) and time.monotonic() < deadline:
            process.poll()  # reap the server itself once it exits
            time.sleep(0.1)
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
            while _group_alive(group) and time.monotonic() < deadline + 10:
                process.poll()
                time.sleep(0.1)
        process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def chat_model(self, model: str | None = None, **settings: Any) -> BaseChatModel:
        """A chat model for this server: a LoRA adapter by name, or by default the model
        served (the adapter, when the server was made from an adapter folder)."""
        return vllm_chat_model(self.base_url, model or self.default_model, **settings)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter into the running server (needs ``runtime_lora=True``)."""
        if not self.runtime_lora:
            raise ConfigError("start the server with runtime_lora=True to load adapters.")
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        self.adapters[name] = str(path)

    def unload_adapter(self, name: str) -> None:
        """Unload a LoRA adapter from the running server (needs ``runtime_lora=True``)."""
        if not self.runtime_lora:
            raise ConfigError("start the server with runtime_lora=True to unload adapters.")
        self._post("/v1/unload_lora_adapter", {"lora_name": name})
        self.adapters.pop(name, None)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health",
                                        timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _post(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"http://{self.host}:{self.port}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60):
                pass
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise BackendError(f"vLLM refused {path}: {err.code} {detail}") from err
        except (urllib.error.URLError, OSError) as err:
            raise BackendError(f"cannot reach the vLLM server for {path}: {err}") from err


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _new_log_file() -> Path:
    descriptor, name = tempfile.mkstemp(prefix="vllm-", suffix=".log")
    os.close(descriptor)
    return Path(name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
