"""Every prompt the agents see, in one place, and the messages built from them.

Override any text with ``Prompts(...)`` (or ``dataclasses.replace(DEFAULT_PROMPTS, ...)``)
and pass it to a factory or node. ``PROMPTS_VERSION`` is recorded with synthesized data so
that a change of wording is visible in provenance.
"""

from __future__ import annotations

import string
from collections.abc import Callable
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
    """The texts of every prompt. Placeholders in braces are filled with ``str.format``.

    ``images_after_text`` puts the image(s) after the text of a user turn instead of before
    it (the usual order): a model trained that way needs it (the shapes world's demo agents,
    whose first reasoning step, describing the picture, then directly follows it).
    """

    images_after_text: bool = False

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
    choices: str = "{question}\nOptions:\n{options}"
    final_answer: str = (
        "The reasoning is complete. Now give the final answer to the question. Reply with only "
        'a JSON object {"answer": "<the final answer, as short as the question allows; the '
        'option letter for a multiple-choice question>"}.'
    )
    judge_system: str = (
        "You check answers. Given a question, its ground-truth answer and an answer to check, "
        "decide whether the answer to check means the same as the ground truth (equivalent "
        "wording, units, rounding or option letter all count as correct). Reply with only a "
        'JSON object {"correct": true or false, "reason": "<one short sentence>"}.'
    )
    judge_user: str = (
        "Question: {question}\nGround-truth answer: {truth}\nAnswer to check: {answer}"
    )
    score_system: str = (
        "You are the scoring agent of a data pipeline. You are given an image question, its "
        "ground-truth answer and {paths} reasoning paths written for it by other models. Score "
        "every path from 1 to 100 for step-by-step accuracy (are the observations and each "
        "inference correct, and does the path reach the ground truth for the right reasons?) "
        "and level of detail (are the steps complete and clear, without padding?). Compare the "
        "paths with each other so that the scores are consistent. Reply with only a JSON object "
        '{{"scores": [{{"path": 1, "score": <1-100>, "comment": "<the main strength or flaw, '
        'one sentence>"}}, ...]}} with one entry for each of the {paths} paths, in order.'
    )
    score_user: str = "Question: {question}\nGround-truth answer: {truth}\n\n{paths}"
    score_path: str = "=== Path {index} ===\n{reasoning}\nFinal answer: {answer}"


DEFAULT_PROMPTS = Prompts()


_CHOOSE = ('Think briefly, then end your reply with exactly "Since <your reason>, I choose '
           'response 1." or "Since <your reason>, I choose response 2."')


@dataclass(frozen=True)
class StagePrompts:
    """The texts of the LLaVA-CoT method: the four-stage response and its judges.

    ``system`` teaches an untrained model the tagged format; a model trained on LLaVA-CoT
    data needs none (set it to ``""``). ``judge_<target>`` is the criterion of the pairwise
    judge for each stage, for whole responses (best-of-N) and for sentences.
    ``images_after_text``: as in :class:`Prompts`.
    """

    images_after_text: bool = False
    system: str = (
        "Answer the question about the image(s) in four stages, each inside its tags, in this "
        "order: <SUMMARY> how you will approach the problem, without solving it yet "
        "</SUMMARY> <CAPTION> what in the image matters for the question </CAPTION> "
        "<REASONING> the step-by-step logic that solves it </REASONING> <CONCLUSION> the "
        "final answer only; for a multiple-choice question only the option </CONCLUSION>."
    )
    question: str = "{question}"
    judge_system: str = (
        "You compare two candidate continuations of a response to a question about the "
        f"image(s) and decide which is better. {_CHOOSE}"
    )
    judge_user: str = (
        "Question: {question}\n\n{context}Response 1:\n{first}\n\nResponse 2:\n{second}\n\n"
        "Criterion: {criterion}"
    )
    judge_context: str = "The response so far (shared by both):\n{prefix}\n\n"
    judge_summary: str = (
        "Which response better outlines how to approach the question, without doing the "
        "detailed reasoning yet?"
    )
    judge_caption: str = (
        "Which response describes more accurately and more usefully what in the image "
        "matters for the question?"
    )
    judge_reasoning: str = (
        "Which response explains the reasoning more clearly and with fewer errors? The image "
        "description in the response so far can be taken as a hint."
    )
    judge_conclusion: str = (
        "Which conclusion follows better from the reasoning and answers the question? A "
        "conclusion that refuses to answer is worse."
    )
    judge_response: str = "Which response answers the question better and more correctly?"
    judge_sentence: str = (
        "Which next sentence continues the response better: more accurate, and more useful "
        "for answering the question?"
    )
    check_system: str = (
        "You check one piece of reasoning about an image. Assume the image description it "
        "builds on is right. Start your reply with \"Correct\" if every step of the reasoning "
        "holds, or \"Incorrect\" if any step is wrong, then say why in one sentence."
    )
    check_user: str = (
        "Question: {question}\n\nImage description: {caption}\n\nReasoning:\n{reasoning}\n\n"
        "Is this reasoning correct?"
    )
    reask: str = "Your reply could not be read: {error}\nReply again in the requested form."

    def criterion(self, target: str) -> str:
        """The judge's criterion for ``target``: a stage, ``response`` or ``sentence``."""
        return str(getattr(self, f"judge_{target}"))


DEFAULT_STAGE_PROMPTS = StagePrompts()


