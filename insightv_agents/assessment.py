"""Multi-granularity assessment of synthesized reasoning paths.

- The **answer filter**: :func:`~insightv_agents.answers.match_answer` decides by rule
  where it can; :class:`JudgeNode` asks a text LLM only when the rules cannot.
- The **path scorer**: :class:`ScoreNode` gives the scoring agent (an MLLM) the image, the
  question, the ground truth and *all* paths of the question in one request and reads a
  score from 1 to 100 for each. Any :class:`PathScorer` (rule-based, a reward model, ...)
  can take its place; :class:`RuleScorer` is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from langchain_core.language_models import LanguageModelLike
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime
from langgraph.types import Overwrite
from typing_extensions import TypedDict

from insightv_agents.errors import ModelCallError, check_int
from insightv_agents.image_store import resolve_images
from insightv_agents.parsing import parse_judgement, parse_scores
from insightv_agents.prompts import DEFAULT_PROMPTS, Prompts, judge_messages, score_messages
from insightv_agents.runtime import (
    Exchange,
    ModelNode,
    Outcome,
    current_runtime,
    emit_event,
    rejected_request,
    run_store,
)
from insightv_agents.schema import (
    AnswerCheck,
    PathResult,
    PathScore,
    judgement_json_schema,
    scores_json_schema,
)


class ScoreRequest(TypedDict):
    """What a scorer sees for one question: the paths to score, in order."""

    question: str
    truth: str
    images: list[str]
    paths: list[PathResult]


@runtime_checkable
class PathScorer(Protocol):
    """Scores all paths of one question together; a drop-in for the LLM scoring agent.

    ``score_paths`` returns one :class:`~insightv_agents.schema.PathScore` per path of the
    request, in order (``score=None`` for a path it cannot score).
    """

    name: str

    def score_paths(self, request: ScoreRequest) -> list[PathScore]: ...


class RuleScorer:
    """A scorer without a model: correctness first, then level of detail.

    Correct paths score 60-100, undecided ones 30-60, wrong ones 1-30; within each band the
    score grows with the number of steps (up to ``full_steps``) and the length of the
    reasoning (up to ``full_chars``). A cheap stand-in where no strong MLLM is at hand.
    """

    name = "rule"

    def __init__(self, *, full_steps: int = 6, full_chars: int = 1500) -> None:
        self.full_steps = full_steps
        self.full_chars = full_chars

    def score_paths(self, request: ScoreRequest) -> list[PathScore]:
        return [self._score(path) for path in request["paths"]]

    def _score(self, path: PathResult) -> PathScore:
        steps = path["steps"]
        chars = sum(len(step["reasoning"]) for step in steps)
        detail = 0.5 * min(len(steps) / self.full_steps, 1.0) + \
            0.5 * min(chars / self.full_chars, 1.0)
        correct = path["check"]["correct"] if path["check"] else None
        low, high, verdict = ((60, 100, "correct") if correct else
                              (1, 30, "wrong") if correct is False else (30, 60, "unchecked"))
        return {"score": round(low + (high - low) * detail),
                "comment": f"{verdict} answer; {len(steps)} steps, {chars} characters of "
                           "reasoning"}


class JudgeNode(ModelNode):
    """The answer judge: a text LLM decides whether ``answer`` matches ``truth``.

    Runs only when ``state["check"]`` is undecided (the rules could not tell); writes
    ``check``. A judge whose reply cannot be read leaves the check undecided and records a
    failure.
    """

    def __init__(
        self,
        model: LanguageModelLike,
        *,
        max_retries: int = 2,
        prompts: Prompts = DEFAULT_PROMPTS,
        name: str = "judge",
        context_keys: Sequence[str] = ("judge",),
    ) -> None:
        super().__init__(model, name=name, context_keys=context_keys, prompts=prompts,
                         max_retries=max_retries)

    def _json_schema(self, state: dict[str, Any]) -> dict[str, object]:
        return judgement_json_schema()

    def _conversation(self, state: dict[str, Any]) -> Exchange[tuple[bool, str]] | None:
        check = state.get("check")
        if check is None or check["correct"] is not None or not state.get("answer"):
            return None
        messages = judge_messages(prompts=self.prompts, question=state["question"],
                                  truth=state["truth"], answer=state["answer"])
        return self._ask(messages, parse_judgement)

    def _update(self, state: dict[str, Any], outcome: Outcome[Any] | None,
                runtime: Runtime[Any] | None) -> dict[str, Any]:
        if outcome is None:
            return {}
        judgement = outcome.value
        if judgement is None:
            failure = self._unreadable(state, outcome, runtime)
            return {"failures": [failure]}
        correct, reason = judgement
        check: AnswerCheck = {"correct": correct, "method": "judge", "detail": reason[:500]}
        return {"check": check}


class ScoreNode(ModelNode):
    """The reasoning-path scoring agent: scores all paths of a question in one request.

    Reads ``paths`` (each a :class:`~insightv_agents.schema.PathResult`), ``question``,
    ``answer`` (the ground truth) and ``images``; writes the paths back in order with
    ``score`` and ``comment`` filled in, and ``scoring_failures``. Paths that failed are not
    shown to the scorer and keep ``score=None``. Each path's reasoning is shown up to
    ``max_path_chars`` characters (``None``: whole), so that one request holding all paths
    of a question fits the scorer's context. A request the server refuses anyway (an HTTP
    4xx, such as a prompt over the model's context) leaves the paths unscored with a
    ``rejected`` scoring failure, so the item is still written rather than failing on
    every rerun; other errors (a server down) propagate, for the run to retry.
    """

    def __init__(
        self,
        model: LanguageModelLike,
        *,
        max_retries: int = 2,
        max_path_chars: int | None = 6000,
        prompts: Prompts = DEFAULT_PROMPTS,
        name: str = "score",
        context_keys: Sequence[str] = ("scorer",),
    ) -> None:
        super().__init__(model, name=name, context_keys=context_keys, prompts=prompts,
                         max_retries=max_retries)
        if max_path_chars is not None:
            check_int("max_path_chars", max_path_chars, 100, 10_000_000)
        self.max_path_chars = max_path_chars

    def _run(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        try:
            return super()._run(state, config)
        except ModelCallError as err:
            if not rejected_request(err.__cause__):
                raise
            return self._rejected(state, err.__cause__)

    async def _arun(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        try:
            return await super()._arun(state, config)
        except ModelCallError as err:
            if not rejected_request(err.__cause__):
                raise
            return self._rejected(state, err.__cause__)

    def _rejected(self, state: dict[str, Any], err: BaseException | None) -> dict[str, Any]:
        failure = self._failure(state, "rejected", f"{type(err).__name__}: {err}"[:2000], 1, "")
        emit_event(current_runtime(), {"event": "failure", "node": self.name,
                                       "failure": failure})
        return {**with_scores(state, []), "scoring_failures": [failure]}

    def _json_schema(self, state: dict[str, Any]) -> dict[str, object]:
        return scores_json_schema(paths=max(1, len(_scorable(state))))

    def _conversation(self, state: dict[str, Any]) -> Exchange[list[PathScore]] | None:
        scored = _scorable(state)
        if not scored:
            return None
        messages = score_messages(prompts=self.prompts, question=state["question"],
                                  truth=state["answer"], images=state.get("images") or [],
                                  paths=[(path["steps"], path["answer"]) for path in scored],
                                  max_path_chars=self.max_path_chars)
        return self._ask(messages, lambda text: parse_scores(text, len(scored)))

    def _update(self, state: dict[str, Any], outcome: Outcome[Any] | None,
                runtime: Runtime[Any] | None) -> dict[str, Any]:
        if outcome is None:
            return with_scores(state, [])
        scores = outcome.value
        if scores is None:
            failure = self._unreadable(state, outcome, runtime)
            return {**with_scores(state, []), "scoring_failures": [failure]}
        return with_scores(state, scores)


def score_with(scorer: PathScorer, state: dict[str, Any]) -> dict[str, Any]:
    """The graph node for a custom :class:`PathScorer`: same reads and writes as ScoreNode."""
    scored = _scorable(state)
    images = resolve_images(state.get("images"), run_store(current_runtime()))
    request: ScoreRequest = {"question": state["question"], "truth": state["answer"],
                             "images": images, "paths": scored}
    return with_scores(state, list(scorer.score_paths(request)) if scored else [])


def with_scores(state: dict[str, Any], scores: list[PathScore]) -> dict[str, Any]:
    """The state update putting ``scores`` (for the scorable paths, in order) on the paths."""
    ordered = sorted(state.get("paths") or [], key=lambda path: path["index"])
    given = iter(scores)
    updated: list[PathResult] = []
    for path in ordered:
        scored = path.copy()
        if path["status"] != "ok":
            scored["score"], scored["comment"] = None, "the path failed: not scored"
        else:
            score = next(given, None)
            scored["score"] = score["score"] if score else None
            scored["comment"] = score["comment"] if score else \
                "the scorer gave no score for this path"
        updated.append(scored)
    return {"paths": Overwrite(updated)}


def _scorable(state: dict[str, Any]) -> list[PathResult]:
    return sorted((path for path in state.get("paths") or [] if path["status"] == "ok"),
                  key=lambda path: path["index"])
