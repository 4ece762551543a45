"""Which models a run uses — a vLLM server, a model in-process, the demo agents, or a scripted
stand-in that says it is one — and the method over them: what the CLI's commands and the
harness models (:mod:`insightv_agents.harnesses`) build from the same plain options."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage

from insightv_agents import demo
from insightv_agents.answers import AnswerRules
from insightv_agents.cards import MAX_TEMPERATURE, AgentCard, card_of, read_card
from insightv_agents.errors import InsightVError, check_number
from insightv_agents.graphs import create_insightv_graph, create_stage_beam_graph
from insightv_agents.images import ImagePolicy
from insightv_agents.prompts import DEFAULT_STAGE_PROMPTS, ReasoningMode
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
    """The models of a run.

    Attributes:
        reasoner, summarizer: the chat models (``summarizer=None``: the reasoner plays both);
            each carries its agent card where it has one, which the graph follows.
        description: what they are, for the user (``None`` for the scripted stand-in).
    """

    reasoner: Any
    summarizer: Any
    description: str | None

    def answer_rules(self) -> AnswerRules | None:
        """The answer rules the reasoning agent's card gives, if it gives any."""
        return AnswerRules.from_card(card_of(self.reasoner))


def choose_backend(base_url: str | Sequence[str] | None, model: str,
                   summary_base_url: str | Sequence[str] | None,
                   summary_model: str | None, local_model: str | None,
                   local_adapter: str | None, temperature: float | None, staged: bool = False,
                   default_temperature: float = 0.2) -> Backend:
    """The backend the options name. With none given: the demo agents, or for the
    LLaVA-CoT methods the scripted stand-in. Sampling: ``temperature`` when given (checked
    here, whichever backend runs), else the agent card's, else ``default_temperature``.
    Several URLs (a list) are the replicas of an endpoint pool."""
    base_url = base_url or None  # typer gives an empty list for a list option not given
    summary_base_url = summary_base_url or None
    if temperature is not None:
        check_number("--temperature", temperature, 0, MAX_TEMPERATURE)
    if local_model is not None and base_url is not None:
        raise InsightVError("pass either --base-url or --local-model, not both.")
    if base_url is None and (summary_base_url or summary_model):
        raise InsightVError("--summary-base-url/--summary-model need --base-url as well.")

    def sampling(card: AgentCard | None) -> float:
        if temperature is not None:
            return temperature
        recommended = card.sampling.temperature if card is not None else None
        return default_temperature if recommended is None else recommended

    if local_model is not None:
        from insightv_agents.backends.transformers import ChatTransformersVLM

        card = read_card(local_adapter) or read_card(local_model)
        local = ChatTransformersVLM(model_path=local_model, adapter_path=local_adapter,
                                    temperature=sampling(card))
        adapter = f" + adapter {local_adapter}" if local_adapter else ""
        return Backend(local, None, f"{local_model}{adapter} in-process (transformers)")
    if base_url is None:
        if staged or not demo.demo_available():
            return Backend(stand_in_stage_model() if staged else stand_in_model(), None, None)
        reasoner, summarizer = demo.demo_agents(temperature=temperature)
        return Backend(reasoner, summarizer, DEMO_BACKEND)
    from insightv_agents.backends.vllm import EndpointPool, endpoints, served_card, vllm_chat_model

    def served(urls: str | Sequence[str] | EndpointPool, name: str) -> Any:
        where = endpoints(urls)  # one pool for the card's lookup and the model
        card = served_card(where, name)
        return vllm_chat_model(where, name, temperature=sampling(card), card=card)

    reasoner = served(base_url, model)
    where = base_url if isinstance(base_url, str) else ", ".join(base_url)
    description = f"{model} at {where}"
    if summary_model is None and summary_base_url is None:
        return Backend(reasoner, None, description)
    if summary_base_url is None and reasoner.pool is not None:
        summary_base_url = reasoner.pool  # one pool: its replicas' load counted once
    summarizer = served(summary_base_url or base_url, summary_model or model)
    return Backend(reasoner, summarizer, f"{description}, summary: {summary_model or model}")


