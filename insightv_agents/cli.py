"""The ``insightv`` command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from langchain_core.messages import BaseMessage
from rich.console import Console
from rich.panel import Panel

from insightv_agents import demo
from insightv_agents.errors import InsightVError, check_int
from insightv_agents.graphs import create_insightv_graph, create_stage_beam_graph
from insightv_agents.images import ImagePolicy
from insightv_agents.prompts import DEFAULT_PROMPTS, DEFAULT_STAGE_PROMPTS, Prompts, ReasoningMode
from insightv_agents.testing import ScriptedChatModel

app = typer.Typer(help="Insight-V multi-agent visual reasoning.", no_args_is_help=True,
                  add_completion=False, rich_markup_mode="markdown")


@app.callback()
def main() -> None:
    """Insight-V multi-agent visual reasoning."""


DEMO_BACKEND = "the demo agents (shapes world, in-process; see insightv_agents.demo)"
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


def stand_in_stage_model() -> ScriptedChatModel:
    """The scripted stand-in for the LLaVA-CoT methods: stage texts that say what they are,
    a judge that always keeps the first candidate, a check that always passes."""
    def reply(messages: list[BaseMessage]) -> str:
        system = messages[0].text if messages else ""
        if system == DEFAULT_STAGE_PROMPTS.judge_system:
            return "Since this is a scripted stand-in, I choose response 1."
        if system == DEFAULT_STAGE_PROMPTS.check_system:
            return "Correct: a scripted stand-in always says so."
        return ("<SUMMARY> Stand-in: a real model would plan here. </SUMMARY>\n\n<CAPTION> "
                "Stand-in: no model has looked at the image. </CAPTION>\n\n<REASONING> "
                "Stand-in: a real model would reason here. </REASONING>\n\n<CONCLUSION> (no "
                "model configured: scripted stand-in) </CONCLUSION>")

    return ScriptedChatModel([reply], cycle=True)


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
RunMode = Annotated[str | None, typer.Option(
    help="step: one step per call; chain: a chain per call (default: chain for the demo "
         "agents, step otherwise).")]
MaxSteps = Annotated[int, typer.Option(help="Cap on reasoning steps.")]
MaxRevisions = Annotated[int, typer.Option(help="Times the summary agent may send reasoning back.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature.")]
AllowUrls = Annotated[bool, typer.Option(help="Allow http(s) image URLs.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")]
Strict = Annotated[bool, typer.Option(
    help="Stop at a bad input row (default: report each bad row and skip it).")]
Method = Annotated[str, typer.Option(
    help="insightv (reasoning + summary agents), or LLaVA-CoT's four stages with stage-beam "
         "(stage-level beam search), best-of-n, sentence-beam or single (one pass).")]
BeamSize = Annotated[int, typer.Option(
    help="Candidates per stage (stage-beam, sentence-beam) or responses (best-of-n).")]

METHODS = {"stage-beam": "stage", "best-of-n": "best_of_n", "sentence-beam": "sentence",
           "single": "single"}


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
    mode: RunMode = None,
    max_steps: MaxSteps = 16,
    max_revisions: MaxRevisions = 0,
    temperature: Annotated[float | None, typer.Option(
        help="Sampling temperature (default: 0 for the demo agents, 0.2 otherwise).")] = None,
    method: Method = "insightv",
    beam_size: BeamSize = 2,
    allow_urls: AllowUrls = False,
    as_json: AsJson = False,
) -> None:
    """Answer a question about an image, printing each reasoning step (or stage) as it is
    made."""
    console = Console(stderr=as_json)
    try:
        if method != "insightv" and method not in METHODS:
            raise InsightVError(f"--method must be insightv, {', '.join(METHODS)}; "
                                f"not {method!r}.")
        reasoner, summarizer, backend = _models(base_url, model, summary_base_url,
                                                summary_model, local_model, local_adapter,
                                                temperature, staged=method != "insightv")
        if backend is None:
            console.print(Panel(STAND_IN_NOTICE, title="backend", style="yellow"))
        else:
            console.print(f"[dim]backend: {backend}[/dim]")
        mode = mode or ("chain" if backend == DEMO_BACKEND else "step")
        graph = _graph(method, reasoner, summarizer, mode=mode, max_steps=max_steps,
                       max_revisions=max_revisions, beam_size=beam_size,
                       policy=ImagePolicy(allow_urls=allow_urls), prompts=_prompts(backend))
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

    from insightv_agents.backends.vllm import VLLMServer

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


@app.command()
def synthesize(
    input: Annotated[str, typer.Option(
        "--input", help="JSONL file or saved Hugging Face dataset folder: image (relative to "
                        "the data folder), question, answer[, id, choices, category].")],
    out: Annotated[str, typer.Option(help="Output folder (records.jsonl, run.json); rerun the "
                                          "same command to resume.")],
    teacher: Annotated[str, typer.Option(help="Served model name of the teacher MLLM.")],
    teacher_url: Annotated[str, typer.Option(
        help="OpenAI-compatible API root of the teacher (e.g. http://127.0.0.1:8000/v1).")],
    scorer: Annotated[str | None, typer.Option(
        help="Served name of the scoring MLLM, or 'rule' for the rule-based scorer "
             "(default: the teacher scores).")] = None,
    scorer_url: Annotated[str | None, typer.Option(
        help="API root of the scorer (default: the teacher's).")] = None,
    judge: Annotated[str | None, typer.Option(
        help="Served name of a text LLM that judges answers the rules cannot decide.")] = None,
    judge_url: Annotated[str | None, typer.Option(
        help="API root of the judge (default: the teacher's).")] = None,
    paths: Annotated[int, typer.Option("--paths", "-n", help="Reasoning paths per item.")] = 4,
    concurrency: Annotated[int, typer.Option(help="Items in flight at once.")] = 32,
    max_steps: MaxSteps = 16,
    temperature: Annotated[float, typer.Option(help="Teacher sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Teacher nucleus sampling.")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="Longest reply per request.")] = 1024,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    strict: Strict = False,
    mode: Mode = "step",
    final_answer: Annotated[str, typer.Option(
        help="ask: the teacher is asked after its last step; stated: the answer its last step "
             "states (a trained reasoning agent's own paths, for build-data --self).")] = "ask",
) -> None:
    """Synthesize reasoning paths for a dataset: N teacher paths per item, answer-checked and
    scored together; append-only and resumable."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from insightv_agents.assessment import RuleScorer
    from insightv_agents.backends.vllm import vllm_chat_model
    from insightv_agents.graphs.synthesis import create_synthesis_graph
    from insightv_agents.synthesize import (
        RECORDS_FILE,
        describe_model,
        load_items,
        write_run_file,
    )
    from insightv_agents.synthesize import (
        synthesize as run_synthesis,
    )

    console = Console()
    try:
        check_int("concurrency", concurrency, 1, 4096)
        items, root = load_items(input, out=out, limit=limit,
                                 on_bad_row=None if strict else _skipped(console))
        teacher_model = vllm_chat_model(teacher_url, teacher, temperature=temperature,
                                        top_p=top_p, max_tokens=max_tokens)
        scorer_model: Any = None
        if scorer == "rule":
            scorer_model = RuleScorer()
        elif scorer is not None or scorer_url is not None:
            scorer_model = vllm_chat_model(scorer_url or teacher_url, scorer or teacher,
                                           temperature=0.0, max_tokens=max_tokens)
        judge_model = None if judge is None else vllm_chat_model(
            judge_url or teacher_url, judge, temperature=0.0, max_tokens=256)
        if final_answer not in ("ask", "stated"):
            raise InsightVError(f"--final-answer must be 'ask' or 'stated', not "
                                f"{final_answer!r}.")
        graph = create_synthesis_graph(
            teacher=teacher_model, scorer=scorer_model, judge=judge_model, paths=paths,
            mode=_mode(mode), max_steps=max_steps,
            final_answer="stated" if final_answer == "stated" else "ask").compile(
                name="synthesis")
        provenance = {"teacher": describe_model(teacher_model),
                      "scorer": describe_model(scorer_model or teacher_model),
                      "judge": describe_model(judge_model), "max_steps": max_steps,
                      "mode": mode, "final_answer": final_answer}
        write_run_file(out, {"input": str(input), "data_root": str(root), "paths": paths,
                             **provenance})
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("synthesizing", total=len(items))

        def advance(report: Any) -> None:
            progress.update(task, completed=report.skipped + report.written + len(report.errors))

        report = asyncio.run(run_synthesis(graph, items, out, concurrency=concurrency,
                                           provenance=provenance, on_item=advance))
    if report.repaired_bytes:
        console.print(f"[yellow]cut {report.repaired_bytes} bytes of an unfinished group left "
                      "by an interrupted run[/yellow]")
    console.print(f"{report.written} item(s) written, {report.skipped} already done, "
                  f"{report.paths_failed} failed path(s) recorded, {len(report.errors)} item "
                  f"error(s), in {report.seconds:.1f} s -> {out}/{RECORDS_FILE}")
    for identifier, message in report.errors[:10]:
        console.print(f"[red]{identifier}: {message}[/red]")
    if report.errors:
        console.print("[yellow]items with errors were not written; rerun to retry them "
                      "(see errors.jsonl)[/yellow]")
        raise typer.Exit(1)


