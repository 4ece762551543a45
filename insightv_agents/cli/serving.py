"""``insightv serve``: a vLLM server for a model and its LoRA adapters, until Ctrl-C (or
SIGTERM, SIGHUP)."""

from __future__ import annotations

import signal
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

from insightv_agents.cli.common import command_errors
from insightv_agents.errors import InsightVError


def serve(
    model: Annotated[str, typer.Option(help="Folder (or hub id) of the model to serve.")],
    adapter: Annotated[list[str] | None, typer.Option(
        help="A LoRA adapter to serve, as NAME=FOLDER (repeatable); the folder holds "
             "adapter_model.safetensors.")] = None,
    served_name: Annotated[str | None, typer.Option(help="Name clients ask for.")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port on 127.0.0.1, 1 to 65535 (default: free).")] = None,
    max_model_len: Annotated[int | None, typer.Option(
        help="Longest prompt + reply, in tokens, at least 16 (default: the agent card's, else "
             "the model's own limit up to 4096).")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="auto, float32, bfloat16 or float16 (default: the agent card's, else auto).")
    ] = None,
    runtime_lora: Annotated[bool, typer.Option(help="Allow loading adapters live.")] = False,
    python: Annotated[str | None, typer.Option(
        help="Python with vLLM installed (default: $INSIGHTV_VLLM_PYTHON, else this one).")] = None,
    startup_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for readiness (above 0).")] = 600,
) -> None:
    """Serve a model (and LoRA adapters) with vLLM on 127.0.0.1 until Ctrl-C, SIGTERM or
    SIGHUP, which stop the vLLM server with it."""
    import time

    from insightv_agents.backends.vllm import VLLMServer

    console = Console()
    with command_errors(console):
        adapters = dict(adapter_spec(spec) for spec in adapter or [])
        server = VLLMServer(model, served_model_name=served_name, python=python, port=port,
                            adapters=adapters, runtime_lora=runtime_lora, dtype=dtype,
                            max_model_len=max_model_len, startup_timeout=startup_timeout)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with command_errors(console), console.status(
                f"starting vLLM (log: {server.log_path})"):
            server.start()
        names = ", ".join([server.served_model_name, *server.adapters])
        console.print(Panel(f"{server.base_url}\nmodels: {names}\ncontext: "
                            f"{server.max_model_len} tokens\n\n{run_command(server)}",
                            title="vLLM serving", style="green"))
        while server.running:
            time.sleep(1)
        console.print(f"[bold red]the server exited[/bold red]\n{server.log_tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        for sig in (*previous, signal.SIGINT):  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM and SIGHUP end ``serve`` as Ctrl-C does: the vLLM server is stopped."""
    raise KeyboardInterrupt


def run_command(server: Any) -> str:
    """The ``insightv run`` command for what ``server`` serves (its default model, in the
    role its agent card gives it)."""
    name = server.default_model
    if server.card is not None and server.card.role == "summary":
        return (f"insightv run -i IMAGE -q QUESTION --base-url REASONER_URL --model REASONER "
                f"--summary-base-url {server.base_url} --summary-model {name}")
    return f"insightv run -i IMAGE -q QUESTION --base-url {server.base_url} --model {name}"


def adapter_spec(spec: str) -> tuple[str, str]:
    """``--adapter``'s ``NAME=FOLDER``, split."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise InsightVError(f"--adapter takes NAME=FOLDER, not {spec!r}.")
    return name, folder
