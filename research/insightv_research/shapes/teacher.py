"""The shapes world's teacher: a chat model that writes reasoning paths from the scene
description of the image it is shown, for the synthesis pipeline (or as an oracle
reasoning agent).

It answers the library's own reasoning conversations (:mod:`~insightv_agents.prompts`): one
step per call in step mode, the whole chain in chain mode, and ``{"answer": ...}`` when asked
for the final answer. At a path's first step it draws a strategy and, with probability
``flaw_rate``, one to ``max_flaws`` flaws (:mod:`~insightv_research.shapes.reasoning`); later
calls continue a path drawn earlier whose steps so far are the ones in the conversation.
With a ``seed``, the k-th path drawn for an (image, question) comes from a generator seeded
by the seed, the scene, the question and k: the same paths whatever order concurrent
requests arrive in (the synthesis graph samples paths and questions in parallel threads).
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr

from insightv_agents.errors import InvalidInputError
from insightv_agents.parsing import format_chain, format_step, parse_steps
from insightv_agents.prompts import DEFAULT_PROMPTS, Prompts
from insightv_agents.schema import ReasoningStep
from insightv_research.shapes.questions import Query, parse_question
from insightv_research.shapes.reasoning import STRATEGIES, Path, Strategy, draw_flaws, plan_path
from insightv_research.shapes.scenes import Scene, SceneIndex


class SceneTeacher(BaseChatModel):
    """Writes reasoning paths grounded in the scene description (see the module docstring).

    Args:
        index: the scenes, found by the image in the conversation.
        flaw_rate: share of paths with flaws.
        max_flaws: most flaws in one path.
        strategies: the strategies drawn from.
        plan_step: write each path's plan as its second step (see
            :mod:`~insightv_research.shapes.reasoning`).
        plan_first: with ``plan_step``, the plan comes first, before the description.
        seed: seeds the draws (``None``: fresh ones), per (scene, question, k-th path).
        prompts: the prompts the conversations are built with (to read them back).
        max_questions: paths are remembered for this many (image, question) pairs.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: SceneIndex
    flaw_rate: float = Field(0.25, ge=0, le=1)
    max_flaws: int = Field(2, ge=1, le=4)
    strategies: tuple[Strategy, ...] = STRATEGIES
    plan_step: bool = False
    plan_first: bool = False
    seed: int | None = None
    prompts: Prompts = DEFAULT_PROMPTS
    max_questions: int = Field(10_000, ge=1)
    n: int = 1
    _rng: random.Random = PrivateAttr()
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _paths: OrderedDict[tuple[Scene, str], list[Path]] = PrivateAttr(default_factory=OrderedDict)
    _draws: OrderedDict[tuple[Scene, str], int] = PrivateAttr(default_factory=OrderedDict)

    def model_post_init(self, context: Any) -> None:
        self._rng = random.Random(self.seed)

    @property
    def _llm_type(self) -> str:
        return "shapes-teacher"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"flaw_rate": self.flaw_rate, "max_flaws": self.max_flaws,
                "strategies": list(self.strategies), "plan_step": self.plan_step,
                "plan_first": self.plan_first,
                "seed": self.seed}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any
                  ) -> ChatResult:
        image, question = self._read_request(messages)
        scene = self.index.lookup(image)
        query = parse_question(question)
        steps = [step for message in messages[2:] if isinstance(message, AIMessage)
                 for step in parse_steps(str(message.content))]
        chain = isinstance(messages[0], SystemMessage) and \
            messages[0].content == self.prompts.reasoning_chain_system
        asks_answer = isinstance(messages[-1], HumanMessage) and \
            messages[-1].content == self.prompts.final_answer
        replies = []
        for _ in range(int(kwargs.get("n", self.n))):
            path = self._path(scene, query, question, steps)
            if asks_answer:
                replies.append(json.dumps({"answer": path.answer}))
            elif chain:
                replies.append(format_chain(path.steps[len(steps):] or path.steps[-1:]))
            else:
                replies.append(format_step(path.steps[min(len(steps), len(path.steps) - 1)]))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))
                                       for text in replies])

    def draw_path(self, scene: Scene, query: Query, rng: random.Random | None = None) -> Path:
        """A new path for ``query``: a drawn strategy, and flaws at ``flaw_rate`` (drawn
        from ``rng``; default: the teacher's own generator)."""
        with self._lock:
            rng = rng or self._rng
            strategy = rng.choice(self.strategies)
            flawed = rng.random() < self.flaw_rate
            amount = rng.randint(1, self.max_flaws)
            attempts = [draw_flaws(scene, query, rng, amount) for _ in range(4)] \
                if flawed else []
        for flaws in attempts:
            try:
                return plan_path(scene, query, strategy=strategy, flaws=flaws,
                                 plan_step=self.plan_step, plan_first=self.plan_first)
            except InvalidInputError:
                continue  # the flaws hid what the question names: draw others
        return plan_path(scene, query, strategy=strategy, plan_step=self.plan_step,
                         plan_first=self.plan_first)

    def _path(self, scene: Scene, query: Query, question: str,
              steps: Sequence[ReasoningStep]) -> Path:
        key = (scene, question)
        if steps:
            with self._lock:
                known = [p for p in self._paths.get(key, []) if _starts(p, steps)]
                if known:
                    return self._rng.choice(known)
        with self._lock:  # which path of this question it is, reserved before drawing
            drawn = self._draws.pop(key, 0)
            self._draws[key] = drawn + 1
            while len(self._draws) > self.max_questions:
                self._draws.popitem(last=False)
        rng = None if self.seed is None else random.Random(
            f"{self.seed}|{json.dumps(scene.to_dict(), sort_keys=True)}|{question}|{drawn}")
        path = self.draw_path(scene, query, rng)
        with self._lock:
            self._paths.setdefault(key, []).append(path)
            self._paths.move_to_end(key)
            while len(self._paths) > self.max_questions:
                self._paths.popitem(last=False)
        return path

    def _read_request(self, messages: list[BaseMessage]) -> tuple[str, str]:
        """The image (data URL) and question of a reasoning conversation."""
        for message in messages:
            if isinstance(message, HumanMessage) and isinstance(message.content, list):
                images = [part["image_url"]["url"] for part in message.content
                          if isinstance(part, dict) and part.get("type") == "image_url"]
                texts = [part["text"] for part in message.content
                         if isinstance(part, dict) and part.get("type") == "text"]
                if images and texts:
                    return images[0], _strip_template(texts[0], self.prompts.question)
        raise InvalidInputError("the conversation has no image and question", field="messages")


def _starts(path: Path, steps: Sequence[ReasoningStep]) -> bool:
    return len(path.steps) >= len(steps) and all(
        (a["summary"], a["reasoning"]) == (b["summary"], b["reasoning"])
        for a, b in zip(path.steps, steps, strict=False))


def _strip_template(text: str, template: str) -> str:
    """The ``{question}`` in ``text`` written with ``template`` (the first paragraph)."""
    before, _, after = template.partition("{question}")
    pattern = re.escape(before) + r"(.*?)" + (re.escape(after) if after else "") + r"(?:\n\n|$)"
    match = re.match(pattern, text, re.S)
    return (match.group(1) if match else text).strip()
