"""Our GRPO wrapper vs plain TRL ``GRPOTrainer`` on the same data, model, rewards and settings.

Both variants train the same tiny Idefics3 with LoRA on the language model, on the
reasoning-agent prompts our dataset builder makes from 16 questions, rewarded by our
format reward, with TRL's in-process generation. Each run is a fresh subprocess (so peak
memory is its own), the variants interleaved over ROUNDS rounds (these machines are noisy);
the script prints the median samples per second of each variant, their ratio (target
>= 0.95) and peak memory (RSS on CPU, CUDA peak allocated on a GPU).

    make bench-grpo        # or: python benchmarks/grpo.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS = 5
STEPS = 30
GENERATIONS = 8
NEW_TOKENS = 32


def prepare(folder: Path) -> dict[str, str]:
    """A tiny Idefics3 and the reasoning agent's GRPO prompts for 16 questions."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import png_bytes

    from insightv_agents.testing import build_tiny_idefics3
    from insightv_agents.trainers.grpo import reasoning_grpo_dataset

    model = build_tiny_idefics3(folder / "model")
    data = folder / "data"
    data.mkdir()
    rows = []
    for index in range(16):
        (data / f"{index}.png").write_bytes(png_bytes(color=("red", "blue")[index % 2]))
        rows.append({"id": f"q{index}", "image": f"{index}.png",
                     "question": f"How many dots {index}?", "answer": "7"})
    (data / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    reasoning_grpo_dataset(data / "items.jsonl").save_to_disk(str(folder / "grpo"))
    return {"model": str(model), "grpo": str(folder / "grpo")}


def run_once(variant: str, paths: dict[str, str], out: str) -> dict[str, float]:
    """One training run in this process; returns samples/s and peak memory (MiB)."""
    import resource

    import torch

    # Both variants load the same libraries, so peak memory compares the training runs.
    import insightv_agents.trainers.grpo  # noqa: F401
    from insightv_agents.trainers.rewards import FormatReward

    settings = {"output_dir": out, "max_steps": STEPS, "per_device_train_batch_size": GENERATIONS,
                "num_generations": GENERATIONS, "max_completion_length": NEW_TOKENS,
                "learning_rate": 1e-4, "logging_steps": 1000, "save_strategy": "no",
                "report_to": [], "dtype": "float32", "warmup_steps": 0,
                "lr_scheduler_type": "linear", "seed": 0}
    if variant == "ours":
        from insightv_agents.trainers.grpo import train_grpo

        metrics = train_grpo(paths["model"], paths["grpo"], settings,
                             rewards=[FormatReward()]).metrics
    else:
        metrics = plain_trl(paths, settings, FormatReward())
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"samples_per_second": metrics["train_samples_per_second"], "peak_mib": peak}


def plain_trl(paths: dict[str, str], settings: dict[str, object], reward: object
              ) -> dict[str, float]:
    """The same run written directly against TRL and PEFT, as a user would."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    processor = AutoProcessor.from_pretrained(paths["model"])
    model = AutoModelForImageTextToText.from_pretrained(paths["model"], dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=r"^model\.text_model\..*\.(q_proj|k_proj|v_proj|o_proj|"
                                     r"gate_proj|up_proj|down_proj)$")
    config = GRPOConfig(
        output_dir=str(settings["output_dir"]), max_steps=STEPS,
        per_device_train_batch_size=GENERATIONS, num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS, learning_rate=1e-4, logging_steps=1000,
        save_strategy="no", report_to="none", seed=0, bf16=False, use_cpu=True,
        lr_scheduler_type="linear", remove_unused_columns=False,
        dataloader_pin_memory=False, activation_checkpointing=False,
        # Ours writes each logged step's rollouts (log_completions); compared like for like.
        log_completions=True, num_completions_to_print=0, reward_weights=[1.0])
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config,
                          train_dataset=datasets.load_from_disk(paths["grpo"]),
                          processing_class=processor, peft_config=lora)
    output = trainer.train()
    trainer.save_model(str(settings["output_dir"]))
    return dict(output.metrics)


def main() -> None:
    if len(sys.argv) == 4:  # a child run: variant paths.json out
        paths = json.loads(Path(sys.argv[2]).read_text())
        print(json.dumps(run_once(sys.argv[1], paths, sys.argv[3])))
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    paths = prepare(folder)
    (folder / "paths.json").write_text(json.dumps(paths))
    print(f"tiny Idefics3, LoRA r16 on the language model, GRPO {STEPS} steps of "
          f"{GENERATIONS} completions ({NEW_TOKENS} new tokens), {ROUNDS} interleaved rounds, "
          "one process per run")
    results: dict[str, list[dict[str, float]]] = {"ours": [], "trl": []}
    for round_number in range(ROUNDS):
        for variant in ("ours", "trl"):
            out = folder / f"{variant}-{round_number}"
            child = subprocess.run([sys.executable, __file__, variant,
                                    str(folder / "paths.json"), str(out)],
                                   capture_output=True, text=True, check=True)
            results[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
    for variant, runs in results.items():
        print(f"  {variant}: samples/s per run "
              + ", ".join(f"{r['samples_per_second']:.1f}" for r in runs))
    speed = {v: statistics.median(r["samples_per_second"] for r in runs)
             for v, runs in results.items()}
    memory = {v: statistics.median(r["peak_mib"] for r in runs) for v, runs in results.items()}
    print(f"grpo: ours {speed['ours']:.1f} samples/s, plain TRL {speed['trl']:.1f} samples/s, "
          f"ratio {speed['ours'] / speed['trl']:.3f} (target >= 0.95); peak memory ours "
          f"{memory['ours']:.0f} MiB, TRL {memory['trl']:.0f} MiB, ratio "
          f"{memory['ours'] / memory['trl']:.3f}")


if __name__ == "__main__":
    main()
