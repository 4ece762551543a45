"""LLaVA-CoT on the same parts: four-stage responses and stage-level beam search.

```
search="stage":  START → prepare → summary → caption → reasoning → conclusion → finish
search="best_of_n" | "sentence" | "single":  START → prepare → generate → finish
                                   (with a summarizer) finish → summarize → END
```
Same contract as the Insight-V graph: ``{"image", "question"}`` in; ``answer``, ``steps``
(the four stages as reasoning steps), ``reasoning``, ``verdict``, ``status`` and
``failures`` out, plus ``stages``, ``response`` and ``search`` (every candidate and
judgement, for inspection).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

from langchain_core.language_models import LanguageModelLike
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.types import Overwrite
from langgraph.utils.runnable import RunnableCallable

from insightv_agents.backends.protocol import unwrap
from insightv_agents.errors import ConfigError, check_int, model_call
from insightv_agents.graphs.insightv import REDACT_IMAGES
from insightv_agents.image_store import aresolve_images, resolve_images
from insightv_agents.images import ImagePolicy
from insightv_agents.nodes import MAX_QUESTION_CHARS, SummaryNode, prepare_input
from insightv_agents.parsing import format_stages, parse_stages
from insightv_agents.prompts import (
    DEFAULT_PROMPTS,
    DEFAULT_STAGE_PROMPTS,
    StagePrompts,
    render_reasoning,
)
from insightv_agents.runtime import current_runtime, emit_event, run_store
from insightv_agents.schema import STAGES, Failure, ReasoningStep, SearchRecord, Stage, Stages
from insightv_agents.search import (
    Search,
    SearchSettings,
    arun_search,
    best_of_n,
    run_search,
    sentence_search,
    single_pass,
    stage_search,
)
from insightv_agents.state import InsightVInput, InsightVOutput, InsightVState

SearchMethod = Literal["stage", "best_of_n", "sentence", "single"]
"""``stage``: stage-level beam search (LLaVA-CoT); ``best_of_n``: N whole responses, the
best judged; ``sentence``: sentence-level beam search; ``single``: one plain generation."""

STAGE_TITLES: dict[str, str] = {"summary": "Summary", "caption": "Caption",
                                "reasoning": "Reasoning", "conclusion": "Conclusion"}


class StageBeamOutput(InsightVOutput):
    """What a run returns: the Insight-V output plus the stages, the whole tagged response
    and the search record (candidates, checks, judgements, winners)."""

    stages: Stages
    response: str
    search: list[SearchRecord]


class StageBeamState(InsightVState):
    """The full state: the Insight-V state plus the stages chosen so far."""

    stages: Stages
    response: str
    search: Annotated[list[SearchRecord], operator.add]


@dataclass(frozen=True)
class StageBeamContext:
    """Run-time choices (``graph.invoke(..., context=StageBeamContext(...))``): a model given
    here replaces the graph's own for this run. ``reasoner`` writes the candidates,
    ``judge`` compares them, ``summarizer`` (if the graph has a summary agent) answers."""

    reasoner: LanguageModelLike | None = None
    judge: LanguageModelLike | None = None
    summarizer: LanguageModelLike | None = None


def empty_stages() -> Stages:
    return {"summary": "", "caption": "", "reasoning": "", "conclusion": ""}


def stages_to_steps(stages: Stages) -> list[ReasoningStep]:
    """The stages as Insight-V reasoning steps (one per non-empty stage, the last with
    action ``summary``), so that a summary agent can judge them."""
    steps: list[ReasoningStep] = [
        {"summary": STAGE_TITLES[stage], "reasoning": stages[stage], "action": "continue"}
        for stage in STAGES if stages[stage]]
    if steps:
        steps[-1]["action"] = "summary"
    return steps


class _SearchNode(RunnableCallable):
    """Runs a search (sync or async) with the run's models and writes its result."""

    def __init__(self, model: LanguageModelLike, judge: LanguageModelLike | None, *,
                 name: str, prompts: StagePrompts, max_retries: int, use_n: bool) -> None:
        super().__init__(self._run, self._arun, name=name, trace=False)
        self.model, self.judge = model, judge
        self.prompts, self.max_retries, self.use_n = prompts, max_retries, use_n

    def _search(self, state: dict[str, Any], settings: SearchSettings) -> Search[Any]:
        raise NotImplementedError

    def _update(self, state: dict[str, Any], result: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _models(self) -> tuple[LanguageModelLike, LanguageModelLike]:
        context = getattr(current_runtime(), "context", None)
        model = getattr(context, "reasoner", None) or self.model
        judge = getattr(context, "judge", None) or self.judge or model
        return model, judge

    def _settings(self, state: dict[str, Any], images: list[str]) -> SearchSettings:
        return SearchSettings(question=state["question"], images=images,
                              prompts=self.prompts, max_retries=self.max_retries)

    def _run(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        model, judge = self._models()
        images = resolve_images(state.get("images"), run_store(current_runtime()))
        with model_call(self.name or ""):
            result = run_search(self._search(state, self._settings(state, images)), model,
                                judge, config, use_n=self.use_n)
        return self._update(state, result)

    async def _arun(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        model, judge = self._models()
        images = await aresolve_images(state.get("images"), run_store(current_runtime()))
        with model_call(self.name or ""):
            result = await arun_search(self._search(state, self._settings(state, images)),
                                       model, judge, config, use_n=self.use_n)
        return self._update(state, result)

    def _judge_failures(self, state: dict[str, Any], records: list[SearchRecord]
                        ) -> list[Failure]:
        """A judge reply that stayed unreadable is a recorded failure (its match was
        decided by the fallback rule)."""
        return [{"node": self.name or "", "revision": state.get("revision", 0),
                 "kind": "unparsable", "error": f"judge of {record['target']}: "
                 f"{judgement['reason']}; the fallback rule chose candidate "
                 f"{judgement['winner'] + 1}", "attempts": judgement["attempts"], "raw": ""}
                for record in records for judgement in record["judgements"]
                if judgement["decided_by"] == "fallback"]


class StageNode(_SearchNode):
    """One stage of stage-level beam search: writes ``stages[stage]`` and its search record.

    Streams ``{"event": "stage", "stage": ..., "text": ..., "candidates": N}``.
    """

    def __init__(self, stage: Stage, model: LanguageModelLike,
                 judge: LanguageModelLike | None = None, *, beam_size: int = 2,
                 check_reasoning: bool = True, prompts: StagePrompts = DEFAULT_STAGE_PROMPTS,
                 max_retries: int = 2, use_n: bool = True) -> None:
        super().__init__(model, judge, name=stage, prompts=prompts, max_retries=max_retries,
                         use_n=use_n)
        self.stage, self.beam_size, self.check_reasoning = stage, beam_size, check_reasoning

    def _search(self, state: dict[str, Any], settings: SearchSettings) -> Search[Any]:
        return stage_search(self.stage, state.get("stages") or empty_stages(), settings,
                            beam_size=self.beam_size, check_reasoning=self.check_reasoning)

    def _update(self, state: dict[str, Any], result: Any) -> dict[str, Any]:
        record: SearchRecord = result
        text = record["candidates"][record["winner"]]
        stages = dict(state.get("stages") or empty_stages())
        stages[self.stage] = text
        emit_event(current_runtime(), {"event": "stage", "stage": self.stage, "text": text,
                                        "candidates": len(record["candidates"])})
        return {"stages": stages, "search": [record],
                "failures": self._judge_failures(state, [record])}


class ResponseNode(_SearchNode):
    """Writes a whole tagged response by best-of-N, sentence-level beam search or a single
    pass; streams ``{"event": "response", "text": ...}``."""

    def __init__(self, model: LanguageModelLike, judge: LanguageModelLike | None = None, *,
                 search: SearchMethod = "single", beam_size: int = 2, max_sentences: int = 64,
                 prompts: StagePrompts = DEFAULT_STAGE_PROMPTS, max_retries: int = 2,
                 use_n: bool = True) -> None:
        super().__init__(model, judge, name="generate", prompts=prompts,
                         max_retries=max_retries, use_n=use_n)
        self.search, self.beam_size, self.max_sentences = search, beam_size, max_sentences

    def _search(self, state: dict[str, Any], settings: SearchSettings) -> Search[Any]:
        if self.search == "best_of_n":
            return best_of_n(settings, n=self.beam_size)
        if self.search == "sentence":
            return sentence_search(settings, beam_size=self.beam_size,
                                   max_sentences=self.max_sentences)
        return single_pass(settings)

    def _update(self, state: dict[str, Any], result: Any) -> dict[str, Any]:
        response, records = result
        emit_event(current_runtime(), {"event": "response", "text": response})
        return {"stages": parse_stages(response), "response": response, "search": records,
                "failures": self._judge_failures(state, records)}


def prepare(state: StageBeamState, *, image_policy: ImagePolicy | None,
            max_question_chars: int) -> dict[str, Any]:
    """Validate the input (no model call) and reset the run, stages included."""
    return {**prepare_input(state, image_policy=image_policy,
                            max_question_chars=max_question_chars),
            "stages": empty_stages(), "response": "", "search": Overwrite([])}


def finish(state: StageBeamState) -> dict[str, Any]:
    """The answer from the conclusion; the stages as steps; ``failed`` with a recorded
    failure when there is no conclusion."""
    stages = state.get("stages") or empty_stages()
    steps = stages_to_steps(stages)
    update: dict[str, Any] = {
        "steps": Overwrite(steps), "reasoning": render_reasoning(steps, DEFAULT_PROMPTS),
        "response": state.get("response") or format_stages(stages),
        "answer": stages["conclusion"],
        "status": "ok" if stages["conclusion"] else "failed"}
    if not stages["conclusion"]:
        failure: Failure = {"node": "finish", "revision": 0, "kind": "no_answer",
                            "error": "the response has no <CONCLUSION> to answer from",
                            "attempts": 0, "raw": (state.get("response") or "")[:2000]}
        update["failures"] = [failure]
    return update


def create_stage_beam_graph(
    model: LanguageModelLike,
    *,
    judge: LanguageModelLike | None = None,
    beam_size: int = 2,
    search: SearchMethod = "stage",
    summarizer: LanguageModelLike | None = None,
    check_reasoning: bool = True,
    max_sentences: int = 64,
    max_retries: int = 2,
    batch_candidates: bool = True,
    prompts: StagePrompts = DEFAULT_STAGE_PROMPTS,
    image_policy: ImagePolicy | None = None,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> StateGraph[StageBeamState, StageBeamContext, InsightVInput, StageBeamOutput]:
    """Build the LLaVA-CoT graph (uncompiled): four tagged stages and stage-level beam search.

    Args:
        model: the chat model that writes responses (any LangChain chat model taking images;
            a model trained on LLaVA-CoT data, or any model taught by ``prompts.system``).
            Candidates need sampling: a model with temperature 0 gives ``beam_size`` copies.
        judge: the chat model that compares candidates (default: ``model`` itself, as in
            LLaVA-CoT); our summary agent, or any other model, works too.
        beam_size: candidates per stage (``stage``, ``sentence``) or responses (``best_of_n``);
            ``1`` samples once with no judging.
        search: ``stage`` (stage-level beam search), ``best_of_n``, ``sentence``
            (sentence-level beam search) or ``single`` (one plain generation).
        summarizer: an Insight-V summary agent that judges the four stages as reasoning and
            gives the answer (``verdict`` is then set); ``None``: the answer is the conclusion.
        check_reasoning: check each reasoning candidate alone before the tournament; one
            judged incorrect loses to one judged correct without a comparison.
        max_sentences: cap on sentences for ``sentence``.
        max_retries: re-asks of an unreadable judge reply before the fallback rule decides.
        batch_candidates: ask for all candidates in one request with the backend's ``n``
            where it has one (vLLM, in-process transformers); ``False``: one request each.
        prompts: the texts (see :class:`~insightv_agents.prompts.StagePrompts`).
        image_policy: which images are accepted.
        max_question_chars: longest question accepted.

    Raises:
        ConfigError: for an option out of range, or ``beam_size > 1`` with a model whose
            temperature is 0.

    Examples:
        >>> from insightv_agents.testing import ScriptedChatModel
        >>> model = ScriptedChatModel(["<SUMMARY> Count. </SUMMARY> <CAPTION> Three dots. "
        ...     "</CAPTION> <REASONING> 3 dots. </REASONING> <CONCLUSION> 3 </CONCLUSION>"])
        >>> graph = create_stage_beam_graph(model, search="single").compile()
        >>> png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ"
        ...        "/pLvAAAAAElFTkSuQmCC")
        >>> graph.invoke({"image": png, "question": "How many dots?"})["answer"]
        '3'
    """
    if model is None:
        raise ConfigError("the stage-beam graph needs a chat model.")
    if search not in ("stage", "best_of_n", "sentence", "single"):
        raise ConfigError(f"search must be 'stage', 'best_of_n', 'sentence' or 'single', "
                          f"not {search!r}.")
    check_int("beam_size", beam_size, 1, 64)
    check_int("max_sentences", max_sentences, 1, 1024)
    check_int("max_retries", max_retries, 0, 10)
    check_int("max_question_chars", max_question_chars, 1, 10_000_000)
    if beam_size > 1 and search != "single" and _temperature(model) == 0:
        raise ConfigError(f"beam_size={beam_size} needs sampled candidates, but the model's "
                          "temperature is 0: set a temperature above 0 (LLaVA-CoT uses 0.6).")
    options: dict[str, Any] = {"prompts": prompts, "max_retries": max_retries,
                               "use_n": batch_candidates}
    builder = StateGraph(StageBeamState, context_schema=StageBeamContext,
                         input_schema=InsightVInput, output_schema=StageBeamOutput)
    builder.add_node("prepare", partial(prepare, image_policy=image_policy,
                                        max_question_chars=max_question_chars),
                     trace_policy=REDACT_IMAGES)
    if search == "stage":
        previous = "prepare"
        for stage in STAGES:
            builder.add_node(stage, StageNode(stage, model, judge, beam_size=beam_size,
                                              check_reasoning=check_reasoning, **options),
                             trace_policy=REDACT_IMAGES)
            builder.add_edge(previous, stage)
            previous = stage
    else:
        builder.add_node("generate", ResponseNode(
            model, judge, search=search, beam_size=beam_size, max_sentences=max_sentences,
            **options), trace_policy=REDACT_IMAGES)
        builder.add_edge("prepare", "generate")
        previous = "generate"
    builder.add_node("finish", finish, trace_policy=REDACT_IMAGES)
    builder.add_edge(START, "prepare")
    builder.add_edge(previous, "finish")
    if summarizer is None:
        builder.add_edge("finish", END)
    else:
        builder.add_node("summarize", SummaryNode(summarizer, max_retries=max_retries),
                         trace_policy=REDACT_IMAGES)
        builder.add_edge("finish", "summarize")
        builder.add_edge("summarize", END)
    return builder


def _temperature(model: LanguageModelLike) -> float | None:
    bound, kwargs = unwrap(model)
    value = kwargs.get("temperature", getattr(bound, "temperature", None))
    return float(value) if isinstance(value, int | float) else None
