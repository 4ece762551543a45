"""Bad-input catalogue cases for damaged files and bad dataset rows: a damaged ``run.json``,
``records.jsonl``, ``eval.json`` or ``predictions.jsonl``, an ``--out`` that is a file, a
record whose image leaves its folder, and dataset rows whose image or text cannot be read.
Each gets a typed error naming the file (and line) before any model or server is called.
Run by tests/test_files.py as tests/test_bad_inputs.py runs :data:`bad_inputs.CASES`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bad_inputs import Case, CommandRefused, Ctx, png

from insightv_agents.errors import InvalidInputError

TRUNCATED_PNG = png((64, 64))[:60]
NOT_AN_IMAGE = b"hello, I am not a picture"
NOT_UTF8 = b'{"image": "good.png", "question": "caf\xe9?", "answer": "1"}'


def dataset(c: Ctx, *rows: Any, image: bytes | None = None) -> str:
    """``c.data(*rows)``, with ``d/bad.png`` holding ``image`` and raw ``bytes`` rows written
    as they are (text that is not UTF-8)."""
    if image is not None:
        c.file("d/bad.png", image)
    path = Path(c.data(*[row for row in rows if not isinstance(row, bytes)]))
    with path.open("ab") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row + b"\n")
    return str(path)


def bad_png_row() -> dict[str, str]:
    return {"id": "bad", "image": "bad.png", "question": "q", "answer": "1"}


def records(c: Ctx, *, run: str | None = None, line: str | None = None,
            image: str | None = None) -> str:
    """``c.records()`` with its ``run.json`` replaced by ``run``, ``line`` put second in
    ``records.jsonl``, or the first record's image set to ``image``."""
    folder = Path(c.records())
    if run is not None:
        (folder / "run.json").write_text(run)
    lines = (folder / "records.jsonl").read_text().splitlines()
    if line is not None:
        lines.insert(1, line)
    if image is not None:
        lines[0] = json.dumps({**json.loads(lines[0]), "image": image})
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def escaping_link(c: Ctx) -> str:
    folder = records(c, image="link.png")
    c.file("secret.png", png())
    (Path(folder) / "link.png").symlink_to(c.tmp / "secret.png")
    return folder


def build(c: Ctx, source: str, *extra: str) -> str:
    return c.cli("build-data", "sft-reason", "--from", source, "--out", str(c.tmp / "ds"),
                 *extra)


def synthesize(c: Ctx, data: str, out: str, *extra: str) -> str:
    return c.cli("synthesize", "--input", data, "--out", out, "--teacher", "t",
                 "--teacher-url", c.url, *extra)


def evaluate_cli(c: Ctx, data: str, out: str) -> str:
    return c.cli("eval", "--data", data, "--out", out, "--base-url", c.url,
                 "--method", "direct")


def out_with(c: Ctx, name: str, text: str) -> str:
    """An output folder holding ``name`` with ``text``."""
    c.file(f"o/{name}", text)
    return str(c.tmp / "o")


def _load(path: str, **options: Any) -> Any:
    from insightv_agents.synthesize import load_items

    return load_items(path, **options)


def _load_records(folder: str, **options: Any) -> Any:
    from insightv_agents.trainers.data import load_records

    return load_records(folder, **options)


def _evaluate(c: Ctx, out: str) -> Any:
    from insightv_agents.evaluate import direct_predictor, evaluate

    items, _ = _load(c.data())
    return asyncio.run(evaluate(direct_predictor(c.model), items, out))


def _synthesize(c: Ctx, out: str) -> Any:
    from insightv_agents.graphs.synthesis import create_synthesis_graph
    from insightv_agents.synthesize import synthesize as run

    items, _ = _load(c.data())
    graph = create_synthesis_graph(teacher=c.model, paths=2).compile()
    return asyncio.run(run(graph, items, out))


def _compare(first: str, second: str) -> Any:
    from insightv_agents.evaluate import compare_predictions

    return compare_predictions(first, second)


RECORD_LINE = json.dumps({"id": "q1", "path_index": 0})

