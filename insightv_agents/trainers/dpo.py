"""DPO of the reasoning agent with TRL's ``DPOTrainer``, on the pairs
:func:`~insightv_agents.trainers.data.build_dpo_pairs` makes.

:class:`DPOConfig` is TRL's ``DPOConfig`` with what agent training adds
(:class:`~insightv_agents.trainers.common.AgentTraining`). The reference model is the model
training starts from: the base under a fresh LoRA adapter (TRL disables the adapter for the
reference), a frozen copy of an adapter trained further, or a frozen copy of a full model.
Defaults follow the paper: sigmoid loss, beta 0.1, one epoch, lr 5e-7 for full fine-tuning;
LoRA uses lr 5e-6 (the usual tenfold of full). TRL's ``loss_type`` and ``loss_weights``
combine losses: ``loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]`` adds a
negative log-likelihood term on the chosen completions (Iterative RPO, Pang et al., 2024),
which keeps the chosen paths' likelihood from falling along with the rejected ones'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trl

from insightv_agents.cards import AgentCard
from insightv_agents.errors import ConfigError
from insightv_agents.trainers.common import (
    AgentTraining,
    check_config,
    checkpoint_to_resume,
    load_dataset_arg,
    load_for_training,
    output_card,
    precision,
    save_output,
)
from insightv_agents.trainers.sft import TrainResult

DPO_DEFAULTS: dict[str, tuple[float, float]] = {"full": (5e-7, 1), "lora": (5e-6, 1)}
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class DPOConfig(AgentTraining, trl.DPOConfig):  # type: ignore[misc]
    """TRL's ``DPOConfig`` for training the reasoning agent: the fields of
    :class:`~insightv_agents.trainers.common.AgentTraining` (the learning rate and epochs
    default to the paper's for ``finetune``), and every DPO option of TRL's (``beta``,
    ``loss_type``, ``loss_weights``, ...)."""

    def __post_init__(self) -> None:
        if not 0 < self.beta <= 100:
            raise ConfigError("invalid DPOConfig: beta must be within (0, 100].")
        rate, epochs = DPO_DEFAULTS.get(self.finetune, (None, None))
        if self.learning_rate is None:
            self.learning_rate = rate
        if self.num_train_epochs is None:
            self.num_train_epochs = epochs
        super().__post_init__()


def train_dpo(model: str | Path, dataset: Any, config: DPOConfig | dict[str, Any], *,
              adapter: str | Path | None = None, eval_dataset: Any = None,
              callbacks: list[Any] | None = None, card: AgentCard | None = None
              ) -> TrainResult:
    """Train ``model`` (a base model, a full model output, or an adapter output, trained
    further) with DPO on ``dataset`` (``prompt``/``chosen``/``rejected`` + ``images``, or
    the folder ``insightv build-data dpo`` saved), the starting model as reference.
    ``config`` is a :class:`DPOConfig` or a dict of its fields. The output holds an agent
    card: ``card``, else the starting model's, else the dataset folder's, in chain mode (the
    pairs are chains).

    Raises:
        ConfigError: for an invalid config; InvalidInputError: for a missing or empty dataset.
    """
    config = check_config(config, DPOConfig)
    data = load_dataset_arg(dataset)
    missing = [name for name in PAIR_COLUMNS if name not in data.column_names]
    if missing:
        raise ConfigError(f"DPO needs {', '.join(PAIR_COLUMNS)} columns; missing "
                          f"{', '.join(missing)} (see insightv build-data dpo).")
    loaded = load_for_training(model, config, adapter=adapter)
    reference = None
    if config.finetune == "full":
        from transformers import AutoModelForImageTextToText

        reference = AutoModelForImageTextToText.from_pretrained(
            loaded.base, dtype=precision(config.dtype)[0], use_safetensors=True,
            trust_remote_code=config.trust_remote_code)
    eval_data = load_dataset_arg(eval_dataset) if eval_dataset is not None else None
    trainer = trl.DPOTrainer(model=loaded.model, ref_model=reference, args=config,
                             train_dataset=data, eval_dataset=eval_data,
                             processing_class=loaded.processor, peft_config=loaded.peft_config,
                             callbacks=callbacks)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint_to_resume(config))
    metrics = {**output.metrics, "train_loss": output.training_loss,
               "wall_seconds": round(time.perf_counter() - started, 3), "pairs": len(data)}
    margins = [entry["rewards/margins"] for entry in trainer.state.log_history
               if "rewards/margins" in entry]
    if margins:
        metrics["last_logged_reward_margin"] = margins[-1]
    out = save_output(trainer, loaded, config, "dpo", metrics, {}, output_card(
        "reasoning", card=card, sources=[loaded.adapter, model, dataset],
        profile="chain", dtype=config.dtype))  # DPO pairs are chains
    return TrainResult(output_dir=out, adapter=config.finetune == "lora",
                       base_model=loaded.base, metrics=metrics)


def preference_margins(model: str | Path, dataset: Any, *, adapter: str | Path | None = None,
                       trust_remote_code: bool = False) -> list[float]:
    """For each pair, ``log p(chosen) - log p(rejected)`` under ``model`` (summed over the
    completion tokens): what DPO raises. Runs on CPU or the first GPU, in float32."""
    return [chosen - rejected for chosen, rejected in preference_logprobs(
        model, dataset, adapter=adapter, trust_remote_code=trust_remote_code)]


def preference_logprobs(model: str | Path, dataset: Any, *, adapter: str | Path | None = None,
                        trust_remote_code: bool = False) -> list[tuple[float, float]]:
    """For each pair, ``(log p(chosen), log p(rejected))`` under ``model``, each summed over
    its completion tokens. Runs on CPU or the first GPU, in float32."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from insightv_agents.trained import check_adapter, resolve_model

    base, found = resolve_model(model)
    adapter = check_adapter(adapter) if adapter else found
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code)
    network: Any = AutoModelForImageTextToText.from_pretrained(
        base, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        network = PeftModel.from_pretrained(network, str(adapter))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network = network.to(device).eval()
    return [(_completion_logprob(network, processor, row, "chosen", device),
             _completion_logprob(network, processor, row, "rejected", device))
            for row in load_dataset_arg(dataset)]


def _completion_logprob(model: Any, processor: Any, row: dict[str, Any], side: str,
                        device: str) -> float:
    import torch

    images = [image.convert("RGB") for image in row.get("images") or []]

    def encode(messages: list[dict[str, Any]], generation_prompt: bool) -> Any:
        text = processor.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        return processor(text=[text], images=[images] if images else None,
                         return_tensors="pt").to(device)

    prompt = encode(row["prompt"], True)
    full = encode(row["prompt"] + row[side], False)
    start = prompt["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**full).logits[0, start - 1:-1].float()
    targets = full["input_ids"][0, start:]
    return float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum())
