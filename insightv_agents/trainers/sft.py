"""Supervised fine-tuning of the reasoning agent or the summary agent with TRL's
``SFTTrainer``, on the datasets :mod:`insightv_agents.trainers.data` builds.

Example::

    from insightv_agents.trainers.sft import SFTConfig, train_sft

    result = train_sft("models/base", "data/sft-reason",
                       SFTConfig(agent="reasoning", output_dir="out/reasoner"))
    # result.output_dir holds a LoRA adapter that ChatTransformersVLM and VLLMServer load.

:class:`SFTConfig` is TRL's ``SFTConfig`` with what agent training adds
(:class:`~insightv_agents.trainers.common.AgentTraining`), so every TRL and transformers
training option is there under its own name. Defaults (``None``): full fine-tuning follows
the paper — reasoning agent lr 5e-6 for 2 epochs, summary agent lr 1e-5 for 1 epoch. LoRA
(rank 16, alpha 32, on the language model) uses lr 1e-4 (reasoning) and 2e-4 (summary), the
usual LoRA range, keeping the paper's 1:2 ratio and epochs.

The loss covers the assistant turns only: through the chat template's ``{% generation %}``
markers where it has them (or TRL has a training template for it), otherwise by splitting
each conversation into prompt/completion rows, one per assistant turn (completion-only loss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import trl

from insightv_agents.cards import AgentCard, Role
from insightv_agents.errors import ConfigError
from insightv_agents.trainers.common import (
    AgentTraining,
    check_config,
    checkpoint_to_resume,
    load_dataset_arg,
    load_for_training,
    option,
    output_card,
    save_output,
)

Agent = Literal["reasoning", "summary"]
LossMask = Literal["auto", "assistant", "completion"]
LossScale = Literal["batch_tokens", "mean_tokens"]

LENGTH_SAMPLING = ("group_by_length", "batch_rebalance")
# (learning rate, epochs) by agent and fine-tuning kind; see the module docstring.
SFT_DEFAULTS: dict[tuple[str, str], tuple[float, float]] = {
    ("reasoning", "full"): (5e-6, 2), ("summary", "full"): (1e-5, 1),
    ("reasoning", "lora"): (1e-4, 2), ("summary", "lora"): (2e-4, 1),
}


@dataclass
class SFTConfig(AgentTraining, trl.SFTConfig):  # type: ignore[misc]
    """TRL's ``SFTConfig`` for training an agent: the fields of
    :class:`~insightv_agents.trainers.common.AgentTraining`, and these.

    Args:
        agent: ``"reasoning"`` or ``"summary"`` (picks the learning rate and epochs).
        loss_mask: which tokens are supervised: ``"assistant"`` (the template's markers: TRL's
            ``assistant_only_loss``), ``"completion"`` (prompt/completion rows), or ``"auto"``
            (markers when the template allows).
        micro_batches: run each batch (``per_device_train_batch_size`` x
            ``gradient_accumulation_steps`` rows, drawn at random as usual) as this many
            gradient-accumulation micro-batches of rows of similar length (transformers'
            ``batch_rebalance`` sampling: a long micro-batch holds fewer rows). Every optimiser
            step sees the same kind of random batch and, with ``loss_scale="batch_tokens"``,
            the same loss; only the padding goes. ``per_device_train_batch_size`` must be a
            multiple of it; not with another ``train_sampling_strategy``.
        loss_scale: what each step's summed token loss is divided by. ``"batch_tokens"``
            (transformers' way): the supervised tokens of the step's own rows, so every step
            weighs the same and a token in a batch of short answers weighs more than one in a
            batch of long chains. ``"mean_tokens"``: the mean supervised tokens per row (counted
            on up to 256 rows of the set before training) times the rows of a step, the same
            for every step, so every supervised token weighs the same however the batches are
            made up; a step of short rows then moves the model less.

    ``train_sampling_strategy="group_by_length"`` (transformers' length-grouped batches) takes
    each row's length from a ``length`` column, added when missing (the characters of its
    text). Where rows of different kinds differ in length, grouped batches hold one kind at a
    time: use it with ``loss_scale="mean_tokens"``, or where the rows are of one kind. The
    documentation's benchmarks page measures both ways of batching by length.
    """

    agent: Agent = option("reasoning", "reasoning or summary: picks the learning rate and "
                                       "epochs.")
    loss_mask: LossMask = option("auto", "Supervised tokens: assistant (template markers), "
                                         "completion (prompt/completion rows) or auto.")
    micro_batches: int = option(1, "Run each batch as this many micro-batches of rows of "
                                   "similar length (batch_rebalance sampling).")
    loss_scale: LossScale = option("batch_tokens", "Divide each step's loss by its own "
                                   "supervised tokens (batch_tokens) or by the same count "
                                   "every step (mean_tokens).")

    def __post_init__(self) -> None:
        problems = [
            message for ok, message in [
                (self.agent in ("reasoning", "summary"), "agent must be reasoning or summary"),
                (self.loss_mask in ("auto", "assistant", "completion"),
                 "loss_mask must be auto, assistant or completion"),
                (self.loss_scale in ("batch_tokens", "mean_tokens"),
                 "loss_scale must be batch_tokens or mean_tokens"),
                (1 <= self.micro_batches <= 64, "micro_batches must be within 1-64"),
                (self.micro_batches == 1 or self.train_sampling_strategy == "random",
                 "micro_batches and train_sampling_strategy are two ways to batch; choose one"),
                (self.per_device_train_batch_size % max(self.micro_batches, 1) == 0,
                 f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a "
                 f"multiple of micro_batches ({self.micro_batches})"),
            ] if not ok]
        if problems:
            raise ConfigError(f"invalid SFTConfig: {'; '.join(problems)}.")
        rate, epochs = SFT_DEFAULTS.get((self.agent, self.finetune), (None, None))
        if self.learning_rate is None:
            self.learning_rate = rate
        if self.num_train_epochs is None:
            self.num_train_epochs = epochs
        super().__post_init__()


@dataclass(frozen=True)
class TrainResult:
    """A finished run: where its output is, whether it is an adapter, and its metrics."""

    output_dir: Path
    adapter: bool
    base_model: str
    metrics: dict[str, Any]


def train_sft(model: str | Path, dataset: Any, config: SFTConfig | dict[str, Any], *,
              adapter: str | Path | None = None, eval_dataset: Any = None,
              callbacks: list[Any] | None = None, card: AgentCard | None = None
              ) -> TrainResult:
    """Fine-tune ``model`` (a base model, a full model output, or an adapter output) on
    ``dataset`` (a ``messages`` + ``images`` dataset, or the folder ``insightv build-data``
    saved). ``config`` is an :class:`SFTConfig` or a dict of its fields. Resumes from the
    newest checkpoint in ``output_dir``; under ``accelerate launch`` it trains on every
    process. The output holds an agent card (:mod:`~insightv_agents.cards`): ``card``, else
    the dataset folder's (``insightv build-data`` writes one), else one read off the data.

    Raises:
        ConfigError: for an invalid config or a chat template that cannot mask the loss as
            asked; InvalidInputError: for a missing or empty dataset.
    """
    config = check_config(config, SFTConfig)
    data = load_dataset_arg(dataset)
    trainer, loaded, mask = _sft_trainer(model, data, config, adapter=adapter,
                                         eval_dataset=eval_dataset, callbacks=callbacks)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint_to_resume(config))
    metrics = {**output.metrics, "train_loss": output.training_loss,
               "wall_seconds": round(time.perf_counter() - started, 3),
               "rows": len(trainer.train_dataset)}
    role: Role = "summary" if config.agent == "summary" else "reasoning"
    out = save_output(trainer, loaded, config, f"sft-{config.agent}", metrics,
                      {"loss_mask": mask}, output_card(role, card=card, sources=[dataset],
                                                       data=data, dtype=config.dtype))
    return TrainResult(output_dir=out, adapter=config.finetune == "lora",
                       base_model=loaded.base, metrics=metrics)


def _sft_trainer(model: str | Path, dataset: Any, config: SFTConfig, *,
                 adapter: str | Path | None = None, eval_dataset: Any = None,
                 callbacks: list[Any] | None = None) -> tuple[Any, Any, str]:
    """The configured ``SFTTrainer`` (not yet trained), the loaded model and the loss mask."""
    data = load_dataset_arg(dataset)
    if "messages" not in data.column_names:
        raise ConfigError("SFT needs a conversational dataset with a `messages` column "
                          "(see insightv build-data sft-reason / sft-summary).")
    loaded = load_for_training(model, config, adapter=adapter)
    mask = loss_mask(loaded.processor, config.loss_mask)
    if mask == "completion":
        data = to_prompt_completion(data)
        if eval_dataset is not None:
            eval_dataset = to_prompt_completion(load_dataset_arg(eval_dataset))
    args = replace(config, assistant_only_loss=mask == "assistant")
    if config.micro_batches > 1:
        args = replace(args, micro_batches=1, train_sampling_strategy="batch_rebalance",
                       per_device_train_batch_size=(config.per_device_train_batch_size
                                                    // config.micro_batches),
                       gradient_accumulation_steps=(config.gradient_accumulation_steps
                                                    * config.micro_batches))
    if args.train_sampling_strategy in LENGTH_SAMPLING:
        data = with_lengths(data, args.length_column_name)
    kind = trl.SFTTrainer if config.loss_scale == "batch_tokens" else _mean_token_trainer()
    if config.micro_batches > 1:
        kind = _seeded_rebalance(kind)
    trainer = kind(model=loaded.model, args=args, train_dataset=data,
                   eval_dataset=eval_dataset, processing_class=loaded.processor,
                   peft_config=loaded.peft_config, callbacks=callbacks)
    if config.loss_scale == "mean_tokens":
        if not (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None):
            raise ConfigError(f"loss_scale='mean_tokens' needs a model whose loss takes the "
                              f"token count; {type(loaded.model).__name__} does not.")
        trainer.tokens_per_row = supervised_tokens_per_row(trainer, seed=config.seed)
    return trainer, loaded, mask


def supervised_tokens_per_row(trainer: Any, rows: int = 256, seed: int = 0) -> float:
    """The mean supervised (label) tokens per row of ``trainer``'s training set, counted on
    up to ``rows`` rows (picked with ``seed``) through its own collator, as the loss counts
    them (labels after the first position)."""
    import random

    data = trainer.train_dataset
    picked = sorted(random.Random(seed).sample(range(len(data)), min(rows, len(data))))
    size = trainer.args.per_device_train_batch_size
    counted = 0
    for start in range(0, len(picked), size):
        batch = trainer.data_collator([data[index] for index in picked[start:start + size]])
        counted += int(batch["labels"][..., 1:].ne(-100).sum())
    return counted / len(picked)


def _mean_token_trainer() -> type:
    """``SFTTrainer`` dividing every step's loss by the same token count (``loss_scale=
    "mean_tokens"``): its ``tokens_per_row`` times the rows of a full step."""
    import torch
    class MeanTokenSFTTrainer(trl.SFTTrainer):
        tokens_per_row: float = 1.0

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int,
                              device: Any) -> tuple[list[Any], Any]:
            batches, counted = super().get_batch_samples(epoch_iterator, num_batches, device)
            if counted is None:
                return batches, counted
            rows = self.args.per_device_train_batch_size * num_batches
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                rows *= self.args.world_size  # the count then covers every process's rows
            return batches, torch.tensor(self.tokens_per_row * rows, device=device)

    return MeanTokenSFTTrainer


def _seeded_rebalance(kind: type) -> type:
    """``kind`` whose ``batch_rebalance`` sampler shuffles with the run's seed (transformers
    seeds it with 42 whatever the run's seed)."""

    from transformers.trainer_pt_utils import BatchRebalanceSampler

    class SeededRebalanceTrainer(kind):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            sampler = super()._get_train_sampler(*args, **kwargs)
            if isinstance(sampler, BatchRebalanceSampler):
                sampler.seed = self.args.seed
            return sampler

    return SeededRebalanceTrainer


