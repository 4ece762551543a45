"""DPO of the reasoning agent with TRL's ``DPOTrainer``, on the pairs
:func:`~insightv_agents.trainers.data.build_dpo_pairs` makes.

The reference model is the model training starts from: the base under a fresh LoRA adapter
(TRL disables the adapter for the reference), a frozen copy of an adapter trained further,
or a frozen copy of a full model. Defaults follow the paper: sigmoid loss, beta 0.1, one
epoch, lr 5e-7 for full fine-tuning; LoRA uses lr 5e-6 (the usual tenfold of full).
"""

from __future__ import annotations

import time
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
    precision,
    save_output,
)
from insightv_agents.trainers.sft import TrainResult

DPO_DEFAULTS: dict[str, tuple[float, float]] = {"full": (5e-7, 1), "lora": (5e-6, 1)}
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class DPOSettings(TrainSettings):
    """DPO settings (see :class:`~insightv_agents.trainers.common.TrainSettings`).

    Args:
        beta: the DPO temperature (how far from the reference the policy may move).
        loss_type: TRL's DPO loss (``"sigmoid"`` is the paper's standard DPO).
        sft_weight: weight of a negative log-likelihood term on the chosen completions
            (per token), added to the DPO loss: Iterative RPO (Pang et al., 2024) for
            iterative DPO on reasoning, where without it the chosen paths' likelihood falls
            along with the rejected ones'. 0 (the default): plain DPO.
    """

    beta: float = Field(0.1, gt=0, le=100)
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard",
                       "nca_pair", "apo_zero", "apo_down", "discopop", "sft"] = "sigmoid"
    sft_weight: float = Field(0.0, ge=0, le=100)

    @model_validator(mode="after")
    def _check_sft_weight(self) -> DPOSettings:
        if self.sft_weight and self.loss_type == "sft":
            raise ValueError("sft_weight adds an SFT term to a preference loss; "
                             "loss_type='sft' is one already.")
        return self

    def losses(self) -> dict[str, list[Any]]:
        """TRL's ``loss_type`` and ``loss_weights``: the DPO loss, and the NLL term if any."""
        if not self.sft_weight:
            return {"loss_type": [self.loss_type]}
        return {"loss_type": [self.loss_type, "sft"], "loss_weights": [1.0, self.sft_weight]}

    def schedule(self) -> tuple[float, float]:
        """The learning rate and epochs this run uses."""
        rate, epochs = DPO_DEFAULTS[self.finetune]
        return self.learning_rate or rate, self.num_train_epochs or epochs


def train_dpo(model: str | Path, dataset: Any, settings: DPOSettings | dict[str, Any], *,
              adapter: str | Path | None = None, eval_dataset: Any = None,
              callbacks: list[Any] | None = None) -> TrainResult:
    """Train ``model`` (a base model, a full model output, or an adapter output, trained
    further) with DPO on ``dataset`` (``prompt``/``chosen``/``rejected`` + ``images``, or
    the folder ``insightv build-data dpo`` saved), the starting model as reference.

    Raises:
        ConfigError: for invalid settings; InvalidInputError: for a missing or empty dataset.
    """
    from trl import DPOConfig, DPOTrainer

    config = check_settings(settings, DPOSettings)
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
    rate, epochs = config.schedule()
    kwargs = config.trl_kwargs(rate, epochs, loaded.bf16, beta=config.beta, **config.losses())
    eval_data = load_dataset_arg(eval_dataset) if eval_dataset is not None else None
    trainer = DPOTrainer(model=loaded.model, ref_model=reference, args=DPOConfig(**kwargs),
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
    out = save_output(trainer, loaded, config, "dpo", metrics,
                      {"learning_rate": rate, "epochs": epochs, "beta": config.beta})
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

    from insightv_agents.trained import resolve_model

    base, found = resolve_model(model)
    adapter = adapter or found
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