def build_graph(method: str, reasoner: Any, summarizer: Any, *, mode: str | None,
                max_steps: int, max_revisions: int, beam_size: int,
                policy: ImagePolicy | None = None) -> Any:
    """The compiled graph of ``method`` (``insightv`` or a LLaVA-CoT search). ``mode``
    ``None``: as the agents' cards say (step mode without one)."""
    if method == "insightv":
        return create_insightv_graph(
            reasoner=reasoner, summarizer=summarizer,
            mode=reasoning_mode(mode) if mode is not None else None,
            max_steps=max_steps, max_revisions=max_revisions,
            image_policy=policy).compile(name="insightv")
    return create_stage_beam_graph(
        reasoner, beam_size=beam_size, search=METHODS[method],  # type: ignore[arg-type]
        summarizer=summarizer, image_policy=policy).compile(name=method)


def reasoning_mode(mode: str) -> ReasoningMode:
    """``--mode``'s value, checked."""
    if mode == "step":
        return "step"
    if mode == "chain":
        return "chain"
    raise InsightVError(f"--mode must be 'step' or 'chain', not {mode!r}.")


@dataclass(frozen=True)
class Evaluation:
    """What ``insightv eval`` runs, as plain values: Ray workers and the harness models
    (:mod:`insightv_agents.harnesses`) build the same models and method from them."""

    method: str
    data: str
    root: str
    base_url: tuple[str, ...]
    local_model: str | None
    local_adapter: str | None
    model: str
    summary_base_url: tuple[str, ...]
    summary_model: str | None
    mode: str | None
    max_steps: int
    temperature: float | None
    beam_size: int
    checks: str | None
    limit: int | None
    labels: str | None

    def build(self) -> tuple[Backend, dict[str, Any], dict[str, Any]]:
        """The backend, the run's settings (``eval.json``), and how each item is predicted
        and judged: ``predict``, ``rules``, ``reasoning_check`` (the arguments of
        :func:`~insightv_agents.evaluate.evaluate` and ``prediction_step``)."""
        from insightv_agents.evaluate import (
            DatasetChecks,
            direct_predictor,
            graph_predictor,
            load_checks,
        )
        from insightv_agents.synthesize import describe_model

        backend = choose_backend(
            self.base_url, self.model, self.summary_base_url, self.summary_model,
            self.local_model, self.local_adapter, self.temperature,
            staged=self.method not in ("insightv", "direct"), default_temperature=0.0)
        mode = self.mode
        if mode is None and card_of(backend.reasoner) is None:
            mode = "chain"
        predict = direct_predictor(backend.reasoner) if self.method == "direct" else \
            graph_predictor(build_graph(self.method, backend.reasoner, backend.summarizer,
                                        mode=mode, max_steps=self.max_steps, max_revisions=0,
                                        beam_size=self.beam_size))
        dataset = load_checks(self.checks, self.root) if self.checks else DatasetChecks()
        rules = answer_rules(self.labels) or (dataset.rules if self.checks else None) \
            or backend.answer_rules() or dataset.rules
        settings: dict[str, Any] = {
            "method": self.method, "data": self.data, "backend": backend.description,
            "reasoner": describe_model(backend.reasoner),
            "summarizer": describe_model(backend.summarizer),
            "mode": mode, "beam_size": self.beam_size, "limit": self.limit}
        if self.checks:
            settings["checks"] = self.checks
        if self.labels:
            settings["labels"] = sorted(rules.labels)
        return backend, settings, {"predict": predict, "rules": rules,
                                   "reasoning_check": dataset.reasoning_check}


def evaluation_worker(run: Evaluation) -> Any:
    """A Ray worker's evaluation step: ``run``'s models and method built in the worker."""
    from insightv_agents.evaluate import prediction_step

    return prediction_step(**run.build()[2])


def answer_rules(labels: str | None) -> Any:
    """The closed answer set ``--labels`` gives, if it gives one."""
    from insightv_agents.answers import AnswerRules

    if labels is None:
        return None
    words = frozenset(word.strip() for word in labels.split(",") if word.strip())
    if not words:
        raise InsightVError("--labels names no answer (comma-separated words).")
    return AnswerRules(labels=words)
