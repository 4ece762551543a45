"""The Insight-V graph's state, its input and output schemas, and its runtime context."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from langchain_core.language_models import LanguageModelLike
from typing_extensions import TypedDict

from insightv_agents.schema import Attempt, Failure, ReasoningStep, Verdict

Status = Literal["ok", "failed"]
"""``ok``: the summary agent answered; ``failed``: no answer could be read (see ``failures``)."""


class InsightVInput(TypedDict):
    """What a caller passes: ``{"image": ..., "question": ...}``."""

    image: Any
    question: str


class InsightVOutput(TypedDict):
    """What a run returns."""

    answer: str
    steps: list[ReasoningStep]
    reasoning: str
    verdict: Verdict | None
    status: Status
    failures: list[Failure]
    attempts: list[Attempt]


class InsightVState(TypedDict):
    """The full state. ``images`` holds the validated images: references to the copies kept
    in the graph's store, or data URLs when it has none (:mod:`~insightv_agents.image_store`);
    ``image`` is cleared once they are (the caller's payload is not kept); ``revision``
    counts the passes sent back by the summary agent; ``critique`` is the latest reason for
    sending one back."""

    image: Any
    question: str
    images: list[str]
    steps: Annotated[list[ReasoningStep], operator.add]
    revision: int
    critique: str | None
    verdict: Verdict | None
    answer: str
    reasoning: str
    status: Status
    failures: Annotated[list[Failure], operator.add]
    attempts: Annotated[list[Attempt], operator.add]


class _NodeState(TypedDict):
    """The keys every model node reads and writes."""

    question: str
    images: list[str]
    steps: Annotated[list[ReasoningStep], operator.add]
    revision: int
    failures: Annotated[list[Failure], operator.add]


class ReasoningNodeState(_NodeState):
    """The state :class:`~insightv_agents.nodes.ReasoningNode` reads and writes."""

    critique: str | None
    attempts: Annotated[list[Attempt], operator.add]


class SummaryNodeState(_NodeState):
    """The state :class:`~insightv_agents.nodes.SummaryNode` reads and writes."""

    verdict: Verdict | None
    answer: str
    reasoning: str
    status: Status


class FinalAnswerNodeState(_NodeState):
    """The state :class:`~insightv_agents.nodes.FinalAnswerNode` reads and writes."""

    answer: str


@dataclass(frozen=True)
class InsightVContext:
    """Run-time choices, passed as ``graph.invoke(..., context=InsightVContext(...))``.

    A model given here replaces the one the graph was built with, for this run only.
    Any context object with ``reasoner`` / ``summarizer`` attributes works the same way,
    so a parent graph can carry these fields in its own context schema.
    """

    reasoner: LanguageModelLike | None = None
    summarizer: LanguageModelLike | None = None