@app.command("build-data")
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

    console = Console()
    try:
        if kind not in ("sft-reason", "sft-summary", "dpo"):
            raise InsightVError(f"unknown dataset kind {kind!r}: sft-reason, sft-summary or "
                                "dpo.")
        summary_mix = _summary_mix(mix, bins, seed)
        records = data.load_records(source, images=images)
        if kind == "sft-reason":
            dataset, report = data.build_reasoning_sft(records, mode=_mode(mode),
                                                       min_score=min_score)
        elif kind == "sft-summary":
            self_records = data.load_records(self_made) if self_made else None
            dataset, report = data.build_summary_sft(
                records, mix=summary_mix, self_records=self_records, total=total)
        else:
            dataset, report = data.build_dpo_pairs(
                records, min_margin=min_margin, min_chosen_score=min_score,
                pairs_per_question=pairs_per_question)
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
    dataset.save_to_disk(out)
    console.print("\n".join([f"{kind}: {out}", *report.lines()]))


def _summary_mix(text: str, bins: str, seed: int) -> Any:
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


def _graph(method: str, reasoner: Any, summarizer: Any, *, mode: str, max_steps: int,
           max_revisions: int, beam_size: int, policy: ImagePolicy | None = None,
           prompts: Prompts = DEFAULT_PROMPTS) -> Any:
    """The compiled graph of ``method`` (``insightv`` or a LLaVA-CoT search)."""
    if method == "insightv":
        return create_insightv_graph(
            reasoner=reasoner, summarizer=summarizer, mode=_mode(mode), max_steps=max_steps,
            max_revisions=max_revisions, image_policy=policy,
            prompts=prompts).compile(name="insightv")
    return create_stage_beam_graph(
        reasoner, beam_size=beam_size, search=METHODS[method],  # type: ignore[arg-type]
        summarizer=summarizer, image_policy=policy).compile(name=method)


