"""Synthesis over a dataset: input checks, records, resume, and a real SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeOpenAIServer, Refusal, png_bytes, teacher, wire_teacher
from typer.testing import CliRunner

from insightv_agents import InvalidInputError
from insightv_agents.cli import app
from insightv_agents.graphs.synthesis import create_synthesis_graph
from insightv_agents.records import read_records
from insightv_agents.synthesize import RECORD_FIELDS, load_items, synthesize
from insightv_agents.testing import ScriptedChatModel

runner = CliRunner()


def make_data(folder: Path, count: int = 5, **extra: Any) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(count):
        (folder / "images" / f"{i}.png").write_bytes(png_bytes(color=(i * 40, 0, 0)))
        lines.append({"id": f"q{i}", "image": f"images/{i}.png", "question": f"How many {i}?",
                      "answer": "3", **extra})
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return data


def test_load_items_from_jsonl(tmp_path: Path) -> None:
    data = make_data(tmp_path, 3, choices=["1", "3"], category="count")
    items, root = load_items(data)
    assert root == tmp_path.resolve()
    assert [i.id for i in items] == ["q0", "q1", "q2"]
    assert items[0].image == str(tmp_path.resolve() / "images/0.png")
    assert items[0].image_ref == "images/0.png" and items[0].choices == ["1", "3"]


def test_load_items_from_a_dataset_folder_with_embedded_images(tmp_path: Path) -> None:
    import datasets

    rows = {"image": [png_bytes(color="blue"), png_bytes(color="green")],
            "question": ["a?", "b?"], "answer": ["x", "y"]}
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "ds"))
    items, _ = load_items(tmp_path / "ds", out=tmp_path / "out")
    assert len({i.id for i in items}) == 2  # ids made from the content when missing
    assert items[0].image_root == "out" and (tmp_path / "out" / items[0].image_ref).is_file()
    assert isinstance(items[0].image, bytes)


def test_load_items_from_a_dataset_folder_with_image_paths(tmp_path: Path) -> None:
    import datasets

    make_data(tmp_path / "ds", 2)
    rows = [json.loads(line) for line in (tmp_path / "ds" / "data.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    items, root = load_items(tmp_path / "ds")
    assert root == (tmp_path / "ds").resolve() and items[1].image_ref == "images/1.png"


@pytest.mark.parametrize(("row", "message"), [
    ({"image": "../secret.png", "question": "q", "answer": "a"}, "outside the data folder"),
    ({"image": "images/link.png", "question": "q", "answer": "a"}, "outside the data folder"),
    ({"image": "/etc/passwd", "question": "q", "answer": "a"}, "absolute"),
    ({"image": "images/none.png", "question": "q", "answer": "a"}, "no such file"),
    ({"image": "images/0.png", "answer": "a"}, "`question`"),
    ({"image": "images/0.png", "question": "q", "answer": ""}, "`answer`"),
    ({"image": "images/0.png", "question": "q", "answer": "a", "choices": "ab"}, "`choices`"),
    ({"id": "q0", "image": "images/0.png", "question": "q", "answer": "a"}, "also on line 1"),
])
def test_bad_items_are_refused_with_their_line(tmp_path: Path, row: dict[str, Any],
                                               message: str) -> None:
    data = make_data(tmp_path / "data", 1)
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (tmp_path / "data" / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    with data.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    with pytest.raises(InvalidInputError) as caught:
        load_items(data)
    assert "line 2" in str(caught.value) and message in str(caught.value)


def test_records_have_every_field_and_resume_skips_finished_items(tmp_path: Path) -> None:
    items, _ = load_items(make_data(tmp_path / "data", 4))
    model = ScriptedChatModel([teacher(steps=2)], cycle=True)
    graph = create_synthesis_graph(teacher=model, paths=3).compile()
    out = tmp_path / "out"
    report = asyncio.run(synthesize(graph, items[:2], out, concurrency=2,
                                    provenance={"teacher": {"model_name": "t"}}))
    assert (report.written, report.skipped) == (2, 0)
    calls_first = len(model.calls)
    report = asyncio.run(synthesize(graph, items, out, concurrency=2))
    assert (report.written, report.skipped) == (2, 2)
    assert len(model.calls) == calls_first * 2  # only the two new items ran
    records = list(read_records(out / "records.jsonl"))
    assert Counter((r["id"], r["path_index"]) for r in records) == Counter(
        {(f"q{i}", p): 1 for i in range(4) for p in range(3)})
    first = next(r for r in records if r["id"] == "q0")
    assert tuple(first) == RECORD_FIELDS
    assert first["answer"] == "3" and first["final_answer"] == "3" and first["correct"] is True
    assert first["image"] == "images/0.png" and first["image_root"] == "data"
    provenance = first["provenance"]
    assert provenance["teacher"] == {"model_name": "t"} and provenance["prompts_version"]
    assert set(provenance["timings"]) == {"path_seconds", "scoring_seconds", "item_seconds"}


def test_an_item_that_raises_is_logged_and_retried_by_the_next_run(tmp_path: Path) -> None:
    items, _ = load_items(make_data(tmp_path / "data", 2))
    good = teacher(steps=1)
    broken = {"on": True}

    def reply(messages: list[Any]) -> str:
        if broken["on"] and "How many 1?" in str(messages[1].content):
            raise ConnectionError("server went away")
        return good(messages)

    graph = create_synthesis_graph(teacher=ScriptedChatModel([reply], cycle=True),
                                   paths=2).compile()
    out = tmp_path / "out"
    report = asyncio.run(synthesize(graph, items, out))
    assert report.written == 1 and [e[0] for e in report.errors] == ["q1"]
    assert "server went away" in (out / "errors.jsonl").read_text()
    broken["on"] = False
    report = asyncio.run(synthesize(graph, items, out))
    assert (report.written, report.skipped, report.errors) == (1, 1, [])
    assert len(list(read_records(out / "records.jsonl"))) == 4


def synthesize_args(data: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["synthesize", "--input", str(data), "--out", str(out), "--teacher", "t",
            "--teacher-url", url, "-n", "3", *extra]


def test_cli_synthesize_writes_records_and_run_file(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", 3)
    with FakeOpenAIServer(wire_teacher(steps=2)) as server:
        result = runner.invoke(app, synthesize_args(data, tmp_path / "out", server.url,
                                                    "--concurrency", "2"))
        assert result.exit_code == 0, result.output
        assert "3 item(s) written" in result.output
        # Every request is constrained to a bounded schema; paths are sampled.
        assert all("structured_outputs" in body for body in server.requests)
        assert server.requests[0]["temperature"] == 0.7
        again = runner.invoke(app, synthesize_args(data, tmp_path / "out", server.url))
        assert "0 item(s) written, 3 already done" in again.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["paths"] == 3 and run["data_root"] == str((tmp_path / "data").resolve())
    assert len(list(read_records(tmp_path / "out" / "records.jsonl"))) == 9
    other = runner.invoke(app, [*synthesize_args(data, tmp_path / "out", "http://x/v1"),
                                "-n", "2"])
    assert other.exit_code == 2 and "3 paths per item" in other.output


def test_a_scoring_request_the_server_refuses_leaves_paths_unscored_not_lost(
        tmp_path: Path) -> None:
    """vLLM answers HTTP 400 to a prompt over the model's context: the item is still
    written (paths unscored, a typed ``rejected`` failure), not retried forever."""
    data = make_data(tmp_path / "data", 2)
    teach = wire_teacher(steps=2)

    def reply(body: dict[str, Any]) -> str | Refusal:
        if "scoring agent" in str(body["messages"][0]["content"]):
            return Refusal(400, "This model's maximum context length is 2048 tokens.")
        return teach(body)

    with FakeOpenAIServer(reply) as server:
        result = runner.invoke(app, synthesize_args(data, tmp_path / "out", server.url))
    assert result.exit_code == 0, result.output
    assert "2 item(s) written" in result.output
    assert not (tmp_path / "out" / "errors.jsonl").exists()
    records = list(read_records(tmp_path / "out" / "records.jsonl"))
    assert len(records) == 6 and all(r["score"] is None for r in records)
    assert all(r["status"] == "ok" and r["answer"] == "3" for r in records)
    failures = [r["scoring_failures"] for r in records]
    assert all(len(f) == 1 and f[0]["kind"] == "rejected" and f[0]["node"] == "score"
               and "maximum context length" in f[0]["error"] for f in failures)


def test_cli_refuses_bad_rows_before_calling_a_model(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", 1)
    data.write_text(data.read_text() + json.dumps({"image": "../x.png", "question": "q",
                                                   "answer": "a"}) + "\n")
    with FakeOpenAIServer(wire_teacher()) as server:
        for deprecated in ([], ["--strict"]):  # --strict: the default, before it was
            result = runner.invoke(app, [*synthesize_args(data, tmp_path / "out", server.url),
                                         *deprecated])
            assert result.exit_code == 2 and "outside the data folder" in result.output
            assert ("--strict is deprecated" in result.output) == bool(deprecated)
        assert server.requests == []


def test_cli_reports_and_skips_bad_rows_and_keeps_the_good_ones(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", 2)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], "{not json", json.dumps(["a", "list"]),
                               json.dumps({"image": "../x.png", "question": "q", "answer": "a"}),
                               lines[1]]) + "\n")
    with FakeOpenAIServer(wire_teacher(steps=2)) as server:
        result = runner.invoke(app, [*synthesize_args(data, tmp_path / "out", server.url),
                                     "--skip-bad"])
    assert result.exit_code == 0, result.output
    for problem in ("line 2: not JSON", "line 3: a list, not a JSON object",
                    "line 4: image '../x.png' is outside the data folder"):
        assert f"skipped bad row: {data}, {problem}" in " ".join(result.output.split())
    assert "2 item(s) written" in result.output
    assert len(list(read_records(tmp_path / "out" / "records.jsonl"))) == 6


@pytest.mark.slow
def test_resume_after_sigkill_gives_one_record_per_path(tmp_path: Path) -> None:
    """Kill the real CLI process mid-run (several times), then finish: every (id, path)
    appears exactly once and every line is a complete record."""
    count = 12
    data = make_data(tmp_path / "data", count)
    out = tmp_path / "out"
    records = out / "records.jsonl"
    command = [sys.executable, "-m", "insightv_agents.cli",
               *synthesize_args(data, out, "{url}", "--concurrency", "3")]
    with FakeOpenAIServer(wire_teacher(steps=2), delay=0.02) as server:
        command = [part.replace("{url}", server.url) for part in command]
        for kill in range(3):
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            lines_before = _lines(records)
            # Kill once this run has written something and is busy with more.
            while time.monotonic() < deadline and process.poll() is None:
                if _lines(records) > lines_before:
                    time.sleep(0.05 * (kill + 1))
                    break
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
        finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stdout + finished.stderr
    raw = records.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is complete JSON
    assert Counter((r["id"], r["path_index"]) for r in parsed) == Counter(
        {(f"q{i}", p): 1 for i in range(count) for p in range(3)})
    assert all(r["status"] == "ok" and len(r["steps"]) == 2 for r in parsed)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_module_runs_as_a_script() -> None:
    result = subprocess.run([sys.executable, "-m", "insightv_agents.cli", "--help"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0 and "synthesize" in result.stdout


def test_cli_synthesize_a_trained_agents_own_chains_with_their_stated_answers(
        tmp_path: Path) -> None:
    """--mode chain --final-answer stated: one request per path, the answer read from the
    chain's last step (how `build-data sft-summary --self` input is made)."""
    data = make_data(tmp_path / "data", 2)
    chain = (json.dumps({"summary": "Count", "reasoning": "One, two, three.",
                         "action": "continue"}) + "\n"
             + json.dumps({"summary": "Answer", "reasoning": "The answer is 3.",
                           "action": "summary"}))
    with FakeOpenAIServer(lambda body: chain) as server:
        result = runner.invoke(app, synthesize_args(
            data, tmp_path / "out", server.url, "--scorer", "rule", "--mode", "chain",
            "--final-answer", "stated"))
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 2 * 3  # one chain per path, nothing else asked
    records = list(read_records(tmp_path / "out" / "records.jsonl"))
    assert len(records) == 6 and all(r["status"] == "ok" and len(r["steps"]) == 2
                                     for r in records)
    assert {r["final_answer"] for r in records} == {"3"}
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run["mode"], run["final_answer"]) == ("chain", "stated")
    bad = runner.invoke(app, [*synthesize_args(data, tmp_path / "bad", "http://x/v1"),
                              "--final-answer", "verdict"])
    assert bad.exit_code == 2 and "--final-answer must be" in bad.output
