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
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insightv_agents.answers import choice_letter
from insightv_agents.errors import ConfigError, InvalidInputError, check_int
from insightv_agents.evaluate import PREDICTIONS_FILE, start_evaluation
from insightv_agents.methods import METHODS, Evaluation
from insightv_agents.records import RecordLog, read_records
from insightv_agents.synthesize import Item

_MAX_PROMPT_CHARS = 200_000  # options are looked for in this much of a prompt
# A lettered option on a line of its own: "A. text", "(A) text", "A) text", "A: text".
_OPTION = re.compile(r"^[ \t]*+(?:\(([A-Z])\)|([A-Z])[.):])[ \t]++(\S[^\n]*)$", re.M)
# An option in a list on one line, after "Options:": "A: x, B: y", "(A) x (B) y".
_INLINE_OPTION = re.compile(r"(?:^|(?<=[\s,;]))\(?([A-Z])[:.)][ \t]*+")
_OPTIONS_MARKER = re.compile(r"\b(?:options|choices)[ \t]*+:", re.I)
_YES_NO = re.compile(r"(yes|no)(?:$|[,.;:!])", re.I)  # "Yes", "No, ...": not "no smoking"
# A number, with a currency sign before it or a percent sign or a word (a unit) after it.
_NUMBER = re.compile(r"[$€£¥]?[ \t]*+([-+\u2212]?\d[\d,]*+(?:\.\d++)?)"
                     r"(?:[ \t]*+%|[ \t]++[^\W\d_]{1,20}\.?)?")
_THOUSANDS = re.compile(r"[-+\u2212]?\d{1,3}(?:,\d{3})++(?:\.\d++)?")
FAILED_FILE = "failed.jsonl"
"""Beside a group's ``predictions.jsonl``: the questions that failed (asked again next run)."""
METHOD_NAMES = ("insightv", "direct", *METHODS)
"""The methods a harness model runs: ``insightv eval --method``'s."""