def loss_mask(processor: Any, asked: LossMask) -> Literal["assistant", "completion"]:
    """How the loss is limited to assistant turns with this processor's chat template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = getattr(processor, "chat_template", None)
    if asked == "completion":
        return "completion"
    supported = isinstance(template, str | dict) and (
        has_generation_markers(template) or _patchable(get_training_chat_template, processor))
    if supported:
        return "assistant"
    if asked == "assistant":
        raise ConfigError("the chat template has no {% generation %} markers and TRL has no "
                          "training template for it; use loss='completion' or 'auto'.")
    return "completion"


def with_lengths(dataset: Any, column: str = "length") -> Any:
    """``dataset`` with a ``column`` of lengths (if it has none): the characters of each
    row's text, in ``messages`` or in ``prompt`` and ``completion``."""
    if column in dataset.column_names:
        return dataset
    columns = [name for name in ("messages", "prompt", "completion")
               if name in dataset.column_names]

    def measure(batch: dict[str, list[Any]]) -> dict[str, list[int]]:
        return {column: [sum(_text_length(batch[name][row]) for name in columns)
                                for row in range(len(batch[columns[0]]))]}

    return dataset.map(measure, batched=True)


def _text_length(value: Any) -> int:
    """The characters of the text in a message list, a message, its content or a string."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    if isinstance(value, dict):
        if value.get("type", "text") != "text":
            return 0
        return _text_length(value.get("content", value.get("text", "")))
    return 0


def to_prompt_completion(dataset: Any) -> Any:
    """Split each conversation into one prompt/completion row per assistant turn (the
    prompt is everything before it), so only assistant text is supervised."""
    def split(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {"prompt": [], "completion": []}
        others = [name for name in batch if name != "messages"]
        rows.update({name: [] for name in others})
        for index, messages in enumerate(batch["messages"]):
            for turn, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                rows["prompt"].append(messages[:turn])
                rows["completion"].append([message])
                for name in others:
                    rows[name].append(batch[name][index])
        return rows

    return dataset.map(split, batched=True, remove_columns=dataset.column_names)


def _patchable(get_training_chat_template: Any, processor: Any) -> bool:
    try:
        get_training_chat_template(processor)
    except ValueError:
        return False
    return True
