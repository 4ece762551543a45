"""The data-synthesis graph: N teacher reasoning paths per question, checked and scored.

One run handles one (image, question, ground-truth answer):

    prepare ─Send×N→ path ─→ score → END
    path = reason ⟲ (continue) → final_answer → check ─(undecided)→ judge → finish
                                                     └─(decided)──────────→ finish

Each path is the Insight-V progressive generation: the teacher writes one step at a time
(the same :class:`~insightv_agents.nodes.ReasoningNode` as inference) until it chooses
``summary`` or reaches the cap, then gives its final answer: asked for it, from a summary
agent's verdict, or (``final_answer="stated"``) as its last step states it. Paths differ by
sampling, so give the teacher a temperature above zero.
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import Sequence
from functools import partial
from typing import Annotated, Any, Literal, NotRequired, cast

from langchain_core.language_models import LanguageModelLike
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Overwrite, Send
from langgraph.utils.runnable import RunnableCallable
from typing_extensions import TypedDict

from insightv_agents.answers import (
    DEFAULT_RULES,
    AnswerRules,
    FinalAnswer,
    match_answer,
    stated_answer,
)
from insightv_agents.assessment import JudgeNode, PathScorer, ScoreNode, score_with
from insightv_agents.errors import ConfigError, InvalidInputError, check_int
from insightv_agents.graphs.insightv import REDACT_IMAGES
from insightv_agents.images import ImagePolicy
from insightv_agents.nodes import (
    MAX_QUESTION_CHARS,
    FinalAnswerNode,
    ReasoningNode,
    SummaryNode,
    prepare_input,
    reasoning_usable,
    revise,
)
from insightv_agents.prompts import DEFAULT_PROMPTS, Prompts, ReasoningMode, format_question
from insightv_agents.runtime import Exchange, Outcome, emit_event
from insightv_agents.schema import (
    AnswerCheck,
    Attempt,
    Failure,
    PathResult,
    ReasoningStep,
    Verdict,
)

MAX_CHOICES = 26
MAX_ANSWER_CHARS = 10_000


class SynthesisInput(TypedDict):
    """One item: ``image``, ``question``, the ground-truth ``answer``; optional ``choices``
    (multiple-choice options, lettered A, B, ...), ``id`` and ``category`` (passed through)."""

    image: Any
    question: str
    answer: str
    choices: NotRequired[list[str] | None]
    id: NotRequired[str | None]
    category: NotRequired[str | None]


class SynthesisOutput(TypedDict):
    """The item's paths (in order, each checked and scored) and how scoring went."""

    id: str | None
    question: str
    answer: str
    choices: list[str] | None
    category: str | None
    paths: list[PathResult]
    scoring_failures: list[Failure]
    scoring_seconds: float


class SynthesisState(TypedDict):
    image: Any
    question: str
    answer: str
    choices: list[str] | None
    id: str | None
    category: str | None
    images: list[str]
    paths: Annotated[list[PathResult], operator.add]
    scoring_failures: Annotated[list[Failure], operator.add]
    scoring_seconds: float


class PathState(TypedDict):
    """The state of one reasoning path (a subgraph run per path)."""

    index: int
    question: str
    images: list[str]
    truth: str
    choices: list[str] | None
    started: float
    steps: Annotated[list[ReasoningStep], operator.add]
    failures: Annotated[list[Failure], operator.add]
    answer: str
    check: AnswerCheck | None
    paths: list[PathResult]
    revision: NotRequired[int]
    critique: NotRequired[str | None]
    attempts: NotRequired[Annotated[list[Attempt], operator.add]]
    verdict: NotRequired[Verdict | None]


class PathOutput(TypedDict):
    paths: list[PathResult]