def user_content(prompts: Prompts | StagePrompts, images: list[str], text: str
                 ) -> list[str | dict[Any, Any]]:
    """A user turn's content parts: the image(s) and the text, in the prompts' order."""
    parts: list[str | dict[Any, Any]] = list(image_parts(images))
    words: list[str | dict[Any, Any]] = [{"type": "text", "text": text}]
    return [*words, *parts] if prompts.images_after_text else [*parts, *words]


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
        *_system(system), HumanMessage(content=user_content(prompts, images, text))]
    if mode == "step":
        for step in steps:
            messages += [AIMessage(format_step(step)), HumanMessage(prompts.next_step)]
    elif steps:
        messages += [AIMessage(format_chain(steps)), HumanMessage(prompts.continue_chain)]
    return messages


def summary_messages(
    *, prompts: Prompts, question: str, images: list[str], steps: list[ReasoningStep],
    render: Callable[[list[ReasoningStep], Prompts], str] = render_reasoning,
) -> list[BaseMessage]:
    """The conversation for the summary agent: question, image(s) and the reasoning as
    ``render`` shows it."""
    text = prompts.summary_user.format(question=question, reasoning=render(steps, prompts))
    return [*_system(prompts.summary_system),
            HumanMessage(content=user_content(prompts, images, text))]


def _system(text: str) -> list[BaseMessage]:
    """The system turn, none when the prompt is empty (a model trained without one)."""
    return [SystemMessage(text)] if text else []


def format_question(question: str, choices: list[str] | None, prompts: Prompts) -> str:
    """The question text the agents see: with its lettered options, if it has any."""
    if not choices:
        return question
    options = "\n".join(f"({letter}) {choice}" for letter, choice
                        in zip(string.ascii_uppercase, choices, strict=False))
    return prompts.choices.format(question=question, options=options)


def final_answer_messages(
    *, prompts: Prompts, question: str, images: list[str], steps: list[ReasoningStep]
) -> list[BaseMessage]:
    """The step-mode reasoning conversation so far, then the request for the final answer."""
    messages = reasoning_messages(prompts=prompts, mode="step", question=question,
                                  images=images, steps=steps)
    return [*messages, HumanMessage(prompts.final_answer)]


def judge_messages(*, prompts: Prompts, question: str, truth: str, answer: str
                   ) -> list[BaseMessage]:
    """The answer judge's conversation (text only)."""
    return [SystemMessage(prompts.judge_system),
            HumanMessage(prompts.judge_user.format(question=question, truth=truth,
                                                   answer=answer))]


def score_messages(
    *, prompts: Prompts, question: str, truth: str, images: list[str],
    paths: list[tuple[list[ReasoningStep], str]], max_path_chars: int | None = None,
) -> list[BaseMessage]:
    """The scoring agent's conversation: every path of one question, in a single request.
    With ``max_path_chars``, each path's reasoning is cut to that length (and says so), so
    that the request of a question with many long paths stays within the model's context."""
    def reasoning(steps: list[ReasoningStep]) -> str:
        text = render_reasoning(steps, prompts)
        if max_path_chars is None or len(text) <= max_path_chars:
            return text
        return f"{text[:max_path_chars]} [... {len(text) - max_path_chars} characters cut]"

    blocks = "\n\n".join(
        prompts.score_path.format(index=index, reasoning=reasoning(steps),
                                  answer=answer or "(none)")
        for index, (steps, answer) in enumerate(paths, 1))
    text = prompts.score_user.format(question=question, truth=truth, paths=blocks)
    return [
        SystemMessage(prompts.score_system.format(paths=len(paths))),
        HumanMessage(content=user_content(prompts, images, text)),
    ]


def stage_messages(*, prompts: StagePrompts, question: str, images: list[str], prefix: str = ""
                   ) -> list[BaseMessage]:
    """The conversation that asks for a LLaVA-CoT response, or (``prefix`` given) for the
    continuation of one: the prefix is the final assistant turn, which backends that can
    (vLLM, the in-process transformers model) continue rather than answer."""
    messages = _system(prompts.system)
    text = prompts.question.format(question=question)
    messages.append(HumanMessage(content=user_content(prompts, images, text)))
    if prefix:
        messages.append(AIMessage(prefix))
    return messages


def pairwise_messages(*, prompts: StagePrompts, target: str, question: str, images: list[str],
                      prefix: str, first: str, second: str) -> list[BaseMessage]:
    """The judge's conversation: which of two candidates for ``target`` is better."""
    context = prompts.judge_context.format(prefix=prefix) if prefix else ""
    text = prompts.judge_user.format(question=question, context=context,
                                     first=first or "(empty)", second=second or "(empty)",
                                     criterion=prompts.criterion(target))
    return [SystemMessage(prompts.judge_system),
            HumanMessage(content=user_content(prompts, images, text))]


def check_messages(*, prompts: StagePrompts, question: str, images: list[str], caption: str,
                   reasoning: str) -> list[BaseMessage]:
    """The single-candidate correctness check of a reasoning stage."""
    text = prompts.check_user.format(question=question, caption=caption or "(none)",
                                     reasoning=reasoning or "(empty)")
    return [SystemMessage(prompts.check_system),
            HumanMessage(content=user_content(prompts, images, text))]


def reask_messages(
    messages: list[BaseMessage], reply: str, error: str, prompts: Prompts | StagePrompts
) -> list[BaseMessage]:
    """``messages`` plus the unreadable reply and a request to answer again, naming the error."""
    return [*messages, AIMessage(reply[:4000]), HumanMessage(prompts.reask.format(error=error))]
