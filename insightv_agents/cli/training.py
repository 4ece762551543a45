"""``insightv train sft | dpo | iterate | grpo | loop``: the trainers (TRL + PEFT), from
the command line.

Each command's options are the fields of its config (:class:`~insightv_agents.trainers.sft.
SFTConfig`, :class:`~insightv_agents.trainers.dpo.DPOConfig`, :class:`~insightv_agents.
trainers.iterative.IterativeDPOConfig`: TRL's configs with what agent training adds) and of
a small dataclass of what the command reads, parsed by TRL's own ``TrlParser`` as ``trl sft``
does: ``--learning_rate 1e-4`` (or ``--learning-rate``), ``--config run.yaml`` for a file of
them (the line wins), ``insightv train sft --help`` for them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import typer
from rich.console import Console

from insightv_agents.cli.common import command_errors
from insightv_agents.errors import ConfigError, InsightVError
from insightv_agents.trained import check_adapter
from insightv_agents.trainers.common import option

app = typer.Typer(help="Train the agents: SFT, DPO, iterative DPO, GRPO and the "
                       "self-improving loop (TRL + PEFT). Each "
                       "also runs under `accelerate launch -m insightv_agents.cli train` "
                       "(`insightv train launch-config` gives DeepSpeed and FSDP configs). "
                       "`insightv train sft --help` lists a command's options.",
                  no_args_is_help=True)

def required(help: str) -> Any:
    """A field the command line must give."""
    return field(metadata={"help": help})


# The options are parsed by TRL's parser, not typer's: pass every word through.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                "help_option_names": []}


@dataclass
class TrainingInputs:
    """What ``train sft`` and ``train dpo`` read."""

    model: str = required("Base model folder, or an earlier output (full model or adapter) "
                          "to train further.")
    data: str = required("Dataset folder from `insightv build-data`.")
    adapter: str | None = option(None, "A PEFT adapter on --model to train further.")


@dataclass
class IterationInputs:
    """What ``train iterate`` reads and samples with."""

    model: str = required("M_1: the reasoning agent (e.g. its SFT output).")
    input: str = required("Questions in the synthesis input format (JSONL or a dataset "
                          "folder).")
    scorer: str = option("rule", "'rule', or the served name of a scoring MLLM at "
                                 "--scorer_url.")
    scorer_url: list[str] | None = option(None, "API root of the scorer (several: the "
                                                "replicas of an endpoint pool).")
    summarizer: str | None = option(None, "Served name of the summary agent that answers each "
                                          "path (at --summarizer_url); default: see "
                                          "--final_answer.")
    summarizer_url: list[str] | None = option(None, "API root of the summarizer (several: "
                                                    "an endpoint pool).")
    sampler: Literal["local", "vllm"] = option(
        "local", "local (transformers in-process) or vllm (a vLLM server on the base model, "
                 "loading each round's adapter live).")
    temperature: float = option(0.7, "Policy sampling temperature.")
    max_tokens: int = option(1024, "Longest reply per request.")


@dataclass
class GRPOInputs:
    """What ``train grpo`` reads."""

    model: str = required("The agent to train: a base model folder, or an earlier output "
                          "(full model or adapter).")
    input: str = required("reasoning: questions in the synthesis input format (JSONL or a "
                          "dataset folder); summary: a synthesis output folder of chains "
                          "written by a reasoning agent (right and flawed ones).")
    adapter: str | None = option(None, "A PEFT adapter on --model to train further.")
    scorer: Literal["none", "rule"] = option(
        "none", "rule: add RuleScorer's path score to the reasoning agent's rewards.")
    sampler: Literal["trl", "vllm"] = option(
        "trl", "trl (TRL's generation, in-process) or vllm (a vLLM server on the base model, "
               "loading the policy's adapter at each step; LoRA only).")


@dataclass
class LoopInputs:
    """What ``train loop`` reads and samples with."""

    reasoner: str = required("M_1: the reasoning agent (e.g. its SFT output).")
    summarizer: str = required("S_1: the summary agent (e.g. its SFT output).")
    input: str = required("Questions in the synthesis input format (JSONL or a dataset "
                          "folder).")
    scorer: str = option("rule", "'rule', or the served name of a scoring MLLM at "
                                 "--scorer_url.")
    scorer_url: list[str] | None = option(None, "API root of the scorer (several: the "
                                                "replicas of an endpoint pool).")
    sampling_temperature: float = option(0.7, "The reasoning agent's temperature when it "
                                              "samples a round's chains.")
    max_tokens: int = option(1024, "Longest reply per request.")
    sampler: Literal["local", "vllm"] = option(
        "local", "local (transformers in-process) or vllm (one vLLM server on the agents' "
                 "base model, loading each round's adapters live; LoRA only).")


def training_arguments(command: str, args: Sequence[str]) -> tuple[Any, ...]:
    """The dataclasses ``insightv train <command>`` parses from ``args`` (TRL's ``TrlParser``:
    the command line over the ``--config`` file).

    Raises:
        ConfigError: for an invalid value or config file; SystemExit: argparse's own exit
            for ``--help`` (0) and for an unknown or malformed option (2).
    """
    from trl import TrlParser

    from insightv_agents.trainers.dpo import DPOConfig
    from insightv_agents.trainers.grpo import GRPOConfig
    from insightv_agents.trainers.iterative import IterativeDPOConfig
    from insightv_agents.trainers.loop import LoopConfig
    from insightv_agents.trainers.sft import SFTConfig

    kinds: dict[str, tuple[Any, ...]] = {
        "sft": (TrainingInputs, SFTConfig), "dpo": (TrainingInputs, DPOConfig),
        "iterate": (IterationInputs, IterativeDPOConfig), "grpo": (GRPOInputs, GRPOConfig),
        "loop": (LoopInputs, LoopConfig)}
    needed = {"iterate": "--model MODEL --input QUESTIONS",
              "grpo": "--model MODEL --input QUESTIONS|CHAINS",
              "loop": "--reasoner MODEL --summarizer MODEL --input QUESTIONS"}.get(
        command, "--model MODEL --data DATASET")
    parser = TrlParser(kinds[command], prog=f"insightv train {command}", allow_abbrev=False,
                       usage=f"%(prog)s {needed} --output_dir OUT [options] "
                             f"(--help lists the options)")
    try:
        return tuple(parser.parse_args_and_config(list(args)))
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError) as err:  # the config file; a value TRL refuses
        raise ConfigError(f"insightv train {command}: {err}") from None


@app.command("sft", context_settings=PASS_THROUGH, add_help_option=False)
def train_sft_command(ctx: typer.Context) -> None:
    """Supervised fine-tuning of the reasoning or the summary agent: --model, --data,
    --output_dir, and any SFTConfig field (--agent summary, --learning_rate, ...)."""
    _train("sft", ctx.args)


@app.command("dpo", context_settings=PASS_THROUGH, add_help_option=False)
def train_dpo_command(ctx: typer.Context) -> None:
    """DPO of the reasoning agent (the starting model is the reference): --model, --data,
    --output_dir, and any DPOConfig field (--beta, --loss_type, ...)."""
    _train("dpo", ctx.args)


@app.command("iterate", context_settings=PASS_THROUGH, add_help_option=False)
def train_iterate_command(ctx: typer.Context) -> None:
    """Iterative DPO: each round samples from the current model through the synthesis
    graph, scores, builds pairs and trains the next model: --model, --input, --output_dir,
    and any IterativeDPOConfig field (--rounds, --paths, --beta, ...)."""
    from insightv_agents.trainers.iterative import InProcessPolicy, VLLMPolicy, iterative_dpo

    console = Console()

    def show(metrics: dict[str, Any]) -> None:
        console.print(f"round {metrics['round']}: accuracy {metrics['accuracy']}, mean score "
                      f"{metrics['mean_score']}, {metrics['pairs']} pairs -> "
                      f"{metrics['model_out']}")

    with command_errors(console), ExitStack() as stack:
        inputs, config = training_arguments("iterate", ctx.args)
        scoring = scorer_of(inputs)
        answering = None
        if inputs.summarizer is not None or inputs.summarizer_url is not None:
            from insightv_agents.backends.vllm import vllm_chat_model

            if inputs.summarizer is None or inputs.summarizer_url is None:
                raise InsightVError("--summarizer and --summarizer_url go together.")
            answering = vllm_chat_model(inputs.summarizer_url, inputs.summarizer,
                                        temperature=0.0, max_tokens=inputs.max_tokens)
        policy: Any
        if inputs.sampler == "vllm":
            from insightv_agents.backends.vllm import VLLMServer
            from insightv_agents.trained import resolve_model

            server = VLLMServer(resolve_model(inputs.model)[0], runtime_lora=True,
                                max_lora_rank=64)
            with console.status(f"starting vLLM (log: {server.log_path})"):
                stack.enter_context(server)
            policy = VLLMPolicy(server, temperature=inputs.temperature,
                                max_tokens=inputs.max_tokens)
        else:
            policy = InProcessPolicy(temperature=inputs.temperature,
                                     max_new_tokens=inputs.max_tokens)
        result = iterative_dpo(inputs.model, inputs.input, config, scorer=scoring,
                               summarizer=answering, policy=policy, on_round=show)
    console.print(f"final model: {result.final_model}\nrounds: {config.output_dir}/rounds.md")


@app.command("grpo", context_settings=PASS_THROUGH, add_help_option=False)
def train_grpo_command(ctx: typer.Context) -> None:
    """GRPO of either agent (Insight-V++): --agent reasoning (chains on --input questions,
    rewarded for answer and format) or --agent summary (the judge, on the chains of a
    synthesis output), --model, --output_dir, and any GRPOConfig field (--loss_type,
    --num_generations, --beta, ...)."""
    console = Console()
    with command_errors(console), ExitStack() as stack:
        inputs, config = training_arguments("grpo", ctx.args)
        if inputs.adapter is not None:
            check_adapter(inputs.adapter)
        from insightv_agents.answers import AnswerRules
        from insightv_agents.cards import read_card
        from insightv_agents.formats import card_profile
        from insightv_agents.trainers.grpo import (
            VLLMRollouts,
            judge_grpo_dataset,
            reasoning_grpo_dataset,
            train_grpo,
        )
        from insightv_agents.trainers.rewards import ScoreReward, default_rewards

        card = read_card(inputs.adapter) or read_card(inputs.model)
        reasoning = config.agent == "reasoning"
        profile = card_profile(card, mode="chain" if reasoning else None)
        if reasoning:
            data = reasoning_grpo_dataset(inputs.input, prompts=profile.prompts)
        else:
            from insightv_agents.trainers.data import load_records

            data = judge_grpo_dataset(load_records(inputs.input), prompts=profile.prompts,
                                      profile=profile)
        rules = AnswerRules.from_card(card)
        rewards = None
        if inputs.scorer == "rule":
            if not reasoning:
                raise InsightVError("--scorer rule rewards reasoning chains (--agent "
                                    "reasoning).")
            from insightv_agents.answers import DEFAULT_RULES
            from insightv_agents.assessment import RuleScorer

            chosen = rules or DEFAULT_RULES
            rewards = [*default_rewards("reasoning", profile=profile, rules=chosen),
                       ScoreReward(RuleScorer(), rules=chosen, profile=profile, weight=0.5)]
        rollouts = None
        if inputs.sampler == "vllm":
            from insightv_agents.backends.vllm import VLLMServer
            from insightv_agents.trained import resolve_model

            server = VLLMServer(resolve_model(inputs.model)[0], runtime_lora=True,
                                max_lora_rank=max(config.lora_r, 16))
            with console.status(f"starting vLLM (log: {server.log_path})"):
                stack.enter_context(server)
            rollouts = VLLMRollouts(server)
        result = train_grpo(inputs.model, data, config, rewards=rewards, rollouts=rollouts,
                            adapter=inputs.adapter, rules=rules)
    kind = "adapter" if result.adapter else "model"
    console.print(f"{kind}: {result.output_dir} (reward "
                  f"{result.metrics.get('first_logged_reward')} -> "
                  f"{result.metrics.get('last_logged_reward')}; rollouts in "
                  f"{result.output_dir}/completions/)")


@app.command("loop", context_settings=PASS_THROUGH, add_help_option=False)
def train_loop_command(ctx: typer.Context) -> None:
    """The self-improving loop (Insight-V++): each round the reasoning agent samples chains
    through the synthesis graph, the summary agent judges them and sends flawed ones back,
    and both agents are retrained (--method grpo or sft): --reasoner, --summarizer, --input,
    --output_dir, and any LoopConfig field (--rounds, --paths, --max_revisions, ...)."""
    from insightv_agents.trainers.iterative import InProcessPolicy
    from insightv_agents.trainers.loop import self_improving_loop

    console = Console()

    def show(metrics: dict[str, Any]) -> None:
        console.print(f"round {metrics['round']}: accuracy {metrics['accuracy']}, verdict "
                      f"accuracy {metrics['verdict_accuracy']}, {metrics['kept_paths']} "
                      f"paths kept -> {metrics['reasoner_out']}, {metrics['summarizer_out']}")

    with command_errors(console), ExitStack() as stack:
        inputs, config = training_arguments("loop", ctx.args)
        scoring = scorer_of(inputs)
        policy: Any = InProcessPolicy(temperature=inputs.sampling_temperature,
                                      max_new_tokens=inputs.max_tokens)
        summary_policy: Any = InProcessPolicy(temperature=0.0,
                                              max_new_tokens=inputs.max_tokens)
        if inputs.sampler == "vllm":
            policy, summary_policy = vllm_loop_policies(inputs, config, console, stack)
        result = self_improving_loop(
            inputs.reasoner, inputs.summarizer, inputs.input, config, scorer=scoring,
            policy=policy, summary_policy=summary_policy, on_round=show)
    console.print(f"final agents: {result.reasoner}, {result.summarizer}\nrounds: "
                  f"{config.output_dir}/rounds.md")


def vllm_loop_policies(inputs: LoopInputs, config: Any, console: Console,
                       stack: ExitStack) -> tuple[Any, Any]:
    """The loop's two samplers on one vLLM server started on the agents' base model (in
    ``stack``): the reasoning agent's rounds loaded as ``reasoner-<t>``, the summary
    agent's as ``summary-<t>``."""
    from insightv_agents.backends.vllm import VLLMServer
    from insightv_agents.synthesize import load_items
    from insightv_agents.trained import adapter_rank, resolve_model, same_model
    from insightv_agents.trainers.iterative import VLLMPolicy

    if config.finetune != "lora":
        raise InsightVError("--sampler vllm loads each round's adapters into a vLLM server: "
                            "it needs --finetune lora.")
    agents = [resolve_model(inputs.reasoner), resolve_model(inputs.summarizer)]
    if not same_model(agents[0][0], agents[1][0]):
        raise InsightVError(
            f"--sampler vllm serves both agents from one vLLM server: they must be adapters "
            f"on one base model (or that model), but the reasoning agent's is {agents[0][0]} "
            f"and the summary agent's {agents[1][0]}. Use --sampler local.")
    load_items(inputs.input)  # bad items are refused before the server starts
    rank = max([config.lora_r, *(adapter_rank(adapter) for _, adapter in agents if adapter)])
    server = VLLMServer(agents[0][0], runtime_lora=True, max_lora_rank=rank,
                        extra_args=["--max-loras", "2"])  # one adapter of each agent at once
    with console.status(f"starting vLLM (log: {server.log_path})"):
        stack.enter_context(server)
    return (VLLMPolicy(server, temperature=inputs.sampling_temperature,
                       max_tokens=inputs.max_tokens, adapter_prefix="reasoner"),
            VLLMPolicy(server, temperature=0.0, max_tokens=inputs.max_tokens,
                       adapter_prefix="summary"))


