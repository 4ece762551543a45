"""The ``insightv`` command line."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

from insightv_agents.errors import InsightVError
from insightv_agents.graphs import create_insightv_graph
from insightv_agents.images import ImagePolicy
from insightv_agents.prompts import ReasoningMode
from insightv_agents.testing import ScriptedChatModel

app = typer.Typer(help="Insight-V multi-agent visual reasoning.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def main() -> None:
    """Insight-V multi-agent visual reasoning."""


STAND_IN_NOTICE = (
    "No model given: using a scripted stand-in (insightv_agents.testing.ScriptedChatModel). "
    "Its replies are canned text, not a model's reading of the image; the run shows the "
    "graph's flow only. Pass --base-url (an OpenAI-compatible server such as vLLM) or "
    "--local-model DIR (a transformers model run in-process) for real answers."
)


def stand_in_model() -> ScriptedChatModel:
    """The scripted stand-in used when no backend is given (it says so in every reply)."""
    steps = [
        {"summary": "Stand-in: read the question",
         "reasoning": "This is a scripted reply; no model has looked at the image.",
         "action": "continue"},
        {"summary": "Stand-in: hand over",
         "reasoning": "A real reasoning agent would write its steps here.", "action": "summary"},
    ]
    verdict = {"reasoning_correct": True, "critique": "",
               "answer": "(no model configured: scripted stand-in)"}
    return ScriptedChatModel([json.dumps(step) for step in steps] + [json.dumps(verdict)])


Images = Annotated[list[str], typer.Option("--image", "-i", help="Image path (repeatable).")]
Question = Annotated[str, typer.Option("--question", "-q", help="The question to answer.")]
BaseUrl = Annotated[str | None, typer.Option(
    help="OpenAI-compatible API root of the reasoning agent (e.g. http://127.0.0.1:8000/v1).")]
SummaryBaseUrl = Annotated[str | None, typer.Option(
    help="API root of the summary agent (default: the reasoning agent's).")]
LocalModel = Annotated[str | None, typer.Option(
    help="Folder of a transformers VLM to run in-process as the reasoning (and summary) agent.")]
LocalAdapter = Annotated[str | None, typer.Option(help="PEFT adapter folder for --local-model.")]
Model = Annotated[str, typer.Option(help="Served model name of the reasoning agent.")]
SummaryModel = Annotated[str | None, typer.Option(
    help="Served model name of the summary agent (default: the reasoner plays both roles).")]
Mode = Annotated[str, typer.Option(help="step: one step per call; chain: a chain per call.")]
MaxSteps = Annotated[int, typer.Option(help="Cap on reasoning steps.")]
MaxRevisions = Annotated[int, typer.Option(help="Times the summary agent may send reasoning back.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature.")]
AllowUrls = Annotated[bool, typer.Option(help="Allow http(s) image URLs.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")]


@app.command()
def run(
    image: Images,
    question: Question,
    base_url: BaseUrl = None,
    local_model: LocalModel = None,
    local_adapter: LocalAdapter = None,
    model: Model = "insightv-reason",
    summary_base_url: SummaryBaseUrl = None,
    summary_model: SummaryModel = None,
    mode: Mode = "step",
    max_steps: MaxSteps = 16,
    max_revisions: MaxRevisions = 0,
    temperature: Temperature = 0.2,
    allow_urls: AllowUrls = False,
    as_json: AsJson = False,
) -> None:
    """Answer a question about an image, printing each reasoning step as it is made."""
    console = Console(stderr=as_json)
    try:
        reasoner, summarizer, backend = _models(base_url, model, summary_base_url,
                                                summary_model, local_model, local_adapter,
                                                temperature)
        if backend is None:
            console.print(Panel(STAND_IN_NOTICE, title="backend", style="yellow"))
        else:
            console.print(f"[dim]backend: {backend}[/dim]")
        graph = create_insightv_graph(
            reasoner=reasoner, summarizer=summarizer, mode=_mode(mode), max_steps=max_steps,
            max_revisions=max_revisions, image_policy=ImagePolicy(allow_urls=allow_urls),
        ).compile(name="insightv")
        result = _stream(graph, {"image": image if len(image) > 1 else image[0],
                                 "question": question}, console)
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    style = "green" if result["status"] == "ok" else "red"
    console.print(Panel(result["answer"] or "(no answer)", title="answer", style=style))
    for failure in result["failures"]:
        console.print(f"[yellow]recorded failure in {failure['node']}: {failure['error']}[/yellow]")


@app.command()
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

    from insightv_agents.integrations.vllm import VLLMServer

    console = Console()
    try:
        adapters = dict(_adapter_spec(spec) for spec in adapter or [])
        server = VLLMServer(model, served_model_name=served_name, python=python, port=port,
                            adapters=adapters, runtime_lora=runtime_lora, dtype=dtype,
                            max_model_len=max_model_len, startup_timeout=startup_timeout)
        with console.status(f"starting vLLM (log: {server.log_path})"):
            server.start()
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
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


def _adapter_spec(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise InsightVError(f"--adapter takes NAME=FOLDER, not {spec!r}.")
    return name, folder


def _models(base_url: str | None, model: str, summary_base_url: str | None,
            summary_model: str | None, local_model: str | None, local_adapter: str | None,
            temperature: float) -> tuple[Any, Any, str | None]:
    """The reasoner, the summarizer (``None``: the reasoner plays both) and a description of
    the backend (``None`` for the scripted stand-in)."""
    if local_model is not None and base_url is not None:
        raise InsightVError("pass either --base-url or --local-model, not both.")
    if base_url is None and (summary_base_url or summary_model):
        raise InsightVError("--summary-base-url/--summary-model need --base-url as well.")
    if local_model is not None:
        from insightv_agents.integrations.transformers import ChatTransformersVLM

        local = ChatTransformersVLM(model_path=local_model, adapter_path=local_adapter,
                                    temperature=temperature, max_new_tokens=512)
        adapter = f" + adapter {local_adapter}" if local_adapter else ""
        return local, None, f"{local_model}{adapter} in-process (transformers)"
    if base_url is None:
        return stand_in_model(), None, None
    from insightv_agents.integrations.vllm import vllm_chat_model

    reasoner = vllm_chat_model(base_url, model, temperature=temperature)
    description = f"{model} at {base_url}"
    if summary_model is None and summary_base_url is None:
        return reasoner, None, description
    summarizer = vllm_chat_model(summary_base_url or base_url, summary_model or model,
                                 temperature=temperature)
    return reasoner, summarizer, f"{description}, summary: {summary_model or model}"


def _mode(mode: str) -> ReasoningMode:
    if mode == "step":
        return "step"
    if mode == "chain":
        return "chain"
    raise InsightVError(f"--mode must be 'step' or 'chain', not {mode!r}.")


def _stream(graph: Any, inputs: dict[str, Any], console: Console) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind, chunk in graph.stream(inputs, stream_mode=["custom", "values"]):
        if kind == "values":
            result = chunk
        elif chunk.get("event") == "step":
            step = chunk["step"]
            title = f"step {chunk['index']}" + (f" (revision {chunk['revision']})"
                                               if chunk["revision"] else "")
            console.print(Panel(f"[bold]{step['summary']}[/bold]\n{step['reasoning']}",
                                title=title, subtitle=step["action"], title_align="left"))
        elif chunk.get("event") == "verdict":
            verdict = chunk["verdict"]
            holds = "holds" if verdict["reasoning_correct"] else "is flawed"
            console.print(f"[dim]summary agent: the reasoning {holds}"
                          + (f": {verdict['critique']}" if verdict["critique"] else "") + "[/dim]")
    return result




if __name__ == "__main__":
    app()
