"""The graph nodes, usable on their own in any LangGraph graph.

- :func:`prepare_input` validates ``image`` and ``question`` (no model call) and resets a run.
- :class:`ReasoningNode` asks the reasoning agent for the next step (or the rest of a chain).
- :class:`SummaryNode` asks the summary agent to judge the reasoning and answer.
- :class:`FinalAnswerNode` asks the reasoning model for the final answer of its own reasoning
  (data synthesis: each teacher path ends with one).
- :func:`revise` archives a pass judged flawed and starts the next one with its critique.

Model replies are untrusted: each call is re-asked at most ``max_retries`` times with the
parse error kept in the conversation, then recorded as a :class:`~insightv_agents.schema.Failure`.
Nodes never raise on model output. Each node has a real sync and async path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.language_models import LanguageModelLike
from langgraph.runtime import Runtime
from langgraph.types import Overwrite

from insightv_agents.errors import (
    InvalidInputError,
    check_int,
)
from insightv_agents.formats import FormatProfile, format_profile
from insightv_agents.image_store import hold_images
from insightv_agents.images import ImagePolicy, load_images
from insightv_agents.parsing import parse_answer
from insightv_agents.prompts import (
    DEFAULT_PROMPTS,
    Prompts,
    ReasoningMode,
    final_answer_messages,
    reasoning_messages,
    summary_messages,
)
from insightv_agents.runtime import (
    Exchange,
    ModelNode,
    Outcome,
    current_runtime,
    emit_event,
    run_store,
)
from insightv_agents.schema import (
    Attempt,
    Failure,
    ReasoningStep,
    Verdict,
    answer_json_schema,
)
from insightv_agents.state import (
    FinalAnswerNodeState,
    InsightVState,
    ReasoningNodeState,
    SummaryNodeState,
)

MAX_QUESTION_CHARS = 20_000


def prepare_input(
    state: InsightVState,
    *,
    image_policy: ImagePolicy | None = None,
    max_question_chars: int = MAX_QUESTION_CHARS,
) -> dict[str, Any]:
    """Validate the input and reset per-run fields (so a reused thread starts clean).

    The images are kept once (in the graph's store, if it has one: see
    :mod:`~insightv_agents.image_store`) and ``image``, the caller's payload, is cleared.
    Its type tells LangGraph the state it writes: added to a graph whose state lacks those
    keys, it brings them; one defining them differently is refused by ``add_node``.

    Raises:
        InvalidInputError: for a state that is not a mapping, a missing, empty or oversized
            question, or any bad image.
    """
    if not isinstance(state, Mapping):
        raise InvalidInputError(f"the input must be a dict such as {{'image': ..., "
                                f"'question': ...}}, not {type(state).__name__}.",
                                field="input")
    question = state.get("question")
    if question is None:
        raise InvalidInputError("`question` is required: pass a non-empty string.",
                                field="question")
    if not isinstance(question, str):
        raise InvalidInputError(f"`question` must be a string, not {type(question).__name__}.",
                                field="question")
    if not question.strip():
        raise InvalidInputError("`question` is empty: pass the question to answer.",
                                field="question")
    if len(question) > max_question_chars:
        raise InvalidInputError(f"`question` is {len(question)} characters; the limit is "
                                f"{max_question_chars}.", field="question")
    images = hold_images(load_images(state.get("image"), image_policy),
                         run_store(current_runtime()))
    return {
        "image": None, "question": question.strip(), "images": images,
        "steps": Overwrite([]), "failures": Overwrite([]), "attempts": Overwrite([]),
        "revision": 0, "critique": None, "verdict": None, "answer": "", "reasoning": "",
        "status": "ok",
    }


def revise(state: InsightVState) -> dict[str, Any]:
    """Archive the pass the summary agent judged flawed and start a new one with its critique."""
    verdict = state.get("verdict")
    if verdict is None:
        return {}
    attempt: Attempt = {"steps": list(state.get("steps") or []), "verdict": verdict}
    return {"attempts": [attempt], "steps": Overwrite([]), "critique": verdict["critique"],
            "revision": state.get("revision", 0) + 1, "verdict": None}


class ReasoningNode(ModelNode):
    """The reasoning agent: adds the next step(s) to ``state["steps"]``.

    Args:
        model: any LangChain chat model that takes images.
        profile: the agent's format (:mod:`~insightv_agents.formats`: a profile or a built-in
            one's name); default: ours for ``mode``.
        mode: ``"step"`` asks for one step per call (multi-turn); ``"chain"`` asks for the
            whole chain in one generation (how a trained reasoning agent answers) and parses
            it into the same steps. Default: the profile's (``"step"`` without one).
        max_steps: hard cap on steps per reasoning pass.
        max_retries: re-asks after an unreadable reply before recording a failure.
        prompts: the prompt texts (default: the profile's).
        name: the node's name (also used in recorded failures and stream events).
        context_keys: attributes of the run-time context that can replace ``model``.

    Reads ``question``, ``images``, ``steps``, ``revision``, ``critique``, ``attempts``;
    writes ``steps`` (appended) and ``failures`` (appended). Streams a custom event
    ``{"event": "step", ...}`` per new step.

    Examples:
        >>> from insightv_agents.testing import ScriptedChatModel
        >>> node = ReasoningNode(ScriptedChatModel(
        ...     ['{"summary": "Look", "reasoning": "A red square.", "action": "summary"}']))
        >>> update = node.invoke({"question": "What shape?", "images": [], "steps": []})
        >>> update["steps"][0]["action"]
        'summary'
    """

    def __init__(
        self,
        model: LanguageModelLike,
        *,
        profile: FormatProfile | str | None = None,
        mode: ReasoningMode | None = None,
        max_steps: int = 16,
        max_retries: int = 2,
        prompts: Prompts | None = None,
        name: str = "reason",
        context_keys: Sequence[str] = ("reasoner",),
    ) -> None:
        self.profile = format_profile(profile, mode=mode, prompts=prompts)
        super().__init__(model, name=name, context_keys=context_keys,
                         prompts=self.profile.prompts, max_retries=max_retries)
        check_int("max_steps", max_steps, 1, 256)
        self.mode: ReasoningMode = self.profile.mode
        self.max_steps = max_steps

    def __call__(self, state: ReasoningNodeState) -> dict[str, Any]:
        """The node's update for ``state`` (its type tells LangGraph which state keys the
        node uses: a graph whose state lacks them gets them; one defining them differently
        is refused by ``add_node``)."""
        return self.invoke(state)

    def _structured_output(self, state: dict[str, Any]) -> dict[str, object]:
        # Exactly the text the agents are trained on (a chain: one JSON step per line).
        return self.profile.reasoning_constraint(self.max_steps)

    def is_done(self, state: Mapping[str, Any]) -> bool:
        """Whether this reasoning pass is over: ``summary`` chosen, step cap, or a failure."""
        revision = state.get("revision", 0)
        if any(f["node"] == self.name and f["revision"] == revision
               for f in state.get("failures") or []):
            return True
        steps = state.get("steps") or []
        return bool(steps) and (steps[-1]["action"] == "summary" or len(steps) >= self.max_steps)

    def _conversation(self, state: dict[str, Any]) -> Exchange[list[ReasoningStep]] | None:
        steps = state.get("steps") or []
        if len(steps) >= self.max_steps:
            return None
        revision = state.get("revision", 0)
        attempts = state.get("attempts") or []
        messages = reasoning_messages(
            prompts=self.prompts, mode=self.mode, question=state["question"],
            images=state.get("images") or [], steps=steps,
            critique=state.get("critique") if revision else None,
            previous=attempts[-1]["steps"] if revision and attempts else None)
        return self._ask(messages, self.profile.parse_reasoning)

    def _update(self, state: dict[str, Any], outcome: Outcome[Any] | None,
                runtime: Runtime[Any] | None) -> dict[str, Any]:
        steps = state.get("steps") or []
        if outcome is None:
            return {"failures": [self._cap_failure(state, attempts=0)]}
        parsed, attempts = outcome.value, outcome.attempts
        if parsed is None:
            failure = self._unreadable(state, outcome, runtime)
            return {"failures": [failure]}
        new = parsed[: self.max_steps - len(steps)]
        for index, step in enumerate(new, len(steps) + 1):
            emit_event(runtime, {"event": "step", "node": self.name,
                            "revision": state.get("revision", 0), "index": index, "step": step})
        update: dict[str, Any] = {"steps": new}
        if len(steps) + len(new) >= self.max_steps and new[-1]["action"] == "continue":
            update["failures"] = [self._cap_failure(state, attempts)]
        return update

    def _cap_failure(self, state: dict[str, Any], attempts: int) -> Failure:
        return self._failure(state, "step_cap", f"the step cap ({self.max_steps}) was reached "
                             "before the model chose 'summary'", attempts, "")


class SummaryNode(ModelNode):
    """The summary agent (the critique node): judges ``state["steps"]`` and answers.

    Writes ``verdict``, ``answer``, ``reasoning`` (the rendered steps) and ``status``; on an
    unreadable reply after the re-asks, ``status="failed"``, an empty answer and a recorded
    failure. A reply in plain text that states an answer is that answer, with the verdict's
    ``reasoning_correct`` unknown (``None``). Streams a custom event
    ``{"event": "verdict", ...}``.

    Args:
        model: any LangChain chat model that takes images.
        profile: the agent's format (a profile or a built-in one's name; default: ours).
        max_retries: re-asks after an unreadable reply before recording a failure.
        prompts: the prompt texts (default: the profile's).
        name: the node's name.
        context_keys: attributes of the run-time context that can replace ``model``, in order.
    """

    def __init__(
        self,
        model: LanguageModelLike,
        *,
        profile: FormatProfile | str | None = None,
        max_retries: int = 2,
        prompts: Prompts | None = None,
        name: str = "summarize",
        context_keys: Sequence[str] = ("summarizer",),
    ) -> None:
        self.profile = format_profile(profile, prompts=prompts)
        super().__init__(model, name=name, context_keys=context_keys,
                         prompts=self.profile.prompts, max_retries=max_retries)

    def __call__(self, state: SummaryNodeState) -> dict[str, Any]:
        """The node's update for ``state`` (its type tells LangGraph which state keys the
        node uses, as :meth:`ReasoningNode.__call__`'s does)."""
        return self.invoke(state)

    def _structured_output(self, state: dict[str, Any]) -> dict[str, object]:
        # Exactly the text the summary agent is trained on (format_verdict).
        return self.profile.summary_constraint()

    def _conversation(self, state: dict[str, Any]) -> Exchange[Verdict] | None:
        messages = summary_messages(prompts=self.prompts, question=state["question"],
                                    images=state.get("images") or [],
                                    steps=state.get("steps") or [],
                                    render=self.profile.render_reasoning)
        return self._ask(messages, self.profile.parse_summary)

    def _update(self, state: dict[str, Any], outcome: Outcome[Any] | None,
                runtime: Runtime[Any] | None) -> dict[str, Any]:
        assert outcome is not None
        verdict = outcome.value
        reasoning = self.profile.render_reasoning(state.get("steps") or [], self.prompts)
        if verdict is None:
            failure = self._unreadable(state, outcome, runtime)
            return {"verdict": None, "answer": "", "reasoning": reasoning, "status": "failed",
                    "failures": [failure]}
        emit_event(runtime, {"event": "verdict", "node": self.name,
                        "revision": state.get("revision", 0), "verdict": verdict})
        return {"verdict": verdict, "answer": verdict["answer"], "reasoning": reasoning,
                "status": "ok"}


class FinalAnswerNode(ModelNode):
    """Asks the reasoning model for the final answer after its last step (data synthesis).

    Skipped (no call) when the reasoning has no steps or failed; otherwise writes ``answer``,
    or records a failure and writes an empty answer when the reply cannot be read.

    Args:
        model: the chat model that wrote the reasoning (the teacher).
        max_retries: re-asks after an unreadable reply before recording a failure.
        prompts: the prompt texts.
        reasoning_node: the name of the node whose failures make the reasoning unusable.
        name: the node's name.
        context_keys: attributes of the run-time context that can replace ``model``.
    """

    def __init__(
        self,
        model: LanguageModelLike,
        *,
        max_retries: int = 2,
        prompts: Prompts = DEFAULT_PROMPTS,
        reasoning_node: str = "reason",
        name: str = "final_answer",
        context_keys: Sequence[str] = ("reasoner",),
    ) -> None:
        super().__init__(model, name=name, context_keys=context_keys, prompts=prompts,
                         max_retries=max_retries)
        self.reasoning_node = reasoning_node

    def __call__(self, state: FinalAnswerNodeState) -> dict[str, Any]:
        """The node's update for ``state`` (its type tells LangGraph which state keys the
        node uses, as :meth:`ReasoningNode.__call__`'s does)."""
        return self.invoke(state)

    def _json_schema(self, state: dict[str, Any]) -> dict[str, object]:
        return answer_json_schema()

    def usable(self, state: Mapping[str, Any]) -> bool:
        """Whether the reasoning can be answered from: it has steps and no unreadable reply."""
        return reasoning_usable(state, self.reasoning_node)

    def _conversation(self, state: dict[str, Any]) -> Exchange[str] | None:
        if not self.usable(state):
            return None
        messages = final_answer_messages(prompts=self.prompts, question=state["question"],
                                         images=state.get("images") or [],
                                         steps=state.get("steps") or [])
        return self._ask(messages, parse_answer)

    def _update(self, state: dict[str, Any], outcome: Outcome[Any] | None,
                runtime: Runtime[Any] | None) -> dict[str, Any]:
        if outcome is None:
            return {"answer": ""}
        answer = outcome.value
        if answer is None:
            failure = self._unreadable(state, outcome, runtime)
            return {"answer": "", "failures": [failure]}
        emit_event(runtime, {"event": "answer", "node": self.name, "answer": answer})
        return {"answer": answer}


def reasoning_usable(state: Mapping[str, Any], reasoning_node: str = "reason") -> bool:
    """Whether a state's reasoning can be answered from: it has steps and
    ``reasoning_node`` left no unreadable reply."""
    return bool(state.get("steps")) and not any(
        f["node"] == reasoning_node and f["kind"] == "unparsable"
        for f in state.get("failures") or [])
