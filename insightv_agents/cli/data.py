"""``insightv synthesize`` (reasoning paths from a teacher) and ``insightv build-data``
(TRL-ready datasets from them)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from insightv_agents.cli.common import (
    MaxSteps,
    RayAddress,
    RayWorkers,
    SkipBad,
    Strict,
    bad_rows,
    guarded,
    pool_status,
    progress,
)
from insightv_agents.errors import InsightVError, check_int
from insightv_agents.files import output_folder
from insightv_agents.methods import reasoning_mode


@guarded
def synthesize(
    input: Annotated[str, typer.Option(
        "--input", help="JSONL file or saved Hugging Face dataset folder: image (relative to "
                        "the data folder), question, answer[, id, choices, category].")],
    out: Annotated[str, typer.Option(help="Output folder (records.jsonl, run.json); rerun the "
                                          "same command to resume.")],
    teacher: Annotated[str, typer.Option(help="Served model name of the teacher MLLM.")],
    teacher_url: Annotated[list[str], typer.Option(
        help="OpenAI-compatible API root of the teacher (e.g. http://127.0.0.1:8000/v1); "
             "repeat it for several replicas (each request goes to the least busy one up).")],
    scorer: Annotated[str | None, typer.Option(
        help="Served name of the scoring MLLM, or 'rule' for the rule-based scorer "
             "(default: the teacher scores).")] = None,
    scorer_url: Annotated[list[str] | None, typer.Option(
        help="API root of the scorer, repeatable (default: the teacher's).")] = None,
    judge: Annotated[str | None, typer.Option(
        help="Served name of a text LLM that judges answers the rules cannot decide.")] = None,
    judge_url: Annotated[list[str] | None, typer.Option(
        help="API root of the judge, repeatable (default: the teacher's).")] = None,
    paths: Annotated[int, typer.Option("--paths", "-n", help="Reasoning paths per item.")] = 4,
    concurrency: Annotated[int, typer.Option(
        help="Items in flight at once (with --ray: in each worker).")] = 32,
    max_steps: MaxSteps = 16,
    temperature: Annotated[float, typer.Option(help="Teacher sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Teacher nucleus sampling.")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="Longest reply per request.")] = 1024,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    skip_bad: SkipBad = False,
    strict: Strict = False,
    mode: Annotated[str | None, typer.Option(
        help="step: one step per call; chain: a chain per call (default: the teacher's agent "
             "card's, else step).")] = None,
    final_answer: Annotated[str, typer.Option(
        help="ask: the teacher is asked after its last step; stated: the answer its last step "
             "states (a trained reasoning agent's own paths, for build-data --self).")] = "ask",
    ray: RayAddress = None,
    workers: RayWorkers = None,
) -> None:
    """Synthesize reasoning paths for a dataset: N teacher paths per item, answer-checked and
    scored together; append-only and resumable."""
    import asyncio

    from insightv_agents.synthesize import RECORDS_FILE, load_items, log_error, write_run_file
    from insightv_agents.synthesize import synthesize as run_synthesis

    console = Console()
    output_folder(out)
    check_int("concurrency", concurrency, 1, 4096)
    if ray is not None:
        from insightv_agents.distributed import check_ray

        check_ray()
    if final_answer not in ("ask", "stated"):
        raise InsightVError(f"--final-answer must be 'ask' or 'stated', not "
                            f"{final_answer!r}.")
    items, root = load_items(input, out=out, limit=limit,
                             on_bad_row=bad_rows(console, skip_bad, strict))
    teaching = Teaching(teacher=teacher, teacher_url=tuple(teacher_url), scorer=scorer,
                        scorer_url=tuple(scorer_url or ()), judge=judge,
                        judge_url=tuple(judge_url or ()), paths=paths, max_steps=max_steps,
                        temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                        mode=mode, final_answer=final_answer)
    graph, provenance, models = teaching.build()
    write_run_file(out, {"input": str(input), "data_root": str(root), "paths": paths,
                         **provenance})
    if ray is not None:
        from insightv_agents.distributed import run_on_ray

        with progress(console, f"synthesizing on Ray ({ray})", len(items)) as done:
            ray_report = run_on_ray(
                functools.partial(synthesis_worker, teaching), items, out, stem="records",
                size="num_paths", address=ray, workers=workers, concurrency=concurrency,
                on_item=lambda r: done(r.skipped + r.written + len(r.errors)),
                on_error=functools.partial(log_error, Path(out)))
        console.print(f"{ray_report.written} item(s) written, {ray_report.skipped} already "
                      f"done, {len(ray_report.errors)} item error(s), over "
                      f"{ray_report.workers} worker(s) ({ray_report.restarts} "
                      f"restarted), in {ray_report.seconds:.1f} s -> {out}/{RECORDS_FILE}")
        errors = ray_report.errors
    else:
        with progress(console, "synthesizing", len(items), pool_status(*models)) as done:

            def advance(report: Any) -> None:
                done(report.skipped + report.written + len(report.errors))

            report = asyncio.run(run_synthesis(graph, items, out, concurrency=concurrency,
                                               provenance=provenance, on_item=advance))
        if report.repaired_bytes:
            console.print(f"[yellow]cut {report.repaired_bytes} bytes of an unfinished group "
                          "left by an interrupted run[/yellow]")
        console.print(f"{report.written} item(s) written, {report.skipped} already done, "
                      f"{report.paths_failed} failed path(s) recorded, {len(report.errors)} "
                      f"item error(s), in {report.seconds:.1f} s -> {out}/{RECORDS_FILE}")
        errors = report.errors
    for identifier, message in errors[:10]:
        console.print(f"[red]{escape(identifier)}: {escape(message)}[/red]")
    if errors:
        console.print("[yellow]items with errors were not written; rerun to retry them "
                      "(see errors.jsonl)[/yellow]")
        raise typer.Exit(1)


@dataclass(frozen=True)
class Teaching:
    """The models and settings of a synthesis run, as plain values (sent to Ray workers,
    which build the same models and graph)."""

    teacher: str
    teacher_url: tuple[str, ...]
    scorer: str | None
    scorer_url: tuple[str, ...]
    judge: str | None
    judge_url: tuple[str, ...]
    paths: int
    max_steps: int
    temperature: float
    top_p: float
    max_tokens: int
    mode: str | None
    final_answer: str

    def build(self) -> tuple[Any, dict[str, Any], tuple[Any, ...]]:
        """The compiled synthesis graph, the records' provenance and the models (teacher,
        scorer, judge); the teacher's replicas are one endpoint pool, which the scorer and
        judge share unless given their own URLs."""
        from insightv_agents.assessment import RuleScorer
        from insightv_agents.backends.vllm import endpoints, vllm_chat_model
        from insightv_agents.cards import card_of
        from insightv_agents.formats import card_profile, json_profile
        from insightv_agents.graphs.synthesis import create_synthesis_graph
        from insightv_agents.synthesize import describe_model

        teachers = endpoints(self.teacher_url)
        teacher = vllm_chat_model(teachers, self.teacher, temperature=self.temperature,
                                  top_p=self.top_p, max_tokens=self.max_tokens)
        scorer: Any = None
        if self.scorer == "rule":
            scorer = RuleScorer()
        elif self.scorer is not None or self.scorer_url:
            scorer = vllm_chat_model(endpoints(self.scorer_url or teachers),
                                     self.scorer or self.teacher, temperature=0.0,
                                     max_tokens=self.max_tokens)
        judge = None if self.judge is None else vllm_chat_model(
            endpoints(self.judge_url or teachers), self.judge, temperature=0.0,
            max_tokens=256)
        # a trained agent as teacher is driven as its card says
        profile = json_profile(card_profile(card_of(teacher), mode=reasoning_mode(
            self.mode) if self.mode is not None else None), "synthesis")
        graph = create_synthesis_graph(
            teacher=teacher, scorer=scorer, judge=judge, paths=self.paths,
            mode=profile.mode, max_steps=self.max_steps, prompts=profile.prompts,
            final_answer="stated" if self.final_answer == "stated" else "ask").compile(
                name="synthesis")
        provenance = {"teacher": describe_model(teacher),
                      "scorer": describe_model(scorer or teacher),
                      "judge": describe_model(judge), "max_steps": self.max_steps,
                      "mode": profile.mode, "final_answer": self.final_answer}
        return graph, provenance, (teacher, scorer, judge)


def synthesis_worker(teaching: Teaching) -> Any:
    """A Ray worker's synthesis step: ``teaching``'s graph built in the worker."""
    from insightv_agents.synthesize import synthesis_step

    graph, provenance, _ = teaching.build()
    return synthesis_step(graph, provenance)


@guarded
def build_data(
    kind: Annotated[str, typer.Argument(help="sft-reason, sft-summary or dpo.")],
    source: Annotated[str, typer.Option("--from", help="A synthesis output folder.")],
    out: Annotated[str, typer.Option(help="Folder for the dataset (save_to_disk format).")],
    mode: Annotated[str, typer.Option(help="sft-reason: step (a step per turn) or chain.")]
    = "step",
    min_score: Annotated[int | None, typer.Option(
        help="sft-reason: only paths scoring at least this; dpo: the chosen path's minimum.")]
    = None,
    self_made: Annotated[str | None, typer.Option(
        "--self", help="sft-summary: synthesis output written by the trained reasoning agent.")]
    = None,
    mix: Annotated[str, typer.Option(
        help="sft-summary proportions, e.g. optimal=0.35,flawed=0.35,self=0.1,qa=0.2.")]
    = "optimal=0.35,flawed=0.35,self=0.1,qa=0.2",
    bins: Annotated[str, typer.Option(help="sft-summary flawed score bins, e.g. 1-40,41-70.")]
    = "1-40,41-70,71-90",
    total: Annotated[int | None, typer.Option(help="sft-summary: rows wanted.")] = None,
    min_margin: Annotated[int, typer.Option(help="dpo: chosen - rejected score margin.")] = 20,
    pairs_per_question: Annotated[int, typer.Option(help="dpo: pairs per question.")] = 1,
    images: Annotated[str | None, typer.Option(
        help="The data folder, if it moved since synthesis.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Build a TRL-ready dataset from synthesis records."""
    from insightv_agents.trainers import data
    from insightv_agents.trainers.common import dataset_card

    console = Console()
    output_folder(out)
    if kind not in ("sft-reason", "sft-summary", "dpo"):
        raise InsightVError(f"unknown dataset kind {kind!r}: sft-reason, sft-summary or "
                            "dpo.")
    shares = summary_mix(mix, bins, seed)
    records = data.load_records(source, images=images)
    if kind == "sft-reason":
        dataset, report = data.build_reasoning_sft(records, mode=reasoning_mode(mode),
                                                   min_score=min_score)
    elif kind == "sft-summary":
        self_records = data.load_records(self_made) if self_made else None
        dataset, report = data.build_summary_sft(
            records, mix=shares, self_records=self_records, total=total)
    else:
        dataset, report = data.build_dpo_pairs(
            records, min_margin=min_margin, min_chosen_score=min_score,
            pairs_per_question=pairs_per_question)
    dataset.save_to_disk(out)
    dataset_card(kind, mode=reasoning_mode(mode)).save(out)  # how its agent will be driven
    console.print("\n".join([f"{kind}: {out}", *report.lines()]))


def summary_mix(text: str, bins: str, seed: int) -> Any:
    """``--mix`` and ``--bins`` as a :class:`~insightv_agents.trainers.data.SummaryMix`."""
    from insightv_agents.trainers.data import SummaryMix

    names = {"optimal": "optimal", "flawed": "flawed", "self": "self_made", "qa": "qa"}
    shares: dict[str, float] = {}
    try:
        for part in filter(None, text.split(",")):
            name, _, value = part.partition("=")
            shares[names[name.strip()]] = float(value)
        ranges = tuple((int(low), int(high)) for low, high in
                       (part.split("-") for part in filter(None, bins.split(","))))
    except (KeyError, ValueError):
        raise InsightVError(f"--mix takes optimal=,flawed=,self=,qa= shares and --bins "
                            f"LOW-HIGH ranges, not {text!r} / {bins!r}.") from None
    if any(not 1 <= low <= high <= 100 for low, high in ranges):
        raise InsightVError("--bins ranges must lie within 1-100, low <= high.")
    return SummaryMix(**{**dict.fromkeys(names.values(), 0.0), **shares},
                      flawed_bins=ranges, seed=seed)