@app.command("eval")
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
    mode: Mode = "chain",
    max_steps: MaxSteps = 16,
    temperature: Temperature = 0.0,
    beam_size: BeamSize = 2,
    checks: Annotated[str | None, typer.Option(
        help="The dataset's own checks (its closed answer set, a check of the reasoning): "
             "module:attribute of a DatasetChecks or of a function of the data folder "
             "returning one, or the name of an 'insightv_agents.checks' entry point.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    strict: Strict = False,
    concurrency: Annotated[int, typer.Option(help="Items in flight at once.")] = 8,
    labels: Annotated[str | None, typer.Option(
        help="The data's closed answer set, comma-separated (e.g. yes,no,red,blue): one label "
             "given for another is wrong, not undecided (default: the --checks' rules).")
    ] = None,
) -> None:
    """Evaluate a method on a dataset: accuracy overall and per category, every prediction
    saved; append-only and resumable."""
    import asyncio

    from rich.markdown import Markdown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from insightv_agents.evaluate import (
        DatasetChecks,
        direct_predictor,
        evaluate,
        graph_predictor,
        load_checks,
    )
    from insightv_agents.synthesize import describe_model, load_items

    console = Console()
    try:
        if method not in ("insightv", "direct", *METHODS):
            raise InsightVError(f"--method must be insightv, direct or one of "
                                f"{', '.join(METHODS)}; not {method!r}.")
        check_int("concurrency", concurrency, 1, 4096)
        items, root = load_items(data, out=out, limit=limit,
                                 on_bad_row=None if strict else _skipped(console))
        if base_url is None and local_model is None and not (
                method == "insightv" and demo.demo_available()):
            raise InsightVError("evaluation needs a model: pass --base-url or --local-model "
                                "(with neither, --method insightv runs the demo agents).")
        reasoner, summarizer, backend = _models(
            base_url, model, summary_base_url, summary_model, local_model, local_adapter,
            temperature, staged=method not in ("insightv", "direct"))
        predict = direct_predictor(reasoner) if method == "direct" else graph_predictor(
            _graph(method, reasoner, summarizer, mode=mode, max_steps=max_steps,
                   max_revisions=0, beam_size=beam_size, prompts=_prompts(backend)))
        dataset = load_checks(checks, root) if checks else DatasetChecks()
        rules = _answer_rules(labels) or dataset.rules
        settings: dict[str, Any] = {
            "method": method, "data": str(data), "backend": backend,
            "reasoner": describe_model(reasoner), "summarizer": describe_model(summarizer),
            "mode": mode, "beam_size": beam_size, "limit": limit}
        if checks:
            settings["checks"] = checks
        if labels:
            settings["labels"] = sorted(rules.labels)
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"evaluating {method}", total=len(items))
        try:
            report = asyncio.run(evaluate(
                predict, items, out, settings=settings, concurrency=concurrency,
                reasoning_check=dataset.reasoning_check, rules=rules,
                on_item=lambda _: progress.advance(task)))
        except InsightVError as err:
            console.print(f"[bold red]error:[/bold red] {err}")
            raise typer.Exit(2) from err
    from insightv_agents.evaluate import report_markdown

    console.print(Markdown(report_markdown(report)))
    console.print(f"-> {out}/report.md, {out}/report.json, {out}/predictions.jsonl")