CASES: list[Case] = [
    # --- dataset rows whose content cannot be read (found before any model call) ---
    Case("dataset row", "a truncated PNG", InvalidInputError, "corrupt or truncated",
         lambda c: _load(dataset(c, bad_png_row(), image=TRUNCATED_PNG))),
    Case("dataset row", "a text file named .png", InvalidInputError, "not an image",
         lambda c: _load(dataset(c, bad_png_row(), image=NOT_AN_IMAGE))),
    Case("dataset row", "a line that is not UTF-8", InvalidInputError, "line 2: not UTF-8",
         lambda c: _load(dataset(c, NOT_UTF8))),
    Case("dataset row", "a \\ud800 escape (half a UTF-16 pair)", InvalidInputError,
         "lone surrogate", lambda c: _load(dataset(
             c, '{"image": "good.png", "question": "q\\ud800", "answer": "1"}'))),
    Case("dataset row", "only bad rows, skipping bad rows", InvalidInputError,
         "no good one", lambda c: _load(c.file("d/bad.jsonl", "{oops\n"),
                                        on_bad_row=lambda problem: None)),
    Case("load_items", "out naming an existing file", InvalidInputError, "is a file",
         lambda c: _load(c.data(), out=c.file("taken", "x"))),
    # --- a synthesis run's files ---
    Case("load_records", "a truncated run.json", InvalidInputError, "line 1: not JSON",
         lambda c: _load_records(records(c, run='{"data_root": "/x", "pa'))),
    Case("load_records", "a run.json without data_root", InvalidInputError,
         "no `data_root` field", lambda c: _load_records(records(c, run='{"paths": 3}'))),
    Case("load_records", "a run.json holding a list", InvalidInputError,
         "not a JSON object", lambda c: _load_records(records(c, run="[1, 2]"))),
    Case("load_records", "a records.jsonl line that is not JSON", InvalidInputError,
         "line 2: not JSON", lambda c: _load_records(records(c, line="{torn"))),
    Case("load_records", "a record without id", InvalidInputError, "no `id` field",
         lambda c: _load_records(records(c, line=json.dumps({"path_index": 0})))),
    Case("load_records", "a record whose path_index is a string", InvalidInputError,
         "`path_index` is", lambda c: _load_records(records(c, line=json.dumps(
             {"id": "q1", "path_index": "first"})))),
    Case("load_records", "an image path with ../", InvalidInputError, "outside",
         lambda c: _load_records(records(c, image="../img.png"))),
    Case("load_records", "an absolute image path", InvalidInputError, "absolute",
         lambda c: _load_records(records(c, image="/etc/passwd"))),
    Case("load_records", "an image that is a symlink leading out", InvalidInputError,
         "outside", lambda c: _load_records(escaping_link(c))),
    Case("load_records", "an image missing from images=", InvalidInputError,
         "no such file", lambda c: _load_records(records(c), images=str(c.tmp))),
    Case("synthesize", "out naming an existing file", InvalidInputError, "is a file",
         lambda c: _synthesize(c, c.file("taken", "x"))),
    # --- an evaluation's files ---
    Case("evaluate", "a corrupt eval.json", InvalidInputError, "evaluation settings",
         lambda c: _evaluate(c, out_with(c, "eval.json", '{"method": '))),
    Case("evaluate", "out naming an existing file", InvalidInputError, "is a file",
         lambda c: _evaluate(c, c.file("taken", "x"))),
    Case("compare_predictions", "a predictions line that is not JSON", InvalidInputError,
         "not JSON", lambda c: _compare(out_with(c, "predictions.jsonl", "{oops\n"),
                                        str(c.tmp))),
    Case("compare_predictions", "a prediction without correct", InvalidInputError,
         "no `correct` field", lambda c: _compare(out_with(
             c, "predictions.jsonl", json.dumps({"id": "a", "category": "all"}) + "\n"),
             str(c.tmp))),
    # --- the commands ---
    Case("insightv synthesize", "a truncated PNG row (refused by default)", CommandRefused,
         "corrupt or truncated", lambda c: synthesize(
             c, dataset(c, bad_png_row(), image=TRUNCATED_PNG), str(c.tmp / "o"))),
    Case("insightv synthesize", "a line that is not UTF-8", CommandRefused, "not UTF-8",
         lambda c: synthesize(c, dataset(c, NOT_UTF8), str(c.tmp / "o"))),
    Case("insightv synthesize", "--out naming an existing file", CommandRefused, "is a file",
         lambda c: synthesize(c, c.data(), c.file("taken", "x"))),
    Case("insightv synthesize", "a corrupt run.json in --out", CommandRefused,
         "synthesis settings", lambda c: synthesize(c, c.data(), out_with(c, "run.json", "{"))),
    Case("insightv synthesize", "records.jsonl damaged before its end (raised in the run)",
         CommandRefused, "changed by something else", lambda c: synthesize(
             c, c.data(), out_with(c, "records.jsonl", "garbage\n" + RECORD_LINE + "\n"))),
    Case("insightv synthesize", "--strict with --skip-bad", CommandRefused, "contradict",
         lambda c: synthesize(c, c.data(), str(c.tmp / "o"), "--strict", "--skip-bad")),
    Case("insightv build-data", "a truncated run.json", CommandRefused, "not JSON",
         lambda c: build(c, records(c, run='{"data_root": '))),
    Case("insightv build-data", "a record without id", CommandRefused, "no `id` field",
         lambda c: build(c, records(c, line=json.dumps({"path_index": 0})))),
    Case("insightv build-data", "an image path with ../", CommandRefused, "outside",
         lambda c: build(c, records(c, image="../../secret.png"))),
    Case("insightv build-data", "--out naming an existing file", CommandRefused, "is a file",
         lambda c: c.cli("build-data", "dpo", "--from", c.records(), "--out",
                         c.file("taken", "x"))),
    Case("insightv eval", "a corrupt eval.json in --out", CommandRefused,
         "evaluation settings", lambda c: evaluate_cli(c, c.data(),
                                                       out_with(c, "eval.json", "[1,"))),
    Case("insightv eval", "a text file named .png (refused by default)", CommandRefused,
         "not an image", lambda c: evaluate_cli(
             c, dataset(c, bad_png_row(), image=NOT_AN_IMAGE), str(c.tmp / "o"))),
    Case("insightv eval", "--out naming a file inside a file", CommandRefused, "a file",
         lambda c: evaluate_cli(c, c.data(), str(Path(c.file("taken", "x")) / "o"))),
    Case("insightv convert", "--out naming an existing file", CommandRefused, "is a file",
         lambda c: c.cli("convert", "--source", str(c.tmp), "--out", c.file("taken", "x"))),
    Case("insightv convert", "a checkpoint whose config.json is truncated", CommandRefused,
         "line 1: not JSON", lambda c: c.cli(
             "convert", "--source", str(Path(c.file("ckpt/config.json", '{"mm_vis')).parent),
             "--out", str(c.tmp / "o"))),
    Case("insightv compare", "a predictions file that is not UTF-8", CommandRefused,
         "not UTF-8", lambda c: c.cli("compare", c.file("p.jsonl", b"\xff\xfe{}\n"),
                                      str(c.tmp))),
]