@app.command("launch-config")
def launch_config_command(
    name: str = typer.Argument(help="ddp, zero2 (DeepSpeed ZeRO-2), zero3 (DeepSpeed ZeRO-3) "
                                    "or fsdp (PyTorch FSDP2)."),
) -> None:
    """Print the path of a shipped `accelerate launch --config_file` file, e.g.
    `accelerate launch --config_file $(insightv train launch-config zero3) --num_processes 8
    -m insightv_agents.cli train sft ...`."""
    from insightv_agents.configs import launch_config

    with command_errors(Console()):
        typer.echo(str(launch_config(name)))


def scorer_of(inputs: IterationInputs | LoopInputs) -> Any:
    """The scorer ``--scorer`` names: ``RuleScorer`` for ``rule``, else the served model at
    ``--scorer_url``."""
    from insightv_agents.assessment import RuleScorer

    if inputs.scorer == "rule":
        return RuleScorer()
    if inputs.scorer_url is None:
        raise InsightVError("--scorer NAME needs --scorer_url.")
    from insightv_agents.backends.vllm import vllm_chat_model

    return vllm_chat_model(inputs.scorer_url, inputs.scorer, temperature=0.0,
                           max_tokens=inputs.max_tokens)


def _train(command: str, args: Sequence[str]) -> None:
    """Parse ``args``, run the training, then say where its result is and how to serve or
    run it."""
    console = Console()
    with command_errors(console):
        inputs, config = training_arguments(command, args)
        if inputs.adapter is not None:
            check_adapter(inputs.adapter)
        from insightv_agents.trainers.dpo import train_dpo
        from insightv_agents.trainers.sft import train_sft

        train: Any = train_sft if command == "sft" else train_dpo
        result = train(inputs.model, inputs.data, config, adapter=inputs.adapter)
    kind = "adapter" if result.adapter else "model"
    loss = result.metrics.get("train_loss")
    console.print(f"{kind}: {result.output_dir} (loss {loss:.4g}); serve it with "
                  f"`insightv serve --model {result.output_dir}` or run it with "
                  f"`insightv run --local-model {result.output_dir}`")