@app.command("compare")
def compare_command(
    first: Annotated[str, typer.Argument(help="An evaluation folder (insightv eval --out).")],
    second: Annotated[str, typer.Argument(help="Another, on the same items.")],
    category: Annotated[list[str] | None, typer.Option(
        help="Only items of this category (repeat for several).")] = None,
) -> None:
    """Compare two evaluations question by question: which items only one got right, and
    the sign test's p-value (accuracies a few points apart on tens of items are noise)."""
    from insightv_agents.evaluate import compare_predictions

    console = Console()
    try:
        paired = compare_predictions(first, second, categories=category or None)
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
    console.print(
        f"{paired.items} items: both right {paired.both_right}, only {first} "
        f"{paired.only_first}, only {second} {paired.only_second}, both wrong "
        f"{paired.both_wrong}.\nAccuracy difference {100 * paired.difference:+.1f} points; "
        f"sign test p = {paired.p_value:.3f}.", highlight=False)


def _skipped(console: Console) -> Callable[[str], None]:
    """Reports a skipped input row."""
    def report(problem: str) -> None:
        console.print(f"[yellow]skipped bad row: {problem}[/yellow]")
    return report


def _prompts(backend: str | None) -> Prompts:
    """The prompts for ``backend``: the demo agents' own, else the library's."""
    return demo.demo_prompts() if backend == DEMO_BACKEND else DEFAULT_PROMPTS


def _answer_rules(labels: str | None) -> Any:
    """The closed answer set ``--labels`` gives, if it gives one."""
    from insightv_agents.answers import AnswerRules

    if labels is None:
        return None
    words = frozenset(word.strip() for word in labels.split(",") if word.strip())
    if not words:
        raise InsightVError("--labels names no answer (comma-separated words).")
    return AnswerRules(labels=words)


