"""The reproduction's SFT speed-ups, side by side: ``SFTConfig(micro_batches=2)`` (each
random batch as two length-sorted micro-batches) and ``dtype="bf16-mixed"`` (bfloat16
autocast, float32 weights), alone and together, against float32 with whole batches.

On the shapes world's two kinds of rows that ``make reproduce`` trains on most: the
four-stage rows with the pairwise judge rows in the reproduction's proportion (a quarter of
the rows, twice as long as the rest) and the reasoning chains.
Each run is a fresh subprocess training STEPS steps of batch 16 from the same tiny Idefics3
(full fine-tuning, as the reproduction trains), the variants interleaved over ROUNDS rounds
(these machines are noisy). It prints each variant's samples per second per run, its
median, the ratio to float32 with whole batches, and the median train loss (the same
objective: the losses stay close). bf16-mixed is fast only where bfloat16 is native (a CPU
with AVX512-BF16 or AMX, or a GPU); the script says whether it is.

    make bench-sft-speed     # or: python benchmarks/sft_speed.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS = 3
STEPS = 10
BATCH = 16
VARIANTS = {"float32": (1, "float32"), "micro-batches": (2, "float32"),
            "bf16-mixed": (1, "bf16-mixed"), "both": (2, "bf16-mixed")}


def run_once(variant: str, rows: str, model: str, out: str) -> dict[str, float]:
    """STEPS steps of ``variant`` in this process; samples/s and the train loss."""
    from insightv_agents.trainers.sft import SFTConfig, train_sft

    micro_batches, dtype = VARIANTS[variant]
    metrics = train_sft(model, rows, SFTConfig(
        output_dir=out, finetune="full", learning_rate=2e-3, max_steps=STEPS,
        per_device_train_batch_size=BATCH, warmup_steps=0.05, logging_steps=1000,
        save_steps=100_000, dtype=dtype, micro_batches=micro_batches, seed=0)).metrics
    return {"samples_per_second": metrics["train_samples_per_second"],
            "train_loss": metrics["train_loss"]}


def main() -> None:
    if len(sys.argv) == 5:  # a child run: variant rows model out
        print(json.dumps(run_once(*sys.argv[1:])))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from length_grouping import QUESTIONS, prepare

    from insightv_agents.trainers.common import native_bf16

    folder = Path(tempfile.mkdtemp(prefix="bench-sft-speed-"))
    # judge rows in make reproduce's proportion (600 for 2000 questions): a quarter of the rows
    paths = prepare(folder, judge_rows=QUESTIONS * 3 // 10)
    print(f"shapes world rows of {QUESTIONS} questions, tiny Idefics3, full fine-tuning, "
          f"{STEPS} steps of batch {BATCH}, {ROUNDS} interleaved rounds, one process per run; "
          f"native bfloat16 here: {'yes' if native_bf16() else 'no'}")
    for name, rows in (("four-stage + judge rows", paths["rows"]),
                       ("reasoning chains", paths["chains"])):
        results: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
        for round_number in range(ROUNDS):
            for variant in VARIANTS:
                child = subprocess.run(
                    [sys.executable, __file__, variant, rows, paths["model"],
                     str(folder / f"{Path(rows).name}-{variant}-{round_number}")],
                    capture_output=True, text=True, check=True)
                results[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
        base = statistics.median(r["samples_per_second"] for r in results["float32"])
        print(name + ":")
        for variant, runs in results.items():
            speed = statistics.median(r["samples_per_second"] for r in runs)
            print(f"  {variant:>13}: samples/s " + ", ".join(
                f"{r['samples_per_second']:.2f}" for r in runs)
                + f" (median {speed:.2f}, {speed / base:.2f}x float32); train loss "
                f"{statistics.median(r['train_loss'] for r in runs):.3f}")


if __name__ == "__main__":
    main()
