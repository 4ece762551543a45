"""The evaluation harness: run a method over a dataset, check every answer, report accuracy.

Items are read with :func:`~insightv_agents.synthesize.load_items` (the synthesis input
format: JSONL or a ``save_to_disk`` folder, with ``image``, ``question``, ``answer`` and
optional ``id``, ``choices``, ``category``), all validated before any model is called.
Each prediction (answer, reasoning, verdict, the check) is appended to
``<out>/predictions.jsonl`` as one whole line as soon as it is made, so a run stopped at any
point resumes where it stopped; ``report.json`` and ``report.md`` are rewritten from all
predictions at the end. Answers are checked by :func:`~insightv_agents.answers.match_answer`,
the same rules as the synthesis answer filter.

A benchmark can bring checks of its own (:class:`DatasetChecks`: its closed answer set, a
check of the reasoning against its ground truth); ``insightv eval --checks`` loads them by
name (:func:`load_checks`), so the harness knows nothing of any one benchmark.

Methods (a :class:`Predictor` each): ``insightv`` (the two-agent graph), ``stage-beam``
(LLaVA-CoT's four stages with a search), ``direct`` (one model, one call, its answer read
from the reply by :func:`~insightv_agents.answers.extract_answer`) and ``chain`` (one model
writes a whole reasoning chain, its answer read from the last step: a reasoning agent alone).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from math import comb, sqrt
from pathlib import Path
from typing import Any

from langchain_core.language_models import LanguageModelLike
from langchain_core.messages import HumanMessage

from insightv_agents.answers import (
    DEFAULT_RULES,
    AnswerRules,
    extract_answer,
    match_answer,
    stated_answer,
)
from insightv_agents.errors import ConfigError, InvalidInputError, ModelOutputError, check_int
from insightv_agents.files import Fields, output_folder, read_json
from insightv_agents.images import ImagePolicy, load_images
from insightv_agents.parsing import parse_steps
from insightv_agents.prompts import (
    DEFAULT_PROMPTS,
    Prompts,
    format_question,
    reasoning_messages,
    user_content,
)
from insightv_agents.records import RecordLog, merge_shards, read_records
from insightv_agents.runtime import reply_text
from insightv_agents.synthesize import Item
from insightv_agents.trainers.common import write_atomic

PREDICTIONS_FILE = "predictions.jsonl"
EVAL_FILE = "eval.json"
PREDICTION_FIELDS: Fields = {"id": str, "category": str, "correct": bool, "status": str,
                              "check": dict, "seconds": (int, float)}
"""The fields of a prediction the reports read (:func:`summarize`, :func:`compare_predictions`);
each line of ``predictions.jsonl`` also holds the answer and what the method gave."""
Predictor = Callable[[Item], Awaitable[dict[str, Any]]]
"""Answers one item: returns at least ``answer`` and ``status``; may add ``steps``,
``reasoning``, ``verdict``, ``stages``, ``response``, ``failures``."""
ReasoningCheck = Callable[[Item, dict[str, Any]], bool | None]
"""Whether a prediction's reasoning is sound (``None``: cannot tell for this item)."""
CHECKS_ENTRY_POINTS = "insightv_agents.checks"
"""The entry-point group where installed packages name their :class:`DatasetChecks`."""


@dataclass(frozen=True)
class DatasetChecks:
    """What a benchmark brings to its evaluation beyond its items.

    Attributes:
        rules: how its answers are checked; its closed answer set as ``labels`` makes a
            wrong label wrong rather than undecided.
        reasoning_check: judges each prediction's reasoning against the benchmark's ground
            truth (``None``: the report says nothing of the reasoning).
    """

    rules: AnswerRules = field(default=DEFAULT_RULES)
    reasoning_check: ReasoningCheck | None = None


