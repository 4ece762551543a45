"""Test helpers for insightv-agents and for applications built on it.

:class:`ScriptedChatModel` is a LangChain chat model that replies with given texts and
records every conversation it was sent, so tests can drive a graph without a real model
and assert what the model saw.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr

Reply = str | Callable[[list[BaseMessage]], str]
"""A scripted reply: a text, or a function of the conversation that returns one."""


class ScriptedChatModel(BaseChatModel):
    """A chat model that returns scripted replies in order and records what it was sent.

    Args:
        replies: the replies, used in order. A reply may be a function of the messages.
        cycle: start again from the first reply when all are used (otherwise running out
            raises ``RuntimeError``, which makes a test that calls the model too often fail).

    Example:
        >>> model = ScriptedChatModel(["first", "second"])
        >>> model.invoke("hi").content, model.invoke("again").content
        ('first', 'second')
        >>> len(model.calls)
        2
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    replies: Sequence[Reply] = Field(default_factory=list)
    cycle: bool = False
    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, replies: Sequence[Reply] = (), **kwargs: Any) -> None:
        super().__init__(replies=list(replies), **kwargs)

    @property
    def calls(self) -> list[list[BaseMessage]]:
        """Every conversation sent to the model, in order."""
        return list(self._calls)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        with self._lock:
            index = len(self._calls)
            self._calls.append(list(messages))
        if not self.replies:
            raise RuntimeError("ScriptedChatModel has no replies to give.")
        if index >= len(self.replies) and not self.cycle:
            raise RuntimeError(f"ScriptedChatModel ran out of replies: call {index + 1}, "
                               f"{len(self.replies)} scripted.")
        reply = self.replies[index % len(self.replies)]
        text = reply(list(messages)) if callable(reply) else reply
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])
