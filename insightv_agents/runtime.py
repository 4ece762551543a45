"""The model-call runtime: how a node holds a conversation with a model.

- :class:`Outcome` / :data:`Exchange`: a conversation is a generator that yields the messages
  to send and receives each reply's text; it returns how it ended.
- :class:`ModelNode`: the base of every node that calls a model (model choice, constraints,
  bounded re-asks, one conversation for the sync and the async path).
- :func:`reply_text`, :func:`rejected_request`, :func:`current_runtime`, :func:`run_store`,
  :func:`emit_event`:
  what searches, judges and evaluation share with the nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from langchain_core.language_models import LanguageModelLike
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime, get_runtime
from langgraph.store.base import BaseStore
from langgraph.utils.runnable import RunnableCallable

from insightv_agents.backends.protocol import constrained
from insightv_agents.errors import ConfigError, ModelOutputError, check_int, model_call
from insightv_agents.image_store import aresolve_images, resolve_images
from insightv_agents.prompts import Prompts, reask_messages
from insightv_agents.schema import Failure

T = TypeVar("T")


class Outcome(NamedTuple, Generic[T]):
    """How a conversation with a model ended: the parsed value, or ``None`` after the re-asks."""

    value: T | None
    attempts: int
    error: str
    raw: str


# A conversation with a model: yields the messages to send, receives each reply's text.
Exchange = Generator[list[BaseMessage], str, Outcome[T]]


class ModelNode(RunnableCallable):
    """A graph node that holds a conversation with a model: the model chosen for the run (the
    run's context, else the node's own), constrained to the node's reply format where the
    backend can be, and each reply re-asked a bounded number of times until it parses.

    Subclasses write the conversation (:meth:`_conversation`, a generator over
    :meth:`_ask`) and what it writes back to the state (:meth:`_update`); the same
    conversation runs on the sync and the async path."""

    def __init__(
        self,
        model: LanguageModelLike,
        *,
        name: str,
        context_keys: Sequence[str],
        prompts: Prompts,
        max_retries: int,
    ) -> None:
        super().__init__(self._run, self._arun, name=name, trace=False)
        if model is None:
            raise ConfigError(f"the {name!r} node needs a chat model.")
        check_int("max_retries", max_retries, 0, 10)
        self.model = model
        self.context_keys = tuple(context_keys)
        self.prompts = prompts
        self.max_retries = max_retries

    # Subclasses implement the conversation and what to write back to the state.
    def _conversation(self, state: dict[str, Any]) -> Exchange[Any] | None:
        raise NotImplementedError

    def _update(self, state: dict[str, Any], outcome: Outcome[Any] | None,
                runtime: Runtime[Any] | None) -> dict[str, Any]:
        raise NotImplementedError

    def _run(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        runtime = current_runtime()
        state = {**state, "images": resolve_images(state.get("images"), run_store(runtime))}
        model = self._model(runtime, state)
        conversation = self._conversation(state)
        outcome = None
        if conversation is not None:
            with model_call(self.name or ""):
                outcome = finish(conversation,
                                 lambda messages: reply_text(model.invoke(messages, config)))
        return self._update(state, outcome, runtime)

    async def _arun(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        runtime = current_runtime()
        state = {**state,
                 "images": await aresolve_images(state.get("images"), run_store(runtime))}
        model = self._model(runtime, state)
        conversation = self._conversation(state)
        outcome = None
        if conversation is not None:
            with model_call(self.name or ""):
                outcome = await afinish(conversation, model, config)
        return self._update(state, outcome, runtime)

    def _json_schema(self, state: dict[str, Any]) -> dict[str, object]:
        raise NotImplementedError

    def _structured_output(self, state: dict[str, Any]) -> dict[str, object]:
        """What every reply must match, as vLLM's ``structured_outputs`` field. Nodes whose
        replies our trainers teach (steps, chains, verdicts) pin the exact trained text with
        a pattern; the teacher-facing ones give a bounded JSON schema."""
        return {"json": self._json_schema(state)}

    def _model(self, runtime: Runtime[Any] | None, state: dict[str, Any]) -> LanguageModelLike:
        """The model for this call: from the run's context, else the node's own; constrained
        to the node's reply format where the model supports it (vLLM)."""
        context = getattr(runtime, "context", None)
        chosen = next((getattr(context, key) for key in self.context_keys
                       if getattr(context, key, None) is not None), self.model)
        constraint = self._structured_output(state)
        return constrained(chosen, constraint) if constraint else chosen

    def _ask(self, messages: list[BaseMessage], parse: Callable[[str], T]) -> Exchange[T]:
        """Send ``messages``; re-ask with the error after an unreadable reply, a bounded
        number of times."""
        error, reply = "", ""
        for attempt in range(1, self.max_retries + 2):
            reply = yield messages
            try:
                return Outcome(parse(reply), attempt, "", reply)
            except ModelOutputError as err:
                error = str(err)
                messages = reask_messages(messages, reply, error, self.prompts)
        return Outcome(None, self.max_retries + 1, error, reply)

    def _unreadable(self, state: dict[str, Any], outcome: Outcome[Any],
                    runtime: Runtime[Any] | None) -> Failure:
        """The failure of a conversation that ended with no readable reply, streamed."""
        failure = self._failure(state, "unparsable", outcome.error, outcome.attempts,
                                outcome.raw)
        emit_event(runtime, {"event": "failure", "node": self.name, "failure": failure})
        return failure

    def _failure(self, state: dict[str, Any], kind: Any, error: str, attempts: int,
                 raw: str) -> Failure:
        return {"node": self.name or "", "revision": state.get("revision", 0), "kind": kind,
                "error": error, "attempts": attempts, "raw": raw[:2000]}


