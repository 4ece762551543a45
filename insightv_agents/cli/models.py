"""Which models a command runs: a vLLM server, a model in-process, the demo agents, or a
scripted stand-in that says it is one; and the graph of a method over them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage

from insightv_agents import demo
from insightv_agents.cli.common import reasoning_mode
from insightv_agents.errors import InsightVError
from insightv_agents.graphs import create_insightv_graph, create_stage_beam_graph
from insightv_agents.images import ImagePolicy
from insightv_agents.prompts import DEFAULT_PROMPTS, DEFAULT_STAGE_PROMPTS, Prompts
from insightv_agents.testing import ScriptedChatModel

DEMO_BACKEND = "the demo agents (shapes world, in-process; see insightv_agents.demo)"
STAND_IN_NOTICE = (
    "No model given: using a scripted stand-in (insightv_agents.testing.ScriptedChatModel). "
    "Its replies are canned text, not a model's reading of the image; the run shows the "
    "graph's flow only. Pass --base-url (an OpenAI-compatible server such as vLLM) or "
    "--local-model DIR (a transformers model run in-process) for real answers."
)


def stand_in_model() -> ScriptedChatModel:
    """The scripted stand-in used when no backend is given (it says so in every reply)."""
    steps = [
        {"summary": "Stand-in: read the question",
         "reasoning": "This is a scripted reply; no model has looked at the image.",
         "action": "continue"},
        {"summary": "Stand-in: hand over",
         "reasoning": "A real reasoning agent would write its steps here.", "action": "summary"},
    ]
    verdict = {"reasoning_correct": True, "critique": "",
               "answer": "(no model configured: scripted stand-in)"}
    return ScriptedChatModel([json.dumps(step) for step in steps] + [json.dumps(verdict)])


def stand_in_stage_model() -> ScriptedChatModel:
    """The scripted stand-in for the LLaVA-CoT methods: stage texts that say what they are,
    a judge that always keeps the first candidate, a check that always passes."""
    def reply(messages: list[BaseMessage]) -> str:
        system = messages[0].text if messages else ""
        if system == DEFAULT_STAGE_PROMPTS.judge_system:
            return "Since this is a scripted stand-in, I choose response 1."
        if system == DEFAULT_STAGE_PROMPTS.check_system:
            return "Correct: a scripted stand-in always says so."
        return ("<SUMMARY> Stand-in: a real model would plan here. </SUMMARY>\n\n<CAPTION> "
                "Stand-in: no model has looked at the image. </CAPTION>\n\n<REASONING> "
                "Stand-in: a real model would reason here. </REASONING>\n\n<CONCLUSION> (no "
                "model configured: scripted stand-in) </CONCLUSION>")

    return ScriptedChatModel([reply], cycle=True)


METHODS = {"stage-beam": "stage", "best-of-n": "best_of_n", "sentence-beam": "sentence",
           "single": "single"}


@dataclass(frozen=True)
class Backend:
    """The models of a run and how to drive them.

    Attributes:
        reasoner, summarizer: the chat models (``summarizer=None``: the reasoner plays both).
        description: what they are, for the user (``None`` for the scripted stand-in).
        prompts: the prompts they answer to (the demo agents were trained on their own).
        mode: how the reasoning agent is asked by default (the demo agents write chains).
    """

    reasoner: Any
    summarizer: Any
    description: str | None
    prompts: Prompts = DEFAULT_PROMPTS
    mode: str = "step"


def choose_backend(base_url: str | None, model: str, summary_base_url: str | None,
                   summary_model: str | None, local_model: str | None,
                   local_adapter: str | None,
                   temperature: float | None, staged: bool = False) -> Backend:
    """The backend the options name. With none given: the demo agents (greedy unless a
    temperature is given), or for the LLaVA-CoT methods the scripted stand-in."""
    if local_model is not None and base_url is not None:
        raise InsightVError("pass either --base-url or --local-model, not both.")
    sampling = 0.2 if temperature is None else temperature  # for a given backend
    if base_url is None and (summary_base_url or summary_model):
        raise InsightVError("--summary-base-url/--summary-model need --base-url as well.")
    if local_model is not None:
        from insightv_agents.backends.transformers import ChatTransformersVLM

        local = ChatTransformersVLM(model_path=local_model, adapter_path=local_adapter,
                                    temperature=sampling, max_new_tokens=512)
        adapter = f" + adapter {local_adapter}" if local_adapter else ""
        return Backend(local, None, f"{local_model}{adapter} in-process (transformers)")
    if base_url is None:
        if staged or not demo.demo_available():
            return Backend(stand_in_stage_model() if staged else stand_in_model(), None, None)
        reasoner, summarizer = demo.demo_agents(temperature=temperature or 0.0)
        return Backend(reasoner, summarizer, DEMO_BACKEND, prompts=demo.demo_prompts(),
                       mode="chain")
    from insightv_agents.backends.vllm import vllm_chat_model

    reasoner = vllm_chat_model(base_url, model, temperature=sampling)
    description = f"{model} at {base_url}"
    if summary_model is None and summary_base_url is None:
        return Backend(reasoner, None, description)
    summarizer = vllm_chat_model(summary_base_url or base_url, summary_model or model,
                                 temperature=sampling)
    return Backend(reasoner, summarizer, f"{description}, summary: {summary_model or model}")


def build_graph(method: str, reasoner: Any, summarizer: Any, *, mode: str, max_steps: int,
                max_revisions: int, beam_size: int, policy: ImagePolicy | None = None,
                prompts: Prompts = DEFAULT_PROMPTS) -> Any:
    """The compiled graph of ``method`` (``insightv`` or a LLaVA-CoT search)."""
    if method == "insightv":
        return create_insightv_graph(
            reasoner=reasoner, summarizer=summarizer, mode=reasoning_mode(mode),
            max_steps=max_steps, max_revisions=max_revisions, image_policy=policy,
            prompts=prompts).compile(name="insightv")
    return create_stage_beam_graph(
        reasoner, beam_size=beam_size, search=METHODS[method],  # type: ignore[arg-type]
        summarizer=summarizer, image_policy=policy).compile(name=method)
