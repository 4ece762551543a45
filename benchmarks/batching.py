"""In-process generation: concurrent calls batched (``ChatTransformersVLM``'s default,
``max_batch_size=8``) vs one generation at a time (``max_batch_size=1``), on the shapes
world's tiny Idefics3 (the reproduction's sizes, randomly initialised) answering questions
about generated pictures.

Each variant answers the same CALLS prompts (greedy, MAX_NEW_TOKENS tokens each) with
``CONCURRENCY`` calls in flight, as ``evaluate`` and the DPO rounds' sampling run them; the
variants are interleaved over ROUNDS rounds in one process (these machines are noisy). It
prints each variant's seconds, the median ratio, and whether the replies were the same.

    make bench-batching     # or: python benchmarks/batching.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from langchain_core.messages import HumanMessage

ROUNDS = 3
CALLS = 16
MAX_NEW_TOKENS = 128
CONCURRENCY = (4, 8)


def main() -> None:
    from insightv_research.shapes.dataset import make_dataset
    from insightv_research.shapes.scenes import CELL_TAGS

    from insightv_agents.backends.transformers import ChatTransformersVLM
    from insightv_agents.tiny import build_idefics3

    folder = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    make_dataset(folder / "data", sizes={"train": CALLS}, seed=0)
    lines = (folder / "data" / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    path = build_idefics3(folder / "model", corpus=[row["question"] for row in rows] * 20,
                          vocab_size=1024, words=CELL_TAGS)
    prompts = [[HumanMessage(content=[
        {"type": "text", "text": row["question"]},
        {"type": "image_url", "image_url": {"url": str(folder / "data" / row["image"])}}])]
        for row in rows]
    models = {size: ChatTransformersVLM(model_path=str(path), max_new_tokens=MAX_NEW_TOKENS,
                                        max_batch_size=size) for size in (1, 8)}
    times: dict[tuple[int, int], list[float]] = {}
    replies: dict[tuple[int, int], list[str]] = {}
    for _ in range(ROUNDS):
        for concurrency in CONCURRENCY:
            for size, model in models.items():
                started = time.perf_counter()
                out = model.batch(prompts, config={"max_concurrency": concurrency})
                times.setdefault((size, concurrency), []).append(time.perf_counter() - started)
                replies[size, concurrency] = [message.text for message in out]
    for concurrency in CONCURRENCY:
        one, batched = times[1, concurrency], times[8, concurrency]
        ratio = statistics.median(a / b for a, b in zip(one, batched, strict=True))
        same = replies[1, concurrency] == replies[8, concurrency]
        print(f"{CALLS} calls, {concurrency} in flight: one at a time "
              f"{statistics.median(one):.2f} s, batched {statistics.median(batched):.2f} s, "
              f"ratio {ratio:.2f}x (same replies: {same})")


if __name__ == "__main__":
    main()
