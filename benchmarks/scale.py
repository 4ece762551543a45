"""Scale-out benchmark: synthesis items per second through an endpoint pool of 1 and 2
replicas, and over Ray workers against one process.

Each replica is a loopback OpenAI-compatible server (a scripted teacher, in a process of its
own) that serves at most CAPACITY requests at once, each taking LATENCY seconds: a stand-in
for a GPU server whose batch is full, so what is measured is how well the client side spreads
and keeps up the load.

  1. ``2-replica ratio``: items/s of the synthesis runner with a pool of two replicas over
     items/s with one (target >= 1.9).
  2. ``Ray / single``: items/s of ``run_on_ray`` (a local Ray cluster on this machine, two
     workers of half the concurrency each, its start-up, workers and merge included) over
     items/s of the single-process runner at the same total concurrency, both on the two
     replicas (target >= 0.9).

Medians of interleaved rounds (these machines are noisy).

    python benchmarks/scale.py [--items 240] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
CAPACITY, LATENCY = 4, 0.2
PATHS, STEPS = 2, 2
SERVER = """
import sys, threading, time
sys.path.insert(0, {tests!r})
from helpers import FakeOpenAIServer, wire_teacher
slots, reply = threading.Semaphore({capacity}), wire_teacher(steps={steps})
def limited(body):
    with slots:  # a full batch: at most CAPACITY requests served at once
        time.sleep({latency})
        return reply(body)
with FakeOpenAIServer(limited, keep_alive=True) as server:
    print(server.url, flush=True)
    time.sleep(86400)
"""


def start_replica() -> tuple[subprocess.Popen[str], str]:
    code = SERVER.format(tests=str(TESTS), capacity=CAPACITY, steps=STEPS, latency=LATENCY)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def items(folder: Path, count: int) -> list[Any]:
    from PIL import Image

    from insightv_agents.synthesize import Item

    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "image.png"
    Image.new("RGB", (16, 16), "red").save(image)
    return [Item(id=f"q{i}", image=str(image), image_ref="image.png", image_root="data",
                 question=f"How many {i}?", answer="3", choices=None, category=None, line=i)
            for i in range(count)]


def teaching(urls: list[str]) -> Any:
    """The synthesis settings the CLI would use, as a Ray worker builds them."""
    from insightv_agents.cli.data import Teaching

    return Teaching(teacher="t", teacher_url=tuple(urls), scorer=None, scorer_url=(),
                    judge=None, judge_url=(), paths=PATHS, max_steps=STEPS + 2,
                    temperature=0.7, top_p=0.95, max_tokens=256, mode=None,
                    final_answer="ask")


def single(urls: list[str], batch: list[Any], out: Path, concurrency: int) -> float:
    from insightv_agents.synthesize import synthesize

    graph, provenance, _ = teaching(urls).build()
    report = asyncio.run(synthesize(graph, batch, out, concurrency=concurrency,
                                    provenance=provenance, fsync=False))
    assert report.written == len(batch) and not report.errors, report.errors[:3]
    return len(batch) / report.seconds


def on_ray(urls: list[str], batch: list[Any], out: Path, concurrency: int,
           address: str) -> float:
    from insightv_agents.cli.data import synthesis_worker
    from insightv_agents.distributed import run_on_ray

    started = time.perf_counter()
    report = run_on_ray(functools.partial(synthesis_worker, teaching(urls)), batch, out,
                        stem="records", size="num_paths", address=address, workers=2,
                        concurrency=concurrency // 2)
    assert report.written == len(batch) and not report.errors, report.errors[:3]
    return len(batch) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="insightv-scale-"))
    batch = items(folder / "data", args.items)
    replicas = [start_replica(), start_replica()]
    urls = [url for _, url in replicas]
    ray_bin = Path(sys.executable).with_name("ray")
    port = 6400 + int(time.time()) % 500
    subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True)
    rates: dict[str, list[float]] = {"1 replica": [], "2 replicas": [], "Ray, 2 replicas": []}
    try:
        single(urls, batch[:4], folder / "warm-up", args.concurrency)
        for index in range(args.rounds):  # interleaved: noise hits every way alike
            rates["1 replica"].append(single(urls[:1], batch, folder / f"one-{index}",
                                             args.concurrency))
            rates["2 replicas"].append(single(urls, batch, folder / f"two-{index}",
                                              args.concurrency))
            rates["Ray, 2 replicas"].append(on_ray(urls, batch, folder / f"ray-{index}",
                                                   args.concurrency, f"127.0.0.1:{port}"))
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True)
        for process, _ in replicas:
            process.kill()
    requests = PATHS * (STEPS + 1) + 1
    print(f"{args.items} items x {PATHS} paths ({requests} requests an item); each replica "
          f"serves {CAPACITY} requests at once, {LATENCY * 1000:.0f} ms each (at most "
          f"{CAPACITY / LATENCY / requests:.2f} items/s a replica); concurrency "
          f"{args.concurrency} items\n")
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        shown = ", ".join(f"{value:.2f}" for value in values)
        print(f"{name:>16}: {median[name]:6.2f} items/s (rounds: {shown})")
    ray_s, single_s = (args.items / median[name] for name in ("Ray, 2 replicas", "2 replicas"))
    print(f"Ray's own time: {ray_s - single_s:.1f} s a run (connecting, starting the workers, "
          f"which import the library and build their models, the last batches, the merge)")
    print(f"\n2-replica ratio: {median['2 replicas'] / median['1 replica']:.2f} (target >= 1.9)")
    print(f"Ray / single: {median['Ray, 2 replicas'] / median['2 replicas']:.2f} "
          f"(target >= 0.9; medians of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