def load_checks(spec: str, data_root: str | Path) -> DatasetChecks:
    """The checks ``spec`` names, for the dataset in ``data_root``.

    ``spec`` is ``module:attribute`` (an importable name) or the name of an entry point in
    the ``insightv_agents.checks`` group; it points at a :class:`DatasetChecks`, or at a
    function that takes the data folder and returns one.

    Raises:
        ConfigError: when ``spec`` names nothing importable, or not checks.
    """
    module, colon, attribute = spec.partition(":")
    try:
        if colon:
            found = getattr(importlib.import_module(module), attribute)
        else:
            entry = next((point for point in entry_points(group=CHECKS_ENTRY_POINTS)
                          if point.name == spec), None)
            if entry is None:
                raise ConfigError(f"no checks named {spec!r}: give module:attribute, or an "
                                  f"entry point of the {CHECKS_ENTRY_POINTS!r} group.")
            found = entry.load()
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot load the checks {spec!r}: {err}") from err
    checks = found(Path(data_root)) if callable(found) else found
    if not isinstance(checks, DatasetChecks):
        raise ConfigError(f"{spec!r} gave {type(checks).__name__}, not DatasetChecks.")
    return checks


def graph_predictor(graph: Any) -> Predictor:
    """A compiled ``insightv`` or ``stage-beam`` graph as a predictor."""
    async def predict(item: Item) -> dict[str, Any]:
        question = format_question(item.question, item.choices, DEFAULT_PROMPTS)
        result = await graph.ainvoke({"image": item.image, "question": question})
        keep = ("answer", "status", "steps", "reasoning", "verdict", "stages", "response",
                "failures")
        return {key: result[key] for key in keep if key in result}
    return predict


def direct_predictor(model: LanguageModelLike, *, prompts: Prompts = DEFAULT_PROMPTS,
                     image_policy: ImagePolicy | None = None) -> Predictor:
    """One model answers in one call (image and question, no system prompt: the format
    :func:`~insightv_agents.trainers.data.qa_conversation` trains); the answer is read from
    its reply with :func:`~insightv_agents.answers.extract_answer`."""
    async def predict(item: Item) -> dict[str, Any]:
        images = load_images(item.image, image_policy)
        question = format_question(item.question, item.choices, prompts)
        message = HumanMessage(content=user_content(prompts, images, question))
        reply = reply_text(await model.ainvoke([message]))
        answer = extract_answer(reply)
        return {"answer": answer, "status": "ok" if answer else "failed", "response": reply}
    return predict


def chain_predictor(model: LanguageModelLike, *, prompts: Prompts = DEFAULT_PROMPTS,
                    image_policy: ImagePolicy | None = None) -> Predictor:
    """One model writes a whole reasoning chain (the reasoning agent's chain-mode prompt) and
    the answer is read from its last step: a reasoning agent with no summary agent."""
    async def predict(item: Item) -> dict[str, Any]:
        images = load_images(item.image, image_policy)
        question = format_question(item.question, item.choices, prompts)
        messages = reasoning_messages(prompts=prompts, mode="chain", question=question,
                                      images=images, steps=[])
        reply = reply_text(await model.ainvoke(messages))
        try:
            steps = parse_steps(reply)
        except ModelOutputError:  # unreadable steps: the answer may still be stated
            steps = []
        answer = extract_answer(reply)
        return {"answer": answer, "status": "ok" if answer else "failed", "steps": steps,
                "response": reply}
    return predict


