"""Supervised fine-tuning of the reasoning agent or the summary agent with TRL's
``SFTTrainer``, on the datasets :mod:`insightv_agents.trainers.data` builds.

Example::

    from insightv_agents.trainers import SFTSettings, train_sft

    result = train_sft("models/base", "data/sft-reason",
                       SFTSettings(agent="reasoning", output_dir="out/reasoner"))
    # result.output_dir holds a LoRA adapter that ChatTransformersVLM and VLLMServer load.

Defaults (``None`` in the settings): full fine-tuning follows the paper — reasoning agent
lr 5e-6 for 2 epochs, summary agent lr 1e-5 for 1 epoch. LoRA (rank 16, alpha 32, on the
language model) uses lr 1e-4 (reasoning) and 2e-4 (summary), the usual LoRA range, keeping
the paper's 1:2 ratio and epochs.

The loss covers the assistant turns only: through the chat template's ``{% generation %}``
markers where it has them (or TRL has a training template for it), otherwise by splitting
each conversation into prompt/completion rows, one per assistant turn (completion-only loss).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from insightv_agents.errors import ConfigError
from insightv_agents.trainers.common import (
    TrainSettings,
    check_settings,
    checkpoint_to_resume,
    load_dataset_arg,
    load_for_training,
    save_output,
)

Agent = Literal["reasoning", "summary"]
LossMask = Literal["auto", "assistant", "completion"]
LossScale = Literal["batch_tokens", "mean_tokens"]

LENGTH_COLUMN = "length"
# (learning rate, epochs) by agent and fine-tuning kind; see the module docstring.
SFT_DEFAULTS: dict[tuple[str, str], tuple[float, float]] = {
    ("reasoning", "full"): (5e-6, 2), ("summary", "full"): (1e-5, 1),
    ("reasoning", "lora"): (1e-4, 2), ("summary", "lora"): (2e-4, 1),
}


class SFTSettings(TrainSettings):
    """SFT settings (see :class:`~insightv_agents.trainers.common.TrainSettings` for the rest).

    Args:
        agent: ``"reasoning"`` or ``"summary"`` (picks the defaults).
        loss: which tokens are supervised: ``"assistant"`` (template markers), ``"completion"``
            (prompt/completion rows), or ``"auto"`` (markers when the template allows).
        max_length: cut rows to this many tokens (``None``: never; image tokens are kept).
        group_by_length: batch rows of similar length together (transformers' length-grouped
            sampling: shuffled, then sorted within mega-batches of up to 50 batches), each row's
            length its text in characters (``length`` column, added when missing). Less
            padding, so less compute where lengths vary: on 597 of the shapes world's
            four-stage rows, batches of 16 were 55% real text shuffled and 90% grouped, and
            trained 2.0x faster (``benchmarks/length_grouping.py``). Within a mega-batch the
            batches run longest first; with fewer than eight batches of rows a mega-batch is one
            batch (no grouping). Where a row's length follows its kind (a chain's length its
            question's kind), grouped batches are of one kind and runs of steps push the model
            toward one kind at a time: a shapes reasoning agent trained so at learning rate
            2e-3 wrote the plan of the wrong kind of question for most test questions (6.7%
            right against 30.0% shuffled). The loss is still each batch's mean over its supervised
            tokens, so where kinds of rows differ in length and in supervised tokens (short
            answer-only rows beside long chains), grouping them apart gives the tokens of the
            kind with fewer per batch more weight than shuffled batches would: use it with
            ``loss_scale="mean_tokens"``, or where the rows are of one kind.
        micro_batches: run each batch (``per_device_train_batch_size`` x
            ``gradient_accumulation_steps`` rows, drawn at random as usual) as this many
            gradient-accumulation micro-batches of rows of similar length (transformers'
            ``batch_rebalance`` sampling: a long micro-batch holds fewer rows). Every optimiser
            step sees the same kind of random batch and, with ``loss_scale="batch_tokens"``,
            the same loss (divided by the supervised tokens of the whole step); only the
            padding goes. On the shapes world's four-stage rows (judge rows up to twice as long
            as the rest), 2 micro-batches of a batch of 16 trained 1.8x faster; on its
            reasoning chains 1.1x. ``per_device_train_batch_size`` must be a multiple of it.
            Needs transformers with ``train_sampling_strategy``; not with ``group_by_length``.
        loss_scale: what each step's summed token loss is divided by. ``"batch_tokens"``
            (transformers' way): the supervised tokens of the step's own rows, so every step
            weighs the same and a token in a batch of short answers weighs more than one in a
            batch of long chains. ``"mean_tokens"``: the mean supervised tokens per row (counted
            on up to 256 rows of the set before training) times the rows of a step, the same
            for every step, so every supervised token weighs the same however the batches are
            made up (grouped or not); a step of short rows then moves the model less.
    """

    agent: Agent = "reasoning"
    loss: LossMask = "auto"
    max_length: int | None = Field(None, ge=16)
    group_by_length: bool = False
    micro_batches: int = Field(1, ge=1, le=64)
    loss_scale: LossScale = "batch_tokens"

    @model_validator(mode="after")
    def _check_micro_batches(self) -> SFTSettings:
        if self.micro_batches > 1:
            if self.group_by_length:
                raise ValueError("micro_batches and group_by_length are two ways to batch by "
                                 "length; choose one.")
            if self.per_device_train_batch_size % self.micro_batches:
                raise ValueError(f"per_device_train_batch_size "
                                 f"({self.per_device_train_batch_size}) must be a multiple of "
                                 f"micro_batches ({self.micro_batches}).")
        return self

    def schedule(self) -> tuple[float, float]:
        """The learning rate and epochs this run uses."""
        rate, epochs = SFT_DEFAULTS[(self.agent, self.finetune)]
        return self.learning_rate or rate, self.num_train_epochs or epochs


@dataclass(frozen=True)
class TrainResult:
    """A finished run: where its output is, whether it is an adapter, and its metrics."""

    output_dir: Path
    adapter: bool
    base_model: str
    metrics: dict[str, Any]


def train_sft(model: str | Path, dataset: Any, settings: SFTSettings | dict[str, Any], *,
              adapter: str | Path | None = None, eval_dataset: Any = None,
              callbacks: list[Any] | None = None) -> TrainResult:
    """Fine-tune ``model`` (a base model, a full model output, or an adapter output) on
    ``dataset`` (a ``messages`` + ``images`` dataset, or the folder ``insightv build-data``
    saved). Resumes from the newest checkpoint in ``output_dir``; under ``accelerate launch``
    it trains on every process.

    Raises:
        ConfigError: for invalid settings or a chat template that cannot mask the loss as
            asked; InvalidInputError: for a missing or empty dataset.
    """
    config = check_settings(settings, SFTSettings)
    trainer, loaded, mask = _sft_trainer(model, dataset, config, adapter=adapter,
                                         eval_dataset=eval_dataset, callbacks=callbacks)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint_to_resume(config))
    rate, epochs = config.schedule()
    metrics = {**output.metrics, "train_loss": output.training_loss,
               "wall_seconds": round(time.perf_counter() - started, 3),
               "rows": len(trainer.train_dataset)}
    out = save_output(trainer, loaded, config, f"sft-{config.agent}", metrics,
                      {"loss_mask": mask, "learning_rate": rate, "epochs": epochs,
                       "loss_scale": config.loss_scale})
    return TrainResult(output_dir=out, adapter=config.finetune == "lora",
                       base_model=loaded.base, metrics=metrics)


def _sft_trainer(model: str | Path, dataset: Any, config: SFTSettings, *,
                 adapter: str | Path | None = None, eval_dataset: Any = None,
                 callbacks: list[Any] | None = None) -> tuple[Any, Any, str]:
    """The configured ``SFTTrainer`` (not yet trained), the loaded model and the loss mask."""
    from trl import SFTConfig, SFTTrainer

    data = load_dataset_arg(dataset)
    if "messages" not in data.column_names:
        raise ConfigError("SFT needs a conversational dataset with a `messages` column "
                          "(see insightv build-data sft-reason / sft-summary).")
    loaded = load_for_training(model, config, adapter=adapter)
    mask = loss_mask(loaded.processor, config.loss)
    if mask == "completion":
        data = to_prompt_completion(data)
        if eval_dataset is not None:
            eval_dataset = to_prompt_completion(load_dataset_arg(eval_dataset))
    rate, epochs = config.schedule()
    kwargs = config.trl_kwargs(rate, epochs, loaded.bf16, assistant_only_loss=mask == "assistant",
                               max_length=config.max_length)
    if config.group_by_length:
        data = with_lengths(data)
        kwargs = {**_length_grouped_kwargs(), **kwargs}  # trl_args still win
    elif config.micro_batches > 1:
        data = with_lengths(data)
        kwargs = {**kwargs, **_micro_batch_kwargs(config), **config.trl_args}
    kind = SFTTrainer if config.loss_scale == "batch_tokens" else _mean_token_trainer()
    if config.micro_batches > 1:
        kind = _seeded_rebalance(kind)
    trainer = kind(model=loaded.model, args=SFTConfig(**kwargs), train_dataset=data,
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
    from trl import SFTTrainer

    class MeanTokenSFTTrainer(SFTTrainer):
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


def with_lengths(dataset: Any) -> Any:
    """``dataset`` with a ``length`` column (if it has none): the characters of each row's
    text, in ``messages`` or in ``prompt`` and ``completion``."""
    if LENGTH_COLUMN in dataset.column_names:
        return dataset
    columns = [name for name in ("messages", "prompt", "completion")
               if name in dataset.column_names]

    def measure(batch: dict[str, list[Any]]) -> dict[str, list[int]]:
        return {LENGTH_COLUMN: [sum(_text_length(batch[name][row]) for name in columns)
                                for row in range(len(batch[columns[0]]))]}

    return dataset.map(measure, batched=True)


def _length_grouped_kwargs() -> dict[str, Any]:
    """The training arguments for length-grouped batches (transformers 5 made the flag a
    sampling strategy)."""
    from transformers import TrainingArguments

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length", "length_column_name": LENGTH_COLUMN}
    return {"group_by_length": True, "length_column_name": LENGTH_COLUMN}


def _micro_batch_kwargs(config: SFTSettings) -> dict[str, Any]:
    """TRL arguments that run each batch as ``config.micro_batches`` micro-batches by length."""
    from transformers import TrainingArguments

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        raise ConfigError("micro_batches needs a transformers with train_sampling_strategy "
                          "(batch_rebalance); upgrade transformers or leave micro_batches at 1.")
    return {"train_sampling_strategy": "batch_rebalance", "length_column_name": LENGTH_COLUMN,
            "per_device_train_batch_size":
                config.per_device_train_batch_size // config.micro_batches,
            "gradient_accumulation_steps":
                config.gradient_accumulation_steps * config.micro_batches}


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
