"""Reward functions for GRPO of either agent, made from the library's own parts.

Each is a TRL reward function (``reward(completions=..., **columns) -> list[float | None]``,
named by ``__name__`` in TRL's logs) with a ``weight`` that :func:`~insightv_agents.
trainers.grpo.train_grpo` passes to TRL's ``reward_weights``; any callable of that shape
can stand beside or replace them. Completions are read as the agent's format profile reads
them, in linear time; an unreadable completion earns the reward's floor, never an error.

The reasoning agent:

- :class:`FormatReward`: the chain parses in the agent's format profile and ends with a
  concluding step (1.0); a chain that parses but does not end (0.5); otherwise partial
  credit up to ``partial`` for each of the format's markers the text holds (the JSON keys,
  the tags), so that a model that cannot write the format yet still gets a gradient.
- :class:`AnswerReward`: the chain's stated answer ("The answer is X" in its last step) is
  right by :class:`~insightv_agents.answers.AnswerRules` (1.0), wrong (0.0), or undecided
  (``undecided``). With a ``summarizer``, the summary agent answers from the chain instead,
  through the graph's own :class:`~insightv_agents.nodes.SummaryNode`.
- :class:`ScoreReward`: a :class:`~insightv_agents.assessment.PathScorer` scores the paths
  of one question together (1-100, divided by 100): a process-level reward where the
  scorer sees more than the answer (the shapes world's scene scorer checks every claim).

The summary agent trained as a judge (our reading of Insight-V++'s J-GRPO, whose exact
reward formulas are not published):

- :class:`VerdictReward`: its verdict (``reasoning_correct``) matches whether the chain it
  judged is right (the ``chain_correct`` column; 1.0), or not (0.0, also for no verdict).
- :class:`AnswerReward` with ``agent="summary"``: its final answer is right.
- :class:`FormatReward` with ``agent="summary"``: the reply is a JSON verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from insightv_agents.answers import DEFAULT_RULES, AnswerRules, match_answer, stated_answer
from insightv_agents.errors import ConfigError, ModelOutputError
from insightv_agents.formats import FormatProfile, format_profile
from insightv_agents.schema import PathResult, ReasoningStep

Agent = Literal["reasoning", "summary"]

_MARKERS: dict[str, tuple[str, ...]] = {
    "steps": ("{", '"summary"', '"reasoning"', '"action"', "}"),
    "chain": ("{", '"summary"', '"reasoning"', '"action"', "}"),
    "insightv-reference": ("<thoughts>", "</thoughts>"),
    "llava-cot": ("<SUMMARY>", "<CAPTION>", "<REASONING>", "<CONCLUSION>", "</CONCLUSION>"),
    "summary": ("{", '"reasoning_correct"', '"critique"', '"answer"', "}"),
}


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or a conversation's last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return ""


def read_chain(text: str, profile: FormatProfile) -> list[ReasoningStep] | None:
    """The steps of a reasoning completion, or ``None`` when it does not parse."""
    try:
        return profile.parse_reasoning(text)
    except ModelOutputError:
        return None


def chain_answer(steps: Sequence[ReasoningStep] | None) -> str:
    """The answer a chain's last step states ("The answer is X"), ``""`` for none."""
    return stated_answer(steps[-1]["reasoning"]) if steps else ""


class Reward:
    """The base of the reward functions: a name (TRL logs ``rewards/<name>``) and a weight.
    A subclass is called as TRL calls reward functions: ``(completions, **columns)``."""

    __name__ = "reward"

    def __init__(self, *, weight: float = 1.0, name: str | None = None) -> None:
        if not 0 <= weight <= 100:
            raise ConfigError(f"a reward weight must be within [0, 100], not {weight}.")
        self.weight = float(weight)
        if name is not None:
            self.__name__ = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r}, weight={self.weight})"


