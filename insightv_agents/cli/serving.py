"""``insightv serve``: a vLLM server for a model and its LoRA adapters, until Ctrl-C."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel

from insightv_agents.cli.common import command_errors
from insightv_agents.errors import InsightVError


def serve(
    model: Annotated[str, typer.Option(help="Folder (or hub id) of the model to serve.")],
    adapter: Annotated[list[str] | None, typer.Option(
        help="A LoRA adapter to serve, as NAME=FOLDER (repeatable).")] = None,
    served_name: Annotated[str | None, typer.Option(help="Name clients ask for.")] = None,
    port: Annotated[int | None, typer.Option(help="Port on 127.0.0.1 (default: free).")] = None,
    max_model_len: Annotated[int, typer.Option(help="Longest prompt + reply, in tokens.")] = 4096,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, ...")] = "auto",
    runtime_lora: Annotated[bool, typer.Option(help="Allow loading adapters live.")] = False,
    python: Annotated[str | None, typer.Option(
        help="Python with vLLM installed (default: $INSIGHTV_VLLM_PYTHON, else this one).")] = None,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 600,
) -> None:
    """Serve a model (and LoRA adapters) with vLLM on 127.0.0.1 until Ctrl-C."""
    import time

    from insightv_agents.backends.vllm import VLLMServer

    console = Console()
    with command_errors(console):
        adapters = dict(adapter_spec(spec) for spec in adapter or [])
        server = VLLMServer(model, served_model_name=served_name, python=python, port=port,
                            adapters=adapters, runtime_lora=runtime_lora, dtype=dtype,
                            max_model_len=max_model_len, startup_timeout=startup_timeout)
        with console.status(f"starting vLLM (log: {server.log_path})"):
            server.start()
    names = ", ".join([server.served_model_name, *server.adapters])
    console.print(Panel(f"{server.base_url}\nmodels: {names}\n\ninsightv run -i IMAGE -q "
                        f"QUESTION --base-url {server.base_url} --model "
                        f"{next(iter(server.adapters), server.served_model_name)}",
                        title="vLLM serving", style="green"))
    try:
        while server.running:
            time.sleep(1)
        console.print(f"[bold red]the server exited[/bold red]\n{server.log_tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        server.stop()


def adapter_spec(spec: str) -> tuple[str, str]:
    """``--adapter``'s ``NAME=FOLDER``, split."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise InsightVError(f"--adapter takes NAME=FOLDER, not {spec!r}.")
    return name, folder
