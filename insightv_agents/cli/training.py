"""``insightv train sft | dpo | iterate``: the trainers (TRL + PEFT) from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from insightv_agents.cli.common import command_errors
from insightv_agents.errors import InsightVError

app = typer.Typer(help="Train the agents: SFT, DPO, iterative DPO (TRL + PEFT). Each "
                       "also runs under `accelerate launch -m insightv_agents.cli train`.",
                  no_args_is_help=True)

TrainModel = Annotated[str, typer.Option(
    help="Base model folder, or an earlier output (full model or adapter) to train further.")]
TrainOut = Annotated[str, typer.Option(help="Output folder (checkpoints, then the adapter or "
                                            "model); rerun the same command to resume.")]
FineTuneOpt = Annotated[str | None, typer.Option(help="lora (default: an adapter on the language "
                                                      "model) or full.")]
LearningRate = Annotated[float | None, typer.Option(
    "--lr", help="Learning rate (default: the paper's, see the docs).")]
Epochs = Annotated[float | None, typer.Option(help="Epochs (default: the paper's).")]
MaxTrainSteps = Annotated[int | None, typer.Option(
    help="Stop after this many steps (default -1: run the epochs).")]
BatchSize = Annotated[int | None, typer.Option(help="Batch size per device (default 1).")]
GradAccum = Annotated[int | None, typer.Option(
    help="Gradient accumulation steps (default 1).")]
LoraRank = Annotated[int | None, typer.Option(help="LoRA rank (default 16).")]
LoraAlpha = Annotated[int | None, typer.Option(help="LoRA alpha (default 32).")]
TrainDType = Annotated[str | None, typer.Option(help="auto (bf16 on a capable GPU, else fp32), "
                                              "bfloat16, bf16-mixed (fp32 weights, bf16 "
                                              "compute; also on CPUs) or float32.")]
ReportTo = Annotated[str | None, typer.Option(
    help="TRL reporting: none (default), tensorboard, wandb, ...")]
Seed = Annotated[int | None, typer.Option(help="Seed (default 0).")]
SettingsFile = Annotated[str | None, typer.Option(
    "--config", help="JSON file of settings (the options given on the line win).")]


def _train_settings(config: str | None, **options: Any) -> dict[str, Any]:
    """Settings from a JSON file, then the command-line options."""
    settings: dict[str, Any] = {}
    if config is not None:
        try:
            settings = json.loads(Path(config).read_text())
        except (OSError, ValueError) as err:
            raise InsightVError(f"--config {config}: {err}") from None
        if not isinstance(settings, dict):
            raise InsightVError(f"--config {config} must hold a JSON object.")
    lora = {"r": options.pop("lora_r"), "alpha": options.pop("lora_alpha")}
    settings["lora"] = {**settings.get("lora", {}),
                        **{key: value for key, value in lora.items() if value is not None}}
    settings.update({key: value for key, value in options.items() if value is not None})
    return settings


@app.command("sft")
def train_sft_command(
    model: TrainModel, data: Annotated[str, typer.Option(
        help="Dataset folder from `insightv build-data sft-reason|sft-summary`.")],
    out: TrainOut,
    agent: Annotated[str | None, typer.Option(
        help="reasoning (default) or summary: picks the defaults.")] = None,
    finetune: FineTuneOpt = None, lr: LearningRate = None, epochs: Epochs = None,
    max_steps: MaxTrainSteps = None, batch_size: BatchSize = None, grad_accum: GradAccum = None,
    lora_r: LoraRank = None, lora_alpha: LoraAlpha = None, dtype: TrainDType = None,
    loss: Annotated[str | None, typer.Option(
        help="auto (default), assistant or completion.")] = None,
    report_to: ReportTo = None, seed: Seed = None, config: SettingsFile = None,
) -> None:
    """Supervised fine-tuning of the reasoning or the summary agent."""
    from insightv_agents.trainers.sft import train_sft

    _train(lambda settings: train_sft(model, data, settings), _train_settings(
        config, output_dir=out, agent=agent, finetune=finetune, learning_rate=lr,
        num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, lora_r=lora_r, lora_alpha=lora_alpha,
        dtype=dtype, loss=loss, report_to=report_to, seed=seed))


@app.command("dpo")
def train_dpo_command(
    model: TrainModel, data: Annotated[str, typer.Option(
        help="Dataset folder from `insightv build-data dpo`.")],
    out: TrainOut, finetune: FineTuneOpt = None, lr: LearningRate = None,
    epochs: Epochs = None, max_steps: MaxTrainSteps = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1).")] = None,
    batch_size: BatchSize = None, grad_accum: GradAccum = None, lora_r: LoraRank = None,
    lora_alpha: LoraAlpha = None, dtype: TrainDType = None, report_to: ReportTo = None,
    seed: Seed = None, config: SettingsFile = None,
) -> None:
    """DPO of the reasoning agent (the starting model is the reference)."""
    from insightv_agents.trainers.dpo import train_dpo

    _train(lambda settings: train_dpo(model, data, settings), _train_settings(
        config, output_dir=out, finetune=finetune, learning_rate=lr, num_train_epochs=epochs,
        max_steps=max_steps, beta=beta, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, lora_r=lora_r, lora_alpha=lora_alpha,
        dtype=dtype, report_to=report_to, seed=seed))


@app.command("iterate")
def train_iterate_command(
    model: Annotated[str, typer.Option(help="M_1: the reasoning agent (e.g. its SFT output).")],
    input: Annotated[str, typer.Option(
        "--input", help="Questions in the synthesis input format (JSONL or dataset folder).")],
    out: Annotated[str, typer.Option(help="Run folder (a sub-folder per round); rerun the "
                                          "same command to resume.")],
    rounds: Annotated[int, typer.Option(help="Rounds T.")] = 3,
    paths: Annotated[int, typer.Option("--paths", "-n", help="Paths per question.")] = 4,
    mode: Annotated[str, typer.Option(help="chain or step.")] = "chain",
    scorer: Annotated[str, typer.Option(
        help="'rule', or the served name of a scoring MLLM at --scorer-url.")] = "rule",
    scorer_url: Annotated[str | None, typer.Option(help="API root of the scorer.")] = None,
    summarizer: Annotated[str | None, typer.Option(
        help="Served name of the summary agent that answers each path (at --summarizer-url); "
             "default: see --final-answer.")] = None,
    summarizer_url: Annotated[str | None, typer.Option(help="API root of the summarizer.")]
    = None,
    final_answer: Annotated[str, typer.Option(
        help="Without --summarizer, each path's answer: ask (the policy is asked after its "
             "reasoning) or stated (the answer its last step states).")] = "ask",
    sampler: Annotated[str, typer.Option(
        help="local (transformers in-process) or vllm (a vLLM server on the base model, "
             "loading each round's adapter live).")] = "local",
    temperature: Annotated[float, typer.Option(help="Policy sampling temperature.")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Longest reply per request.")] = 1024,
    concurrency: Annotated[int, typer.Option(help="Questions sampled at once.")] = 8,
    questions_per_round: Annotated[int | None, typer.Option(
        help="Each round samples the next N questions of the input (wrapping round); "
             "default: every round samples them all.")] = None,
    min_margin: Annotated[int, typer.Option(help="Chosen - rejected score margin.")] = 20,
    finetune: FineTuneOpt = None, lr: LearningRate = None, epochs: Epochs = None,
    max_steps: MaxTrainSteps = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1).")] = None,
    batch_size: BatchSize = None, grad_accum: GradAccum = None, dtype: TrainDType = None,
    report_to: ReportTo = None, seed: Seed = None,
) -> None:
    """Iterative DPO: each round samples from the current model through the synthesis
    graph, scores, builds pairs and trains the next model."""
    from contextlib import ExitStack

    from insightv_agents.assessment import RuleScorer
    from insightv_agents.trainers.iterative import InProcessPolicy, VLLMPolicy, iterative_dpo

    console = Console()
    dpo = {key: value for key, value in {
        "finetune": finetune, "learning_rate": lr, "num_train_epochs": epochs,
        "max_steps": max_steps, "beta": beta, "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum, "dtype": dtype, "report_to": report_to,
        "seed": seed}.items() if value is not None}
    settings = {"output_dir": out, "rounds": rounds, "paths": paths, "mode": mode,
                "final_answer": final_answer, "concurrency": concurrency,
                "questions_per_round": questions_per_round, "min_margin": min_margin,
                "dpo": dpo}

    def show(metrics: dict[str, Any]) -> None:
        console.print(f"round {metrics['round']}: accuracy {metrics['accuracy']}, mean score "
                      f"{metrics['mean_score']}, {metrics['pairs']} pairs -> "
                      f"{metrics['model_out']}")

    with command_errors(console), ExitStack() as stack:
        scoring: Any = RuleScorer()
        if scorer != "rule":
            from insightv_agents.backends.vllm import vllm_chat_model

            if scorer_url is None:
                raise InsightVError("--scorer NAME needs --scorer-url.")
            scoring = vllm_chat_model(scorer_url, scorer, temperature=0.0,
                                      max_tokens=max_tokens)
        answering = None
        if summarizer is not None or summarizer_url is not None:
            from insightv_agents.backends.vllm import vllm_chat_model

            if summarizer is None or summarizer_url is None:
                raise InsightVError("--summarizer and --summarizer-url go together.")
            answering = vllm_chat_model(summarizer_url, summarizer, temperature=0.0,
                                        max_tokens=max_tokens)
        policy: Any
        if sampler == "vllm":
            from insightv_agents.backends.vllm import VLLMServer
            from insightv_agents.trained import resolve_model

            server = VLLMServer(resolve_model(model)[0], runtime_lora=True,
                                max_lora_rank=64)
            with console.status(f"starting vLLM (log: {server.log_path})"):
                stack.enter_context(server)
            policy = VLLMPolicy(server, temperature=temperature, max_tokens=max_tokens)
        elif sampler == "local":
            policy = InProcessPolicy(temperature=temperature, max_new_tokens=max_tokens)
        else:
            raise InsightVError(f"--sampler must be local or vllm, not {sampler!r}.")
        result = iterative_dpo(model, input, settings, scorer=scoring,
                               summarizer=answering, policy=policy, on_round=show)
    console.print(f"final model: {result.final_model}\nrounds: {out}/rounds.md")


def _train(run: Any, settings: dict[str, Any]) -> None:
    """Run a training, then say where its result is and how to serve or run it."""
    console = Console()
    with command_errors(console):
        result = run(settings)
    kind = "adapter" if result.adapter else "model"
    loss = result.metrics.get("train_loss")
    console.print(f"{kind}: {result.output_dir} (loss {loss:.4g}); serve it with "
                  f"`insightv serve --model {result.output_dir}` or run it with "
                  f"`insightv run --local-model {result.output_dir}`")
