"""The Insight-V inference graph: a reasoning agent and a summary (critique) agent.

```
START → prepare → reason ─continue→ reason
                    └─summary (or step cap, or failure)→ summarize ─done→ END
                                                            └─revise→ revise → reason
```
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from langchain_core.language_models import LanguageModelLike
from langgraph.graph import END, START, StateGraph
from langgraph.types import TracePolicy
from langgraph.utils.runnable import RunnableCallable

from insightv_agents.cards import card_of
from insightv_agents.errors import check_int
from insightv_agents.formats import FormatProfile, agent_profile, format_profile
from insightv_agents.images import ImagePolicy, redact_images
from insightv_agents.nodes import (
    MAX_QUESTION_CHARS,
    ReasoningNode,
    SummaryNode,
    prepare_input,
    revise,
)
from insightv_agents.prompts import Prompts, ReasoningMode
from insightv_agents.state import InsightVContext, InsightVInput, InsightVOutput, InsightVState

REDACT_IMAGES = TracePolicy(process_inputs=redact_images, process_outputs=redact_images)
"""Keeps image payloads (base64 data URLs) out of the nodes' traces."""


def create_insightv_graph(
    *,
    reasoner: LanguageModelLike,
    summarizer: LanguageModelLike | None = None,
    profile: FormatProfile | str | None = None,
    summary_profile: FormatProfile | str | None = None,
    mode: ReasoningMode | None = None,
    max_steps: int = 16,
    max_revisions: int = 0,
    max_retries: int = 2,
    prompts: Prompts | None = None,
    image_policy: ImagePolicy | None = None,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> StateGraph[InsightVState, InsightVContext, InsightVInput, InsightVOutput]:
    """Build the Insight-V graph (uncompiled, so the caller picks checkpointer and name).

    Args:
        reasoner: chat model of the reasoning agent (any LangChain chat model taking images).
        summarizer: chat model of the summary agent; ``None`` lets the reasoner play both roles.
        profile: the agents' format (:mod:`~insightv_agents.formats`: ``"steps"``, ``"chain"``,
            ``"insightv-reference"``, ``"llava-cot"`` or a ``FormatProfile``); default: what
            each model's agent card says (:mod:`~insightv_agents.cards`), else ours for
            ``mode``.
        summary_profile: the summary agent's format, where it differs from ``profile``.
        mode: ``"step"``: one step per reasoning call; ``"chain"``: a whole chain per call
            (default: the profile's; ``"step"`` without one).
        max_steps: hard cap on reasoning steps per pass.
        max_revisions: how many times the summary agent may send flawed reasoning back with
            its critique; ``0`` is the paper's one-pass system.
        max_retries: re-asks after an unreadable model reply, per call.
        prompts: the prompt texts (see :class:`~insightv_agents.prompts.Prompts`; default:
            the profile's).
        image_policy: which images are accepted (URLs are refused unless allowed there).
        max_question_chars: longest question accepted.

    Returns:
        A ``StateGraph`` taking ``{"image", "question"}`` and returning ``answer``, ``steps``,
        ``reasoning``, ``verdict``, ``status``, ``failures`` and ``attempts``. Models can be
        swapped per run with ``context=InsightVContext(reasoner=..., summarizer=...)``.

    Raises:
        ConfigError: for an option out of range.

    Examples:
        >>> from insightv_agents.testing import ScriptedChatModel
        >>> model = ScriptedChatModel([
        ...     '{"summary": "Count", "reasoning": "There are 3 dots.", "action": "summary"}',
        ...     '{"reasoning_correct": true, "critique": "", "answer": "3"}'])
        >>> graph = create_insightv_graph(reasoner=model).compile()
        >>> png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ"
        ...        "/pLvAAAAAElFTkSuQmCC")
        >>> graph.invoke({"image": png, "question": "How many dots?"})["answer"]
        '3'
    """
    check_int("max_revisions", max_revisions, 0, 16)
    check_int("max_question_chars", max_question_chars, 1, 10_000_000)
    reasoning = agent_profile(reasoner, profile, mode=mode, prompts=prompts)
    summary = reasoning  # unless it is told, or its own card says, otherwise
    if summary_profile is not None:
        summary = format_profile(summary_profile, prompts=prompts)
    elif profile is None and card_of(summarizer) is not None:  # mode is the reasoner's
        summary = agent_profile(summarizer, prompts=prompts)
    reason = ReasoningNode(reasoner, profile=reasoning, max_steps=max_steps,
                           max_retries=max_retries)
    summarize = SummaryNode(
        summarizer if summarizer is not None else reasoner, max_retries=max_retries,
        profile=summary,
        context_keys=("summarizer",) if summarizer is not None else ("summarizer", "reasoner"))

    def after_reason(state: InsightVState) -> Literal["continue", "summary"]:
        return "summary" if reason.is_done(state) else "continue"

    def after_summary(state: InsightVState) -> Literal["flawed", "done"]:
        verdict = state.get("verdict")
        flawed = verdict is not None and verdict["reasoning_correct"] is False
        return "flawed" if flawed and state.get("revision", 0) < max_revisions else "done"

    builder = StateGraph(InsightVState, context_schema=InsightVContext,
                         input_schema=InsightVInput, output_schema=InsightVOutput)
    builder.add_node("prepare", partial(prepare_input, image_policy=image_policy,
                                        max_question_chars=max_question_chars),
                     trace_policy=REDACT_IMAGES)
    builder.add_node("reason", reason, trace_policy=REDACT_IMAGES)
    builder.add_node("summarize", summarize, trace_policy=REDACT_IMAGES)
    builder.add_node("revise", revise, trace_policy=REDACT_IMAGES)
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "reason")
    # Routers read the whole state (images included): keep them out of traces.
    builder.add_conditional_edges("reason", RunnableCallable(after_reason, trace=False),
                                  {"continue": "reason", "summary": "summarize"})
    builder.add_conditional_edges("summarize", RunnableCallable(after_summary, trace=False),
                                  {"flawed": "revise", "done": END})
    builder.add_edge("revise", "reason")
    return builder

