"""Our methods as a VLMEvalKit model.

VLMEvalKit is not on PyPI and loads models only from its own ``vlmeval/config.py``, so
:class:`InsightVModel` implements its documented model interface (that of
``vlmeval.vlm.base.BaseModel``) without importing it, and :data:`REGISTRATION` is what to
add at the end of ``vlmeval/config.py`` in a VLMEvalKit checkout (after
``pip install insightv-agents[vllm,hf]`` in its environment)::

    python run.py --data MMStar --model insightv-demo

VLMEvalKit hands each benchmark item over as a message, ``[{"type": "image", "value":
PATH}, ..., {"type": "text", "value": TEXT}]``. :meth:`InsightVModel.build_prompt` writes
that message for every benchmark (``use_custom_prompt``): the hint and question, and a
multiple-choice item's options in the form our agents are trained on; :meth:`generate`
answers it with ``insightv eval``'s method and models and returns the answer in the form
VLMEvalKit's scorers read (the option letter, a number, Yes/No, a short answer).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from insightv_agents.errors import InvalidInputError
from insightv_agents.harnesses.agent import (
    HarnessAgent,
    HarnessQuestion,
    HarnessSettings,
    question_id,
)
from insightv_agents.prompts import DEFAULT_PROMPTS, format_question

Message = list[dict[str, str]]
"""VLMEvalKit's message: ``{"type": "image" | "text", "value": str}`` items."""

REGISTRATION = '''\
# insightv-agents (https://github.com/insightv-agents): our methods as VLMEvalKit models.
from functools import partial as _partial

from insightv_agents.harnesses.vlmevalkit import InsightVModel

supported_VLM.update({
    # the demo agents of the shapes world, in-process: a check that the wiring works
    "insightv-demo": _partial(InsightVModel),
    # two agents served by vLLM (`insightv serve` or `vllm serve`), replicas as a list
    "insightv": _partial(InsightVModel, base_url="http://localhost:8000/v1",
                         model="insightv-reason", summary_model="insightv-summary",
                         log_dir="outputs/insightv-predictions"),
    # LLaVA-CoT with its stage-level beam search (beam 2, as the paper's table)
    "llava-cot-beam": _partial(InsightVModel, method="stage-beam", beam_size=2,
                               base_url="http://localhost:8000/v1", model="llava-cot"),
})
'''
"""The lines that register :class:`InsightVModel` in VLMEvalKit's ``vlmeval/config.py``
(appended at its end, where ``supported_VLM`` is defined); edit the URLs and names."""


