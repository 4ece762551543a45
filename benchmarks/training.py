"""Our SFT and DPO wrappers vs plain TRL on the same data, model and settings.

Each run is a fresh subprocess (so peak memory is its own), the variants interleaved over
ROUNDS rounds (these machines are noisy); the script prints, per trainer, the median
samples per second of each variant, their ratio (target >= 0.95) and peak memory (RSS on
CPU, CUDA peak allocated on a GPU).

    make bench-training        # or: python benchmarks/training.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS = 5
STEPS = 60
BATCH = 2


def prepare(folder: Path) -> dict[str, str]:
    """A tiny Idefics3 and SFT / DPO datasets built by our builders from 16 questions."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import write_output

    from insightv_agents.testing import build_tiny_idefics3
    from insightv_agents.trainers.data import build_dpo_pairs, build_reasoning_sft, load_records

    model = build_tiny_idefics3(folder / "model")
    questions = {f"q{i}": [(90, True), (60, True), (10, False)] for i in range(16)}
    records = load_records(write_output(folder / "records", questions, steps=3))
    build_reasoning_sft(records, mode="chain")[0].save_to_disk(str(folder / "sft"))
    build_dpo_pairs(records)[0].save_to_disk(str(folder / "dpo"))
    return {"model": str(model), "sft": str(folder / "sft"), "dpo": str(folder / "dpo")}


def run_once(kind: str, variant: str, paths: dict[str, str], out: str) -> dict[str, float]:
    """One training run in this process; returns samples/s and peak memory (MiB)."""
    import resource

    import torch

    # Both variants load the same libraries (ours adds LangChain and LangGraph, tens of MiB
    # that are not training memory), so peak memory compares the training runs themselves.
    import insightv_agents.trainers.dpo
    import insightv_agents.trainers.sft  # noqa: F401

    settings = {"output_dir": out, "max_steps": STEPS, "per_device_train_batch_size": BATCH,
                "learning_rate": 1e-4, "logging_steps": 1000, "save_steps": 100_000,
                "dtype": "float32", "warmup_steps": 0, "lr_scheduler_type": "linear", "seed": 0}
    if variant == "ours":
        if kind == "sft":
            from insightv_agents.trainers.sft import train_sft

            metrics = train_sft(paths["model"], paths["sft"], settings).metrics
        else:
            from insightv_agents.trainers.dpo import train_dpo

            metrics = train_dpo(paths["model"], paths["dpo"], settings).metrics
    else:
        metrics = plain_trl(kind, paths, settings)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"samples_per_second": metrics["train_samples_per_second"], "peak_mib": peak}


def plain_trl(kind: str, paths: dict[str, str], settings: dict[str, object]) -> dict[str, float]:
    """The same run written directly against TRL and PEFT, as a user would."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(paths["model"])
    model = AutoModelForImageTextToText.from_pretrained(paths["model"], dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=r"^model\.text_model\..*\.(q_proj|k_proj|v_proj|o_proj|"
                                     r"gate_proj|up_proj|down_proj)$")
    common = {"output_dir": settings["output_dir"], "max_steps": STEPS,
              "per_device_train_batch_size": BATCH, "learning_rate": 1e-4,
              "logging_steps": 1000, "save_strategy": "no", "report_to": "none", "seed": 0,
              "bf16": False, "max_length": None, "lr_scheduler_type": "linear",
              "remove_unused_columns": False, "dataloader_pin_memory": False,
              # TRL turns activation checkpointing on by default; our configs leave it off
              # unless asked. Compared like for like.
              "activation_checkpointing": False}
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, assistant_only_loss=True),
                             train_dataset=datasets.load_from_disk(paths["sft"]),
                             processing_class=processor, peft_config=lora)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1),
                             train_dataset=datasets.load_from_disk(paths["dpo"]),
                             processing_class=processor, peft_config=lora)
    output = trainer.train()
    trainer.save_model(str(settings["output_dir"]))
    return dict(output.metrics)


def main() -> None:
    if len(sys.argv) == 5:  # a child run: kind variant paths.json out
        paths = json.loads(Path(sys.argv[3]).read_text())
        print(json.dumps(run_once(sys.argv[1], sys.argv[2], paths, sys.argv[4])))
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-training-"))
    paths = prepare(folder)
    (folder / "paths.json").write_text(json.dumps(paths))
    print(f"tiny Idefics3, LoRA r16 on the language model, {STEPS} steps of batch {BATCH}, "
          f"{ROUNDS} interleaved rounds, one process per run")
    for kind in ("sft", "dpo"):
        results: dict[str, list[dict[str, float]]] = {"ours": [], "trl": []}
        for round_number in range(ROUNDS):
            for variant in ("ours", "trl"):
                out = folder / f"{kind}-{variant}-{round_number}"
                child = subprocess.run(
                    [sys.executable, __file__, kind, variant, str(folder / "paths.json"),
                     str(out)], capture_output=True, text=True, check=True)
                results[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
        for variant, runs in results.items():
            print(f"  {kind} {variant}: samples/s per run "
                  + ", ".join(f"{r['samples_per_second']:.1f}" for r in runs))
        speed = {v: statistics.median(r["samples_per_second"] for r in runs)
                 for v, runs in results.items()}
        memory = {v: statistics.median(r["peak_mib"] for r in runs)
                  for v, runs in results.items()}
        print(f"{kind}: ours {speed['ours']:.1f} samples/s, plain TRL {speed['trl']:.1f} "
              f"samples/s, ratio {speed['ours'] / speed['trl']:.3f} (target >= 0.95); peak "
              f"memory ours {memory['ours']:.0f} MiB, TRL {memory['trl']:.0f} MiB, ratio "
              f"{memory['ours'] / memory['trl']:.3f}")


if __name__ == "__main__":
    main()
