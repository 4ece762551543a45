"""Every prompt the agents see, in one place, and the messages built from them.

Override any text with ``Prompts(...)`` (or ``dataclasses.replace(DEFAULT_PROMPTS, ...)``)
and pass it to a factory or node. ``PROMPTS_VERSION`` is recorded with synthesized data so
that a change of wording is visible in provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from insightv_agents.parsing import format_chain, format_step
from insightv_agents.schema import ReasoningStep

PROMPTS_VERSION = "1"

ReasoningMode = Literal["step", "chain"]

_STEP_FORMAT = (
    'a JSON object {"summary": "<one-line summary of this step>", "reasoning": "<the detailed '
    'reasoning of this step>", "action": "continue" or "summary"}'
)


@dataclass(frozen=True)
class Prompts:
    """The texts of every prompt. Placeholders in braces are filled with ``str.format``."""

    reasoning_step_system: str = (
        "You are the reasoning agent of a visual question answering system. Solve the question "
        "about the image(s) step by step, ONE step per reply. Look carefully at the image, "
        "break the problem into small steps, and check your work. Reply with only "
        f"{_STEP_FORMAT}. Use action \"continue\" while more steps are needed and \"summary\" "
        "on the last step, whose reasoning states the final result. Do not write anything "
        "outside the JSON object."
    )
    reasoning_chain_system: str = (
        "You are the reasoning agent of a visual question answering system. Solve the question "
        "about the image(s) with a complete step-by-step reasoning process. Write each step as "
        f"{_STEP_FORMAT}, one JSON object per line. Every step but the last has action "
        "\"continue\"; the last has action \"summary\" and states the final result. Only "
        "provide the reasoning process."
    )
    question: str = "Question: {question}"
    critique: str = (
        "An earlier attempt at this question was judged flawed by a reviewer:\n{critique}\n\n"
        "Earlier reasoning:\n{previous}\n\nReason again from the start and avoid those mistakes."
    )
    next_step: str = "Continue with the next step."
    continue_chain: str = "Continue the reasoning from where it stopped."
    reask: str = (
        "Your reply could not be read: {error}\nReply again with only the requested JSON, "
        "nothing else."
    )
    summary_system: str = (
        "You are the summary agent of a visual question answering system. You are given a "
        "question about the image(s) and a step-by-step reasoning process written by another "
        "agent. Decide whether the reasoning is correct. If it is, take the answer from it; if "
        "it is not, ignore it and answer the question yourself from the image. Reply with only "
        'a JSON object {"reasoning_correct": true or false, "critique": "<short: what is '
        'wrong, or empty>", "answer": "<the final answer, as short as the question allows>"}.'
    )
    summary_user: str = "Question: {question}\n\nReasoning process:\n{reasoning}"
    no_reasoning: str = "(no reasoning was produced)"


DEFAULT_PROMPTS = Prompts()


def image_parts(images: list[str]) -> list[dict[str, Any]]:
    """Message content parts for images given as data URLs (OpenAI ``image_url`` format)."""
    return [{"type": "image_url", "image_url": {"url": url}} for url in images]


def render_reasoning(steps: list[ReasoningStep], prompts: Prompts = DEFAULT_PROMPTS) -> str:
    """The human-readable reasoning text: numbered steps, each a summary line and its details."""
    if not steps:
        return prompts.no_reasoning
    return "\n\n".join(f"Step {index}: {step['summary']}\n{step['reasoning']}".rstrip()
                       for index, step in enumerate(steps, 1))


def reasoning_messages(
    *,
    prompts: Prompts,
    mode: ReasoningMode,
    question: str,
    images: list[str],
    steps: list[ReasoningStep],
    critique: str | None = None,
    previous: list[ReasoningStep] | None = None,
) -> list[BaseMessage]:
    """The conversation for the reasoning agent's next call.

    Step mode is multi-turn: each earlier step is one assistant turn in canonical form,
    followed by a short "next step" user turn. Chain mode asks for the whole chain in one
    turn (and, if a chain stopped early, for the rest of it).
    """
    text = prompts.question.format(question=question)
    if critique is not None:
        text += "\n\n" + prompts.critique.format(
            critique=critique or "(no details given)",
            previous=render_reasoning(previous or [], prompts))
    system = prompts.reasoning_step_system if mode == "step" else prompts.reasoning_chain_system
    messages: list[BaseMessage] = [
        SystemMessage(system),
        HumanMessage(content=[*image_parts(images), {"type": "text", "text": text}]),
    ]
    if mode == "step":
        for step in steps:
            messages += [AIMessage(format_step(step)), HumanMessage(prompts.next_step)]
    elif steps:
        messages += [AIMessage(format_chain(steps)), HumanMessage(prompts.continue_chain)]
    return messages


def summary_messages(
    *, prompts: Prompts, question: str, images: list[str], steps: list[ReasoningStep]
) -> list[BaseMessage]:
    """The conversation for the summary agent: question, image(s) and the rendered reasoning."""
    text = prompts.summary_user.format(question=question,
                                       reasoning=render_reasoning(steps, prompts))
    return [
        SystemMessage(prompts.summary_system),
        HumanMessage(content=[*image_parts(images), {"type": "text", "text": text}]),
    ]


def reask_messages(
    messages: list[BaseMessage], reply: str, error: str, prompts: Prompts
) -> list[BaseMessage]:
    """``messages`` plus the unreadable reply and a request to answer again, naming the error."""
    return [*messages, AIMessage(reply[:4000]), HumanMessage(prompts.reask.format(error=error))]
