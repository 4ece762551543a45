"""What SFT and DPO share: the settings every run has, loading a VLM for training (LoRA on
the language model, or full fine-tuning), precision from the device, resuming from
checkpoints, and saving an output that both backends load as it is.

An output folder holds either a PEFT adapter (``adapter_config.json`` naming its base model
by absolute path) or a full model with its processor, plus ``insightv_training.json`` (the
settings, the final metrics and TRL's log history).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.trained import TRAINING_FILE, check_remote_code, resolve_model

FineTune = Literal["lora", "full"]
Settings = TypeVar("Settings", bound=BaseModel)
DType = Literal["auto", "bfloat16", "bf16-mixed", "float16", "float32"]


class LoraSettings(BaseModel):
    """LoRA on the language model only, so that vLLM serves the adapter as it is.

    Defaults: rank 16, alpha 32, dropout 0.05, on every linear layer of the language model
    (attention and MLP projections); the vision tower and the connector stay frozen.
    ``target_modules`` takes PEFT's forms (a regex string or module names) instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1, le=512)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] | None = None


class TrainSettings(BaseModel):
    """Settings every training run has. ``None`` means "the default for this kind of run"
    (see each trainer's config for its learning rates and epochs).

    Args:
        output_dir: where checkpoints, the final adapter or model, and the run file go.
        finetune: ``"lora"`` (an adapter on the language model) or ``"full"``.
        lora: the adapter's settings (with ``finetune="lora"``).
        learning_rate, num_train_epochs: ``None`` takes the paper-derived default.
        max_steps: stop after this many optimiser steps (``-1``: run the epochs).
        per_device_train_batch_size, gradient_accumulation_steps: the batch, per device.
        warmup_ratio, lr_scheduler_type, weight_decay: the schedule.
        gradient_checkpointing: trade compute for memory.
        dtype: ``"auto"`` trains in bfloat16 on a GPU that supports it, float32 otherwise;
            ``"bf16-mixed"`` keeps the weights in float32 and computes in bfloat16 (autocast),
            on a GPU or a CPU: on a CPU with native bfloat16 (AVX512-BF16 or AMX:
            :func:`native_bf16`) a quarter faster than float32, emulated (slower) elsewhere.
        logging_steps, save_steps, save_total_limit: logging and checkpoints.
        report_to: TRL / transformers reporting integrations (``"none"``, ``"tensorboard"``,
            ``"wandb"``, ...).
        seed: the run's seed.
        resume: continue from the newest checkpoint in ``output_dir`` if there is one.
        trust_remote_code: run code shipped with the checkpoint. Off by default.
        trl_args: more keyword arguments for TRL's config, passed as they are (they win).
    """

    model_config = ConfigDict(extra="forbid")

    output_dir: Path
    finetune: FineTune = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float | None = Field(None, gt=0, le=1)
    num_train_epochs: float | None = Field(None, gt=0, le=1000)
    max_steps: int = Field(-1, ge=-1)
    per_device_train_batch_size: int = Field(1, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler_type: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    dtype: DType = "auto"
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    report_to: str | list[str] = "none"
    seed: int = 0
    resume: bool = True
    trust_remote_code: bool = False
    trl_args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (run the epochs) or at least 1.")
        return self

    def trl_kwargs(self, learning_rate: float, epochs: float, bf16: bool,
                   **specific: Any) -> dict[str, Any]:
        """Keyword arguments for TRL's ``SFTConfig`` / ``DPOConfig``: the shared ones, then
        the trainer's ``specific`` ones, then ``trl_args`` (which win)."""
        import torch
        from transformers import TrainingArguments

        kwargs: dict[str, Any] = {
            "output_dir": str(self.output_dir), "learning_rate": learning_rate,
            "num_train_epochs": epochs, "max_steps": self.max_steps,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "warmup_steps": self.warmup_ratio,  # a float below 1 is a ratio of all steps
            "lr_scheduler_type": self.lr_scheduler_type,
            "weight_decay": self.weight_decay,
            "bf16": bf16, "fp16": False, "logging_steps": self.logging_steps,
            "save_strategy": "steps", "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit, "report_to": self.report_to,
            "seed": self.seed, "max_length": None,  # never cut image tokens
            "remove_unused_columns": False,
            "dataloader_pin_memory": torch.cuda.is_available(),
        }
        if bf16 and not torch.cuda.is_available():
            kwargs["use_cpu"] = True  # transformers refuses bf16 on a CPU unless told

        # transformers 5 renamed gradient checkpointing to activation checkpointing.
        renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        kwargs["activation_checkpointing" if renamed else "gradient_checkpointing"] = \
            self.gradient_checkpointing
        return {**kwargs, **specific, **self.trl_args}


def check_settings(settings: Settings | dict[str, Any], kind: type[Settings]) -> Settings:
    """``settings`` as ``kind``: a dict is validated; a mistake becomes a ``ConfigError``."""
    from pydantic import ValidationError

    if isinstance(settings, kind):
        return settings
    try:
        return kind.model_validate(settings)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                             for e in err.errors())
        raise ConfigError(f"invalid {kind.__name__}: {problems}") from None


# --- device and precision --------------------------------------------------------------------


def precision(dtype: DType) -> tuple[Any, bool]:
    """The torch dtype to load the model in, and whether TRL should train in bf16."""
    import torch

    if dtype == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if bf16 else torch.float32), bf16
    if dtype == "bf16-mixed":
        return torch.float32, True
    chosen = getattr(torch, dtype)
    if chosen is torch.float16:
        raise ConfigError("float16 training is not supported (use bfloat16 or float32).")
    return chosen, chosen is torch.bfloat16


