"""A vLLM OpenAI-compatible server run as a child process: :class:`VLLMServer` starts
``python -m vllm.entrypoints.openai.api_server`` (from any Python, so vLLM can live in its own
virtualenv), waits until it is healthy, serves LoRA adapters, and stops it with every process
it started.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from langchain_core.language_models import BaseChatModel

from insightv_agents.cards import read_card
from insightv_agents.errors import BackendError, ConfigError, check_int, check_number
from insightv_agents.trained import (
    adapter_rank,
    check_adapter,
    model_limit,
    resolve_model,
    vllm_lora_rank,
)

VLLM_PYTHON_ENV = "INSIGHTV_VLLM_PYTHON"
"""Environment variable naming the Python that has vLLM installed (default: this one)."""
DEFAULT_MAX_MODEL_LEN = 4096
"""The context length served when neither the agent card nor a smaller limit of the model
says otherwise."""


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
            Each folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
            (never only a pickle), checked before the server starts.
        max_lora_rank: the largest adapter rank the server accepts, 1 to 512 (raised to fit
            the adapters given).
        runtime_lora: allow loading and unloading adapters while running
            (:meth:`load_adapter`, :meth:`unload_adapter`).
        dtype: the precision: ``auto``, ``float32``, ``bfloat16``, ``float16`` (or vLLM's
            ``float``, ``half``); default: the agent card's, else ``auto``.
        enforce_eager: start faster, without graph capture.
        max_model_len: the longest prompt and reply, in tokens (default: the agent card's,
            else the model's own limit up to 4096).
        load_format: how vLLM reads the weights: ``safetensors`` (default); the formats
            that read pickles (``pt``, ``npcache``, and ``auto``, which falls back to them)
            are refused.
        extra_args: more command-line arguments for the server.
        env: more environment variables for the server.
        startup_timeout: seconds to wait for ``/health`` before giving up.
        log_path: where the server's output goes (default: a temporary file).

    Raises:
        ConfigError: for an option out of range (``port`` 1 to 65535, ``max_model_len``
            16 to 16,777,216, ``startup_timeout`` above 0 up to a day), before anything starts.
        InvalidInputError: for a model or adapter folder that cannot be served (weights
            held only as pickles included).

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
        dtype: str | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        load_format: str = "safetensors",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 600.0,
        log_path: str | Path | None = None,
    ) -> None:
        _check_options(port=port, max_model_len=max_model_len, max_lora_rank=max_lora_rank,
                       dtype=dtype, load_format=load_format, startup_timeout=startup_timeout)
        adapters = dict(adapters or {})
        for name, folder in adapters.items():
            _check_adapter(name, folder)
        base, trained_adapter = resolve_model(model)
        default = None
        if trained_adapter is not None:  # an adapter output: serve its base, and it by name
            default = served_model_name or Path(trained_adapter).name
            adapters.setdefault(default, trained_adapter)
            served_model_name = None
        max_lora_rank = vllm_lora_rank(max_lora_rank,
                                       *(adapter_rank(folder) for folder in adapters.values()))
        self.model = base
        self.card = read_card(trained_adapter) or read_card(base)
        """The agent card of the default model (its adapter's, or the model's), if any."""
        if max_model_len is None:
            max_model_len = (self.card.max_model_len if self.card is not None else None) \
                or min(model_limit(base) or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        self.max_model_len = max_model_len
        dtype = dtype or (self.card.dtype if self.card is not None else None) or "auto"
        self.served_model_name = served_model_name or self.model
        self.default_model = default or self.served_model_name
        self.python = python or os.environ.get(VLLM_PYTHON_ENV) or sys.executable
        self.host = "127.0.0.1"
        self.port = port or _free_port()
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
        from insightv_agents.backends.vllm.client import vllm_chat_model

        return vllm_chat_model(self.base_url, model or self.default_model, **settings)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA adapter into the running server (needs ``runtime_lora=True``); its
        weights must be safetensors (:func:`~insightv_agents.trained.check_adapter`)."""
        if not self.runtime_lora:
            raise ConfigError("start the server with runtime_lora=True to load adapters.")
        _check_adapter(name, path)
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


DTYPES = ("auto", "float32", "bfloat16", "float16", "float", "half")
PICKLE_LOAD_FORMATS = ("auto", "pt", "npcache")


def _check_options(*, port: int | None, max_model_len: int | None, max_lora_rank: int,
                   dtype: str | None, load_format: str, startup_timeout: float) -> None:
    """Raise :class:`ConfigError` for a :class:`VLLMServer` option out of range."""
    if port is not None:
        check_int("port", port, 1, 65_535)
    if max_model_len is not None:
        check_int("max_model_len", max_model_len, 16, 2**24)
    check_int("max_lora_rank", max_lora_rank, 1, 512)
    check_number("startup_timeout", startup_timeout, 0, 86_400, above=True)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; not {dtype!r}.")
    if load_format in PICKLE_LOAD_FORMATS:
        raise ConfigError(f"load_format {load_format!r} can read pickles, which can run code "
                          "when loaded; use 'safetensors' (the default).")


def _check_adapter(name: str, folder: str | Path) -> None:
    """Refuse an adapter name vLLM's ``--lora-modules NAME=FOLDER`` cannot carry, a missing
    folder, or one whose weights are not safetensors."""
    if not isinstance(name, str) or not name or "=" in name or any(c.isspace() for c in name):
        raise ConfigError(f"adapter name {name!r}: give a non-empty name without '=' or "
                          "spaces.")
    if not Path(folder).expanduser().is_dir():
        raise ConfigError(f"adapter {name!r}: {str(folder)!r} is not a folder.")
    check_adapter(folder)


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
