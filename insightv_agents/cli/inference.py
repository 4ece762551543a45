"""``insightv run``: answer a question about an image, each step shown as it is made."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

from insightv_agents.cli.common import (
    AllowUrls,
    AsJson,
    BaseUrl,
    BeamSize,
    Images,
    LocalAdapter,
    LocalModel,
    MaxRevisions,
    MaxSteps,
    Method,
    Model,
    Question,
    RunMode,
    SummaryBaseUrl,
    SummaryModel,
    command_errors,
)
from insightv_agents.errors import InsightVError
from insightv_agents.images import ImagePolicy
from insightv_agents.methods import METHODS, STAND_IN_NOTICE, build_graph, choose_backend


def run(
    image: Images,
    question: Question,
    base_url: BaseUrl = None,
    local_model: LocalModel = None,
    local_adapter: LocalAdapter = None,
    model: Model = "insightv-reason",
    summary_base_url: SummaryBaseUrl = None,
    summary_model: SummaryModel = None,
    mode: RunMode = None,
    max_steps: MaxSteps = 16,
    max_revisions: MaxRevisions = 0,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature, 0 to 10 (0 to 5 for --local-model; default: the agent "
             "card's, else 0.2).")] = None,
    method: Method = "insightv",
    beam_size: BeamSize = 2,
    allow_urls: AllowUrls = False,
    as_json: AsJson = False,
) -> None:
    """Answer a question about an image, printing each reasoning step (or stage) as it is
    made."""
    console = Console(stderr=as_json)
    with command_errors(console):
        if method != "insightv" and method not in METHODS:
            raise InsightVError(f"--method must be insightv, {', '.join(METHODS)}; "
                                f"not {method!r}.")
        backend = choose_backend(base_url, model, summary_base_url, summary_model, local_model,
                                 local_adapter, temperature, staged=method != "insightv")
        if backend.description is None:
            console.print(Panel(STAND_IN_NOTICE, title="backend", style="yellow"))
        else:
            console.print(f"[dim]backend: {backend.description}[/dim]")
        graph = build_graph(method, backend.reasoner, backend.summarizer, mode=mode,
                            max_steps=max_steps, max_revisions=max_revisions,
                            beam_size=beam_size, policy=ImagePolicy(allow_urls=allow_urls))
        result = stream_run(graph, {"image": image if len(image) > 1 else image[0],
                                 "question": question}, console)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    style = "green" if result["status"] == "ok" else "red"
    console.print(Panel(result["answer"] or "(no answer)", title="answer", style=style))
    for failure in result["failures"]:
        console.print(f"[yellow]recorded failure in {failure['node']}: {failure['error']}[/yellow]")


def stream_run(graph: Any, inputs: dict[str, Any], console: Console) -> dict[str, Any]:
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
        elif chunk.get("event") == "stage":
            console.print(Panel(chunk["text"] or "(empty)", title_align="left",
                                title=f"{chunk['stage']} (best of {chunk['candidates']})"))
        elif chunk.get("event") == "response":
            console.print(Panel(chunk["text"] or "(empty)", title="response", title_align="left"))
        elif chunk.get("event") == "verdict":
            verdict = chunk["verdict"]
            holds = {True: "holds", False: "is flawed", None: "was not judged"}[
                verdict["reasoning_correct"]]
            console.print(f"[dim]summary agent: the reasoning {holds}"
                          + (f": {verdict['critique']}" if verdict["critique"] else "") + "[/dim]")
    return result
