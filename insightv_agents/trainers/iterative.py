"""Iterative DPO of the reasoning agent (Insight-V, section 4): for t = 1..T, sample N
paths per question from M_t **through the synthesis graph**, score them, build the pairs
D_t, and train M_{t+1} from M_t with M_t as the reference.

Each round lives in ``<output_dir>/round-<t>/``: ``samples/`` (a synthesis output, itself
append-only and resumable), ``pairs/`` (the DPO dataset), ``model/`` (the trained adapter
or model, with TRL checkpoints) and ``round.json``, written last: a round with it is
finished. A killed run, started again with the same arguments, skips finished rounds and
resumes the unfinished one (its samples from the record log, its training from the newest
checkpoint). ``rounds.md``, ``rounds.json`` and ``rounds.svg`` hold the round metrics.

Sampling goes through a :class:`Policy`: :class:`InProcessPolicy` (transformers) or
:class:`VLLMPolicy` (a running vLLM server that loads each round's adapter without a
restart).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from langchain_core.language_models import BaseChatModel, LanguageModelLike

from insightv_agents.answers import DEFAULT_RULES, AnswerRules, FinalAnswer
from insightv_agents.assessment import PathScorer
from insightv_agents.cards import read_card
from insightv_agents.errors import BackendError, ConfigError, InvalidInputError
from insightv_agents.files import read_json
from insightv_agents.formats import card_profile, json_profile
from insightv_agents.prompts import PROMPTS_VERSION, Prompts, ReasoningMode
from insightv_agents.trained import model_name, resolve_model, same_model
from insightv_agents.trainers.common import check_config, option, write_atomic
from insightv_agents.trainers.dpo import DPOConfig, train_dpo
from insightv_agents.trainers.report import write_round_report

ROUND_FILE = "round.json"


@dataclass
class IterativeDPOConfig(DPOConfig):
    """The config of an iterative-DPO run: each round's DPO is this config (a
    :class:`~insightv_agents.trainers.dpo.DPOConfig`) with ``output_dir`` set to the round's
    model folder; these fields say how rounds sample and pair.

    Args:
        output_dir: the run's folder (one sub-folder per round).
        rounds: T, the number of rounds (the paper: 3).
        paths: N, reasoning paths sampled per question and round.
        mode: how the policy writes its reasoning: ``"chain"`` (one call, as trained by
            ``build-data sft-reason --mode chain``) or ``"step"``; default: as the policy's
            agent card says, else chain.
        reasoning_max_steps, reasoning_max_retries: caps of each sampled path.
        final_answer: how a sampled path without a summarizer gets its answer: ``"ask"``
            (the policy is asked after its reasoning) or ``"stated"`` (the answer its last
            step states, "The answer is X": a chain-trained reasoning agent was never taught
            the final-answer request).
        concurrency: questions sampled at once.
        questions_per_round: each round samples its own slice of this many questions, in
            the items' order (round 1 the first n, round 2 the next n, wrapping round at the
            end), so later rounds do not fit the same questions again; None: every round
            samples every question (the paper's setting on a large pool).
        min_margin, min_chosen_score, pairs_per_question: how pairs are picked
            (see :func:`~insightv_agents.trainers.data.build_dpo_pairs`).
    """

    rounds: int = option(3, "Rounds T.")
    paths: int = option(4, "Paths sampled per question and round.")
    mode: ReasoningMode | None = option(
        None, "How the policy reasons: chain (a chain per call) or step (a step per call); "
              "default: its agent card's, else chain.")
    reasoning_max_steps: int = option(16, "Cap on the steps of a sampled path.")
    reasoning_max_retries: int = option(2, "Retries of a sampled path's malformed step.")
    final_answer: FinalAnswer = option("ask", "Without a summarizer, each path's answer: ask "
                                              "(the policy is asked after its reasoning) or "
                                              "stated (the answer its last step states).")
    concurrency: int = option(8, "Questions sampled at once.")
    questions_per_round: int | None = option(
        None, "Each round samples the next N questions of the input (wrapping round); "
              "default: every round samples them all.")
    min_margin: int = option(20, "Least chosen - rejected score margin of a pair.")
    min_chosen_score: int | None = option(None, "Least score of a chosen path.")
    pairs_per_question: int = option(1, "Most pairs made from one question.")

    def __post_init__(self) -> None:
        problems = [message for ok, message in [
            (1 <= self.rounds <= 100, "rounds must be within 1-100"),
            (2 <= self.paths <= 64, "paths must be within 2-64"),
            (self.mode in (None, "chain", "step"), "mode must be chain or step"),
            (1 <= self.reasoning_max_steps <= 256, "reasoning_max_steps must be within 1-256"),
            (0 <= self.reasoning_max_retries <= 10, "reasoning_max_retries must be within 0-10"),
            (self.final_answer in ("ask", "stated"), "final_answer must be ask or stated"),
            (1 <= self.concurrency <= 1024, "concurrency must be within 1-1024"),
            (self.questions_per_round is None or self.questions_per_round >= 1,
             "questions_per_round must be at least 1"),
            (0 <= self.min_margin <= 99, "min_margin must be within 0-99"),
            (self.min_chosen_score is None or 1 <= self.min_chosen_score <= 100,
             "min_chosen_score must be within 1-100"),
            (1 <= self.pairs_per_question <= 64, "pairs_per_question must be within 1-64"),
        ] if not ok]
        if problems:
            raise ConfigError(f"invalid IterativeDPOConfig: {'; '.join(problems)}.")
        super().__post_init__()

    def round_dpo(self, round_number: int) -> DPOConfig:
        """The DPO config of one round: this one, writing to the round's model folder."""
        return replace(self, output_dir=str(self.round_dir(round_number) / "model"))

    def round_dir(self, round_number: int) -> Path:
        return Path(str(self.output_dir)) / f"round-{round_number}"

    def round_questions(self, round_number: int, count: int) -> list[int]:
        """Indexes of the questions (of ``count``) that one round samples."""
        return round_slice(round_number, count, self.questions_per_round)


def round_slice(round_number: int, count: int, per_round: int | None) -> list[int]:
    """Indexes of the questions (of ``count``) round ``round_number`` samples: the next
    ``per_round`` of them, wrapping round (all of them for ``None``)."""
    if per_round is None or per_round >= count:
        return list(range(count))
    start = (round_number - 1) * per_round
    return [(start + offset) % count for offset in range(per_round)]


@runtime_checkable
class Policy(Protocol):
    """Where the policy M_t samples from: a chat model for a round's model folder."""

    def chat_model(self, model: str, round_number: int) -> BaseChatModel:
        """A chat model sampling from ``model`` (a model folder or an adapter output)."""
        ...


@dataclass
class InProcessPolicy:
    """Samples in-process with ``ChatTransformersVLM`` (each round loads the round's model
    or adapter)."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 1024
    device: str = "auto"
    seed: int | None = None

    def chat_model(self, model: str, round_number: int) -> BaseChatModel:
        from insightv_agents.backends.transformers import ChatTransformersVLM

        return ChatTransformersVLM(model_path=model, temperature=self.temperature,
                                   top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                                   device=self.device, seed=self.seed)


@dataclass
class VLLMPolicy:
    """Samples from a running :class:`~insightv_agents.backends.vllm.VLLMServer`
    (started with ``runtime_lora=True``): each round's adapter is loaded into it by name
    (``<adapter_prefix>-<t>``), no restart. The server serves the base model; rounds must be
    LoRA adapters on it (full fine-tuned rounds need a new server: use
    :class:`InProcessPolicy`). Two policies sharing a server (the self-improving loop's two
    agents) take different prefixes."""

    server: Any
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024
    adapter_prefix: str = "round"

    def chat_model(self, model: str, round_number: int) -> BaseChatModel:
        base, adapter = resolve_model(model)
        settings = {"temperature": self.temperature, "top_p": self.top_p,
                    "max_tokens": self.max_tokens}
        if adapter is None:
            if same_model(base, self.server.model):
                return self.server.chat_model(self.server.served_model_name, **settings)
            raise ConfigError(f"the vLLM server serves {self.server.model}, not {base}: a "
                              "full model per round needs InProcessPolicy (or LoRA rounds).")
        if not same_model(base, self.server.model):
            raise ConfigError(f"the adapter {adapter} is for {base}, but the vLLM server "
                              f"serves {self.server.model}.")
        name = f"{self.adapter_prefix}-{round_number}"
        if self.server.adapters.get(name) != adapter:
            if name in self.server.adapters:
                self.server.unload_adapter(name)
            self.server.load_adapter(name, adapter)
        return self.server.chat_model(name, **settings)


@dataclass(frozen=True)
class IterativeResult:
    """The run's rounds (their metrics, in order) and the final model M_{T+1}."""

    rounds: list[dict[str, Any]]
    final_model: str


def iterative_dpo(
    model: str | Path,
    items: str | Path,
    config: IterativeDPOConfig | dict[str, Any],
    *,
    scorer: LanguageModelLike | PathScorer,
    judge: LanguageModelLike | None = None,
    summarizer: LanguageModelLike | None = None,
    policy: Policy | None = None,
    prompts: Prompts | None = None,
    rules: AnswerRules = DEFAULT_RULES,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> IterativeResult:
    """Run T rounds of iterative DPO from ``model`` (M_1: a model folder or an adapter
    output, e.g. the reasoning agent's SFT output) on the questions in ``items`` (the
    synthesis input format: image, question, answer[, id, choices]), as ``config`` (an
    :class:`IterativeDPOConfig` or a dict of its fields) says.

    Args:
        scorer: scores each question's paths (an MLLM, or a
            :class:`~insightv_agents.assessment.PathScorer` such as ``RuleScorer``).
        judge: decides answers the rules cannot; summarizer: gives each path's final answer
            (the summary agent; without one, as ``config.final_answer`` says).
        policy: where M_t samples (default: :class:`InProcessPolicy`).
        prompts: the prompts M_t is sampled with and its pairs are written in (default: as
            its agent card says, else ours).
        rules: how each path's answer is checked against the ground truth.
        on_round: called with each round's metrics when the round finishes (on the main
            process only, under ``accelerate launch``).

    Raises:
        ConfigError, InvalidInputError: before any round, for a bad config or items;
        BackendError: when items fail to sample (rerun to resume).
    """
    from insightv_agents.synthesize import load_items

    config = check_config(config, IterativeDPOConfig)
    if scorer is None:
        raise ConfigError("iterative_dpo needs a scorer (an MLLM or a PathScorer such as "
                          "RuleScorer): the policy must not score its own paths.")
    if config.final_answer == "stated" and summarizer is not None:
        raise ConfigError("final_answer='stated' reads each path's last step; with a "
                          "summarizer, the summarizer answers. Pass one or the other.")
    load_items(items)  # every item is checked before any round
    from accelerate import PartialState

    policy = policy or InProcessPolicy()
    current = start_model(model)
    rounds: list[dict[str, Any]] = []
    main = PartialState().is_main_process  # under accelerate launch, one process reports
    # One event loop for every round: HTTP clients that models cache stay bound to it.
    with asyncio.Runner() as loop:
        for number in range(1, config.rounds + 1):
            finished = finished_round(config.round_dir(number))
            if finished is None:
                finished = _run_round(number, current, items, config, loop=loop,
                                      policy=policy, scorer=scorer, judge=judge,
                                      summarizer=summarizer, prompts=prompts, rules=rules)
                if on_round is not None and main:
                    on_round(finished)
            rounds.append(finished)
            current = finished["model_out"]
            if main:
                write_round_report(Path(str(config.output_dir)), rounds)
    return IterativeResult(rounds=rounds, final_model=current)


def _run_round(number: int, current: str, items: str | Path, config: IterativeDPOConfig, *,
               loop: asyncio.Runner, policy: Policy, scorer: Any, judge: Any, summarizer: Any,
               prompts: Prompts | None, rules: AnswerRules) -> dict[str, Any]:
    from accelerate import PartialState

    from insightv_agents.trainers.data import build_dpo_pairs, load_records

    card = read_card(current)  # M_t is driven as it was trained (chain mode by default)
    profile = json_profile(card_profile(card, mode=config.mode or (
        None if card is not None else "chain"), prompts=prompts), "iterative DPO")
    mode, prompts = profile.mode, profile.prompts
    folder = config.round_dir(number)
    samples = folder / "samples"
    state = PartialState()
    started = time.perf_counter()
    if state.is_main_process:  # under accelerate launch, one process samples
        sample_round(number, current, items, samples, config, mode, loop=loop, policy=policy,
                     scorer=scorer, judge=judge, summarizer=summarizer, prompts=prompts,
                     rules=rules)
    state.wait_for_everyone()
    sampled_seconds = time.perf_counter() - started
    records = load_records(samples)
    metrics: dict[str, Any] = {"round": number, "model_in": current,
                               **sample_metrics(records.questions.values())}
    try:
        pairs, report = build_dpo_pairs(records, min_margin=config.min_margin,
                                        min_chosen_score=config.min_chosen_score,
                                        pairs_per_question=config.pairs_per_question,
                                        prompts=prompts)
    except InvalidInputError:
        pairs, report = None, None
    metrics["pairs"] = 0 if pairs is None else len(pairs)
    metrics["skipped_questions"] = dict(report.skipped) if report is not None else {}
    metrics["sampling_seconds"] = round(sampled_seconds, 3)
    if pairs is None:  # nothing to learn from: M_{t+1} = M_t, said in the metrics
        metrics.update(model_out=current, trained=False, train_loss=None, reward_margin=None,
                       training_seconds=0.0)
    else:
        if state.is_main_process and not (folder / "pairs").exists():
            pairs.save_to_disk(str(folder / "pairs.tmp"))  # then renamed: never half written
            (folder / "pairs.tmp").replace(folder / "pairs")
        state.wait_for_everyone()
        result = train_dpo(current, str(folder / "pairs"), config.round_dpo(number))
        metrics.update(model_out=str(result.output_dir), trained=True,
                       train_loss=result.metrics.get("train_loss"),
                       reward_margin=result.metrics.get("last_logged_reward_margin"),
                       training_seconds=result.metrics.get("wall_seconds"))
    if state.is_main_process:
        write_atomic(folder / ROUND_FILE, json.dumps(metrics, indent=2, default=str))
    state.wait_for_everyone()
    return metrics


def sample_round(number: int, current: str, items: str | Path, samples: Path, config: Any,
                 mode: ReasoningMode, *, loop: asyncio.Runner, policy: Policy, scorer: Any,
                 judge: Any, summarizer: Any, prompts: Prompts, rules: AnswerRules,
                 max_revisions: int = 0) -> None:
    """Sample round ``number``'s paths from ``current`` through the synthesis graph into
    ``samples`` (append-only; a rerun resumes), as ``config`` (an :class:`IterativeDPOConfig`
    or the loop's config: ``paths``, ``reasoning_max_*``, ``final_answer``, ``concurrency``,
    ``round_questions``) says; with ``max_revisions``, ``summarizer`` sends flawed paths
    back for revision.

    Raises:
        BackendError: when items fail to sample (rerun to resume).
    """
    from insightv_agents.graphs.synthesis import create_synthesis_graph
    from insightv_agents.synthesize import describe_model, load_items, synthesize, write_run_file

    loaded, root = load_items(items, out=samples)
    chosen = config.round_questions(number, len(loaded))
    loaded = [loaded[index] for index in chosen]
    sampler = policy.chat_model(current, number)
    graph = create_synthesis_graph(teacher=sampler, scorer=scorer, judge=judge,
                                   summarizer=summarizer, mode=mode, paths=config.paths,
                                   max_steps=config.reasoning_max_steps,
                                   max_retries=config.reasoning_max_retries,
                                   prompts=prompts, rules=rules,
                                   final_answer=config.final_answer,
                                   max_revisions=max_revisions,
                                   ).compile(name=f"round-{number}")
    provenance = {"teacher": {**describe_model(sampler), "policy_model": current},
                  "scorer": describe_model(scorer), "judge": describe_model(judge),
                  "summarizer": describe_model(summarizer), "max_steps": config.reasoning_max_steps,
                  "mode": mode, "final_answer": config.final_answer,
                  "max_revisions": max_revisions,
                  "prompts_version": PROMPTS_VERSION, "round": number}
    write_run_file(samples, {"input": str(items), "data_root": str(root),
                             "question_ids": [item.id for item in loaded],
                             "paths": config.paths, **provenance})
    report = loop.run(synthesize(graph, loaded, samples, concurrency=config.concurrency,
                                 provenance=provenance))
    if report.errors:
        shown = "; ".join(f"{item}: {error}" for item, error in report.errors[:3])
        raise BackendError(f"round {number}: {len(report.errors)} item(s) failed to sample "
                           f"({shown}). Rerun to resume; see {samples / 'errors.jsonl'}.")


def sample_metrics(questions: Sequence[list[dict[str, Any]]] | Any) -> dict[str, Any]:
    """A round's sample metrics: questions, paths, failed paths, accuracy, mean score."""
    paths = [path for group in questions for path in group]
    scored = [path["score"] for path in paths if path["score"] is not None]
    return {
        "questions": len(list(questions)), "paths": len(paths),
        "failed_paths": sum(path["status"] != "ok" for path in paths),
        "accuracy": round(sum(path["correct"] is True for path in paths) / len(paths), 4)
        if paths else None,
        "mean_score": round(sum(scored) / len(scored), 2) if scored else None,
    }


def finished_round(folder: Path) -> dict[str, Any] | None:
    """The metrics of the round finished in ``folder`` (its round file), else ``None``."""
    path = folder / ROUND_FILE
    if not path.exists():
        return None
    return read_json(path, what="the round file",
                     fix="Remove the round's folder to run the round again.",
                     field="output_dir")


def start_model(model: str | Path) -> str:
    """Where a run starts: a model folder's absolute path, an adapter output's adapter, or
    a model name as it is."""
    base, adapter = resolve_model(model)
    return adapter or model_name(base)


