"""What the harness models run: a method of ``insightv eval`` answering a harness's questions.

A harness hands over questions as it builds them (its prompt text, with the options of a
multiple-choice item written into it, and the item's images). :class:`HarnessAgent` answers
them with the same models and graph ``insightv eval`` would build from the same settings
(:class:`~insightv_agents.methods.Evaluation`), many at once on one event loop of its
own, and gives each answer in the form benchmark scorers read (:func:`benchmark_answer`: the
option letter, a bare number, Yes/No, else the short answer). With a ``log_dir`` every
prediction — reasoning steps, the summary agent's verdict, a search's stages — is appended to
``<log_dir>/<group>/predictions.jsonl`` as it is made (``insightv eval``'s format, without the
truth the harness alone knows), and a rerun with the same settings takes the answers kept
there instead of asking the models again.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insightv_agents.answers import choice_letter, parse_number
from insightv_agents.errors import ConfigError, InvalidInputError, check_int
from insightv_agents.evaluate import PREDICTIONS_FILE, start_evaluation
from insightv_agents.methods import METHODS, Evaluation
from insightv_agents.records import RecordLog, read_records
from insightv_agents.synthesize import Item

_MAX_PROMPT_CHARS = 200_000  # options are looked for in this much of a prompt
# A lettered option on a line of its own: "A. text", "(A) text", "A) text", "A: text".
_OPTION = re.compile(r"^[ \t]*+(?:\(([A-Z])\)|([A-Z])[.):])[ \t]++(\S[^\n]*)$", re.M)
_YES_NO = re.compile(r"(yes|no)(?:$|[,.;:!])", re.I)  # "Yes", "No, ...": not "no smoking"
METHOD_NAMES = ("insightv", "direct", *METHODS)
"""The methods a harness model runs: ``insightv eval --method``'s."""


@dataclass(frozen=True)
class HarnessQuestion:
    """One question as a harness gives it.

    Attributes:
        id: the harness's name for it (kept in the log; unique within a group).
        images: its images: ``PIL.Image`` objects, file paths or encoded bytes.
        prompt: the text the harness built (question, options, instructions).
    """

    id: str
    images: Sequence[Any]
    prompt: str


@dataclass(frozen=True)
class HarnessSettings:
    """Which models and method a harness model runs: ``insightv eval``'s options, by name.

    With neither ``base_url`` nor ``local_model`` the ``insightv`` method runs the demo
    agents. Several ``base_url`` entries are the replicas of one endpoint pool.
    """

    method: str = "insightv"
    base_url: tuple[str, ...] = ()
    model: str = "insightv-reason"
    summary_base_url: tuple[str, ...] = ()
    summary_model: str | None = None
    local_model: str | None = None
    local_adapter: str | None = None
    mode: str | None = None
    max_steps: int = 16
    temperature: float | None = None
    beam_size: int = 2
    concurrency: int = 8
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"method must be one of {', '.join(METHOD_NAMES)}; "
                              f"not {self.method!r}.")
        check_int("concurrency", self.concurrency, 1, 4096)
        check_int("max_steps", self.max_steps, 1, 256)
        check_int("beam_size", self.beam_size, 2, 64)

    def evaluation(self) -> Evaluation:
        """The same run as ``insightv eval`` with these options."""
        return Evaluation(method=self.method, data="", root="", base_url=self.base_url,
                          local_model=self.local_model, local_adapter=self.local_adapter,
                          model=self.model, summary_base_url=self.summary_base_url,
                          summary_model=self.summary_model, mode=self.mode,
                          max_steps=self.max_steps, temperature=self.temperature,
                          beam_size=self.beam_size, checks=None, limit=None, labels=None)


