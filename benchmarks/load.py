"""Load test: synthesis at concurrency 64 against the CPU vLLM server, for a bounded time.

A tiny random Idefics3 (built offline) is served by vLLM; ``--items`` questions, each about
its own picture, go through the synthesis graph (``--paths`` paths of ``STEPS`` steps each,
then one scoring request) at ``--concurrency`` items in flight, until all are done or
``--seconds`` have passed (the run is then cancelled, as a kill would stop it). Afterwards
every item must be accounted for: written with exactly ``--paths`` records, logged as an
error, or not finished in time; no half record. The client's resident memory is sampled
every second: start, peak and end are reported.

    INSIGHTV_VLLM_PYTHON=.vllm-venv/bin/python python benchmarks/load.py [--out docs/load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import continuing_model, pin, questions

from insightv_agents.backends.vllm import VLLMServer
from insightv_agents.graphs.synthesis import create_synthesis_graph
from insightv_agents.records import read_records
from insightv_agents.synthesize import load_items, synthesize, write_run_file
from insightv_agents.testing import build_tiny_idefics3

STEPS = 2


def rss_mib() -> float:
    """This process's resident memory, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_items(folder: Path, count: int) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = []
    for index, item in enumerate(questions(count)):
        (folder / "images" / f"{index}.png").write_bytes(item["image"])
        lines.append(json.dumps({"id": f"q{index}", "image": f"images/{index}.png",
                                 "question": item["question"], "answer": "3"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


async def run(graph: Any, items: list[Any], out: Path, concurrency: int,
              seconds: float) -> dict[str, Any]:
    samples = [rss_mib()]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            samples.append(rss_mib())

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    timed_out = False
    try:
        await asyncio.wait_for(synthesize(graph, items, out, concurrency=concurrency),
                               timeout=seconds)
    except TimeoutError:
        timed_out = True
    elapsed = time.perf_counter() - started
    stop.set()
    await sampler
    samples.append(rss_mib())
    return {"seconds": round(elapsed, 1), "timed_out": timed_out,
            "rss_mib": {"start": round(samples[0], 1), "peak": round(max(samples), 1),
                        "end": round(samples[-1], 1)}}


def account(out: Path, ids: list[str], paths: int) -> dict[str, Any]:
    """Every item: written (with exactly ``paths`` records), an error, or unfinished."""
    records = list(read_records(out / "records.jsonl")) if (out / "records.jsonl").exists() \
        else []
    per_item = Counter(record["id"] for record in records)
    errors = set()
    if (out / "errors.jsonl").exists():
        errors = {json.loads(line)["id"] for line in
                  (out / "errors.jsonl").read_text().splitlines() if line.strip()}
    written = set(per_item)
    return {"items": len(ids), "written": len(written), "errors": len(errors - written),
            "unfinished": len(set(ids) - written - errors),
            "records": len(records),
            "items_with_wrong_record_count": sum(n != paths for n in per_item.values()),
            "failed_paths": sum(record["status"] == "failed" for record in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=640)
    parser.add_argument("--paths", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="insightv-load-"))
    model_path = build_tiny_idefics3(folder / "model")
    items, root = load_items(write_items(folder / "data", args.items))
    out = folder / "out"
    write_run_file(out, {"data_root": str(root), "paths": args.paths})
    server = VLLMServer(model_path, served_model_name="tiny", dtype="float32",
                        max_model_len=2048, enforce_eager=True,
                        extra_args=["--block-size", "32"], env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    with server:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cores) > 1:
            pin(set(cores[1:]))  # the client off the server's first core
        graph = create_synthesis_graph(teacher=continuing_model(server), paths=args.paths,
                                       max_steps=STEPS, max_retries=0).compile()
        figures = asyncio.run(run(graph, items, out, args.concurrency, args.seconds))
    figures |= account(out, [item.id for item in items], args.paths)
    figures |= {"concurrency": args.concurrency, "paths": args.paths, "steps": STEPS,
                "limit_seconds": args.seconds,
                "items_per_second": round(figures["written"] / figures["seconds"], 2)}
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