def create_path_graph(
    *,
    teacher: LanguageModelLike,
    judge: LanguageModelLike | None = None,
    summarizer: LanguageModelLike | None = None,
    mode: ReasoningMode = "step",
    max_steps: int = 16,
    max_retries: int = 2,
    prompts: Prompts = DEFAULT_PROMPTS,
    rules: AnswerRules = DEFAULT_RULES,
    final_answer: FinalAnswer = "ask",
    max_revisions: int = 0,
) -> StateGraph[PathState, Any, PathState, PathOutput]:
    """One reasoning path: steps until ``summary`` or the cap, the final answer (asked of the
    teacher, from ``summarizer``'s verdict, or as the last step states it), and the answer
    check (rules, then ``judge`` when they cannot decide). Its output is
    ``{"paths": [PathResult]}``, so runs fanned out with ``Send`` collect in a parent's
    ``paths`` list. With ``max_revisions`` (and a ``summarizer``), a path the summary agent
    judges flawed goes back to the teacher with its critique (the inference graph's revise
    loop) up to that many times; the path keeps its last pass, its verdict and how many
    revisions it took."""
    check_int("max_revisions", max_revisions, 0, 16)
    if max_revisions and summarizer is None:
        raise ConfigError("max_revisions needs a summarizer: its verdicts send flawed paths "
                          "back for revision.")
    if final_answer not in ("ask", "stated"):
        raise ConfigError(f"final_answer must be 'ask' or 'stated', not {final_answer!r}.")
    if final_answer == "stated" and summarizer is not None:
        raise ConfigError("final_answer='stated' reads the teacher's last step; it cannot be "
                          "combined with a summarizer.")
    reason = ReasoningNode(teacher, mode=mode, max_steps=max_steps, max_retries=max_retries,
                           prompts=prompts, context_keys=("teacher",))
    final: Any = (RunnableCallable(_stated, trace=False) if final_answer == "stated"
                  else FinalAnswerNode(teacher, max_retries=max_retries, prompts=prompts,
                                       context_keys=("teacher",)) if summarizer is None
                  else VerdictAnswerNode(summarizer, max_retries=max_retries, prompts=prompts))

    def after_reason(state: PathState) -> Literal["continue", "answer"]:
        return "answer" if reason.is_done(state) else "continue"

    def check(state: PathState) -> dict[str, Any]:
        if not state.get("answer"):
            return {"check": None}
        return {"check": match_answer(state["answer"], state["truth"],
                                      choices=state.get("choices"), rules=rules)}

    def after_check(state: PathState) -> Literal["undecided", "decided"]:
        undecided = state["check"] is not None and state["check"]["correct"] is None
        return "undecided" if undecided and judge is not None else "decided"

    builder = StateGraph(PathState, output_schema=PathOutput)
    builder.add_node("reason", reason, trace_policy=REDACT_IMAGES)
    builder.add_node("final_answer", final, trace_policy=REDACT_IMAGES)
    builder.add_node("check", check, trace_policy=REDACT_IMAGES)
    builder.add_node("finish", _finish_path, trace_policy=REDACT_IMAGES)
    builder.add_edge(START, "reason")
    builder.add_conditional_edges("reason", RunnableCallable(after_reason, trace=False),
                                  {"continue": "reason", "answer": "final_answer"})
    if max_revisions:
        def after_verdict(state: PathState) -> Literal["flawed", "done"]:
            verdict = state.get("verdict")
            flawed = verdict is not None and verdict["reasoning_correct"] is False
            return "flawed" if flawed and state.get("revision", 0) < max_revisions else "done"

        builder.add_node("revise", revise, trace_policy=REDACT_IMAGES)
        builder.add_conditional_edges("final_answer",
                                      RunnableCallable(after_verdict, trace=False),
                                      {"flawed": "revise", "done": "check"})
        builder.add_edge("revise", "reason")
    else:
        builder.add_edge("final_answer", "check")
    if judge is not None:
        builder.add_node("judge", JudgeNode(judge, max_retries=max_retries, prompts=prompts),
                         trace_policy=REDACT_IMAGES)
        builder.add_conditional_edges("check", RunnableCallable(after_check, trace=False),
                                      {"undecided": "judge", "decided": "finish"})
        builder.add_edge("judge", "finish")
    else:
        builder.add_edge("check", "finish")
    builder.add_edge("finish", END)
    return builder


