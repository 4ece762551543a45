"""The self-improving loop (Insight-V++): both agents retrained on paths they made together.

Round t, from the reasoning agent M_t and the summary agent S_t:

1. **sample**: M_t writes ``paths`` chains per question through the synthesis graph; S_t
   judges each and sends a flawed one back with its critique (the revise loop, up to
   ``max_revisions`` times) and answers it; the answer rules check the answer and the
   scorer scores the question's paths together;
2. **keep** what the rules and scorer confirm: right answers, scored at least
   ``min_score``;
3. **retrain** both agents, by ``method``: ``"grpo"`` (M_t by GRPO on the round's questions,
   rewarded for the stated answer, the format and, with a path scorer, its score; S_t by
   judge GRPO on the round's right and flawed chains) or ``"sft"`` (M_t on the kept paths;
   S_t on verdicts of the round's chains).

Each round lives in ``<output_dir>/round-<t>/``: ``samples/`` (a synthesis output,
append-only), ``reasoner/`` and ``summary/`` (the trained agents, with TRL checkpoints) and
``round.json``, written last. A killed run, started again with the same arguments, skips
finished rounds and resumes the unfinished one at its step (the samples from the record
log; a finished training is not redone, an unfinished one resumes from its checkpoint).
``rounds.md``, ``rounds.json`` and ``rounds.svg`` hold the round metrics (accuracy, verdict
accuracy, reward, paths kept).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_core.language_models import LanguageModelLike

from insightv_agents.answers import DEFAULT_RULES, AnswerRules, FinalAnswer
from insightv_agents.assessment import PathScorer
from insightv_agents.cards import read_card
from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.formats import card_profile, json_profile
from insightv_agents.prompts import Prompts
from insightv_agents.trainers.common import check_config, finished_run, option, write_atomic
from insightv_agents.trainers.grpo import (
    GRPOConfig,
    judge_grpo_dataset,
    reasoning_grpo_dataset,
    train_grpo,
)
from insightv_agents.trainers.iterative import (
    ROUND_FILE,
    InProcessPolicy,
    Policy,
    finished_round,
    round_slice,
    sample_metrics,
    sample_round,
    start_model,
)
from insightv_agents.trainers.report import write_round_report
from insightv_agents.trainers.rewards import ScoreReward, default_rewards

LOOP_COLUMNS = (("round", "round"), ("accuracy", "sample accuracy"),
                ("verdict_accuracy", "verdict accuracy"), ("revised_paths", "revised"),
                ("paths", "paths"), ("kept_paths", "paths kept"),
                ("reasoner_reward", "reasoner reward"), ("summary_reward", "summary reward"),
                ("sampling_seconds", "sampling s"), ("training_seconds", "training s"))
LOOP_SERIES = (("accuracy", 1.0, "#1f77b4", "sample accuracy"),
               ("verdict_accuracy", 1.0, "#2ca02c", "verdict accuracy"),
               ("reasoner_reward", 1.0, "#d62728", "reasoner reward"))


@dataclass
class LoopConfig(GRPOConfig):
    """The config of a self-improving loop: each round's trainings are this config (a
    :class:`~insightv_agents.trainers.grpo.GRPOConfig`; for ``method="sft"``, its shared
    fields in an SFTConfig) with the round's output folder and agent; these fields say how
    rounds sample, keep and retrain.

    Args:
        output_dir: the run's folder (one sub-folder per round).
        rounds: rounds T.
        paths: chains sampled per question and round.
        max_revisions: times the summary agent may send a flawed chain back.
        method: ``"grpo"`` (Insight-V++) or ``"sft"`` (rejection-sampling fine-tuning).
        min_score: least score of a kept path (with a scorer).
        concurrency: questions sampled at once.
        questions_per_round: each round samples the next N questions (wrapping round);
            None: every round samples them all.
        sft_epochs: epochs of each round's SFT (``method="sft"``).
    """

    rounds: int = option(2, "Rounds T.")
    paths: int = option(4, "Chains sampled per question and round.")
    max_revisions: int = option(1, "Times the summary agent may send a flawed chain back "
                                   "with its critique.")
    method: Literal["grpo", "sft"] = option("grpo", "How both agents are retrained: grpo "
                                                    "(Insight-V++) or sft (on kept paths).")
    min_score: int | None = option(None, "Least score of a kept path.")
    concurrency: int = option(8, "Questions sampled at once.")
    questions_per_round: int | None = option(
        None, "Each round samples the next N questions (wrapping round); default: all.")
    sft_epochs: float = option(1.0, "Epochs of each round's SFT (method sft).")
    reasoning_max_steps: int = option(16, "Cap on the steps of a sampled chain.")
    reasoning_max_retries: int = option(2, "Retries of an unreadable reply.")

    def __post_init__(self) -> None:
        problems = [message for ok, message in [
            (1 <= self.rounds <= 100, "rounds must be within 1-100"),
            (1 <= self.paths <= 64, "paths must be within 1-64"),
            (0 <= self.max_revisions <= 16, "max_revisions must be within 0-16"),
            (self.method in ("grpo", "sft"), "method must be grpo or sft"),
            (self.min_score is None or 1 <= self.min_score <= 100,
             "min_score must be within 1-100"),
            (1 <= self.concurrency <= 1024, "concurrency must be within 1-1024"),
            (self.questions_per_round is None or self.questions_per_round >= 1,
             "questions_per_round must be at least 1"),
            (0 < self.sft_epochs <= 1000, "sft_epochs must be within (0, 1000]"),
            (1 <= self.reasoning_max_steps <= 256, "reasoning_max_steps must be within 1-256"),
            (0 <= self.reasoning_max_retries <= 10,
             "reasoning_max_retries must be within 0-10"),
        ] if not ok]
        if problems:
            raise ConfigError(f"invalid LoopConfig: {'; '.join(problems)}.")
        super().__post_init__()

    @property
    def final_answer(self) -> FinalAnswer:
        """How each sampled path gets its answer: the summary agent answers it."""
        return "ask"

    def round_dir(self, round_number: int) -> Path:
        return Path(str(self.output_dir)) / f"round-{round_number}"

    def round_questions(self, round_number: int, count: int) -> list[int]:
        """Indexes of the questions (of ``count``) that one round samples."""
        return round_slice(round_number, count, self.questions_per_round)

    def grpo(self, output_dir: Path, agent: Literal["reasoning", "summary"]) -> GRPOConfig:
        """This round's GRPO config for ``agent``: this one, writing to ``output_dir``."""
        return self.changed(output_dir=str(output_dir), agent=agent)

    def sft(self, output_dir: Path, agent: Literal["reasoning", "summary"]) -> Any:
        """This round's SFT config for ``agent``: the shared fields, ``sft_epochs``."""
        from insightv_agents.trainers.sft import SFTConfig

        shared = ("finetune", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                  "dtype", "seed", "report_to", "save_strategy", "save_steps", "resume",
                  "logging_steps", "use_cpu")
        return SFTConfig(output_dir=str(output_dir), agent=agent,
                         num_train_epochs=self.sft_epochs,
                         **{name: getattr(self, name) for name in shared})