class InsightVModel:
    """A method of ``insightv eval`` behind VLMEvalKit's model interface.

    Args: ``insightv eval``'s options (:class:`~insightv_agents.harnesses.agent.
    HarnessSettings`): ``method`` (``insightv``, ``direct``, ``stage-beam``, ``best-of-n``,
    ``sentence-beam``, ``single``), ``base_url`` (a URL or a list: a pool), ``model``,
    ``summary_base_url``, ``summary_model``, ``local_model``, ``local_adapter``, ``mode``,
    ``max_steps``, ``temperature``, ``beam_size``, and ``log_dir`` (every prediction's
    reasoning, verdict and search, a folder per benchmark). VLMEvalKit asks one question at
    a time (several processes with ``torchrun`` ask in parallel). With
    ``custom_prompt=False`` VLMEvalKit builds each benchmark's prompt itself; the options
    are then read from its text.
    """

    INTERLEAVE = False
    allowed_types = ("text", "image")
    is_api = False
    VIDEO_LLM = False

    def __init__(self, method: str = "insightv", *, base_url: str | Sequence[str] = (),
                 custom_prompt: bool = True, **settings: Any) -> None:
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        summary = settings.pop("summary_base_url", ())
        summary_urls = (summary,) if isinstance(summary, str) else tuple(summary)
        try:
            chosen = HarnessSettings(method=method, base_url=urls,
                                     summary_base_url=summary_urls, **settings)
        except TypeError as err:
            raise InvalidInputError(f"InsightVModel: {err}", field="settings") from None
        self.agent = HarnessAgent(chosen, harness="vlmevalkit")
        self.custom_prompt = custom_prompt
        self.dump_image_func: Callable[[Any], Any] | None = None

    # --- VLMEvalKit's BaseModel interface ------------------------------------------------------

    def use_custom_prompt(self, dataset: str | None) -> bool:
        """Whether :meth:`build_prompt` writes the prompt (for every benchmark, unless
        ``custom_prompt=False``)."""
        return self.custom_prompt

    def set_dump_image(self, dump_image_func: Callable[[Any], Any]) -> None:
        """VLMEvalKit hands over its dataset's ``dump_image`` (a row to image paths)."""
        self.dump_image_func = dump_image_func

    def dump_image(self, line: Any, dataset: str | None = None) -> list[str]:
        """The row's images as local files (by the dataset's ``dump_image``)."""
        if self.dump_image_func is None:
            raise InvalidInputError("no dump_image function: VLMEvalKit sets one with "
                                    "set_dump_image before asking for prompts.")
        paths = self.dump_image_func(line)
        return [paths] if isinstance(paths, str) else list(paths)

    def build_prompt(self, line: Any, dataset: str | None = None) -> Message:
        """The message for one benchmark row (a ``pandas.Series`` of its TSV): its images,
        then its hint and question, with the options ``A``, ``B``, ... as our agents read
        them (``insightv eval``'s question text)."""
        question = str(line["question"])
        hint = _value(line, "hint")
        if hint is not None:
            question = f"Hint: {hint}\n{question}"
        options = []
        for letter in string.ascii_uppercase:
            option = _value(line, letter)
            if option is None:
                break
            options.append(option)
        text = format_question(question, options or None, DEFAULT_PROMPTS)
        images = self.dump_image(line, dataset)
        return [*({"type": "image", "value": path} for path in images),
                {"type": "text", "value": text}]

    def generate(self, message: Any, dataset: str | None = None) -> str:
        """The answer to one message (a string, a list of strings — image paths and text —
        or a list of ``{"type", "value"}`` items), as VLMEvalKit's ``BaseModel.generate``
        takes it."""
        return self.generate_inner(_message(message), dataset)

    def generate_inner(self, message: Message, dataset: str | None = None) -> str:
        """The answer to one message, in the form VLMEvalKit's scorers read; its reasoning,
        verdict and search are kept in ``log_dir/<dataset>`` when a ``log_dir`` is set."""
        images = [item["value"] for item in message if item["type"] == "image"]
        text = "\n".join(item["value"] for item in message if item["type"] == "text")
        question = HarnessQuestion(id=question_id(text, images), images=images, prompt=text)
        (row,) = self.agent.answer([question], group=dataset or "default")
        return str(row["answer"])

    def close(self) -> None:
        """Stop the agent's event loop and close its logs."""
        self.agent.close()


def _value(line: Any, key: str) -> str | None:
    """A row's field, ``None`` when it is missing or empty (NaN in a pandas row)."""
    try:
        value = line[key]
    except (KeyError, IndexError):
        return None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _message(message: Any) -> Message:
    """A message in any form ``BaseModel.generate`` accepts, as ``{"type", "value"}`` items
    (a string naming an existing image file is an image; other strings are text).

    Raises:
        InvalidInputError: for another form, or an item type this model does not read
            (video).
    """
    if isinstance(message, str | dict):
        message = [message]
    if not isinstance(message, list) or not message:
        raise InvalidInputError("a message is a string, a dict or a non-empty list of them.",
                                field="message")
    items = []
    for item in message:
        if isinstance(item, str):
            kind = "image" if Path(item).suffix.lower() in _IMAGE_SUFFIXES \
                and Path(item).is_file() else "text"
            items.append({"type": kind, "value": item})
        elif isinstance(item, dict) and item.get("type") in InsightVModel.allowed_types:
            items.append({"type": str(item["type"]), "value": str(item["value"])})
        else:
            raise InvalidInputError(f"unsupported message item {item!r:.80}: text and images "
                                    "only.", field="message")
    return items


_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
