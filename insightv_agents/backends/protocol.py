"""What a backend may offer beyond LangChain's chat-model interface.

Any LangChain chat model can back a node. Some offer more, and the library uses it where
they do, doing without where they do not:

- :class:`StructuredOutputs`: replies constrained to a format while decoding (vLLM's
  structured outputs), so a weak model cannot write an unreadable reply.
- several samples per request (an ``n`` field, as OpenAI-compatible chat models have):
  :func:`chat_model_with_n` finds it, for searches that want k candidates at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from langchain_core.language_models import BaseChatModel, LanguageModelInput, LanguageModelLike
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable, RunnableBinding


@runtime_checkable
class StructuredOutputs(Protocol):
    """A model that can constrain its replies while decoding (``ChatVLLM``, for one)."""

    def bind_structured_outputs(self, constraint: Mapping[str, Any]
                                ) -> Runnable[LanguageModelInput, BaseMessage]:
        """This model with every reply following ``constraint``, in vLLM's
        ``structured_outputs`` terms: ``{"json": schema}``, ``{"regex": pattern}``,
        ``{"choice": [...]}`` or ``{"grammar": ebnf}``."""
        ...


def constrained(model: LanguageModelLike, constraint: Mapping[str, Any]) -> LanguageModelLike:
    """``model`` with its replies constrained to ``constraint`` where it can be
    (:class:`StructuredOutputs`), else ``model`` as it is (its replies are parsed anyway)."""
    if isinstance(model, StructuredOutputs):
        return model.bind_structured_outputs(constraint)
    return model


def unwrap(model: LanguageModelLike) -> tuple[Any, dict[str, Any]]:
    """The model behind a ``.bind(...)`` and the arguments bound to it."""
    if isinstance(model, RunnableBinding):
        return model.bound, dict(model.kwargs)
    return model, {}


def chat_model_with_n(model: LanguageModelLike) -> tuple[BaseChatModel, dict[str, Any]] | None:
    """The chat model behind ``model`` and its bound arguments, if it takes an ``n``
    (samples per request); ``None`` otherwise."""
    chat, kwargs = unwrap(model)
    if isinstance(chat, BaseChatModel) and "n" in type(chat).model_fields:
        return chat, kwargs
    return None