async def evaluate(predict: Predictor, items: Sequence[Item], out: str | Path, *,
                   settings: dict[str, Any] | None = None, concurrency: int = 8,
                   reasoning_check: ReasoningCheck | None = None,
                   rules: AnswerRules = DEFAULT_RULES,
                   on_item: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Predict every item not yet in ``<out>/predictions.jsonl`` and write the reports.

    Args:
        settings: what the run is (method, models, data); stored in ``eval.json``. A rerun
            into the same folder must have the same settings (it resumes), else it is refused.
        reasoning_check: tells whether a prediction's reasoning is sound (``None``: cannot
            tell); when given, the report says how often the final answer was right although
            the reasoning was not (the summary agent's recovery rate).
        rules: how answers are checked (:class:`~insightv_agents.answers.AnswerRules`); with
            the dataset's closed answer set as ``labels``, a wrong label is wrong rather than
            undecided (the accuracy is the same: an undecided answer counts as wrong).
        on_item: called with each new prediction (progress bars).

    Returns:
        The report (also in ``report.json`` / ``report.md``).

    Raises:
        InvalidInputError: for a folder holding a run with other settings, or a damaged
            ``eval.json`` or ``predictions.jsonl``; for an ``out`` that is a file.
        ConfigError: for a ``concurrency`` below 1.
    """
    check_int("concurrency", concurrency, 1, 4096)
    folder = start_evaluation(out, settings)
    queue: asyncio.Queue[Item] = asyncio.Queue()
    step = prediction_step(predict, reasoning_check, rules)
    merge_shards(folder, "predictions", "records")  # what a run over Ray left (--ray)
    with RecordLog(folder / PREDICTIONS_FILE, size="records") as log:
        for item in items:
            if item.id not in log.finished:
                queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                item = queue.get_nowait()
                rows = await step(item)
                log.append(rows)
                if on_item is not None:
                    on_item(rows[0])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return finish_evaluation(folder, items, settings)


def start_evaluation(out: str | Path, settings: dict[str, Any] | None) -> Path:
    """The evaluation folder ``out``, made, holding ``settings`` (``eval.json``).

    Raises:
        InvalidInputError: when it holds a run with other settings, or for an ``out`` that
            is a file.
    """
    folder = output_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    _check_settings(folder, settings or {})
    return folder


def finish_evaluation(folder: Path, items: Sequence[Item],
                      settings: dict[str, Any] | None) -> dict[str, Any]:
    """The report on ``items`` from the predictions in ``folder``, written there too."""
    wanted = {item.id for item in items}
    rows = [row for row in read_records(folder / PREDICTIONS_FILE, fields=PREDICTION_FIELDS)
            if row["id"] in wanted]
    report = summarize(rows)
    report["settings"] = settings or {}
    write_reports(folder, report)
    return report


def prediction_step(predict: Predictor, reasoning_check: ReasoningCheck | None = None,
                    rules: AnswerRules = DEFAULT_RULES
                    ) -> Callable[[Item], Awaitable[list[dict[str, Any]]]]:
    """What evaluation does with one item: its prediction, checked, as a one-row group of
    ``predictions.jsonl`` (a failing backend gives a failed prediction, not an error)."""
    async def step(item: Item) -> list[dict[str, Any]]:
        return [await _predict_one(predict, item, reasoning_check, rules)]
    return step


async def _predict_one(predict: Predictor, item: Item,
                       reasoning_check: ReasoningCheck | None,
                       rules: AnswerRules) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        result = await predict(item)
    except InvalidInputError:
        raise
    except Exception as err:  # a failing backend is one failed item, not a lost run
        result = {"answer": "", "status": "failed",
                  "failures": [{"node": "predict", "kind": "error", "error": repr(err)[:500]}]}
    check = match_answer(str(result.get("answer") or ""), item.answer, choices=item.choices,
                         rules=rules)
    row = {"id": item.id, "records": 1, "category": item.category or "all",
           "question": item.question, "truth": item.answer, "answer": result.get("answer", ""),
           "correct": check["correct"] is True, "check": check,
           "status": result.get("status", "ok"),
           "seconds": round(time.perf_counter() - started, 3),
           **{key: value for key, value in result.items() if key not in ("answer", "status")}}
    if reasoning_check is not None and result.get("steps"):
        row["reasoning_sound"] = reasoning_check(item, result)
    if result.get("verdict") and result.get("steps"):
        stated = stated_answer(str(result["steps"][-1].get("reasoning", "")))
        if stated:  # what the summary agent did with the answer the reasoning reached
            row["stated"] = {
                "answer": stated,
                "correct": match_answer(stated, item.answer, choices=item.choices,
                                        rules=rules)["correct"] is True,
                "kept": match_answer(row["answer"], stated, choices=item.choices,
                                     rules=rules)["correct"] is True}
    return row


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per category (each with its 95% interval), failures, the
    recovery of wrong reasoning, and (for the two-agent system) what the summary agent did
    with the answers the reasoning stated: ``summary_agent`` counts the chains whose last
    step states an answer, those right, how often the final answer kept the stated one, and
    the right answers it lost and the wrong ones it fixed."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    failed = undecided = flawed = recovered = rejected = 0
    seconds = 0.0
    rows = list(rows)
    for row in rows:
        for key in dict.fromkeys(("all", row["category"])):  # an uncategorised row is "all"
            totals[key][0] += 1
            totals[key][1] += bool(row["correct"])
        failed += row["status"] != "ok"
        undecided += row["check"]["correct"] is None
        seconds += row["seconds"]
        if row.get("reasoning_sound") is False:
            flawed += 1
            recovered += bool(row["correct"])
            verdict = row.get("verdict") or {}
            rejected += verdict.get("reasoning_correct") is False
    accuracy = {key: {"n": n, "correct": right, "accuracy": right / n if n else 0.0,
                      "interval": list(accuracy_interval(right, n))}
                for key, (n, right) in sorted(totals.items(), key=lambda kv: kv[0] != "all")}
    report: dict[str, Any] = {
        "items": len(rows), "accuracy": accuracy, "failed": failed, "undecided": undecided,
        "mean_seconds": seconds / len(rows) if rows else 0.0}
    stated = [(row["stated"], bool(row["correct"])) for row in rows if row.get("stated")]
    if stated:
        report["summary_agent"] = {
            "chains": len(stated), "chain_right": sum(s["correct"] for s, _ in stated),
            "kept": sum(s["kept"] for s, _ in stated),
            "lost": sum(s["correct"] and not right for s, right in stated),
            "fixed": sum(right and not s["correct"] for s, right in stated)}
    if any("reasoning_sound" in row for row in rows):
        report["flawed_reasoning"] = {
            "items": flawed, "answer_right": recovered, "flagged": rejected,
            "recovery_rate": recovered / flawed if flawed else None}
    return report


def write_reports(folder: str | Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md``, each written whole (atomically)."""
    folder = Path(folder)
    write_atomic(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(folder / "report.md", report_markdown(report))


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one row per category, ``all`` first)."""
    settings = report.get("settings") or {}
    lines = [f"# Evaluation: {settings.get('method', 'run')}", ""]
    if settings:
        lines += [f"- {key}: `{value}`" for key, value in settings.items()] + [""]
    lines += ["| category | items | correct | accuracy | 95% interval |",
              "|---|---:|---:|---:|---:|"]
    for key, value in report["accuracy"].items():
        low, high = accuracy_interval(value["correct"], value["n"])
        lines.append(f"| {key} | {value['n']} | {value['correct']} | "
                     f"{100 * value['accuracy']:.1f}% | {100 * low:.1f}-{100 * high:.1f}% |")
    lines += ["", f"Failed runs: {report['failed']}; answers no rule could check: "
                  f"{report['undecided']}; mean seconds per item: {report['mean_seconds']:.2f}."]
    flawed = report.get("flawed_reasoning")
    if flawed:
        rate = flawed["recovery_rate"]
        lines.append(f"Unsound reasoning: {flawed['items']} items; final answer right anyway: "
                     f"{flawed['answer_right']}" + (f" ({100 * rate:.1f}%)" if rate is not None
                                                   else "")
                     + f"; flagged by the summary agent: {flawed['flagged']}.")
    summary = report.get("summary_agent")
    if summary:
        lines.append(f"Chains stating an answer: {summary['chains']}, {summary['chain_right']} "
                     f"of them right; the summary agent kept the stated answer "
                     f"{summary['kept']} times, lost {summary['lost']} right ones and fixed "
                     f"{summary['fixed']} wrong ones.")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PairedComparison:
    """Two evaluations of the same items, item by item.

    Attributes:
        items: the items both evaluated (matched by id).
        both_right, only_first, only_second, both_wrong: how those items split.
        p_value: the exact two-sided sign test (McNemar's) on the items where only one was
            right: the chance of a split at least this uneven if neither were better.
    """

    items: int
    both_right: int
    only_first: int
    only_second: int
    both_wrong: int
    p_value: float

    @property
    def difference(self) -> float:
        """First's accuracy minus second's, on the shared items."""
        return (self.only_first - self.only_second) / self.items


def compare_predictions(first: str | Path, second: str | Path, *,
                        categories: Collection[str] | None = None,
                        stated: bool = False) -> PairedComparison:
    """Compare two evaluation folders (or their ``predictions.jsonl``) on the items both
    answered, optionally only those of some ``categories``. On a test set of tens of
    questions, accuracies a few points apart are within noise; the paired count says how
    many items actually changed, and ``p_value`` how surprising that is.

    With ``stated``, compare the answers the reasoning chains stated in their last step
    (what the two-agent system's evaluations record as ``stated``; a reasoning agent's own
    answer where it answered alone, :func:`chain_predictor`) in place of the final answers:
    whether the reasoning agents differ, whatever the summary agents made of their chains.
    An item whose chain stated no answer counts as wrong.

    Raises:
        InvalidInputError: when a folder holds no predictions or damaged ones, or the two
            share no item; with ``stated``, when a folder holds no reasoning chain (a
            direct answerer's evaluation).
    """
    def right(folder: str | Path) -> dict[str, bool]:
        path = Path(folder)
        path = path / PREDICTIONS_FILE if path.is_dir() else path
        if not path.is_file():
            raise InvalidInputError(f"no predictions at {path}", field="predictions")
        rows = [row for row in read_records(path, fields=PREDICTION_FIELDS)
                if categories is None or row["category"] in categories]
        if not stated:
            return {row["id"]: row["correct"] for row in rows}
        if rows and not any(row.get("verdict") or row.get("steps") for row in rows):
            raise InvalidInputError(
                f"{path} is not an evaluation of a reasoning agent: no prediction holds a "
                "reasoning chain, so none states an answer", field="predictions")
        return {row["id"]: _chain_right(row) for row in rows}

    a, b = right(first), right(second)
    shared = [key for key in a if key in b]
    if not shared:
        raise InvalidInputError(f"{first} and {second} share no evaluated item"
                                + (f" in {sorted(categories)}" if categories else ""),
                                field="predictions")
    both, only_first, only_second, neither = (
        sum(a[k] == x and b[k] == y for k in shared)
        for x, y in ((True, True), (True, False), (False, True), (False, False)))
    return PairedComparison(len(shared), both, only_first, only_second, neither,
                            sign_test(only_first, only_second))


def _chain_right(row: dict[str, Any]) -> bool:
    """Whether a prediction's reasoning chain stated the right answer: with a summary agent
    (a verdict), its recorded ``stated`` answer; a reasoning agent alone answers with it."""
    if row.get("verdict"):
        stated = row.get("stated")
        return isinstance(stated, dict) and stated.get("correct") is True
    return bool(row.get("steps")) and row["correct"] is True


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``correct`` out of ``n`` (95% with the
    default ``z``): where the accuracy on many more items like these would lie. On 60 items
    an accuracy near 35% is 24-48%; ``(0, 1)`` when there are no items."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test of ``wins`` against ``losses`` (p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _check_settings(folder: Path, settings: dict[str, Any]) -> None:
    path = folder / EVAL_FILE
    if path.exists():
        stored = read_json(path, what="evaluation settings", field="out",
                           fix="Remove it (the next run writes it again), or use another --out.")
        if stored != json.loads(json.dumps(settings)):
            raise InvalidInputError(
                f"{folder} holds an evaluation with other settings ({stored}); use another "
                "--out or remove it.", field="out")
        return
    write_atomic(path, json.dumps(settings, indent=2) + "\n")
