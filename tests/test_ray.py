"""Synthesis and evaluation over a real local Ray cluster (started here on 127.0.0.1 with
2 CPUs): per-worker shards merged exactly once, a killed worker replaced, a killed driver
resumed, and `eval --ray` predicting as a single process does."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeOpenAIServer, step, verdict, wire_teacher
from test_synthesize import make_data, synthesize_args

from insightv_agents.records import read_records

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env,
                   timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)


def workers() -> list[int]:
    """The pids of the Ray worker processes running a ShardWorker (Ray titles them so)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::ShardWorker"):
                found.append(int(entry.name))
    return found


def shard_lines(folder: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in folder.glob("records.*.jsonl"))


def ray_synthesis(data: Path, out: Path, url: str, cluster: str) -> list[str]:
    return [sys.executable, "-m", "insightv_agents.cli",
            *synthesize_args(data, out, url, "--ray", cluster, "--workers", "2",
                             "--concurrency", "4")]


def start_until(command: list[str], out: Path, lines: int) -> subprocess.Popen[str]:
    """Start ``command``; return once its shards hold ``lines`` records (or it ended)."""
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None and shard_lines(out) < lines:
        time.sleep(0.02)
    return run


def exactly_once(out: Path, count: int, paths: int = 3) -> None:
    records = out / "records.jsonl"
    parsed = [json.loads(line) for line in records.read_bytes().splitlines()]
    assert Counter((r["id"], r["path_index"]) for r in parsed) == Counter(
        {(f"q{i}", p): 1 for i in range(count) for p in range(paths)})
    assert all(r["status"] == "ok" for r in parsed)
    assert not list(out.glob("records.*.jsonl"))  # the shards, merged and removed


def test_a_killed_worker_is_replaced_and_every_path_written_once(
        cluster: str, tmp_path: Path) -> None:
    count = 100
    data = make_data(tmp_path / "data", count)
    out = tmp_path / "out"
    with FakeOpenAIServer(wire_teacher(steps=2), delay=0.02) as server:
        run = start_until(ray_synthesis(data, out, server.url, cluster), out, 60)  # 20 items
        busy = workers()
        assert len(busy) == 2, "both workers should be running"
        os.kill(busy[0], signal.SIGKILL)
        output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    assert re.search(r"100 item\(s\) written, 0 already done, 0 item error\(s\), over 2 "
                     r"worker\(s\) \(1 restarted\)", " ".join(output.split())), output
    exactly_once(out, count)
    run_file = json.loads((out / "run.json").read_text())
    assert run_file["paths"] == 3


@pytest.mark.parametrize("again", ["with Ray", "without Ray"])
def test_a_killed_driver_resumes_from_the_shards(cluster: str, tmp_path: Path,
                                                 again: str) -> None:
    """The driver SIGKILLed midway; the same command, or the same without --ray, finishes
    the run from the shards' whole groups."""
    count = 100
    data = make_data(tmp_path / "data", count)
    out = tmp_path / "out"
    with FakeOpenAIServer(wire_teacher(steps=2), delay=0.02) as server:
        command = ray_synthesis(data, out, server.url, cluster)
        run = start_until(command, out, 90)  # 30 items
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert run.returncode == -signal.SIGKILL, "the run ended before the kill"
        before = shard_lines(out)
        assert before >= 90 and not (out / "records.jsonl").exists()
        if again == "without Ray":
            command = command[:command.index("--ray")]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "COLUMNS": "200"})
    assert finished.returncode == 0, finished.stdout + finished.stderr
    done_before = int(re.search(r"(\d+) already done", finished.stdout).group(1))
    assert done_before >= before // 3 - 1  # the shards' whole groups were kept
    exactly_once(out, count)


def _answering(body: dict[str, Any]) -> str:
    """The insightv method, scripted: the summary agent answers right on even questions."""
    messages = body["messages"]
    if "summary agent" in str(messages[0]["content"]):
        asked = re.search(r"How many (\d+)", json.dumps(messages))
        return verdict("3" if asked and int(asked.group(1)) % 2 == 0 else "5")
    if any(m["role"] == "assistant" for m in messages):
        return step("count", "3 shapes", "summary")
    return step("look", "I see shapes")


def test_eval_on_ray_predicts_as_one_process_does(cluster: str, tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", 20)
    with FakeOpenAIServer(_answering, delay=0.01) as server:
        def evaluate(out: Path, *extra: str) -> str:
            result = subprocess.run(
                [sys.executable, "-m", "insightv_agents.cli", "eval", "--data", str(data),
                 "--out", str(out), "--base-url", server.url, "--mode", "step", *extra],
                capture_output=True, text=True, timeout=300,
                env={**os.environ, "COLUMNS": "200"})
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        evaluate(tmp_path / "single")
        evaluate(tmp_path / "ray", "--ray", cluster, "--workers", "2", "--concurrency", "3")

    def predictions(out: Path) -> dict[str, tuple[Any, ...]]:
        rows = list(read_records(out / "predictions.jsonl"))
        assert len(rows) == 20 and not list(out.glob("predictions.*.jsonl"))
        return {row["id"]: (row["answer"], row["correct"], row["steps"], row["verdict"])
                for row in rows}

    assert predictions(tmp_path / "ray") == predictions(tmp_path / "single")
    single, ray = (json.loads((tmp_path / name / "report.json").read_text())
                   for name in ("single", "ray"))
    assert ray["accuracy"] == single["accuracy"] and single["accuracy"]["all"]["correct"] == 10


def test_a_cluster_without_room_for_a_worker_is_a_typed_error(
        cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers asking for a GPU on a cluster of none never start: the run says so."""
    import functools

    from insightv_agents import distributed
    from insightv_agents.errors import ConfigError
    from insightv_agents.methods import Evaluation, evaluation_worker
    from insightv_agents.synthesize import load_items

    monkeypatch.setattr(distributed, "WORKER_START_S", 3.0)
    items, root = load_items(make_data(tmp_path / "data", 2))
    run = Evaluation(method="insightv", data="d", root=str(root), base_url=(), local_model=None,
                     local_adapter=None, model="m", summary_base_url=(), summary_model=None,
                     mode=None, max_steps=4, temperature=0.0, beam_size=2, checks=None,
                     limit=None, labels=None)
    with pytest.raises(ConfigError, match="no Ray worker started within 3 s"):
        distributed.run_on_ray(functools.partial(evaluation_worker, run), items,
                               tmp_path / "out", stem="predictions", size="records",
                               address=cluster, workers=1, gpus_per_worker=1)