@dataclass(frozen=True)
class HarnessQuestion:
    """One question as a harness gives it.

    Attributes:
        id: the harness's name for it (unique within a group: the log's key).
        images: its images (``PIL.Image`` objects, file paths or encoded bytes), or a
            function returning them, called when the question's turn comes (so a
            benchmark's images are not all decoded at once).
        prompt: the text the harness built (question, options, instructions).
    """

    id: str
    images: Sequence[Any] | Callable[[], Sequence[Any]]
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

    The models and method are built here, once (a bad setting is refused before any
    question is asked). With ``settings.log_dir``, the answered questions of each group are
    kept in ``<log_dir>/<group>/predictions.jsonl`` and a later call, in this run or the
    next, takes them from there; a failed question is written to ``failed.jsonl`` beside it
    and asked again next time.

    Args:
        settings: the models and method (:class:`HarnessSettings`).
        harness: the harness's name, kept in each log folder's ``eval.json``.

    Raises:
        ConfigError: for bad settings.
    """

    def __init__(self, settings: HarnessSettings, *, harness: str) -> None:
        self.settings = settings
        backend, described, judged = settings.evaluation().build()
        self.backend = backend
        self.description = {**described, "max_steps": settings.max_steps, "harness": harness}
        del self.description["data"], self.description["limit"]
        self._predict = judged["predict"]
        self._logs: dict[str, tuple[RecordLog, dict[str, dict[str, Any]]]] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        running = threading.Event()
        self._loop.call_soon(running.set)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="insightv harness loop")
        self._thread.start()
        running.wait()

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

        Raises:
            ConfigError: when the agent is closed, or for a group that is not a plain
                folder name.
            InvalidInputError: when the group's log holds a run with other settings, or
                another question under one of these ids.
        """
        if self._closed:
            raise ConfigError("this harness agent is closed.")
        return asyncio.run_coroutine_threadsafe(
            self._answer_all(list(questions), group, on_answer), self._loop).result()

    def close(self) -> None:
        """Stop the event loop (a call still waiting gets ``CancelledError``) and close the
        logs; the agent answers nothing afterwards."""
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._cancel_others(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        for log, _ in self._logs.values():
            log.close()
        self._logs.clear()

    async def _cancel_others(self) -> None:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _answer_all(self, questions: list[HarnessQuestion], group: str,
                          on_answer: Callable[[dict[str, Any]], None] | None
                          ) -> list[dict[str, Any]]:
        log = self._log(group)

        async def one(question: HarnessQuestion) -> dict[str, Any]:
            row = self._kept(log, question)
            if row is None:
                async with self._slots:
                    row = await self._answer_one(question)
                if log is not None:
                    self._write(log, row)
            if on_answer is not None:
                on_answer(row)
            return row

        return list(await asyncio.gather(*(one(question) for question in questions)))

    async def _answer_one(self, question: HarnessQuestion) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            images = await asyncio.to_thread(_images, question)
            if not images:
                raise InvalidInputError("the question has no image.", field="image")
            item = Item(id=question.id, image=images[0] if len(images) == 1 else images,
                        image_ref="", image_root="", question=question.prompt, answer="",
                        choices=None, category=None, line=0)
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
            if group in ("", ".", "..") or Path(group).name != group:
                raise ConfigError(f"a log group is a plain folder name, not {group!r}.")
            folder = start_evaluation(Path(self.settings.log_dir) / group,
                                      {**self.description, "group": group})
            log = RecordLog(folder / PREDICTIONS_FILE, size="records")
            kept = {str(row["id"]): row for row in read_records(log.path)
                    if str(row["id"]) in log.finished}
            self._logs[group] = (log, kept)
        return self._logs[group]

    @staticmethod
    def _kept(log: tuple[RecordLog, dict[str, dict[str, Any]]] | None,
              question: HarnessQuestion) -> dict[str, Any] | None:
        """The logged answer to ``question``, if there is one."""
        row = log[1].get(question.id) if log is not None else None
        if row is not None and row["question"] != question.prompt:
            raise InvalidInputError(
                f"{log[0].path if log else ''} holds another question under the id "
                f"{question.id!r}: the task changed; use another log_dir.", field="log_dir")
        return row

    @staticmethod
    def _write(log: tuple[RecordLog, dict[str, dict[str, Any]]], row: dict[str, Any]) -> None:
        """Keep an answered question in the log (once); a failed one in ``failed.jsonl``."""
        records, kept = log
        if row["status"] != "ok":
            with open(records.path.with_name(FAILED_FILE), "a") as failed:
                failed.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif row["id"] not in records.finished:
            records.append([row])
            kept[row["id"]] = row


def prompt_options(prompt: str) -> list[str]:
    """The lettered options a prompt lists, in order from A: one per line ("A. text",
    "(A) text", "A) text", "A: text"), or on the line of an "Options:" marker ("Options: A:
    x, B: y"); ``[]`` when it lists fewer than two. Linear in the prompt.

    >>> prompt_options("How many?\\nOptions:\\n(A) two\\n(B) three")
    ['two', 'three']
    >>> prompt_options("Which is red?\\nOptions: A: the cube, B: the ball")
    ['the cube', 'the ball']
    >>> prompt_options("Question: Is it red?")
    []
    """
    text = prompt[:_MAX_PROMPT_CHARS]
    found: list[str] = []
    for match in _OPTION.finditer(text):
        letter = match[1] or match[2]
        if letter == "A":
            found = [match[3].strip()]  # a (new) list starts
        elif found and ord(letter) - ord("A") == len(found):
            found.append(match[3].strip())
    if len(found) >= 2:
        return found
    markers = list(_OPTIONS_MARKER.finditer(text))
    if not markers:
        return []
    line = text[markers[-1].end():].split("\n", 1)[0]
    starts: list[tuple[int, int]] = []
    for match in _INLINE_OPTION.finditer(line):
        if ord(match[1]) - ord("A") == len(starts):
            starts.append((match.start(), match.end()))
    ends = [start for start, _ in starts[1:]] + [len(line)]
    inline = [line[begin:end].strip().rstrip(",;").strip()
              for (_, begin), end in zip(starts, ends, strict=True)]
    return inline if len(inline) >= 2 else []


def benchmark_answer(answer: str, options: Sequence[str] = ()) -> str:
    """``answer`` in the form benchmark scorers read: the option letter when the question
    has ``options`` and the answer names one (by letter, by its text, or by the number or
    Yes/No it starts with); the number itself for a number with a currency sign, a percent
    sign or a unit (its digits as written, thousands separators dropped); "Yes"/"No" for an
    answer that starts with one and a comma or full stop; else the answer itself, without a
    final full stop.

    >>> benchmark_answer("(b) three", ["two", "three"]), benchmark_answer("No, not", ["Yes", "No"])
    ('B', 'B')
    >>> benchmark_answer("12 squares"), benchmark_answer("$1,250.50"), benchmark_answer("007")
    ('12', '1250.50', '007')
    >>> benchmark_answer("Yes, both."), benchmark_answer("no smoking sign")
    ('Yes', 'no smoking sign')
    >>> benchmark_answer("a red circle.")
    'a red circle'
    """
    text = answer.strip()
    text = text[:-1].rstrip() if text.endswith(".") else text
    short = _short_answer(text)
    if options:
        for candidate in dict.fromkeys((text, short)):
            letter = choice_letter(candidate, options)
            if letter is not None:
                return letter
    return short


def _short_answer(text: str) -> str:
    """The number an answer states with its unit, or the Yes/No it starts with."""
    number = _NUMBER.fullmatch(text)
    if number is not None:
        digits = number[1]
        return digits.replace(",", "") if _THOUSANDS.fullmatch(digits) else digits
    yes_no = _YES_NO.match(text)
    return yes_no[1].capitalize() if yes_no else text


def _images(question: HarnessQuestion) -> list[Any]:
    """The question's images, encoded for the graph."""
    images = question.images() if callable(question.images) else question.images
    return [_encoded(image) for image in images]


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
