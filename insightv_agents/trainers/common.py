"""What SFT and DPO share: what every run adds to TRL's config, loading a VLM for training
(LoRA on the language model, or full fine-tuning), precision from the device, resuming from
checkpoints, and saving an output that both backends load as it is.

An output folder holds either a PEFT adapter (``adapter_config.json`` naming its base model
by absolute path) or a full model with its processor, plus ``insightv_training.json`` (the
config, the final metrics and TRL's log history).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from insightv_agents.cards import AgentCard, Role, read_card
from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.files import read_json
from insightv_agents.prompts import DEFAULT_PROMPTS, Prompts, ReasoningMode
from insightv_agents.trained import (
    TRAINING_FILE,
    check_adapter,
    check_remote_code,
    model_name,
    resolve_model,
)

FineTune = Literal["lora", "full"]
DType = Literal["auto", "bfloat16", "bf16-mixed", "float32"]
Config = TypeVar("Config")

if TYPE_CHECKING:  # the mixin's fields are checked against TRL's base class
    from transformers import TrainingArguments as _TrainingArguments
else:
    _TrainingArguments = object


def option(default: Any, help: str) -> Any:
    """A dataclass field with the help text ``insightv train --help`` shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class AgentTraining(_TrainingArguments):
    """What every agent-training run adds to TRL's config (``SFTConfig``, ``DPOConfig``), and
    the TRL defaults it changes. Mixed in before TRL's class, so these fields win.

    Added: ``finetune`` (a LoRA adapter on the language model, or full fine-tuning), the
    adapter (``lora_*``, named as in TRL's ``ModelConfig``), ``dtype`` (the precision to load
    and train in: it sets TRL's ``bf16`` unless that is given), and ``resume``.
    Changed defaults: ``learning_rate`` and ``num_train_epochs`` (``None``: the recipe's for
    this agent and kind of fine-tuning), batches of one row per device, a cosine schedule
    with 3% warm-up, two checkpoints kept, seed 0, no activation checkpointing,
    ``max_length=None`` (never cut image tokens), all dataset columns kept. Every other field
    is TRL's, with TRL's meaning and default.
    """

    finetune: FineTune = option("lora", "lora: a LoRA adapter on the language model "
                                 "(vision tower and connector frozen); full: every weight.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_target_modules: list[str] | None = option(
        None, "Module names for the adapter (PEFT's target_modules); default: every linear "
              "layer of the language model.")
    dtype: DType = option("auto", "auto: bfloat16 on a GPU that supports it, else float32; "
                                   "bfloat16; bf16-mixed: float32 weights, bfloat16 compute "
                                   "(autocast, also on CPUs); float32.")
    resume: bool = option(True, "Continue from the newest complete checkpoint in output_dir.")
    learning_rate: float | None = option(  # type: ignore[assignment]
        None, "Learning rate (default: the recipe's for this agent and --finetune).")
    num_train_epochs: float | None = option(  # type: ignore[assignment]
        None, "Epochs (default: the recipe's for this agent).")
    per_device_train_batch_size: int = option(1, "Rows per device and step (images make "
                                                 "rows large).")
    lr_scheduler_type: str = option(
        "cosine", "The learning-rate schedule (transformers' SchedulerType).")
    warmup_steps: float = option(0.03, "Warm-up: steps, or a ratio of all steps below 1.")
    save_total_limit: int | None = option(2, "Checkpoints kept in output_dir.")
    seed: int = option(0, "The run's seed (model initialisation, data order, dropout).")
    gradient_checkpointing: bool | None = option(
        None, "Deprecated alias of activation_checkpointing (off by default).")
    max_length: int | None = option(None, "Cut rows to this many tokens (default: never; "
                                           "cutting can drop image tokens).")
    remove_unused_columns: bool = option(False, "Drop dataset columns the model does not "
                                                 "take (the images column is needed).")

    def __post_init__(self) -> None:
        import torch

        self._check()
        cuda = torch.cuda.is_available()
        if self.bf16 is None:
            self.bf16 = precision(self.dtype)[1]
        if self.bf16 and not cuda:
            self.use_cpu = True  # transformers refuses bf16 on a CPU unless told
        if not cuda:
            self.dataloader_pin_memory = False
        super().__post_init__()

    def _check(self) -> None:
        if self.output_dir is None:
            raise ConfigError("output_dir is required.")
        self.output_dir = str(self.output_dir)
        checks = [
            (self.finetune in ("lora", "full"), "finetune must be lora or full"),
            (self.dtype in DType.__args__,  # type: ignore[attr-defined]
             f"dtype must be one of {', '.join(DType.__args__)}"),  # type: ignore[attr-defined]
            (1 <= self.lora_r <= 512, "lora_r must be within 1-512"),
            (self.lora_alpha >= 1, "lora_alpha must be at least 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be within [0, 1)"),
            (self.learning_rate is None or 0 < self.learning_rate <= 1,
             "learning_rate must be within (0, 1]"),
            (self.num_train_epochs is None or 0 < self.num_train_epochs <= 1000,
             "num_train_epochs must be within (0, 1000]"),
            (self.max_steps == -1 or self.max_steps >= 1,
             "max_steps must be -1 (run the epochs) or at least 1"),
            (self.per_device_train_batch_size >= 1,
             "per_device_train_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1,
             "gradient_accumulation_steps must be at least 1"),
            (self.warmup_steps >= 0, "warmup_steps must not be negative"),
            (self.max_length is None or self.max_length >= 16,
             "max_length must be at least 16"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: {'; '.join(problems)}.")


def check_config(config: Config | dict[str, Any], kind: type[Config]) -> Config:
    """``config`` as ``kind``: a dict is made into one; a mistake becomes a ``ConfigError``."""
    if isinstance(config, kind):
        return config
    if not isinstance(config, dict):
        raise ConfigError(f"expected a {kind.__name__} or a dict, not {type(config).__name__}.")
    try:
        return kind(**config)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {kind.__name__}: {err}") from None


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
    details: dict[str, Any] = field(default_factory=dict)


def load_for_training(model: str | Path, config: AgentTraining, *,
                      adapter: str | Path | None = None) -> Loaded:
    """Load ``model`` (a base model, a full fine-tuned output, or an adapter output) for
    training as ``config`` asks.

    With LoRA and an adapter (given, or ``model`` being an adapter output), that adapter is
    trained further; with LoRA and none, a fresh adapter is made on the language model.
    Full fine-tuning refuses an adapter (merge it first).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base, found = resolve_model(model)
    if (adapter is not None or found is not None) and config.finetune == "full":
        raise ConfigError("full fine-tuning starts from a full model, not an adapter; "
                          "merge the adapter first or use finetune='lora'.")
    adapter = str(check_adapter(adapter)) if adapter is not None else found
    dtype = precision(config.dtype)[0]
    remote = bool(getattr(config, "trust_remote_code", False))
    check_remote_code(base, remote)
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=remote)
    network: Any = AutoModelForImageTextToText.from_pretrained(
        base, dtype=dtype, use_safetensors=True, trust_remote_code=remote)
    peft_config = None
    if config.finetune == "lora":
        from peft import LoraConfig, PeftModel

        if adapter is not None:
            network = PeftModel.from_pretrained(network, adapter, is_trainable=True)
        else:
            peft_config = LoraConfig(
                r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules or language_model_targets(network),
                task_type="CAUSAL_LM")
    return Loaded(model=network, processor=processor, peft_config=peft_config, base=base,
                  adapter=adapter)


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


def checkpoint_to_resume(config: AgentTraining) -> str | None:
    """The newest complete ``checkpoint-N`` folder in the output folder (if resuming is on).
    A checkpoint is complete once its ``trainer_state.json`` is written, the Trainer's last
    write: one cut short by a kill is passed over."""
    out = Path(str(config.output_dir))
    if not config.resume or not out.is_dir():
        return None
    found = [(int(match.group(1)), path) for path in out.iterdir()
             if (match := re.fullmatch(r"checkpoint-(\d+)", path.name))
             and (path / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


def save_output(trainer: Any, loaded: Loaded, config: AgentTraining, kind: str,
                metrics: dict[str, Any], extra: dict[str, Any], card: AgentCard) -> Path:
    """Save the adapter (naming its base by absolute path) or the full model with its
    processor and agent card, then the run file, last and atomically: its presence marks a
    finished run."""
    out = Path(str(config.output_dir))
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return out
    loaded.processor.save_pretrained(str(out))
    if (out / "adapter_config.json").exists():
        adapter_path = out / "adapter_config.json"
        adapter = json.loads(adapter_path.read_text())
        adapter["base_model_name_or_path"] = model_name(loaded.base)
        write_atomic(adapter_path, json.dumps(adapter, indent=2))
    card.save(out)
    run = {"kind": kind, "base_model": model_name(loaded.base),
           "started_from_adapter": loaded.adapter,
           "settings": config.to_dict(), "metrics": metrics,
           "processes": trainer.args.world_size,
           **extra, "log_history": trainer.state.log_history}
    write_atomic(out / TRAINING_FILE, json.dumps(run, indent=2, default=str))
    return out


def prompt_changes(prompts: Prompts) -> dict[str, Any]:
    """The prompt fields that differ from the defaults (what an agent card records)."""
    return {name: getattr(prompts, name) for name in Prompts.__dataclass_fields__
            if getattr(prompts, name) != getattr(DEFAULT_PROMPTS, name)}


def dataset_card(kind: str, *, mode: ReasoningMode = "step",
                 prompts: Prompts = DEFAULT_PROMPTS) -> AgentCard:
    """How an agent trained on a dataset of ``kind`` (``sft-reason``, ``sft-summary``,
    ``dpo``) is driven: ``insightv build-data`` saves it beside the data, and the trainers
    carry it to the model they write."""
    role: Role = "summary" if kind == "sft-summary" else "reasoning"
    profile = "chain" if kind == "dpo" or mode == "chain" else "steps"
    return AgentCard(role=role, profile=profile, prompts=prompt_changes(prompts))


def output_card(role: Role, *, card: AgentCard | None = None, sources: Sequence[Any] = (),
                data: Any = None, profile: str | None = None,
                dtype: str | None = None) -> AgentCard:
    """The agent card of a trained output: ``card``, else the first card found in
    ``sources`` (the dataset's folder, the model trained further), else one inferred from
    the data (a reasoning set with several assistant turns in a row is step mode, else chain
    mode; default prompts); in ``role``, with ``profile`` (the format the data taught, where
    the trainer knows it) and ``dtype`` (the precision trained in, where it is one) when
    given. The context length stays the card's: ``insightv serve`` otherwise takes the
    model's own, up to 4096."""
    cards = (read_card(source) for source in sources
             if isinstance(source, str | Path) and Path(source).is_dir())
    found = card or next((found for found in cards if found is not None), None)
    if found is None:
        inferred = "chain"
        if data is not None and "messages" in data.column_names:
            rows = data.select(range(min(len(data), 32)))["messages"]
            several = any(sum(m["role"] == "assistant" for m in row) > 1 for row in rows)
            inferred = "steps" if several or role == "summary" else "chain"
        found = AgentCard(role=role, profile=inferred)
    update: dict[str, Any] = {"role": role}
    if profile is not None:
        update["profile"] = profile
    if dtype in ("float32", "bfloat16"):
        update["dtype"] = dtype
    return found.model_copy(update=update)


def finished_run(output_dir: str | Path) -> dict[str, Any] | None:
    """The run file of a finished training run in ``output_dir``, else ``None``."""
    path = Path(output_dir) / TRAINING_FILE
    if not path.exists():
        return None
    return read_json(path, what="the training run file",
                     fix="Remove it (or the output folder) to train again.", field="output_dir")


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