def _adapter_spec(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise InsightVError(f"--adapter takes NAME=FOLDER, not {spec!r}.")
    return name, folder


def _models(base_url: str | None, model: str, summary_base_url: str | None,
            summary_model: str | None, local_model: str | None, local_adapter: str | None,
            temperature: float | None, staged: bool = False) -> tuple[Any, Any, str | None]:
    """The reasoner, the summarizer (``None``: the reasoner plays both) and a description of
    the backend (``None`` for the scripted stand-in). With no backend given: the demo agents
    (greedy unless a temperature is given), or for the LLaVA-CoT methods the stand-in."""
    if local_model is not None and base_url is not None:
        raise InsightVError("pass either --base-url or --local-model, not both.")
    sampling = 0.2 if temperature is None else temperature  # for a given backend
    if base_url is None and (summary_base_url or summary_model):
        raise InsightVError("--summary-base-url/--summary-model need --base-url as well.")
    if local_model is not None:
        from insightv_agents.backends.transformers import ChatTransformersVLM

        local = ChatTransformersVLM(model_path=local_model, adapter_path=local_adapter,
                                    temperature=sampling, max_new_tokens=512)
        adapter = f" + adapter {local_adapter}" if local_adapter else ""
        return local, None, f"{local_model}{adapter} in-process (transformers)"
    if base_url is None:
        if staged or not demo.demo_available():
            return (stand_in_stage_model() if staged else stand_in_model()), None, None
        reasoner, summarizer = demo.demo_agents(temperature=temperature or 0.0)
        return reasoner, summarizer, DEMO_BACKEND
    from insightv_agents.backends.vllm import vllm_chat_model

    reasoner = vllm_chat_model(base_url, model, temperature=sampling)
    description = f"{model} at {base_url}"
    if summary_model is None and summary_base_url is None:
        return reasoner, None, description
    summarizer = vllm_chat_model(summary_base_url or base_url, summary_model or model,
                                 temperature=sampling)
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
        elif chunk.get("event") == "stage":
            console.print(Panel(chunk["text"] or "(empty)", title_align="left",
                                title=f"{chunk['stage']} (best of {chunk['candidates']})"))
        elif chunk.get("event") == "response":
            console.print(Panel(chunk["text"] or "(empty)", title="response", title_align="left"))
        elif chunk.get("event") == "verdict":
            verdict = chunk["verdict"]
            holds = "holds" if verdict["reasoning_correct"] else "is flawed"
            console.print(f"[dim]summary agent: the reasoning {holds}"
                          + (f": {verdict['critique']}" if verdict["critique"] else "") + "[/dim]")
    return result




# --- training ------------------------------------------------------------------------------

train_app = typer.Typer(help="Train the agents: SFT, DPO, iterative DPO (TRL + PEFT). Each "
                             "also runs under `accelerate launch -m insightv_agents.cli train`.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

TrainModel = Annotated[str, typer.Option(
    help="Base model folder, or an earlier output (full model or adapter) to train further.")]
TrainOut = Annotated[str, typer.Option(help="Output folder (checkpoints, then the adapter or "
                                            "model); rerun the same command to resume.")]
FineTuneOpt = Annotated[str | None, typer.Option(help="lora (default: an adapter on the language "
                                                      "model) or full.")]
LearningRate = Annotated[float | None, typer.Option(
    "--lr", help="Learning rate (default: the paper's, see the docs).")]
Epochs = Annotated[float | None, typer.Option(help="Epochs (default: the paper's).")]
MaxTrainSteps = Annotated[int | None, typer.Option(
    help="Stop after this many steps (default -1: run the epochs).")]
BatchSize = Annotated[int | None, typer.Option(help="Batch size per device (default 1).")]
GradAccum = Annotated[int | None, typer.Option(
    help="Gradient accumulation steps (default 1).")]
LoraRank = Annotated[int | None, typer.Option(help="LoRA rank (default 16).")]
LoraAlpha = Annotated[int | None, typer.Option(help="LoRA alpha (default 32).")]
TrainDType = Annotated[str | None, typer.Option(help="auto (bf16 on a capable GPU, else fp32), "
                                              "bfloat16, bf16-mixed (fp32 weights, bf16 "
                                              "compute; also on CPUs) or float32.")]
ReportTo = Annotated[str | None, typer.Option(
    help="TRL reporting: none (default), tensorboard, wandb, ...")]
Seed = Annotated[int | None, typer.Option(help="Seed (default 0).")]
SettingsFile = Annotated[str | None, typer.Option(
    "--config", help="JSON file of settings (the options given on the line win).")]


def _train_settings(config: str | None, **options: Any) -> dict[str, Any]:
    """Settings from a JSON file, then the command-line options."""
    settings: dict[str, Any] = {}
    if config is not None:
        try:
            settings = json.loads(Path(config).read_text())
        except (OSError, ValueError) as err:
            raise InsightVError(f"--config {config}: {err}") from None
        if not isinstance(settings, dict):
            raise InsightVError(f"--config {config} must hold a JSON object.")
    lora = {"r": options.pop("lora_r"), "alpha": options.pop("lora_alpha")}
    settings["lora"] = {**settings.get("lora", {}),
                        **{key: value for key, value in lora.items() if value is not None}}
    settings.update({key: value for key, value in options.items() if value is not None})
    return settings


@train_app.command("sft")
def train_sft_command(
    model: TrainModel, data: Annotated[str, typer.Option(
        help="Dataset folder from `insightv build-data sft-reason|sft-summary`.")],
    out: TrainOut,
    agent: Annotated[str | None, typer.Option(
        help="reasoning (default) or summary: picks the defaults.")] = None,
    finetune: FineTuneOpt = None, lr: LearningRate = None, epochs: Epochs = None,
    max_steps: MaxTrainSteps = None, batch_size: BatchSize = None, grad_accum: GradAccum = None,
    lora_r: LoraRank = None, lora_alpha: LoraAlpha = None, dtype: TrainDType = None,
    loss: Annotated[str | None, typer.Option(
        help="auto (default), assistant or completion.")] = None,
    report_to: ReportTo = None, seed: Seed = None, config: SettingsFile = None,
) -> None:
    """Supervised fine-tuning of the reasoning or the summary agent."""
    from insightv_agents.trainers.sft import train_sft

    _train(lambda settings: train_sft(model, data, settings), _train_settings(
        config, output_dir=out, agent=agent, finetune=finetune, learning_rate=lr,
        num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, lora_r=lora_r, lora_alpha=lora_alpha,
        dtype=dtype, loss=loss, report_to=report_to, seed=seed))


@train_app.command("dpo")
def train_dpo_command(
    model: TrainModel, data: Annotated[str, typer.Option(
        help="Dataset folder from `insightv build-data dpo`.")],
    out: TrainOut, finetune: FineTuneOpt = None, lr: LearningRate = None,
    epochs: Epochs = None, max_steps: MaxTrainSteps = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1).")] = None,
    batch_size: BatchSize = None, grad_accum: GradAccum = None, lora_r: LoraRank = None,
    lora_alpha: LoraAlpha = None, dtype: TrainDType = None, report_to: ReportTo = None,
    seed: Seed = None, config: SettingsFile = None,
) -> None:
    """DPO of the reasoning agent (the starting model is the reference)."""
    from insightv_agents.trainers.dpo import train_dpo

    _train(lambda settings: train_dpo(model, data, settings), _train_settings(
        config, output_dir=out, finetune=finetune, learning_rate=lr, num_train_epochs=epochs,
        max_steps=max_steps, beta=beta, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, lora_r=lora_r, lora_alpha=lora_alpha,
        dtype=dtype, report_to=report_to, seed=seed))


@train_app.command("iterate")
def train_iterate_command(
    model: Annotated[str, typer.Option(help="M_1: the reasoning agent (e.g. its SFT output).")],
    input: Annotated[str, typer.Option(
        "--input", help="Questions in the synthesis input format (JSONL or dataset folder).")],
    out: Annotated[str, typer.Option(help="Run folder (a sub-folder per round); rerun the "
                                          "same command to resume.")],
    rounds: Annotated[int, typer.Option(help="Rounds T.")] = 3,
    paths: Annotated[int, typer.Option("--paths", "-n", help="Paths per question.")] = 4,
    mode: Annotated[str, typer.Option(help="chain or step.")] = "chain",
    scorer: Annotated[str, typer.Option(
        help="'rule', or the served name of a scoring MLLM at --scorer-url.")] = "rule",
    scorer_url: Annotated[str | None, typer.Option(help="API root of the scorer.")] = None,
    summarizer: Annotated[str | None, typer.Option(
        help="Served name of the summary agent that answers each path (at --summarizer-url); "
             "default: see --final-answer.")] = None,
    summarizer_url: Annotated[str | None, typer.Option(help="API root of the summarizer.")]
    = None,
    final_answer: Annotated[str, typer.Option(
        help="Without --summarizer, each path's answer: ask (the policy is asked after its "
             "reasoning) or stated (the answer its last step states).")] = "ask",
    sampler: Annotated[str, typer.Option(
        help="local (transformers in-process) or vllm (a vLLM server on the base model, "
             "loading each round's adapter live).")] = "local",
    temperature: Annotated[float, typer.Option(help="Policy sampling temperature.")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Longest reply per request.")] = 1024,
    concurrency: Annotated[int, typer.Option(help="Questions sampled at once.")] = 8,
    questions_per_round: Annotated[int | None, typer.Option(
        help="Each round samples the next N questions of the input (wrapping round); "
             "default: every round samples them all.")] = None,
    min_margin: Annotated[int, typer.Option(help="Chosen - rejected score margin.")] = 20,
    finetune: FineTuneOpt = None, lr: LearningRate = None, epochs: Epochs = None,
    max_steps: MaxTrainSteps = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1).")] = None,
    batch_size: BatchSize = None, grad_accum: GradAccum = None, dtype: TrainDType = None,
    report_to: ReportTo = None, seed: Seed = None,
) -> None:
    """Iterative DPO: each round samples from the current model through the synthesis
    graph, scores, builds pairs and trains the next model."""
    from contextlib import ExitStack

    from insightv_agents.assessment import RuleScorer
    from insightv_agents.trainers.iterative import InProcessPolicy, VLLMPolicy, iterative_dpo

    console = Console()
    dpo = {key: value for key, value in {
        "finetune": finetune, "learning_rate": lr, "num_train_epochs": epochs,
        "max_steps": max_steps, "beta": beta, "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum, "dtype": dtype, "report_to": report_to,
        "seed": seed}.items() if value is not None}
    settings = {"output_dir": out, "rounds": rounds, "paths": paths, "mode": mode,
                "final_answer": final_answer, "concurrency": concurrency,
                "questions_per_round": questions_per_round, "min_margin": min_margin,
                "dpo": dpo}

    def show(metrics: dict[str, Any]) -> None:
        console.print(f"round {metrics['round']}: accuracy {metrics['accuracy']}, mean score "
                      f"{metrics['mean_score']}, {metrics['pairs']} pairs -> "
                      f"{metrics['model_out']}")

    try:
        with ExitStack() as stack:
            scoring: Any = RuleScorer()
            if scorer != "rule":
                from insightv_agents.backends.vllm import vllm_chat_model

                if scorer_url is None:
                    raise InsightVError("--scorer NAME needs --scorer-url.")
                scoring = vllm_chat_model(scorer_url, scorer, temperature=0.0,
                                          max_tokens=max_tokens)
            answering = None
            if summarizer is not None or summarizer_url is not None:
                from insightv_agents.backends.vllm import vllm_chat_model

                if summarizer is None or summarizer_url is None:
                    raise InsightVError("--summarizer and --summarizer-url go together.")
                answering = vllm_chat_model(summarizer_url, summarizer, temperature=0.0,
                                            max_tokens=max_tokens)
            policy: Any
            if sampler == "vllm":
                from insightv_agents.backends.vllm import VLLMServer
                from insightv_agents.trained import resolve_model

                server = VLLMServer(resolve_model(model)[0], runtime_lora=True,
                                    max_lora_rank=64)
                with console.status(f"starting vLLM (log: {server.log_path})"):
                    stack.enter_context(server)
                policy = VLLMPolicy(server, temperature=temperature, max_tokens=max_tokens)
            elif sampler == "local":
                policy = InProcessPolicy(temperature=temperature, max_new_tokens=max_tokens)
            else:
                raise InsightVError(f"--sampler must be local or vllm, not {sampler!r}.")
            result = iterative_dpo(model, input, settings, scorer=scoring,
                                   summarizer=answering, policy=policy, on_round=show)
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
    console.print(f"final model: {result.final_model}\nrounds: {out}/rounds.md")


def _train(run: Any, settings: dict[str, Any]) -> None:
    console = Console()
    try:
        result = run(settings)
    except InsightVError as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        raise typer.Exit(2) from err
    kind = "adapter" if result.adapter else "model"
    loss = result.metrics.get("train_loss")
    console.print(f"{kind}: {result.output_dir} (loss {loss:.4g}); serve it with "
                  f"`insightv serve --model {result.output_dir}` or run it with "
                  f"`insightv run --local-model {result.output_dir}`")


if __name__ == "__main__":
    app()
