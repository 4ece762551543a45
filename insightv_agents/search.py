"""Inference-time search over sampled candidates: LLaVA-CoT's stage-level beam search and
its baselines (best-of-N, sentence-level beam search, a single pass).

Each search is written once, as a generator of model requests, and run by a sync or an
async driver (:func:`run_search`, :func:`arun_search`):

- :class:`Sample` asks the generating model for ``k`` candidates of one conversation — one
  request with the backend's ``n`` where it has one (vLLM, the in-process transformers
  model), else ``k`` requests sent together;
- :class:`Ask` sends several judge conversations together (concurrently), one reply each.

Winners are picked by a knockout tournament (:func:`knockout`): candidates meet in pairs,
round by round (1 v 2, 3 v 4, ...; an odd one out goes through), so N candidates take N-1
matches and the matches of a round run concurrently. Judge replies are untrusted: an
unreadable one is re-asked ``max_retries`` times, then the match is decided by the
documented fallback rule (the first-sampled of the two) and recorded as such.

What a search keeps of the model's text is bounded, however long the replies: a stage
candidate as a step field (``parsing.MAX_FIELD_CHARS``), a sentence
:data:`~insightv_agents.schema.MAX_SENTENCE_CHARS`, a whole response
:data:`~insightv_agents.schema.MAX_RESPONSE_CHARS`, a judge's reason 2,000 characters.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from langchain_core.language_models import BaseChatModel, LanguageModelLike
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableConfig

from insightv_agents.backends.protocol import chat_model_with_n
from insightv_agents.errors import ModelOutputError
from insightv_agents.parsing import (
    close_tag,
    format_stages,
    open_tag,
    parse_check,
    parse_choice,
    stage_text,
)
from insightv_agents.prompts import (
    StagePrompts,
    check_messages,
    pairwise_messages,
    reask_messages,
    stage_messages,
)
from insightv_agents.runtime import Outcome, reply_text
from insightv_agents.schema import (
    MAX_RESPONSE_CHARS,
    MAX_SENTENCE_CHARS,
    Judgement,
    SearchRecord,
    Stage,
    Stages,
)

T = TypeVar("T")
P = TypeVar("P")


@dataclass(frozen=True)
class Sample:
    """Request: ``k`` candidate replies to ``messages`` from the generating model."""

    messages: list[BaseMessage]
    k: int
    stop: list[str] | None = None


@dataclass(frozen=True)
class Ask:
    """Request: one reply from the judge to each conversation, sent together."""

    conversations: list[list[BaseMessage]]


Search = Generator[Sample | Ask, list[str], T]
"""A search: yields requests, receives the reply texts, returns its result."""


@dataclass(frozen=True)
class SearchSettings:
    """What every search shares: question, images, prompts and bounds."""

    question: str
    images: list[str]
    prompts: StagePrompts
    max_retries: int = 2


# --- Drivers --------------------------------------------------------------------------------


def run_search(search: Search[T], model: LanguageModelLike, judge: LanguageModelLike,
               config: RunnableConfig, *, use_n: bool = True) -> T:
    """Run ``search`` to its end, sending its requests to ``model`` and ``judge``."""
    try:
        request = next(search)
        while True:
            if isinstance(request, Sample):
                replies = sample(model, request, config, use_n=use_n)
            else:
                conversations: list[Any] = list(request.conversations)
                replies = [reply_text(r) for r in judge.batch(conversations, config)]
            request = search.send(replies)
    except StopIteration as stop:
        return stop.value


async def arun_search(search: Search[T], model: LanguageModelLike, judge: LanguageModelLike,
                      config: RunnableConfig, *, use_n: bool = True) -> T:
    """The async :func:`run_search`: requests of one step are sent concurrently."""
    try:
        request = next(search)
        while True:
            if isinstance(request, Sample):
                replies = await asample(model, request, config, use_n=use_n)
            else:
                conversations: list[Any] = list(request.conversations)
                replies = [reply_text(r) for r in await judge.abatch(conversations, config)]
            request = search.send(replies)
    except StopIteration as stop:
        return stop.value


def _with_n(model: LanguageModelLike, request: Sample, config: RunnableConfig, use_n: bool
            ) -> tuple[BaseChatModel, dict[str, Any]] | None:
    """The chat model and ``generate`` arguments for all candidates in one request, or
    ``None`` when they go one request each."""
    found = chat_model_with_n(model) if use_n and request.k > 1 else None
    if found is None:
        return None
    chat, kwargs = found
    return chat, {"stop": request.stop, "callbacks": config.get("callbacks"),
                  "tags": config.get("tags"), "metadata": config.get("metadata"),
                  **kwargs, "n": request.k}


def sample(model: LanguageModelLike, request: Sample, config: RunnableConfig, *,
           use_n: bool = True) -> list[str]:
    """``request.k`` replies: one request with ``n`` where the model takes it, else ``k``
    requests sent together; topped up if a backend returns fewer."""
    texts: list[str] = []
    with_n = _with_n(model, request, config, use_n)
    if with_n is not None:
        chat, arguments = with_n
        result = chat.generate([request.messages], **arguments)
        texts = [g.text for g in result.generations[0]][: request.k]
    if len(texts) < request.k:
        inputs: list[Any] = [request.messages] * (request.k - len(texts))
        texts += [reply_text(r) for r in model.batch(inputs, config, stop=request.stop)]
    return texts


async def asample(model: LanguageModelLike, request: Sample, config: RunnableConfig, *,
                  use_n: bool = True) -> list[str]:
    """The async :func:`sample`."""
    texts: list[str] = []
    with_n = _with_n(model, request, config, use_n)
    if with_n is not None:
        chat, arguments = with_n
        result = await chat.agenerate([request.messages], **arguments)
        texts = [g.text for g in result.generations[0]][: request.k]
    if len(texts) < request.k:
        inputs: list[Any] = [request.messages] * (request.k - len(texts))
        texts += [reply_text(r) for r in await model.abatch(inputs, config, stop=request.stop)]
    return texts


# --- Judging --------------------------------------------------------------------------------


def ask_all(conversations: Sequence[list[BaseMessage]], parse: Callable[[str], P],
            settings: SearchSettings) -> Search[list[Outcome[P]]]:
    """Ask every conversation at once; re-ask the unreadable ones (with the error) together,
    at most ``max_retries`` times."""
    pending = {index: list(messages) for index, messages in enumerate(conversations)}
    done: dict[int, Outcome[P]] = {}
    attempts = 0
    while pending:
        attempts += 1
        replies = yield Ask(list(pending.values()))
        retry: dict[int, list[BaseMessage]] = {}
        for (index, messages), reply in zip(pending.items(), replies, strict=True):
            try:
                done[index] = Outcome(parse(reply), attempts, "", reply)
            except ModelOutputError as err:
                if attempts > settings.max_retries:
                    done[index] = Outcome(None, attempts, str(err), reply)
                else:
                    retry[index] = reask_messages(messages, reply, str(err), settings.prompts)
        pending = retry
    return [done[index] for index in range(len(conversations))]


def knockout(
    candidates: Sequence[str],
    match: Callable[[int, int], list[BaseMessage]],
    settings: SearchSettings,
    checks: Sequence[bool | None] | None = None,
) -> Search[tuple[int, list[Judgement]]]:
    """The knockout tournament: returns the winner's index and the N-1 judgements.

    A match is decided without the judge when one candidate is empty and the other is not
    (``empty``), or when the pre-check found exactly one of the two incorrect (``check``);
    otherwise the judge compares the pair (``match(a, b)`` builds its conversation).
    """
    alive = list(range(len(candidates)))
    judgements: list[Judgement] = []
    round_number = 0
    while len(alive) > 1:
        round_number += 1
        pairs = [(alive[i], alive[i + 1]) for i in range(0, len(alive) - 1, 2)]
        decided: dict[tuple[int, int], Judgement] = {}
        to_judge: list[tuple[int, int]] = []
        for a, b in pairs:
            rule = _rule(a, b, candidates, checks)
            if rule is None:
                to_judge.append((a, b))
            else:
                decided[(a, b)] = {"round": round_number, "pair": [a, b], "winner": rule[0],
                                   "decided_by": rule[1], "reason": "", "attempts": 0}
        outcomes = yield from ask_all([match(a, b) for a, b in to_judge], parse_choice, settings)
        for (a, b), outcome in zip(to_judge, outcomes, strict=True):
            if outcome.value is None:
                decided[(a, b)] = {"round": round_number, "pair": [a, b], "winner": a,
                                   "decided_by": "fallback", "reason": outcome.error,
                                   "attempts": outcome.attempts}
            else:
                choice, reason = outcome.value
                decided[(a, b)] = {"round": round_number, "pair": [a, b],
                                   "winner": a if choice == 1 else b, "decided_by": "judge",
                                   "reason": reason, "attempts": outcome.attempts}
        judgements += [decided[pair] for pair in pairs]
        alive = [decided[pair]["winner"] for pair in pairs] + alive[len(pairs) * 2:]
    return (alive[0] if alive else 0), judgements


def _rule(a: int, b: int, candidates: Sequence[str], checks: Sequence[bool | None] | None
          ) -> tuple[int, Literal["empty", "check"]] | None:
    empty_a, empty_b = not candidates[a].strip(), not candidates[b].strip()
    if empty_a != empty_b:
        return (b if empty_a else a), "empty"
    if checks is not None and {checks[a], checks[b]} == {True, False}:
        return (a if checks[a] else b), "check"
    return None


def _record(target: str, candidates: list[str], checks: list[bool | None],
            winner: int, judgements: list[Judgement]) -> SearchRecord:
    return {"target": target, "candidates": candidates, "checks": checks,
            "judgements": judgements, "winner": winner}


# --- The searches ---------------------------------------------------------------------------


def stage_search(stage: Stage, stages: Stages, settings: SearchSettings, *, beam_size: int,
                 check_reasoning: bool = True) -> Search[SearchRecord]:
    """One stage of stage-level beam search: ``beam_size`` candidates continuing the stages
    written so far, each stopped at the stage's closing tag; for the reasoning stage each
    candidate is first checked alone; the knockout tournament picks the winner."""
    prefix = format_stages(stages, upto=stage)
    continuation = f"{prefix}\n\n{open_tag(stage)}" if prefix else open_tag(stage)
    messages = stage_messages(prompts=settings.prompts, question=settings.question,
                              images=settings.images, prefix=continuation)
    texts = yield Sample(messages, beam_size, stop=[close_tag(stage)])
    candidates = [stage_text(text, stage) for text in texts]
    checks: list[bool | None] = []
    written = [index for index, candidate in enumerate(candidates) if candidate]
    if stage == "reasoning" and check_reasoning and len(written) > 1:
        # An empty candidate loses to any other without a check.
        asked = yield from ask_all(
            [check_messages(prompts=settings.prompts, question=settings.question,
                            images=settings.images, caption=stages.get("caption", ""),
                            reasoning=candidates[index]) for index in written],
            parse_check, settings)
        found = dict(zip(written, (outcome.value for outcome in asked), strict=True))
        checks = [found.get(index) for index in range(len(candidates))]

    def match(a: int, b: int) -> list[BaseMessage]:
        return pairwise_messages(prompts=settings.prompts, target=stage,
                                 question=settings.question, images=settings.images,
                                 prefix=prefix, first=candidates[a], second=candidates[b])

    winner, judgements = yield from knockout(candidates, match, settings, checks or None)
    return _record(stage, candidates, checks, winner, judgements)


def best_of_n(settings: SearchSettings, *, n: int) -> Search[tuple[str, list[SearchRecord]]]:
    """Best-of-N: ``n`` whole responses (each cut at ``MAX_RESPONSE_CHARS``), the best
    picked by the tournament."""
    messages = stage_messages(prompts=settings.prompts, question=settings.question,
                              images=settings.images)
    candidates = [text.strip()[:MAX_RESPONSE_CHARS] for text in (yield Sample(messages, n))]

    def match(a: int, b: int) -> list[BaseMessage]:
        return pairwise_messages(prompts=settings.prompts, target="response",
                                 question=settings.question, images=settings.images,
                                 prefix="", first=candidates[a], second=candidates[b])

    winner, judgements = yield from knockout(candidates, match, settings)
    return candidates[winner], [_record("response", candidates, [], winner, judgements)]


def sentence_search(settings: SearchSettings, *, beam_size: int, max_sentences: int
                    ) -> Search[tuple[str, list[SearchRecord]]]:
    """Sentence-level beam search: the response grows one sentence at a time (candidates
    cut at '.', as in the reference, and at ``MAX_SENTENCE_CHARS``), each sentence picked by
    the tournament. It ends when the conclusion closes, when the model has nothing more to
    write, after ``max_sentences``, or when the response reaches ``MAX_RESPONSE_CHARS``."""
    response, records = "", []
    end = close_tag("conclusion").lower()
    for number in range(1, max_sentences + 1):
        messages = stage_messages(prompts=settings.prompts, question=settings.question,
                                  images=settings.images, prefix=response)
        texts = yield Sample(messages, beam_size, stop=["."])
        candidates = [text[:MAX_SENTENCE_CHARS].split(".", 1)[0] for text in texts]

        def match(a: int, b: int, candidates: list[str] = candidates,
                  prefix: str = response) -> list[BaseMessage]:
            return pairwise_messages(prompts=settings.prompts, target="sentence",
                                     question=settings.question, images=settings.images,
                                     prefix=prefix, first=candidates[a], second=candidates[b])

        winner, judgements = yield from knockout(candidates, match, settings)
        records.append(_record(f"sentence {number}", candidates, [], winner, judgements))
        chosen = candidates[winner]
        if not chosen.strip():
            break
        position = chosen.lower().find(end)
        written = chosen[: position + len(end)] if position >= 0 else chosen + "."
        response = (response + written)[:MAX_RESPONSE_CHARS]
        if position >= 0 or len(response) == MAX_RESPONSE_CHARS:
            break
    return response, records


def single_pass(settings: SearchSettings) -> Search[tuple[str, list[SearchRecord]]]:
    """Plain generation: one response (cut at ``MAX_RESPONSE_CHARS``), no search."""
    messages = stage_messages(prompts=settings.prompts, question=settings.question,
                              images=settings.images)
    (text,) = yield Sample(messages, 1)
    return text.strip()[:MAX_RESPONSE_CHARS], []