def create_synthesis_graph(
    *,
    teacher: LanguageModelLike,
    scorer: LanguageModelLike | PathScorer | None = None,
    judge: LanguageModelLike | None = None,
    summarizer: LanguageModelLike | None = None,
    mode: ReasoningMode = "step",
    paths: int = 4,
    max_steps: int = 16,
    max_retries: int = 2,
    prompts: Prompts = DEFAULT_PROMPTS,
    rules: AnswerRules = DEFAULT_RULES,
    image_policy: ImagePolicy | None = None,
    max_question_chars: int = MAX_QUESTION_CHARS,
    final_answer: FinalAnswer = "ask",
    max_revisions: int = 0,
) -> StateGraph[SynthesisState, Any, SynthesisInput, SynthesisOutput]:
    """Build the Insight-V data-synthesis graph for one item (see the module docstring).

    Args:
        teacher: the MLLM that writes the reasoning paths and their final answers (sample
            with a temperature above zero: the paths differ only by sampling).
        scorer: the scoring agent — an MLLM that scores all paths of the question in one
            request — or any :class:`~insightv_agents.assessment.PathScorer`. Default: the
            teacher.
        judge: a text LLM asked whether a final answer matches the ground truth when the
            rules cannot tell (without one, such answers stay undecided: ``correct=None``).
        summarizer: a summary agent that gives each path's final answer from its verdict
            (default: the teacher is asked for it after its last step). Iterative DPO uses
            it: the reasoning agent being trained writes the paths, the summary agent answers.
        mode: ``"step"`` (the Insight-V progressive pipeline, one step per call) or
            ``"chain"`` (the whole reasoning in one call, as a trained reasoning agent writes).
        paths: reasoning paths per item (N).
        max_steps: step cap per path; max_retries: re-asks after an unreadable reply.
        prompts: every prompt text; rules: tolerance of the rule-based answer check.
        image_policy: what images are accepted; max_question_chars: longest question.
        final_answer: ``"ask"`` (the teacher is asked after its last step, or ``summarizer``
            answers) or ``"stated"`` (the answer the last step states, "The answer is X", no
            model call: a trained reasoning agent's own answer, as its chains end; a path
            whose last step states none fails).
        max_revisions: with a ``summarizer``, how many times a path it judges flawed goes
            back to the teacher with its critique (0: never; the self-improving loop's
            revise step).

    Returns:
        A ``StateGraph``: input :class:`SynthesisInput`, output :class:`SynthesisOutput`.
        Models can be swapped per run through a context with ``teacher``, ``scorer``,
        ``judge`` and ``summarizer`` attributes.

    Raises:
        ConfigError: for an option out of range.
    """
    check_int("paths", paths, 1, 64)
    if teacher is None:
        raise ConfigError("create_synthesis_graph needs a teacher model.")
    path_graph = create_path_graph(teacher=teacher, judge=judge, summarizer=summarizer,
                                   mode=mode, max_steps=max_steps, max_retries=max_retries,
                                   prompts=prompts, rules=rules,
                                   final_answer=final_answer,
                                   max_revisions=max_revisions).compile()
    chosen_scorer = teacher if scorer is None else scorer
    if isinstance(chosen_scorer, PathScorer):
        custom = partial(score_with, chosen_scorer)

        async def ascore(state: dict[str, Any]) -> dict[str, Any]:
            return await asyncio.to_thread(custom, state)  # a scorer may block (a model)

        score: Any = RunnableCallable(custom, ascore, name="score", trace=False)
    else:
        score = ScoreNode(chosen_scorer, max_retries=max_retries, prompts=prompts,
                          context_keys=("scorer", "teacher") if scorer is None
                          else ("scorer",))

    def fan_out(state: SynthesisState) -> list[Send]:
        question = format_question(state["question"], state.get("choices"), prompts)
        return [Send("path", {"index": index, "question": question, "images": state["images"],
                              "truth": state["answer"], "choices": state.get("choices"),
                              "started": time.time()})
                for index in range(paths)]

    builder = StateGraph(SynthesisState, input_schema=SynthesisInput,
                         output_schema=SynthesisOutput)
    builder.add_node("prepare", partial(_prepare, image_policy=image_policy,
                                        max_question_chars=max_question_chars),
                     trace_policy=REDACT_IMAGES)
    builder.add_node("path", path_graph, trace_policy=REDACT_IMAGES)
    builder.add_node("score", _Timed(score), trace_policy=REDACT_IMAGES)
    builder.add_edge(START, "prepare")
    builder.add_conditional_edges("prepare", RunnableCallable(fan_out, trace=False), ["path"])
    builder.add_edge("path", "score")
    builder.add_edge("score", END)
    return builder