def finish(conversation: Exchange[T], call: Callable[[list[BaseMessage]], str]
           ) -> Outcome[T]:
    """Run ``conversation`` to its end, ``call`` answering each request (the sync driver)."""
    try:
        messages = next(conversation)
        while True:
            messages = conversation.send(call(messages))
    except StopIteration as stop:
        return stop.value


async def afinish(conversation: Exchange[T], model: LanguageModelLike, config: RunnableConfig
                  ) -> Outcome[T]:
    """Run ``conversation`` to its end, ``model`` answering each request (the async driver)."""
    try:
        messages = next(conversation)
        while True:
            messages = conversation.send(reply_text(await model.ainvoke(messages, config)))
    except StopIteration as stop:
        return stop.value


def reply_text(reply: Any) -> str:
    """The text of a model reply (a message or a plain string)."""
    if isinstance(reply, BaseMessage):
        return reply.text
    return reply if isinstance(reply, str) else str(reply)


def rejected_request(err: BaseException | None) -> bool:
    """Whether ``err`` is a server refusing the request itself (HTTP 400, 413 or 422: too
    long a prompt, say), which resending cannot fix; a 5xx, a timeout or a refused
    connection is not."""
    status = getattr(err, "status_code", None)
    if status is None:
        status = getattr(getattr(err, "response", None), "status_code", None)
    return status in (400, 413, 422)


def current_runtime() -> Runtime[Any] | None:
    """The LangGraph runtime of the current run, or ``None`` when called outside a graph."""
    try:
        return get_runtime()
    except RuntimeError:
        return None


def run_store(runtime: Runtime[Any] | None) -> BaseStore | None:
    """The store of the current run (where its images are kept), if the graph has one."""
    return getattr(runtime, "store", None)


def emit_event(runtime: Runtime[Any] | None, event: dict[str, Any]) -> None:
    """Stream ``event`` to the run's ``custom`` stream mode (nothing outside a graph)."""
    writer = getattr(runtime, "stream_writer", None)
    if writer is not None:
        writer(event)

