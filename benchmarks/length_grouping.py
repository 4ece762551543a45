"""SFT with length-grouped batches (``train_sampling_strategy="group_by_length"``) vs
shuffled batches, on rows whose lengths vary: the shapes world's four-stage training set (stage rows
and pairwise judge rows, as ``make reproduce`` builds it) on its tiny Idefics3.

Each run is a fresh subprocess training on the same rows (batch 16, full fine-tuning, as the
reproduction trains) for as many steps as one of transformers' mega-batches has batches (the
grouped order sorts each mega-batch, a random sample of the rows, by length: its batches
cover every length once), the variants interleaved over ROUNDS rounds (these machines are
noisy). It prints each variant's samples per second, the median ratio, and the share of a
batch's text positions that are real, not padding, with each order (over a whole epoch).

    make bench-length-grouping     # or: python benchmarks/length_grouping.py
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUNDS = 3
BATCH = 16
QUESTIONS = 400


def prepare(folder: Path, judge_rows: int = QUESTIONS) -> dict[str, str]:
    """The shapes world's four-stage rows (``rows``, with ``judge_rows`` pairwise judge rows)
    and reasoning chains (``chains``) for QUESTIONS training questions, and a fresh tiny
    Idefics3 whose tokenizer is trained on the run's texts."""
    from insightv_research.reproduce import ReproduceSettings, Run
    from insightv_research.shapes.dataset import make_dataset
    from insightv_research.shapes.scenes import CELL_TAGS, SceneIndex

    from insightv_agents.tiny import build_idefics3

    settings = ReproduceSettings(out=folder / "run", train=QUESTIONS, dpo=2, test=5, paths=4,
                                 judge_rows=judge_rows)
    run = Run(settings, log=lambda line: None)
    make_dataset(run.data, sizes={"train": QUESTIONS, "dpo": 2, "test": 5}, seed=0)
    run.index = SceneIndex.from_folder(run.data)
    records = run.synthesize()
    sets = run.build(records, ["stages", "reasoner"])
    model = build_idefics3(folder / "model", corpus=run.corpus(records),
                           vocab_size=settings.vocab_size, words=CELL_TAGS)
    return {"model": str(model), "rows": str(sets["stages"]), "chains": str(sets["reasoner"])}


def mega_batch(rows: int) -> int:
    """Batches in one of transformers' mega-batches (its default for this many rows)."""
    return max(1, min(rows // (BATCH * 4), 50))


def run_once(variant: str, paths: dict[str, str], out: str) -> dict[str, float]:
    """One mega-batch's steps in this process; returns samples/s and the train loss."""
    import datasets

    from insightv_agents.trainers.sft import SFTConfig, train_sft

    steps = mega_batch(len(datasets.load_from_disk(paths["rows"])))
    metrics = train_sft(paths["model"], paths["rows"], SFTConfig(
        output_dir=out, finetune="full", learning_rate=2e-3, max_steps=steps,
        per_device_train_batch_size=BATCH, warmup_steps=0.05, logging_steps=1000,
        save_steps=100_000, dtype="float32", seed=0,
        train_sampling_strategy="group_by_length" if variant == "grouped" else "random")
    ).metrics
    return {"samples_per_second": metrics["train_samples_per_second"],
            "train_loss": metrics["train_loss"]}


def padding_share(rows: str) -> tuple[dict[str, float], int]:
    """The share of a batch's text positions that are real (not padding), per order, over
    an epoch; and the number of rows."""
    import datasets
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from insightv_agents.trainers.sft import with_lengths

    lengths = with_lengths(datasets.load_from_disk(rows))["length"]
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    grouped = get_length_grouped_indices(lengths, BATCH,
                                         generator=torch.Generator().manual_seed(0))

    def share(order: list[int]) -> float:
        batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
        padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
        return sum(lengths) / padded

    return {"shuffled": share(shuffled), "grouped": share(grouped)}, len(lengths)


def main() -> None:
    if len(sys.argv) == 4:  # a child run: variant paths.json out
        paths = json.loads(Path(sys.argv[2]).read_text())
        print(json.dumps(run_once(sys.argv[1], paths, sys.argv[3])))
        return
    folder = Path(tempfile.mkdtemp(prefix="bench-length-grouping-"))
    paths = prepare(folder)
    (folder / "paths.json").write_text(json.dumps(paths))
    shares, rows = padding_share(paths["rows"])
    print(f"shapes world four-stage rows of {QUESTIONS} questions ({rows} rows), tiny "
          f"Idefics3, full fine-tuning, {mega_batch(rows)} steps of batch {BATCH}, {ROUNDS} "
          f"interleaved rounds, one process per run; real text in a batch: shuffled "
          f"{shares['shuffled']:.2f}, grouped {shares['grouped']:.2f}")
    results: dict[str, list[dict[str, float]]] = {"shuffled": [], "grouped": []}
    for round_number in range(ROUNDS):
        for variant in results:
            child = subprocess.run(
                [sys.executable, __file__, variant, str(folder / "paths.json"),
                 str(folder / f"{variant}-{round_number}")],
                capture_output=True, text=True, check=True)
            results[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
    for variant, runs in results.items():
        print(f"  {variant}: samples/s per run "
              + ", ".join(f"{r['samples_per_second']:.2f}" for r in runs)
              + f"; train loss {statistics.median(r['train_loss'] for r in runs):.3f}")
    speed = {v: statistics.median(r["samples_per_second"] for r in runs)
             for v, runs in results.items()}
    print(f"grouped {speed['grouped']:.2f} samples/s, shuffled {speed['shuffled']:.2f} "
          f"samples/s, ratio {speed['grouped'] / speed['shuffled']:.2f}")


if __name__ == "__main__":
    main()
