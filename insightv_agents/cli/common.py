"""What every command shares: the common options, one handler that turns the library's
errors into a message and exit status 2, one progress bar, and the parsing of small option
values."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.text import Text

from insightv_agents.errors import ConfigError, InsightVError

Images = Annotated[list[str], typer.Option("--image", "-i", help="Image path (repeatable).")]
Question = Annotated[str, typer.Option("--question", "-q", help="The question to answer.")]
BaseUrl = Annotated[list[str] | None, typer.Option(
    help="OpenAI-compatible API root of the reasoning agent (e.g. http://127.0.0.1:8000/v1); "
         "repeat it for several replicas (each request goes to the least busy one up).")]
SummaryBaseUrl = Annotated[list[str] | None, typer.Option(
    help="API root of the summary agent, repeatable (default: the reasoning agent's).")]
LocalModel = Annotated[str | None, typer.Option(
    help="Folder of a transformers VLM to run in-process as the reasoning (and summary) agent.")]
LocalAdapter = Annotated[str | None, typer.Option(help="PEFT adapter folder for --local-model.")]
Model = Annotated[str, typer.Option(help="Served model name of the reasoning agent.")]
SummaryModel = Annotated[str | None, typer.Option(
    help="Served model name of the summary agent (default: the reasoner plays both roles).")]
Mode = Annotated[str, typer.Option(help="step: one step per call; chain: a chain per call.")]
RunMode = Annotated[str | None, typer.Option(
    help="step: one step per call; chain: a chain per call (default: chain for the demo "
         "agents, step otherwise).")]
MaxSteps = Annotated[int, typer.Option(help="Cap on reasoning steps.")]
MaxRevisions = Annotated[int, typer.Option(help="Times the summary agent may send reasoning back.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature.")]
AllowUrls = Annotated[bool, typer.Option(help="Allow http(s) image URLs.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")]
SkipBad = Annotated[bool, typer.Option(
    "--skip-bad", help="Report each bad dataset row and run the good ones (default: refuse "
                       "the dataset, listing its bad rows, before any model is called).")]
Strict = Annotated[bool, typer.Option(
    "--strict", hidden=True, help="Deprecated: refusing a dataset with bad rows is the default.")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray", metavar="ADDRESS",
    help="Spread the items over the workers of a Ray cluster: auto (the cluster this machine "
         "joined with `ray start`), local (start one here), or host:port. Needs "
         "insightv-agents[ray]; data and --out on storage every node sees.")]
RayWorkers = Annotated[int | None, typer.Option(
    help="With --ray: workers (Ray actors; default: one per node with room for one), each "
         "with --concurrency items in flight.")]
Method = Annotated[str, typer.Option(
    help="insightv (reasoning + summary agents), or LLaVA-CoT's four stages with stage-beam "
         "(stage-level beam search), best-of-n, sentence-beam or single (one pass).")]
BeamSize = Annotated[int, typer.Option(
    help="Candidates per stage (stage-beam, sentence-beam) or responses (best-of-n).")]


P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def command_errors(console: Console) -> Iterator[None]:
    """Bad input, options or data (an :class:`~insightv_agents.errors.InsightVError`) end
    the command with the message (unwrapped: paths in it stay whole) and exit status 2."""
    try:
        yield
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from err


def guarded(command: Callable[P, R]) -> Callable[P, R]:
    """``command`` with :func:`command_errors` around the whole of it, so that a library
    error raised anywhere in it (inside ``asyncio.run``, or while it writes its results)
    ends it with the message and exit status 2, never a traceback."""
    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with command_errors(Console()):
            return command(*args, **kwargs)
    return run


@contextmanager
def progress(console: Console, description: str, total: int,
             status: Callable[[], str] | None = None) -> Iterator[Callable[[int], None]]:
    """A progress bar of ``total`` items, with ``status()`` shown under it as it changes
    (the endpoint pools' replicas: :func:`pool_status`); yields a function that sets how
    many are done."""
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with _StatusProgress(status, *columns, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)
    if status is not None:
        console.print(status(), highlight=False)


class _StatusProgress(Progress):
    """Rich's progress display with a status text under its bars (Rich's documented way:
    overriding ``get_renderables``)."""

    def __init__(self, status: Callable[[], str] | None, *columns: Any, **options: Any) -> None:
        self._status = status  # before Progress starts drawing
        super().__init__(*columns, **options)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        if self._status is not None:
            yield Text(self._status(), style="dim")


def pool_status(*models: Any) -> Callable[[], str] | None:
    """The state of the endpoint pools the ``models`` send to (each pool once: in flight,
    errors, latency per replica), for :func:`progress`; ``None`` when none has a pool."""
    pools = {id(pool): pool for model in models
             if (pool := getattr(model, "pool", None)) is not None}
    if not pools:
        return None
    return lambda: "\n".join(pool.describe() for pool in pools.values())


def bad_rows(console: Console, skip_bad: bool, strict: bool = False
             ) -> Callable[[str], None] | None:
    """What a command does with bad dataset rows (``load_items(on_bad_row=...)``): ``None``
    refuses the dataset; with ``--skip-bad``, a function that reports each row skipped."""
    if strict:
        if skip_bad:
            raise ConfigError("--strict and --skip-bad contradict each other; drop --strict "
                              "(refusing a dataset with bad rows is the default).")
        console.print("[yellow]--strict is deprecated: refusing a dataset with bad rows is "
                      "the default.[/yellow]")
    if not skip_bad:
        return None

    def report(problem: str) -> None:
        console.print(f"[yellow]skipped bad row: {escape(problem)}[/yellow]", soft_wrap=True)
    return report
