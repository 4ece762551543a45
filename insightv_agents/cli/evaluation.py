"""``insightv eval`` (a method over a dataset, every prediction kept) and ``insightv compare``
(two evaluations, question by question)."""

from __future__ import annotations

import functools
import itertools
from typing import Annotated

import typer
from rich.console import Console

from insightv_agents import demo
from insightv_agents.cli.common import (
    BaseUrl,
    BeamSize,
    LocalAdapter,
    LocalModel,
    MaxSteps,
    Model,
    RayAddress,
    RayWorkers,
    SkipBad,
    Strict,
    SummaryBaseUrl,
    SummaryModel,
    bad_rows,
    guarded,
    pool_status,
    progress,
)
from insightv_agents.errors import InsightVError, check_int
from insightv_agents.files import output_folder
from insightv_agents.methods import METHODS, Evaluation, evaluation_worker


@guarded
def eval_command(
    data: Annotated[str, typer.Option(
        help="JSONL file or saved Hugging Face dataset folder in the synthesis input format "
             "(image, question, answer[, id, choices, category]).")],
    out: Annotated[str, typer.Option(help="Output folder (predictions.jsonl, report.json, "
                                          "report.md); rerun the same command to resume.")],
    method: Annotated[str, typer.Option(
        help="insightv, direct (one model, one call), or a LLaVA-CoT method: stage-beam, "
             "best-of-n, sentence-beam, single.")] = "insightv",
    base_url: BaseUrl = None,
    local_model: LocalModel = None,
    local_adapter: LocalAdapter = None,
    model: Model = "insightv-reason",
    summary_base_url: SummaryBaseUrl = None,
    summary_model: SummaryModel = None,
    mode: Annotated[str | None, typer.Option(
        help="step: one step per call; chain: a chain per call (default: the agent card's, "
             "else chain).")] = None,
    max_steps: MaxSteps = 16,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature (default: the agent card's, else 0: greedy).")] = None,
    beam_size: BeamSize = 2,
    checks: Annotated[str | None, typer.Option(
        help="The dataset's own checks (its closed answer set, a check of the reasoning): "
             "module:attribute of a DatasetChecks or of a function of the data folder "
             "returning one, or the name of an 'insightv_agents.checks' entry point.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    skip_bad: SkipBad = False,
    strict: Strict = False,
    concurrency: Annotated[int, typer.Option(
        help="Items in flight at once (with --ray: in each worker).")] = 8,
    labels: Annotated[str | None, typer.Option(
        help="The data's closed answer set, comma-separated (e.g. yes,no,red,blue): one label "
             "given for another is wrong, not undecided (default: the --checks' rules).")
    ] = None,
    ray: RayAddress = None,
    workers: RayWorkers = None,
    worker_gpus: Annotated[float, typer.Option(
        help="With --ray: GPUs each worker reserves (for --local-model on GPU nodes).")] = 0.0,
) -> None:
    """Evaluate a method on a dataset: accuracy overall and per category, every prediction
    saved; append-only and resumable."""
    import asyncio

    from rich.markdown import Markdown

    from insightv_agents.evaluate import evaluate, report_markdown
    from insightv_agents.synthesize import load_items

    console = Console()
    output_folder(out)
    if method not in ("insightv", "direct", *METHODS):
        raise InsightVError(f"--method must be insightv, direct or one of "
                            f"{', '.join(METHODS)}; not {method!r}.")
    check_int("concurrency", concurrency, 1, 4096)
    if ray is not None:
        from insightv_agents.distributed import check_ray

        check_ray()
    items, root = load_items(data, out=out, limit=limit,
                             on_bad_row=bad_rows(console, skip_bad, strict))
    if base_url is None and local_model is None and not (
            method == "insightv" and demo.demo_available()):
        raise InsightVError("evaluation needs a model: pass --base-url or --local-model "
                            "(with neither, --method insightv runs the demo agents).")
    run = Evaluation(method=method, data=str(data), root=str(root),
                     base_url=tuple(base_url or ()), local_model=local_model,
                     local_adapter=local_adapter, model=model,
                     summary_base_url=tuple(summary_base_url or ()),
                     summary_model=summary_model, mode=mode, max_steps=max_steps,
                     temperature=temperature, beam_size=beam_size, checks=checks,
                     limit=limit, labels=labels)
    backend, settings, judged = run.build()
    if ray is not None:
        from insightv_agents.distributed import run_on_ray
        from insightv_agents.evaluate import finish_evaluation, start_evaluation

        folder = start_evaluation(out, settings)
        with progress(console, f"evaluating {method} on Ray ({ray})", len(items)) as done:
            run_on_ray(functools.partial(evaluation_worker, run), items, folder,
                       stem="predictions", size="records", address=ray, workers=workers,
                       concurrency=concurrency, gpus_per_worker=worker_gpus,
                       on_item=lambda r: done(r.skipped + r.written + len(r.errors)))
        report = finish_evaluation(folder, items, settings)
    else:
        finished = itertools.count(1)
        with progress(console, f"evaluating {method}", len(items),
                      pool_status(backend.reasoner, backend.summarizer)) as done:
            report = asyncio.run(evaluate(
                items=items, out=out, settings=settings, concurrency=concurrency,
                on_item=lambda _: done(next(finished)), **judged))
    console.print(Markdown(report_markdown(report)))
    console.print(f"-> {out}/report.md, {out}/report.json, {out}/predictions.jsonl")


@guarded
def compare(
    first: Annotated[str, typer.Argument(help="An evaluation folder (insightv eval --out).")],
    second: Annotated[str, typer.Argument(help="Another, on the same items.")],
    category: Annotated[list[str] | None, typer.Option(
        help="Only items of this category (repeat for several).")] = None,
    stated: Annotated[bool, typer.Option(
        help="Compare the answers the reasoning chains stated, not the final answers "
             "(what the summary agents made of them).")] = False,
) -> None:
    """Compare two evaluations question by question: which items only one got right, and
    the sign test's p-value (accuracies a few points apart on tens of items are noise)."""
    from insightv_agents.evaluate import compare_predictions

    console = Console()
    paired = compare_predictions(first, second, categories=category or None, stated=stated)
    console.print(
        f"{paired.items} items: both right {paired.both_right}, only {first} "
        f"{paired.only_first}, only {second} {paired.only_second}, both wrong "
        f"{paired.both_wrong}{' (the answers their chains stated)' if stated else ''}.\n"
        f"Accuracy difference {100 * paired.difference:+.1f} points; "
        f"sign test p = {paired.p_value:.3f}.", highlight=False)


@guarded
def lmms_task(
    data: Annotated[str, typer.Option(
        help="JSONL file or saved Hugging Face dataset folder in the synthesis input format.")],
    out: Annotated[str, typer.Option(help="Folder for the task file and its dataset.")],
    name: Annotated[str, typer.Option(help="The task's name in lmms-eval.")] = "insightv_local",
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    skip_bad: SkipBad = False,
    strict: Strict = False,
) -> None:
    """Write an lmms-eval task over a dataset of yours (loaded from disk, asked and scored as
    ``insightv eval`` asks and scores it): ``lmms-eval eval --include_path OUT --tasks NAME``."""
    from insightv_agents.harnesses.lmms_task import write_lmms_task
    from insightv_agents.synthesize import load_items

    console = Console()
    output_folder(out)
    items, _ = load_items(data, limit=limit, on_bad_row=bad_rows(console, skip_bad, strict))
    path = write_lmms_task(items, out, task=name)
    console.print(f"{len(items)} items -> {path}\nRun it: lmms-eval eval --model insightv "
                  f"--include_path {out} --tasks {name} --output_path OUT --log_samples",
                  highlight=False)