def native_bf16() -> bool:
    """Whether bfloat16 runs natively here: a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX. (oneDNN also calls plain AVX512 "bf16 supported", by emulation: a
    caption stage in bf16-mixed ran 2.6 times slower than float32 on such a CPU.)"""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


# --- models ----------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A model ready for a TRL trainer: the model (a PeftModel when continuing an adapter),
    its processor, the LoRA config for TRL to apply (a fresh adapter), and where it came from."""

    model: Any
    processor: Any
    peft_config: Any
    base: str
    adapter: str | None
    bf16: bool
    details: dict[str, Any] = field(default_factory=dict)


def load_for_training(model: str | Path, settings: TrainSettings, *,
                      adapter: str | Path | None = None) -> Loaded:
    """Load ``model`` (a base model, a full fine-tuned output, or an adapter output) for
    training as ``settings`` ask.

    With LoRA and an adapter (given, or ``model`` being an adapter output), that adapter is
    trained further; with LoRA and none, a fresh adapter is made on the language model.
    Full fine-tuning refuses an adapter (merge it first).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base, found = resolve_model(model)
    adapter = str(Path(adapter).resolve()) if adapter is not None else found
    if adapter is not None and not Path(adapter).is_dir():
        raise InvalidInputError(f"adapter {adapter!r} is not a folder.", field="adapter")
    if adapter is not None and settings.finetune == "full":
        raise ConfigError("full fine-tuning starts from a full model, not an adapter; "
                          "merge the adapter first or use finetune='lora'.")
    dtype, bf16 = precision(settings.dtype)
    check_remote_code(base, settings.trust_remote_code)
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=settings.trust_remote_code)
    network: Any = AutoModelForImageTextToText.from_pretrained(
        base, dtype=dtype, use_safetensors=True, trust_remote_code=settings.trust_remote_code)
    peft_config = None
    if settings.finetune == "lora":
        from peft import LoraConfig, PeftModel

        if adapter is not None:
            network = PeftModel.from_pretrained(network, adapter, is_trainable=True)
        else:
            lora = settings.lora
            peft_config = LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules or language_model_targets(network),
                task_type="CAUSAL_LM")
    return Loaded(model=network, processor=processor, peft_config=peft_config, base=base,
                  adapter=adapter, bf16=bf16)


def language_model_targets(model: Any) -> str:
    """A PEFT ``target_modules`` regex for every linear layer of ``model``'s language model
    (not the vision tower, the connector or the output head)."""
    import torch

    decoder = model.get_decoder()
    prefix = next((name for name, module in model.named_modules() if module is decoder), None)
    if not prefix:
        raise ConfigError(f"cannot find the language model of {type(model).__name__}; "
                          "give lora.target_modules.")
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in decoder.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    if not leaves:
        raise ConfigError("the language model has no linear layers to adapt; "
                          "give lora.target_modules.")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"


def checkpoint_to_resume(settings: TrainSettings) -> str | None:
    """The newest complete ``checkpoint-N`` folder in the output folder (if resuming is on).
    A checkpoint is complete once its ``trainer_state.json`` is written, the Trainer's last
    write: one cut short by a kill is passed over."""
    if not settings.resume or not settings.output_dir.is_dir():
        return None
    found = [(int(match.group(1)), path) for path in settings.output_dir.iterdir()
             if (match := re.fullmatch(r"checkpoint-(\d+)", path.name))
             and (path / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


def save_output(trainer: Any, loaded: Loaded, settings: TrainSettings, kind: str,
                metrics: dict[str, Any], extra: dict[str, Any]) -> Path:
    """Save the adapter (naming its base by absolute path) or the full model with its
    processor, then the run file, last and atomically: its presence marks a finished run."""
    out = settings.output_dir
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return out
    loaded.processor.save_pretrained(str(out))
    if (out / "adapter_config.json").exists():
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(Path(loaded.base).resolve())
        write_atomic(config_path, json.dumps(config, indent=2))
    run = {"kind": kind, "base_model": str(Path(loaded.base).resolve()),
           "started_from_adapter": loaded.adapter,
           "settings": json.loads(settings.model_dump_json()), "metrics": metrics,
           **extra, "log_history": trainer.state.log_history}
    write_atomic(out / TRAINING_FILE, json.dumps(run, indent=2, default=str))
    return out


def finished_run(output_dir: str | Path) -> dict[str, Any] | None:
    """The run file of a finished training run in ``output_dir``, else ``None``."""
    path = Path(output_dir) / TRAINING_FILE
    return json.loads(path.read_text()) if path.exists() else None


def load_dataset_arg(dataset: Any) -> Any:
    """A ``datasets.Dataset``, or a folder saved with ``save_to_disk`` (``insightv build-data``)."""
    import datasets

    if isinstance(dataset, str | Path):
        if not Path(dataset).is_dir():
            raise InvalidInputError(f"dataset {str(dataset)!r} is not a folder saved by "
                                    "`insightv build-data` (save_to_disk).", field="data")
        dataset = datasets.load_from_disk(str(dataset))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise InvalidInputError("the dataset has no 'train' split.", field="data")
        dataset = dataset["train"]
    if not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
        raise InvalidInputError("the training dataset is empty.", field="data")
    return dataset


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
