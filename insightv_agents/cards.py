"""Agent cards: how a trained agent is driven, written beside its weights.

A model folder (a full model, or a LoRA adapter) holds ``insightv_agent.json``: the agent's
role, its format profile (:mod:`~insightv_agents.formats`), the prompts it was trained with,
its answer rules, recommended sampling and context length. The trainers and the demo export
write it; the backends read it (``ChatTransformersVLM`` from its folder, ``vllm_chat_model``
from the folder the server names for the model), and the graphs and the command line follow
it unless told otherwise, so an agent gives the same answers however it is run. A folder
without a card works as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from insightv_agents.errors import ConfigError, validation_problem

CARD_FILE = "insightv_agent.json"

Role = Literal["reasoning", "summary", "both"]


MAX_TEMPERATURE = 10.0
"""The highest sampling temperature a card or a vLLM client takes."""
MAX_TOKENS = 1_000_000
"""The most tokens a reply may be asked for (a card's ``max_tokens``, a vLLM client's)."""


class Sampling(BaseModel):
    """Recommended sampling: what a backend uses when the caller sets nothing. Values are
    JSON numbers (not strings or booleans) in range: ``temperature`` from 0 to 10,
    ``top_p`` above 0 up to 1, ``max_tokens`` from 1 to 1,000,000."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)


class AgentCard(BaseModel):
    """How an agent is driven.

    Args:
        role: ``"reasoning"``, ``"summary"``, or ``"both"`` (one model plays both agents).
        profile: the name of its format profile (``"steps"``, ``"chain"``,
            ``"insightv-reference"``, ``"llava-cot"``).
        prompts: the fields of :class:`~insightv_agents.prompts.Prompts` it was trained with
            that differ from the profile's (``images_after_text`` included).
        answer_rules: fields of :class:`~insightv_agents.answers.AnswerRules` for checking
            its answers (``labels`` as a list).
        sampling: recommended sampling.
        max_model_len: the longest prompt and reply it takes, in tokens.
        dtype: the precision it runs in (``float32``, ``bfloat16``, ``float16``), where it
            matters: greedy replies can differ between precisions, so an agent measured in
            one is served in it (``insightv serve``, ``ChatTransformersVLM``) by default.
        description: what it is, for people.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    profile: str = "steps"
    prompts: dict[str, Any] = Field(default_factory=dict)
    answer_rules: dict[str, Any] = Field(default_factory=dict)
    sampling: Sampling = Field(default_factory=Sampling)
    max_model_len: int | None = Field(None, ge=16)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    description: str = ""

    def save(self, folder: str | Path) -> Path:
        """Write the card into ``folder`` (atomically); returns its path."""
        path = Path(folder).expanduser() / CARD_FILE
        temporary = path.with_name(f".{CARD_FILE}.tmp")
        temporary.write_text(self.model_dump_json(indent=2, exclude_defaults=True) + "\n")
        os.replace(temporary, path)
        return path


def read_card(folder: str | Path | None) -> AgentCard | None:
    """The card in ``folder`` (a model or adapter folder), ``None`` where it has none.

    Raises:
        ConfigError: for a card that cannot be read.
    """
    if folder is None:
        return None
    path = Path(folder).expanduser() / CARD_FILE
    if not path.is_file():
        return None
    try:
        return AgentCard.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError) as err:
        raise ConfigError(f"{path}: not a valid agent card ({validation_problem(err)}).") \
            from None


def card_of(model: Any) -> AgentCard | None:
    """The card a chat model carries (``agent_card``), also behind ``.bind(...)``."""
    bound = getattr(model, "bound", None)
    card = getattr(model, "agent_card", None)
    if card is None and bound is not None:
        card = getattr(bound, "agent_card", None)
    return card if isinstance(card, AgentCard) else None