@dataclass(frozen=True)
class LoopResult:
    """The run's rounds (their metrics, in order) and the final agents."""

    rounds: list[dict[str, Any]]
    reasoner: str
    summarizer: str


def self_improving_loop(
    reasoner: str | Path,
    summarizer: str | Path,
    items: str | Path,
    config: LoopConfig | dict[str, Any],
    *,
    scorer: LanguageModelLike | PathScorer,
    policy: Policy | None = None,
    summary_policy: Policy | None = None,
    prompts: Prompts | None = None,
    rules: AnswerRules | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    """Run T rounds of the self-improving loop from ``reasoner`` (M_1) and ``summarizer``
    (S_1) — model folders or adapter outputs, in our JSON formats — on the questions in
    ``items`` (the synthesis input format), as ``config`` (a :class:`LoopConfig` or a dict
    of its fields) says.

    Args:
        scorer: scores each question's paths (an MLLM, or a PathScorer such as
            ``RuleScorer``: a PathScorer also rewards GRPO, :class:`~insightv_agents.
            trainers.rewards.ScoreReward`).
        policy: where M_t samples (default: in-process at temperature 0.7);
            summary_policy: where S_t judges (default: in-process, greedy).
        prompts: the prompts both agents are sampled with and trained in (default: the
            reasoner's card's, else ours).
        rules: how answers are checked (default: the reasoner's card's, else ours).
        on_round: called with each round's metrics when it finishes.

    Raises:
        ConfigError, InvalidInputError: before any round, for a bad config or items;
        BackendError: when items fail to sample (rerun to resume).
    """
    from insightv_agents.synthesize import load_items

    config = check_config(config, LoopConfig)
    if scorer is None:
        raise ConfigError("the loop needs a scorer (an MLLM or a PathScorer such as "
                          "RuleScorer).")
    load_items(items)  # every item is checked before any round
    rules = rules or AnswerRules.from_card(read_card(reasoner)) or DEFAULT_RULES
    policy = policy or InProcessPolicy()
    summary_policy = summary_policy or InProcessPolicy(temperature=0.0)
    current = {"reasoner": start_model(reasoner), "summarizer": start_model(summarizer)}
    rounds: list[dict[str, Any]] = []
    with asyncio.Runner() as loop:
        for number in range(1, config.rounds + 1):
            folder = config.round_dir(number)
            finished = finished_round(folder)
            if finished is None:
                finished = _run_round(number, current, items, config, loop=loop,
                                      policy=policy, summary_policy=summary_policy,
                                      scorer=scorer, prompts=prompts, rules=rules)
                if on_round is not None:
                    on_round(finished)
            rounds.append(finished)
            current = {"reasoner": finished["reasoner_out"],
                       "summarizer": finished["summarizer_out"]}
            write_round_report(Path(str(config.output_dir)), rounds, LOOP_COLUMNS,
                               LOOP_SERIES)
    return LoopResult(rounds=rounds, reasoner=current["reasoner"],
                      summarizer=current["summarizer"])


def _run_round(number: int, current: dict[str, str], items: str | Path, config: LoopConfig, *,
               loop: asyncio.Runner, policy: Policy, summary_policy: Policy, scorer: Any,
               prompts: Prompts | None, rules: AnswerRules) -> dict[str, Any]:
    from insightv_agents.trainers.data import load_records

    profile = json_profile(card_profile(read_card(current["reasoner"]), mode="chain",
                                        prompts=prompts), "the self-improving loop")
    folder = config.round_dir(number)
    samples = folder / "samples"
    started = time.perf_counter()
    sample_round(number, current["reasoner"], items, samples, config, "chain", loop=loop,
                 policy=policy, scorer=scorer, judge=None,
                 summarizer=summary_policy.chat_model(current["summarizer"], number),
                 prompts=profile.prompts, rules=rules, max_revisions=config.max_revisions)
    records = load_records(samples)
    metrics: dict[str, Any] = {"round": number, "reasoner_in": current["reasoner"],
                               "summarizer_in": current["summarizer"],
                               **_round_metrics(records, config),
                               "sampling_seconds": round(time.perf_counter() - started, 3)}
    started = time.perf_counter()
    reasoner = _train_reasoner(number, current["reasoner"], items, records, config,
                               scorer=scorer, rules=rules, prompts=profile.prompts)
    summarizer = _train_summarizer(current["summarizer"], records, config,
                                   prompts=profile.prompts, rules=rules, round_dir=folder)
    metrics.update(reasoner_out=reasoner["model"], reasoner_reward=reasoner.get("reward"),
                   reasoner_trained=reasoner["trained"], summarizer_out=summarizer["model"],
                   summary_reward=summarizer.get("reward"),
                   summarizer_trained=summarizer["trained"],
                   training_seconds=round(time.perf_counter() - started, 3))
    write_atomic(folder / ROUND_FILE, json.dumps(metrics, indent=2, default=str))
    return metrics


def _round_metrics(records: Any, config: LoopConfig) -> dict[str, Any]:
    paths = [path for group in records.questions.values() for path in group]
    judged = [path for path in paths if path.get("correct") is not None
              and (path.get("verdict") or {}).get("reasoning_correct") is not None]
    return {
        **sample_metrics(records.questions.values()),
        "verdict_accuracy": round(sum(path["verdict"]["reasoning_correct"] is path["correct"]
                                      for path in judged) / len(judged), 4) if judged else None,
        "revised_paths": sum(bool(path.get("revisions")) for path in paths),
        "kept_paths": sum(_kept(path, config) for path in paths),
    }


def _kept(path: dict[str, Any], config: LoopConfig) -> bool:
    score = path.get("score")
    return path["status"] == "ok" and path.get("correct") is True and (
        config.min_score is None or (score is not None and score >= config.min_score))


def _train_reasoner(number: int, model: str, items: str | Path, records: Any,
                    config: LoopConfig, *, scorer: Any, rules: AnswerRules,
                    prompts: Any) -> dict[str, Any]:
    out = config.round_dir(number) / "reasoner"
    if config.method == "sft":
        from insightv_agents.trainers.data import build_reasoning_sft
        from insightv_agents.trainers.sft import train_sft

        try:
            data, _ = build_reasoning_sft(records, mode="chain", min_score=config.min_score,
                                          prompts=prompts)
        except InvalidInputError:
            return {"model": model, "trained": False}
        return _trained(out, lambda: train_sft(model, data, config.sft(out, "reasoning")))
    data = reasoning_grpo_dataset(items, prompts=prompts)
    chosen = config.round_questions(number, len(data))
    data = data.select(chosen)
    rewards = default_rewards("reasoning", profile=card_profile(read_card(model), mode="chain"),
                              rules=rules)
    if isinstance(scorer, PathScorer):
        rewards.append(ScoreReward(scorer, rules=rules, weight=0.5))
    return _trained(out, lambda: train_grpo(model, data, config.grpo(out, "reasoning"),
                                            rewards=rewards, rules=rules))


def _train_summarizer(model: str, records: Any, config: LoopConfig, *, prompts: Any,
                      rules: AnswerRules, round_dir: Path) -> dict[str, Any]:
    out = round_dir / "summary"
    try:
        if config.method == "sft":
            from insightv_agents.trainers.data import build_summary_sft
            from insightv_agents.trainers.sft import train_sft

            data, _ = build_summary_sft(records, prompts=prompts)
            return _trained(out, lambda: train_sft(model, data, config.sft(out, "summary")))
        judge = judge_grpo_dataset(records, prompts=prompts,
                                   profile=card_profile(read_card(model)))
    except InvalidInputError:  # no right or no flawed chain this round: S_{t+1} = S_t
        return {"model": model, "trained": False}
    return _trained(out, lambda: train_grpo(model, judge, config.grpo(out, "summary"),
                                            rules=rules))


def _trained(out: Path, train: Callable[[], Any]) -> dict[str, Any]:
    """A finished training in ``out`` as it is (a resumed round), else ``train()``'s."""
    run = finished_run(out)
    if run is None:
        result = train()
        metrics = result.metrics
    else:
        metrics = run.get("metrics", {})
    return {"model": str(out), "trained": True, "reward": metrics.get("last_logged_reward"),
            "loss": metrics.get("train_loss")}