def check_truth(answer: Any, choices: Any) -> tuple[str, list[str] | None]:
    """The ground-truth ``answer`` and the ``choices`` of an item, checked and cleaned.

    Raises:
        InvalidInputError: for a missing, empty or oversized answer, or bad choices.
    """
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) \
            or not str(answer).strip():
        raise InvalidInputError("`answer` (the ground truth) is required: a non-empty string.",
                                field="answer")
    if len(str(answer)) > MAX_ANSWER_CHARS:
        raise InvalidInputError(f"`answer` is longer than {MAX_ANSWER_CHARS} characters.",
                                field="answer")
    if choices is None:
        return str(answer).strip(), None
    if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices \
            or len(choices) > MAX_CHOICES \
            or not all(isinstance(c, str | int | float) and str(c).strip() for c in choices):
        raise InvalidInputError(f"`choices` must be a list of 1 to {MAX_CHOICES} non-empty "
                                "strings (or null).", field="choices")
    return str(answer).strip(), [str(choice).strip() for choice in choices]


def _prepare(state: dict[str, Any], *, image_policy: ImagePolicy | None,
             max_question_chars: int) -> dict[str, Any]:
    """Validate the item (no model call) and reset per-run fields."""
    answer, choices = check_truth(state.get("answer"), state.get("choices"))
    prepared = prepare_input(cast(Any, state), image_policy=image_policy,
                             max_question_chars=max_question_chars)
    return {"image": None, "question": prepared["question"], "images": prepared["images"],
            "answer": answer, "choices": choices, "id": state.get("id"),
            "category": state.get("category"), "paths": Overwrite([]),
            "scoring_failures": Overwrite([]), "scoring_seconds": 0.0}


class VerdictAnswerNode(SummaryNode):
    """A path's final answer from the summary agent: its verdict's answer on the path's
    reasoning. Skipped when the reasoning is unusable; an unreadable verdict is a failure."""

    def __init__(self, model: LanguageModelLike, *, max_retries: int = 2,
                 prompts: Prompts = DEFAULT_PROMPTS) -> None:
        super().__init__(model, max_retries=max_retries, prompts=prompts, name="final_answer",
                         context_keys=("summarizer",))

    def _conversation(self, state: dict[str, Any]) -> Exchange[Verdict] | None:
        return super()._conversation(state) if reasoning_usable(state) else None

    def _update(self, state: dict[str, Any], outcome: Outcome[Any] | None,
                runtime: Runtime[Any] | None) -> dict[str, Any]:
        if outcome is None:
            return {"answer": "", "verdict": None}
        if outcome.value is None:
            return {"answer": "", "verdict": None,
                    "failures": [self._unreadable(state, outcome, runtime)]}
        answer = outcome.value["answer"]
        emit_event(runtime, {"event": "answer", "node": self.name, "answer": answer})
        return {"answer": answer, "verdict": outcome.value}


def _stated(state: PathState) -> dict[str, Any]:
    """A path's final answer as its last step states it ("The answer is 3."): no model call;
    empty (a failed path) when the reasoning is unusable or states none."""
    if not reasoning_usable(state):
        return {"answer": ""}
    return {"answer": stated_answer(state["steps"][-1]["reasoning"])}


def _finish_path(state: PathState) -> dict[str, Any]:
    """The path's result; a failed path always carries the failure that explains it."""
    steps, answer = list(state.get("steps") or []), state.get("answer") or ""
    failures = list(state.get("failures") or [])
    ok = bool(answer) and bool(steps)
    if not ok and not failures:
        error = ("the reasoning has no steps" if not steps
                 else "no final answer: the reasoning states none")
        failures.append({"node": "final_answer", "revision": 0, "kind": "no_answer",
                         "error": error, "attempts": 0,
                         "raw": steps[-1]["reasoning"][-2000:] if steps else ""})
    result: PathResult = {
        "index": state["index"], "status": "ok" if ok else "failed", "steps": steps,
        "answer": answer, "check": state.get("check"), "score": None, "comment": "",
        "failures": failures, "seconds": round(time.time() - state["started"], 3),
        "verdict": state.get("verdict"), "revisions": state.get("revision", 0),
    }
    return {"paths": [result]}


class _Timed(RunnableCallable):
    """Runs a scoring node and records how long it took in ``scoring_seconds``."""

    def __init__(self, node: Any) -> None:
        super().__init__(self._run, self._arun, name="score", trace=False)
        self.node = node

    def _run(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        started = time.perf_counter()
        update = self.node.invoke(state, config)
        return {**update, "scoring_seconds": round(time.perf_counter() - started, 3)}

    async def _arun(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        started = time.perf_counter()
        update = await self.node.ainvoke(state, config)
        return {**update, "scoring_seconds": round(time.perf_counter() - started, 3)}
