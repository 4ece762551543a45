"""Format profiles: how one kind of agent is spoken to and read, in one named object — its
prompts, how its reasoning reply becomes steps, how the reasoning is shown to the summary
agent, and whether replies can be constrained to the format (vLLM structured outputs).

Built in (:data:`PROFILES`, by name):

- ``"steps"``: our step JSON, one step per call (multi-turn); the default.
- ``"chain"``: our chain JSON, a whole chain per call (one JSON step per line), as the
  trainers teach a reasoning agent (``insightv build-data sft-reason --mode chain``).
- ``"insightv-reference"``: the released Insight-V agents' formats: the reasoning agent is
  asked to "perform step-by-step reasoning" and writes free text inside
  ``<thoughts>…</thoughts>``; the summary agent gets ``QUESTION:`` and ``REASON PROCESS:``
  and answers with the answer alone.
- ``"llava-cot"``: LLaVA-CoT's four tagged stages as the reasoning (``<SUMMARY>``,
  ``<CAPTION>``, ``<REASONING>``, ``<CONCLUSION>``), one step each.

In every profile the summary agent may answer in plain text ("The answer is 4.", "B"): that
is its answer, with the verdict unknown (``reasoning_correct`` is ``None``), never a failure.
A JSON verdict stays the richer form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from insightv_agents.answers import stated_answer
from insightv_agents.cards import AgentCard, card_of
from insightv_agents.errors import ConfigError, ModelOutputError
from insightv_agents.parsing import (
    MAX_FIELD_CHARS,
    MAX_PLAIN_ANSWER_CHARS,
    MAX_REPLY_CHARS,
    iter_json_objects,
    parse_stages,
    parse_steps,
    parse_verdict,
)
from insightv_agents.prompts import DEFAULT_PROMPTS, Prompts, ReasoningMode, render_reasoning
from insightv_agents.schema import (
    ReasoningStep,
    Verdict,
    chain_regex,
    json_text_regex,
    step_json_schema,
    verdict_json_schema,
)

THOUGHTS_OPEN, THOUGHTS_CLOSE = "<thoughts>", "</thoughts>"
_PARAGRAPHS = re.compile(r"\n\s*\n")


def parse_summary(text: str) -> Verdict:
    """Read the summary agent's reply: a JSON verdict, or a plain-text answer (its last
    "the answer is X" / "Answer: X", else the whole reply when short), whose verdict is
    unknown (``reasoning_correct`` ``None``).

    Raises:
        ModelOutputError: for an empty reply, JSON that holds no verdict, or a long reply
            that states no answer.
    """
    try:
        return parse_verdict(text)
    except ModelOutputError:
        if any(isinstance(value, Mapping) for value in iter_json_objects(text)):
            raise  # JSON that is no verdict: asked again
    plain = text[:MAX_REPLY_CHARS].strip()
    answer = stated_answer(plain) or plain.rstrip(".").strip()
    if not answer or len(answer) > MAX_PLAIN_ANSWER_CHARS:
        raise ModelOutputError("no answer could be read: reply with the answer alone, or a "
                               'JSON object like {"reasoning_correct": true, "critique": "", '
                               '"answer": "..."}.', raw=text)
    return {"reasoning_correct": None, "critique": "", "answer": answer}


def parse_thoughts(text: str) -> list[ReasoningStep]:
    """Read a free-text chain (the Insight-V reference format): what stands between
    ``<thoughts>`` and ``</thoughts>`` (all of it when the tags are missing, the rest when
    the closing one is), one step per paragraph, the last one ``summary``.

    Raises:
        ModelOutputError: when the reply holds no text.
    """
    text = text[:MAX_REPLY_CHARS]
    start = text.find(THOUGHTS_OPEN)
    body = text[start + len(THOUGHTS_OPEN):] if start >= 0 else text
    end = body.find(THOUGHTS_CLOSE)
    body = body[:end] if end >= 0 else body
    paragraphs = [part.strip() for part in _PARAGRAPHS.split(body) if part.strip()]
    if not paragraphs:
        raise ModelOutputError("the reply holds no reasoning text.", raw=text)
    return [{"summary": "", "reasoning": part[:MAX_FIELD_CHARS],
             "action": "summary" if index == len(paragraphs) else "continue"}
            for index, part in enumerate(paragraphs, 1)]


def render_thoughts(steps: list[ReasoningStep], prompts: Prompts) -> str:
    """A free-text chain as the reference summary agent reads it: the paragraphs inside
    ``<thoughts>`` tags."""
    body = "\n\n".join(step["reasoning"] for step in steps) or prompts.no_reasoning
    return f"{THOUGHTS_OPEN}{body}{THOUGHTS_CLOSE}"


def parse_tagged_stages(text: str) -> list[ReasoningStep]:
    """Read a LLaVA-CoT response as steps: one per stage written, the conclusion last.

    Raises:
        ModelOutputError: when no stage can be read.
    """
    stages = parse_stages(text)
    steps: list[ReasoningStep] = [
        {"summary": name.title(), "reasoning": str(stages[name]), "action": "continue"}
        for name in ("summary", "caption", "reasoning", "conclusion") if stages.get(name)]
    if not steps:
        raise ModelOutputError("no stage could be read (expected <SUMMARY> ... "
                               "<CONCLUSION> ... </CONCLUSION>).", raw=text)
    steps[-1]["action"] = "summary"
    return steps


def render_tagged_stages(steps: list[ReasoningStep], prompts: Prompts) -> str:
    """Stages shown to the summary agent as their tagged text."""
    if not steps:
        return prompts.no_reasoning
    return "\n".join(f"<{step['summary'].upper()}>{step['reasoning']}</{step['summary'].upper()}>"
                     for step in steps)


@dataclass(frozen=True)
class FormatProfile:
    """How one kind of agent is driven: its prompts and reasoning mode, how its replies are
    read, and whether replies are constrained to the format where the backend can.

    Args:
        name: the profile's name (what agent cards record).
        mode: ``"step"`` (a step per reasoning call) or ``"chain"`` (a chain per call).
        prompts: the prompt texts.
        parse_reasoning: a reasoning reply as steps (raises ``ModelOutputError``).
        parse_summary: a summary reply as a verdict (raises ``ModelOutputError``).
        render_reasoning: the steps as the summary agent reads them.
        constrained: whether replies are held to the format by structured outputs (vLLM):
            only for formats whose exact text a pattern can state (our JSON).
    """

    name: str
    mode: ReasoningMode
    prompts: Prompts = DEFAULT_PROMPTS
    parse_reasoning: Callable[[str], list[ReasoningStep]] = parse_steps
    parse_summary: Callable[[str], Verdict] = parse_summary
    render_reasoning: Callable[[list[ReasoningStep], Prompts], str] = render_reasoning
    constrained: bool = True
    notes: Mapping[str, Any] = field(default_factory=dict)

    def reasoning_constraint(self, max_steps: int) -> dict[str, object]:
        """The structured-output constraint of a reasoning reply (``{}``: none)."""
        if not self.constrained:
            return {}
        if self.mode == "chain":
            return {"regex": chain_regex(max_steps=max_steps)}
        return {"regex": json_text_regex(step_json_schema())}

    def summary_constraint(self) -> dict[str, object]:
        """The structured-output constraint of a summary reply (``{}``: none)."""
        return {"regex": json_text_regex(verdict_json_schema())} if self.constrained else {}

    def with_prompts(self, prompts: Prompts | Mapping[str, Any] | None) -> FormatProfile:
        """This profile with other prompts (a ``Prompts``, or a mapping of fields to change)."""
        if prompts is None:
            return self
        if isinstance(prompts, Prompts):
            return replace(self, prompts=prompts)
        try:
            return replace(self, prompts=replace(self.prompts, **dict(prompts)))
        except TypeError as err:
            raise ConfigError(f"unknown prompt field in {sorted(prompts)}: {err}") from None


REFERENCE_PROMPTS = Prompts(
    reasoning_chain_system="",
    reasoning_step_system="",
    question="{question}\nPerform step-by-step reasoning of the problem. Only provide the "
             "reasoning process.",
    summary_system="",
    summary_user=(
        "Here is a reasoning process for the question. Judge whether it is correct. If it "
        "is, give the answer it reaches; if it is not, ignore it and answer the question "
        "yourself. Give the answer directly, without stating your judgement.\n"
        "QUESTION: {question}\nREASON PROCESS: {reasoning}"),
    reask="Your reply could not be read: {error}\nReply again.",
)

LLAVA_COT_PROMPTS = Prompts(
    reasoning_chain_system=(
        "Answer the question about the image(s) in four stages, each inside its tags, in "
        "this order: <SUMMARY> how you will approach the problem </SUMMARY> <CAPTION> what "
        "in the image matters for the question </CAPTION> <REASONING> the step-by-step logic "
        "that solves it </REASONING> <CONCLUSION> the final answer only </CONCLUSION>."),
    question="{question}",
    reask="Your reply could not be read: {error}\nReply again in the requested form.",
)

PROFILES: dict[str, FormatProfile] = {
    "steps": FormatProfile(name="steps", mode="step"),
    "chain": FormatProfile(name="chain", mode="chain"),
    "insightv-reference": FormatProfile(
        name="insightv-reference", mode="chain", prompts=REFERENCE_PROMPTS,
        parse_reasoning=parse_thoughts, render_reasoning=render_thoughts, constrained=False,
        notes={"sampling": {"reasoning": {"temperature": 0.2, "top_p": 0.95,
                                          "max_tokens": 1024},
                            "summary": {"temperature": 0.2, "top_p": 0.95,
                                        "max_tokens": 4096}}}),
    "llava-cot": FormatProfile(
        name="llava-cot", mode="chain", prompts=LLAVA_COT_PROMPTS,
        parse_reasoning=parse_tagged_stages, render_reasoning=render_tagged_stages,
        constrained=False),
}
"""The built-in profiles, by name."""


def format_profile(profile: FormatProfile | str | None = None, *,
                   mode: ReasoningMode | None = None,
                   prompts: Prompts | Mapping[str, Any] | None = None) -> FormatProfile:
    """A profile: ``profile`` itself, a built-in one by name, or (``None``) ours for ``mode``
    (``"step"`` by default); ``prompts`` replace its prompts.

    Raises:
        ConfigError: for an unknown name or mode, or a mode that contradicts the profile.
    """
    if profile is None:
        chosen = PROFILES["chain" if mode == "chain" else "steps"]
        if mode not in (None, "step", "chain"):
            raise ConfigError(f"mode must be 'step' or 'chain', not {mode!r}.")
    elif isinstance(profile, FormatProfile):
        chosen = profile
    elif profile in PROFILES:
        chosen = PROFILES[profile]
    else:
        raise ConfigError(f"unknown format profile {profile!r}; the built-in ones are "
                          f"{', '.join(PROFILES)}.")
    if mode is not None and profile is not None and mode != chosen.mode:
        raise ConfigError(f"the {chosen.name!r} profile reasons in {chosen.mode} mode, not "
                          f"{mode!r}.")
    return chosen.with_prompts(prompts)


def card_profile(card: AgentCard | None, *, mode: ReasoningMode | None = None,
                 prompts: Prompts | Mapping[str, Any] | None = None) -> FormatProfile:
    """The profile an agent card gives (with its prompts), in ``mode`` when given (our other
    JSON format, the card's prompts kept); without a card, ours for ``mode``. ``prompts``
    replace the prompts either way.

    Raises:
        ConfigError: for a mode the card's format does not have (free text has no step mode).
    """
    if card is None:
        return format_profile(mode=mode, prompts=prompts)
    carded = format_profile(card.profile, prompts=card.prompts or None)
    if mode is not None and mode != carded.mode:
        if carded.name not in ("steps", "chain"):
            raise ConfigError(f"the agent's card gives the {carded.name!r} format, which has "
                              f"no {mode} mode.")
        carded = format_profile(mode=mode, prompts=carded.prompts)
    return carded.with_prompts(prompts)


def agent_profile(model: Any, profile: FormatProfile | str | None = None, *,
                  mode: ReasoningMode | None = None,
                  prompts: Prompts | Mapping[str, Any] | None = None) -> FormatProfile:
    """The profile to drive ``model`` with: ``profile`` when given, else as its agent card
    says (:func:`card_profile`; :func:`~insightv_agents.cards.card_of`), in ``mode`` when
    given; ``prompts`` replace the prompts either way."""
    if profile is not None:
        return format_profile(profile, mode=mode, prompts=prompts)
    return card_profile(card_of(model), mode=mode, prompts=prompts)


def json_profile(profile: FormatProfile, what: str) -> FormatProfile:
    """``profile`` if it is one of our JSON formats (what synthesis and the trainers write).

    Raises:
        ConfigError: for another format.
    """
    if profile.name not in ("steps", "chain"):
        raise ConfigError(f"{what} works in our JSON formats (steps, chain), not the "
                          f"{profile.name!r} format the agent's card gives.")
    return profile