class FormatReward(Reward):
    """1.0 for a reply in the agent's format (a reasoning chain that parses and concludes;
    a summary reply that is a JSON verdict), 0.5 for a chain that parses but does not
    conclude, else up to ``partial`` for the share of the format's markers present.

    Args:
        profile: the reasoning agent's format profile (a profile or a built-in name;
            default: our chain format).
        agent: ``"reasoning"`` or ``"summary"`` (the summary agent's JSON verdict).
        partial: the most a reply that does not parse can earn.
    """

    __name__ = "format"

    def __init__(self, profile: FormatProfile | str | None = None, *,
                 agent: Agent = "reasoning", partial: float = 0.25, weight: float = 1.0,
                 name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.profile = format_profile(profile if profile is not None else "chain")
        self.agent = _agent(agent)
        self.partial = partial
        self.markers = _MARKERS["summary"] if agent == "summary" \
            else _MARKERS.get(self.profile.name, ())

    def __call__(self, completions: list[Any], **columns: Any) -> list[float | None]:
        return [self.score(completion_text(completion)) for completion in completions]

    def score(self, text: str) -> float:
        if self.agent == "summary":
            try:
                if self.profile.parse_summary(text)["reasoning_correct"] is not None:
                    return 1.0
            except ModelOutputError:
                pass
        else:
            steps = read_chain(text, self.profile)
            if steps:
                return 1.0 if steps[-1]["action"] == "summary" else 0.5
        if not self.markers:
            return 0.0
        return self.partial * sum(marker in text for marker in self.markers) / len(self.markers)


class AnswerReward(Reward):
    """1.0 when the agent's answer is right by ``rules`` against the ``answer`` column
    (with ``choices`` where the item has them), 0.0 when wrong or missing, ``undecided``
    when the rules cannot tell.

    The answer read: a reasoning chain's stated answer (its last step's "The answer is
    X"), or with ``summarizer`` (a chat model) the summary agent's answer on that chain,
    asked through :class:`~insightv_agents.nodes.SummaryNode` with the item's image; a
    summary reply's verdict answer (``agent="summary"``).

    Args:
        rules: the answer check's settings (e.g. a closed answer set).
        profile: the reasoning agent's format profile (default: our chain format);
            summary_profile: the summary agent's (default: ``profile``).
        agent: whose completions are rewarded.
        summarizer: the summary agent answering each chain (reasoning agent only).
        concurrency: the summary calls made at once.
    """

    __name__ = "answer"

    def __init__(self, rules: AnswerRules = DEFAULT_RULES, *,
                 profile: FormatProfile | str | None = None,
                 summary_profile: FormatProfile | str | None = None,
                 agent: Agent = "reasoning", summarizer: Any = None, concurrency: int = 8,
                 undecided: float = 0.0, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.rules = rules
        self.profile = format_profile(profile if profile is not None else "chain")
        self.summary_profile = format_profile(summary_profile) if summary_profile is not None \
            else self.profile
        self.agent = _agent(agent)
        if summarizer is not None and agent == "summary":
            raise ConfigError("AnswerReward: a summarizer answers reasoning chains; the "
                              "summary agent's own answers need none.")
        self.summarizer = summarizer
        self.concurrency = concurrency
        self.undecided = undecided

    def __call__(self, completions: list[Any], *, answer: Sequence[str],
                 choices: Sequence[list[str] | None] | None = None,
                 **columns: Any) -> list[float | None]:
        texts = [completion_text(completion) for completion in completions]
        answers = self.answers(texts, columns)
        rewards: list[float | None] = []
        for index, given in enumerate(answers):
            if not given:
                rewards.append(0.0)
                continue
            check = match_answer(given, answer[index], rules=self.rules,
                                 choices=choices[index] if choices is not None else None)
            rewards.append(self.undecided if check["correct"] is None
                           else float(check["correct"]))
        return rewards

    def answers(self, texts: list[str], columns: dict[str, Any]) -> list[str]:
        """The answer each completion gives (``""`` for none)."""
        if self.agent == "summary":
            return [_verdict_answer(text, self.summary_profile) for text in texts]
        chains = [read_chain(text, self.profile) for text in texts]
        if self.summarizer is None:
            return [chain_answer(steps) for steps in chains]
        return self._summarize(chains, columns)

    def _summarize(self, chains: list[list[ReasoningStep] | None],
                   columns: dict[str, Any]) -> list[str]:
        from insightv_agents.images import load_images
        from insightv_agents.nodes import SummaryNode

        node = SummaryNode(self.summarizer, profile=self.summary_profile, max_retries=1)
        questions = columns.get("question")
        if questions is None:
            raise ConfigError("AnswerReward with a summarizer needs a 'question' column.")
        images = columns.get("image")

        def ask(index: int) -> str:
            steps = chains[index]
            if not steps:
                return ""
            pictures = load_images(images[index]) if images is not None else []
            update = node.invoke({"question": questions[index], "images": pictures,
                                  "steps": steps})
            return str(update.get("answer") or "")

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(ask, range(len(chains))))


class ScoreReward(Reward):
    """A :class:`~insightv_agents.assessment.PathScorer`'s score of each chain, scored
    with the other chains of its question (grouped by the ``id`` column), divided by 100;
    0.0 for a chain that does not parse or that the scorer leaves unscored.

    Args:
        scorer: any PathScorer (``RuleScorer``; the shapes world's ``SceneScorer``).
        rules: the answer check each path carries to the scorer.
        profile: the reasoning agent's format profile (default: our chain format).
    """

    __name__ = "score"

    def __init__(self, scorer: Any, *, rules: AnswerRules = DEFAULT_RULES,
                 profile: FormatProfile | str | None = None, weight: float = 1.0,
                 name: str | None = None) -> None:
        from insightv_agents.assessment import PathScorer

        super().__init__(weight=weight, name=name)
        if not isinstance(scorer, PathScorer):
            raise ConfigError(f"ScoreReward needs a PathScorer, not {type(scorer).__name__}.")
        self.scorer = scorer
        self.rules = rules
        self.profile = format_profile(profile if profile is not None else "chain")

    def __call__(self, completions: list[Any], *, answer: Sequence[str], question: Sequence[str],
                 id: Sequence[str], choices: Sequence[list[str] | None] | None = None,
                 image: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
        from insightv_agents.images import load_images

        groups: dict[str, list[int]] = {}
        for index, key in enumerate(id):
            groups.setdefault(str(key), []).append(index)
        rewards: list[float | None] = [0.0] * len(completions)
        for indexes in groups.values():
            first = indexes[0]
            paths: list[PathResult] = []
            for position, index in enumerate(indexes):
                steps = read_chain(completion_text(completions[index]), self.profile) or []
                given = chain_answer(steps)
                check = match_answer(given, answer[index], rules=self.rules,
                                     choices=choices[index] if choices is not None else None) \
                    if given else None
                paths.append({"index": position, "status": "ok" if steps and given
                              else "failed", "steps": steps, "answer": given, "check": check,
                              "score": None, "comment": "", "failures": [], "seconds": 0.0})
            pictures = load_images(image[first]) if image is not None else []
            scores = self.scorer.score_paths({"question": question[first],
                                              "truth": answer[first], "images": pictures,
                                              "paths": paths})
            for index, path, mark in zip(indexes, paths, scores, strict=True):
                if path["status"] == "ok" and mark["score"] is not None:
                    rewards[index] = max(0.0, min(float(mark["score"]), 100.0)) / 100
        return rewards


class VerdictReward(Reward):
    """1.0 when the summary agent's verdict (``reasoning_correct``) says what the
    ``chain_correct`` column says of the chain it judged, 0.0 otherwise (a wrong verdict,
    no verdict, an unreadable reply).

    Args:
        profile: the summary agent's format profile (default: ours).
    """

    __name__ = "verdict"

    def __init__(self, profile: FormatProfile | str | None = None, *, weight: float = 1.0,
                 name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.profile = format_profile(profile if profile is not None else "chain")

    def __call__(self, completions: list[Any], *, chain_correct: Sequence[bool],
                 **columns: Any) -> list[float | None]:
        return [float(verdict_of(completion_text(completion), self.profile) is truth)
                for completion, truth in zip(completions, chain_correct, strict=True)]


def verdict_of(text: str, profile: FormatProfile) -> bool | None:
    """The ``reasoning_correct`` of a summary reply, ``None`` when it gives none."""
    try:
        return profile.parse_summary(text)["reasoning_correct"]
    except ModelOutputError:
        return None


def default_rewards(agent: Agent, *, profile: FormatProfile | str | None = None,
                    rules: AnswerRules = DEFAULT_RULES) -> list[Reward]:
    """The rewards :func:`~insightv_agents.trainers.grpo.train_grpo` uses unless given:
    for the reasoning agent, the stated answer (weight 1) and the format (0.5); for the
    summary agent, the verdict (1), its answer (0.5) and the format (0.25)."""
    if _agent(agent) == "summary":
        return [VerdictReward(profile), AnswerReward(rules, profile=profile, agent="summary",
                                                     weight=0.5),
                FormatReward(profile, agent="summary", weight=0.25)]
    return [AnswerReward(rules, profile=profile), FormatReward(profile, weight=0.5)]


def _verdict_answer(text: str, profile: FormatProfile) -> str:
    try:
        return str(profile.parse_summary(text)["answer"])
    except ModelOutputError:
        return ""


def _agent(agent: str) -> Agent:
    if agent not in ("reasoning", "summary"):
        raise ConfigError(f"agent must be 'reasoning' or 'summary', not {agent!r}.")
    return agent  # type: ignore[return-value]
