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

from insightv_agents.cards import AgentCard

Reply = str | Callable[[list[BaseMessage]], str]
"""A scripted reply: a text, or a function of the conversation that returns one."""


class ScriptedChatModel(BaseChatModel):
    """A chat model that returns scripted replies in order and records what it was sent.

    Args:
        replies: the replies, used in order. A reply may be a function of the messages;
            such functions are called one at a time, even when requests arrive in parallel
            (``batch``), so they may keep state.
        cycle: start again from the first reply when all are used (otherwise running out
            raises ``RuntimeError``, which makes a test that calls the model too often fail).
        n: replies per call (a call may also pass ``n``): like a backend that samples
            several candidates in one request.
        agent_card: the agent card it stands in with (:mod:`~insightv_agents.cards`), as a
            trained agent's backend carries one.

    Examples:
        >>> model = ScriptedChatModel(["first", "second"])
        >>> model.invoke("hi").content, model.invoke("again").content
        ('first', 'second')
        >>> len(model.calls)
        2
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    replies: Sequence[Reply] = Field(default_factory=list)
    cycle: bool = False
    n: int = 1
    agent_card: AgentCard | None = None
    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _used: int = PrivateAttr(default=0)

    def __init__(self, replies: Sequence[Reply] = (), **kwargs: Any) -> None:
        super().__init__(replies=list(replies), **kwargs)

    @property
    def calls(self) -> list[list[BaseMessage]]:
        """Every conversation sent to the model, in order (a call with ``n`` is one call)."""
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
        """The next reply, or the next ``n`` replies (``n`` samples in one call)."""
        count = int(kwargs.get("n", self.n))
        generations = []
        with self._lock:
            first = self._used
            self._used += count
            self._calls.append(list(messages))
            if not self.replies:
                raise RuntimeError("ScriptedChatModel has no replies to give.")
            if first + count > len(self.replies) and not self.cycle:
                raise RuntimeError(f"ScriptedChatModel ran out of replies: reply "
                                   f"{first + count}, {len(self.replies)} scripted.")
            for index in range(first, first + count):
                reply = self.replies[index % len(self.replies)]
                text = reply(list(messages)) if callable(reply) else reply
                generations.append(ChatGeneration(message=AIMessage(content=text)))
        return ChatResult(generations=generations)


# Tiny models of real architectures, built offline (kept importable from here).
from insightv_agents.tiny import (  # noqa: E402
    IDEFICS3_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    build_tiny_idefics3,
    build_tiny_llava,
)

__all__ = ["IDEFICS3_CHAT_TEMPLATE", "LLAVA_CHAT_TEMPLATE", "ScriptedChatModel",
           "build_tiny_idefics3", "build_tiny_llava"]