class HarnessAgent:
    """Answers a harness's questions with a method of ``insightv eval``.

    Args:
        settings: the models and method (:class:`HarnessSettings`); they are built here,
            once (a bad setting is refused before any question is asked).
        harness: the harness's name, kept in each log folder's ``eval.json``.

    Raises:
        ConfigError: for bad settings, or a ``log_dir`` holding a run with other settings.
    """

    def __init__(self, settings: HarnessSettings, *, harness: str) -> None:
        self.settings = settings
        backend, described, judged = settings.evaluation().build()
        self.backend = backend
        self.description = {**described, "harness": harness}
        del self.description["data"], self.description["limit"]
        self._predict = judged["predict"]
        self._logs: dict[str, tuple[RecordLog, dict[str, dict[str, Any]]]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="insightv harness loop")
        self._thread.start()
        self._slots = asyncio.Semaphore(settings.concurrency)

    def answer(self, questions: Sequence[HarnessQuestion], *, group: str = "default",
               on_answer: Callable[[dict[str, Any]], None] | None = None
               ) -> list[dict[str, Any]]:
        """The predictions for ``questions``, in their order, at most ``concurrency`` asked
        at once; callable from any thread (each call waits for its own questions).

        Each prediction holds ``answer`` (the form benchmark scorers read), ``agent_answer``
        (the method's own answer), ``status``, ``seconds`` and what the method gave
        (``steps``, ``reasoning``, ``verdict``, ``stages``, ``failures``). A question the
        method cannot answer (a model error, an unreadable image) gets ``status`` "failed"
        and an empty answer: one wrong item, not a stopped benchmark.
        """
        if not self._loop.is_running():
            raise ConfigError("this harness agent is closed.")
        return asyncio.run_coroutine_threadsafe(
            self._answer_all(list(questions), group, on_answer), self._loop).result()

    def close(self) -> None:
        """Close the logs and stop the event loop (the agent answers nothing afterwards)."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        for log, _ in self._logs.values():
            log.close()
        self._logs.clear()

    async def _answer_all(self, questions: list[HarnessQuestion], group: str,
                          on_answer: Callable[[dict[str, Any]], None] | None
                          ) -> list[dict[str, Any]]:
        log = self._log(group)

        async def one(question: HarnessQuestion) -> dict[str, Any]:
            kept = log[1].get(question.id) if log else None
            if kept is not None:
                row = kept
            else:
                async with self._slots:
                    row = await self._answer_one(question)
                if log is not None and question.id not in log[0].finished:
                    log[0].append([row])
                    log[1][question.id] = row
            if on_answer is not None:
                on_answer(row)
            return row

        return list(await asyncio.gather(*(one(question) for question in questions)))

    async def _answer_one(self, question: HarnessQuestion) -> dict[str, Any]:
        started = time.perf_counter()
        images = [_encoded(image) for image in question.images]
        item = Item(id=question.id, image=images[0] if len(images) == 1 else images,
                    image_ref="", image_root="", question=question.prompt, answer="",
                    choices=None, category=None, line=0)
        try:
            if not images:
                raise InvalidInputError("the question has no image.", field="image")
            result = await self._predict(item)
        except Exception as err:  # one failed question, not a stopped benchmark
            result = {"answer": "", "status": "failed",
                      "failures": [{"node": "predict", "kind": "error",
                                    "error": repr(err)[:500]}]}
        agent_answer = str(result.get("answer") or "")
        return {"id": question.id, "records": 1, "question": question.prompt,
                "answer": benchmark_answer(agent_answer, prompt_options(question.prompt)),
                "agent_answer": agent_answer, "status": result.get("status", "ok"),
                "seconds": round(time.perf_counter() - started, 3),
                **{key: value for key, value in result.items()
                   if key not in ("answer", "status")}}

    def _log(self, group: str) -> tuple[RecordLog, dict[str, dict[str, Any]]] | None:
        """The open log of ``group`` and the predictions it holds (``None``: no log_dir)."""
        if self.settings.log_dir is None:
            return None
        if group not in self._logs:
            if not group or Path(group).name != group:
                raise ConfigError(f"a log group is a plain folder name, not {group!r}.")
            folder = start_evaluation(Path(self.settings.log_dir) / group,
                                      {**self.description, "group": group})
            log = RecordLog(folder / PREDICTIONS_FILE, size="records")
            kept = {str(row["id"]): row for row in read_records(log.path)
                    if str(row["id"]) in log.finished}
            self._logs[group] = (log, kept)
        return self._logs[group]


def prompt_options(prompt: str) -> list[str]:
    """The lettered options a prompt lists one per line ("A. text", "(A) text", "A) text",
    "A: text"), in order from A; ``[]`` when it lists fewer than two. Linear in the prompt.

    >>> prompt_options("How many?\\nOptions:\\n(A) two\\n(B) three")
    ['two', 'three']
    >>> prompt_options("Question: Is it red?")
    []
    """
    found: list[str] = []
    for match in _OPTION.finditer(prompt[:_MAX_PROMPT_CHARS]):
        letter = match[1] or match[2]
        if letter == "A":
            found = [match[3].strip()]  # a (new) list starts
        elif found and ord(letter) - ord("A") == len(found):
            found.append(match[3].strip())
    return found if len(found) >= 2 else []


def benchmark_answer(answer: str, options: Sequence[str] = ()) -> str:
    """``answer`` in the form benchmark scorers read: the option letter when the question
    has ``options`` and the answer names one (by letter or by its text); a bare number for
    a number with a unit, currency or percent sign; "Yes"/"No" for an answer that starts
    with one; else the answer itself, without a final full stop.

    >>> benchmark_answer("(b) three", ["two", "three"]), benchmark_answer("three", ["two", "three"])
    ('B', 'B')
    >>> benchmark_answer("12 squares"), benchmark_answer("$1,250.50")
    ('12', '1250.5')
    >>> benchmark_answer("Yes, both."), benchmark_answer("no smoking sign")
    ('Yes', 'no smoking sign')
    >>> benchmark_answer("a red circle.")
    'a red circle'
    """
    text = answer.strip().rstrip(".").strip()
    if options:
        letter = choice_letter(text, options)
        if letter is not None:
            return letter
    number = parse_number(text) if "/" not in text else None  # a fraction stays as written
    if number is not None:
        return str(int(number)) if number.is_integer() and abs(number) < 1e15 \
            else f"{number:.10g}"
    yes_no = _YES_NO.match(text)
    return yes_no[1].capitalize() if yes_no else text


def question_id(prompt: str, images: Sequence[Any]) -> str:
    """A stable name for a question its harness does not name: a hash of its text and of
    its images (paths as given, other images by content)."""
    digest = hashlib.sha256(prompt.encode())
    for image in images:
        digest.update(image.encode() if isinstance(image, str) else _encoded(image))
    return digest.hexdigest()[:16]


def _encoded(image: Any) -> Any:
    """A path or bytes stay as they are; a ``PIL.Image`` becomes PNG bytes (its pixels, as
    the models see them)."""
    if isinstance(image, str | bytes):
        return image
    if isinstance(image, Path):
        return str(image)
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidInputError(f"unsupported image type {type(image).__name__}.", field="image")
