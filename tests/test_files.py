"""The one reader of the files the tools read (insightv_agents.files), and what the tools do
with damaged files, bad dataset rows and image paths that leave their folder: a typed error
naming the file and line, before any model call, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bad_inputs_files import NOT_AN_IMAGE, NOT_UTF8, TRUNCATED_PNG
from helpers import FakeOpenAIServer, png_bytes, wire_teacher, write_output
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from insightv_agents.cli import app
from insightv_agents.errors import InvalidInputError
from insightv_agents.files import output_folder, path_inside, read_json, read_jsonl
from insightv_agents.records import read_records
from insightv_agents.synthesize import load_items
from insightv_agents.trainers.data import load_records

runner = CliRunner()


def refused(result: Result, *fragments: str) -> str:
    """The output of a command that ended with exit status 2 and a message (no traceback),
    which holds every fragment."""
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in output
    for fragment in fragments:
        assert fragment in output
    return output


# --- read_json ---------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"data_root": "/x",\n "paths": ', "line 2: not JSON (Expecting value at column 11)"),
    (b'{"data_root": "caf\xe9"}', "line 1: not UTF-8 text (byte 0xe9 at column 19)"),
    (b"[1, 2]", ": a list, not a JSON object"),
    (b'{"paths": 3}', ": no `data_root` field"),
    (b'{"data_root": 3}', ": `data_root` is an integer, not a string"),
])
def test_read_json_names_the_file_the_line_and_what_to_do(tmp_path: Path, content: bytes,
                                                          problem: str) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError) as caught:
        read_json(path, what="settings", fields={"data_root": str}, fix="Remove it.",
                  field="from")
    assert str(caught.value).startswith(f"settings {path}")
    assert problem in str(caught.value) and str(caught.value).endswith("Remove it.")
    assert caught.value.field == "from"


def test_read_json_reads_utf8_with_or_without_a_bom_and_refuses_what_is_no_file(
        tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    for prefix in (b"", b"\xef\xbb\xbf"):
        path.write_bytes(prefix + '{"name": "café"}'.encode())
        assert read_json(path, what="x") == {"name": "café"}
    with pytest.raises(InvalidInputError, match="no such file"):
        read_json(tmp_path / "none.json", what="x")
    with pytest.raises(InvalidInputError, match="is a folder"):
        read_json(tmp_path, what="x")


# --- read_jsonl --------------------------------------------------------------------------


def test_read_jsonl_yields_each_object_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1}\n\n  \r\n{"id": "\xc3\xa9"}\r\n{"id": 3}')
    assert list(read_jsonl(path, what="x")) == [(1, {"id": 1}), (4, {"id": "é"}),
                                                (5, {"id": 3})]


@pytest.mark.parametrize(("line", "problem"), [
    (b"{oops", "line 2: not JSON (Expecting property name enclosed in double quotes at "
               "column 2)"),
    (b'"text"', "line 2: a string, not a JSON object"),
    (b'{"id": "caf\xe9"}', "line 2: not UTF-8 text (byte 0xe9 at column 12)"),
    (b'{"id": "\\ud800"}', "line 2: a \\u escape names half of a UTF-16 pair"),
    (b'{"name": "x"}', "line 2: no `id` field"),
    (b'{"id": null}', "line 2: `id` is null, not a string or an integer"),
])
def test_read_jsonl_refuses_the_first_bad_line(tmp_path: Path, line: bytes,
                                               problem: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a"}\n' + line + b'\n{"id": "c"}\n')
    seen = []
    with pytest.raises(InvalidInputError) as caught:
        for number, _ in read_jsonl(path, what="records", fields={"id": (str, int)}):
            seen.append(number)
    assert seen == [1]
    assert str(caught.value).startswith(f"records {path}, {problem}")
    assert str(caught.value).endswith(". Fix or remove that line.")


def test_read_jsonl_reports_bad_lines_to_on_bad_line_and_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a"}\n[1]\n\xff\n{"id": "d"}\n')
    bad: list[tuple[int, str]] = []
    good = list(read_jsonl(path, what="x", on_bad_line=lambda n, why: bad.append((n, why))))
    assert good == [(1, {"id": "a"}), (4, {"id": "d"})]
    assert [(n, why.split(" (")[0]) for n, why in bad] == [
        (2, "a list, not a JSON object"), (3, "not UTF-8 text")]


def test_a_torn_last_line_is_skipped_in_a_log_only(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "te')
    assert [record["id"] for record in read_records(path)] == ["a"]
    with pytest.raises(InvalidInputError, match="line 2: not JSON"):
        list(read_jsonl(path, what="dataset"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_read_as_objects_or_a_typed_error(content: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f"
        path.write_bytes(content)
        for read in (lambda: read_json(path, what="x", fields={"id": str}),
                     lambda: list(read_jsonl(path, what="x", fields={"id": str}))):
            try:
                read()
            except InvalidInputError as err:
                assert str(path) in str(err)


# --- output folders and contained paths --------------------------------------------------


def test_an_output_folder_may_exist_or_be_new_but_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    assert output_folder(tmp_path) == tmp_path
    assert output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert output_folder("relative") == Path("relative")
    with pytest.raises(InvalidInputError, match="taken is a file"):
        output_folder(tmp_path / "taken")
    with pytest.raises(InvalidInputError, match=r"is inside .*taken, a file"):
        output_folder(tmp_path / "taken" / "sub")
    (tmp_path / "dangling").symlink_to(tmp_path / "none")
    with pytest.raises(InvalidInputError, match="is a file"):
        output_folder(tmp_path / "dangling")


def test_a_path_inside_a_folder_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "inner.png").symlink_to(root / "sub")
    assert path_inside(root, "sub/../sub/a.png", where="it") == (root / "sub/a.png").resolve()
    assert path_inside(root, "inner.png", where="it") == (root / "sub").resolve()
    for value, problem in [("../secret.png", "outside it"), ("link.png", "outside it"),
                           (str(tmp_path / "secret.png"), "is absolute")]:
        with pytest.raises(InvalidInputError, match=problem):
            path_inside(root, value, where="it")


# --- damaged files through the commands --------------------------------------------------


@pytest.mark.parametrize(("run", "problem"), [
    ('{"data_root": "/x", "paths": 3', "line 1: not JSON"),  # cut short
    ('{"paths": 3}', "no `data_root` field"),  # incomplete
])
def test_build_data_refuses_a_damaged_run_file(tmp_path: Path, run: str, problem: str) -> None:
    source = write_output(tmp_path / "out", {"a": [(90, True)]})
    (source / "run.json").write_text(run)
    result = runner.invoke(app, ["build-data", "sft-reason", "--from", str(source), "--out",
                                 str(tmp_path / "ds")])
    refused(result, f"synthesis settings {source / 'run.json'}", problem,
            "rerun the same `insightv synthesize` command")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "line 2: not JSON"),
    (json.dumps({"path_index": 0, "num_paths": 1}), "line 2: no `id` field"),
])
def test_build_data_refuses_damaged_records(tmp_path: Path, line: str, problem: str) -> None:
    source = write_output(tmp_path / "out", {"a": [(90, True)], "b": [(80, True)]})
    lines = (source / "records.jsonl").read_text().splitlines()
    (source / "records.jsonl").write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    result = runner.invoke(app, ["build-data", "dpo", "--from", str(source), "--out",
                                 str(tmp_path / "ds")])
    refused(result, f"synthesis records {source / 'records.jsonl'}, {problem}",
            "Fix or remove that line")


def test_eval_refuses_a_corrupt_eval_file_before_any_model_call(tmp_path: Path) -> None:
    data = dataset(tmp_path / "data", ["a", "b"])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "eval.json").write_text('{"method": "direct", ')
    with FakeOpenAIServer(lambda body: "The answer is 1.") as server:
        result = runner.invoke(app, ["eval", "--data", str(data), "--out", str(tmp_path / "o"),
                                     "--base-url", server.url, "--method", "direct"])
        refused(result, f"evaluation settings {tmp_path / 'o' / 'eval.json'}, line 1: not JSON",
                "Remove it")
        assert server.requests == []


@pytest.mark.parametrize("command", ["synthesize", "build-data", "eval"])
def test_every_command_with_out_refuses_an_existing_file(tmp_path: Path,
                                                         command: str) -> None:
    data = dataset(tmp_path / "data", ["a"])
    taken = tmp_path / "taken"
    taken.write_text("mine")
    arguments = {
        "synthesize": ["synthesize", "--input", str(data), "--teacher", "t",
                       "--teacher-url", "http://127.0.0.1:9/v1"],
        "build-data": ["build-data", "dpo", "--from",
                       str(write_output(tmp_path / "synth", {"a": [(90, True)]}))],
        "eval": ["eval", "--data", str(data), "--base-url", "http://127.0.0.1:9/v1"],
    }[command]
    result = runner.invoke(app, [*arguments, "--out", str(taken)])
    refused(result, f"the output folder {taken} is a file")
    assert taken.read_text() == "mine"


def test_a_typed_error_raised_inside_asyncio_run_exits_2_with_its_message(
        tmp_path: Path) -> None:
    """The synthesis log is opened inside ``asyncio.run``: its refusal of a damaged
    ``records.jsonl`` ends the command like any other typed error."""
    data = dataset(tmp_path / "data", ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    record = json.dumps({"id": "a", "num_paths": 1})
    (out / "records.jsonl").write_text(f"garbage\n{record}\n")
    with FakeOpenAIServer(wire_teacher()) as server:
        result = runner.invoke(app, ["synthesize", "--input", str(data), "--out", str(out),
                                     "--teacher", "t", "--teacher-url", server.url])
        refused(result, f"{out / 'records.jsonl'}, line 1", "changed by something else")
        assert server.requests == []


# --- bad dataset rows --------------------------------------------------------------------


def dataset(folder: Path, ids: list[str], bad: bool = False) -> Path:
    """A JSONL dataset of good rows ``ids``; with ``bad``, a truncated PNG, a text file
    named .png and a line that is not UTF-8 come after the first row (lines 2-4)."""
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(png_bytes())
    (folder / "truncated.png").write_bytes(TRUNCATED_PNG)
    (folder / "text.png").write_bytes(NOT_AN_IMAGE)
    lines = [json.dumps({"id": identifier, "image": "good.png", "question": "How many?",
                         "answer": "3"}).encode() for identifier in ids]
    if bad:
        lines[1:1] = [
            json.dumps({"id": "t", "image": "truncated.png", "question": "q", "answer": "3"})
            .encode(),
            json.dumps({"id": "x", "image": "text.png", "question": "q", "answer": "3"})
            .encode(),
            NOT_UTF8]
    (folder / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "data.jsonl"


BAD_ROWS = ("line 2: image 'truncated.png': the image is corrupt or truncated",
            "line 3: image 'text.png': the data is not an image",
            "line 4: not UTF-8 text (byte 0xe9 at column 39)")


def test_load_items_refuses_bad_rows_or_skips_them_when_asked(tmp_path: Path) -> None:
    data = dataset(tmp_path / "data", ["a", "b"], bad=True)
    with pytest.raises(InvalidInputError) as caught:
        load_items(data)
    message = str(caught.value)
    assert message.startswith(f"{data}: 3 bad item(s), fix them, or skip them")
    assert all(row in message for row in BAD_ROWS)
    skipped: list[str] = []
    items, _ = load_items(data, on_bad_row=skipped.append)
    assert [item.id for item in items] == ["a", "b"]
    assert [problem.split(": ")[0] for problem in skipped] == [
        f"{data}, line 2", f"{data}, line 3", f"{data}, line 4"]


def test_limit_counts_good_items_and_bad_embedded_images_are_not_stored(
        tmp_path: Path) -> None:
    import datasets

    data = dataset(tmp_path / "data", ["a", "b", "c"], bad=True)
    items, _ = load_items(data, limit=2, on_bad_row=lambda problem: None)
    assert [item.id for item in items] == ["a", "b"]  # line 5: past the three bad lines
    rows = {"image": [png_bytes(color="blue"), TRUNCATED_PNG, NOT_AN_IMAGE],
            "question": ["a?", "b?", "c?"], "answer": ["x", "y", "z"]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(
        str(tmp_path / "ds"))
    with pytest.raises(InvalidInputError) as caught:
        load_items(tmp_path / "ds", out=tmp_path / "out")
    assert "row 2: the embedded image: the image is corrupt" in str(caught.value)
    assert "row 3: the embedded image: the data is not an image" in str(caught.value)
    assert not (tmp_path / "out").exists()
    items, _ = load_items(tmp_path / "ds", out=tmp_path / "out", on_bad_row=print)
    assert len(items) == 1 and (tmp_path / "out" / items[0].image_ref).is_file()
    assert len(list((tmp_path / "out" / "images").iterdir())) == 1


def test_synthesize_refuses_bad_rows_before_any_model_call_and_skip_bad_runs_the_good(
        tmp_path: Path) -> None:
    data = dataset(tmp_path / "data", ["a", "b"], bad=True)
    out = tmp_path / "out"
    command = ["synthesize", "--input", str(data), "--out", str(out), "--teacher", "t",
               "--teacher-url", "URL", "-n", "2"]
    with FakeOpenAIServer(wire_teacher(steps=1)) as server:
        command[command.index("URL")] = server.url
        refused(runner.invoke(app, command), "3 bad item(s)", "--skip-bad", *BAD_ROWS)
        assert server.requests == [] and not (out / "records.jsonl").exists()
        result = runner.invoke(app, [*command, "--skip-bad"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert all(f"skipped bad row: {data}, {row}" in output for row in BAD_ROWS)
    assert "2 item(s) written" in output
    assert sorted({r["id"] for r in read_records(out / "records.jsonl")}) == ["a", "b"]


def test_eval_refuses_bad_rows_before_any_model_call_and_skip_bad_runs_the_good(
        tmp_path: Path) -> None:
    data = dataset(tmp_path / "data", ["a", "b", "c"], bad=True)
    out = tmp_path / "out"
    with FakeOpenAIServer(lambda body: "The answer is 3.") as server:
        command = ["eval", "--data", str(data), "--out", str(out), "--base-url", server.url,
                   "--method", "direct"]
        refused(runner.invoke(app, command), *BAD_ROWS)
        assert server.requests == []
        result = runner.invoke(app, [*command, "--skip-bad"])
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 3  # items without a category count once in "all"
    assert report["accuracy"] == {"all": {"n": 3, "correct": 3, "accuracy": 1.0,
                                          "interval": report["accuracy"]["all"]["interval"]}}


# --- image paths in synthesis records stay in their folder -------------------------------


@pytest.mark.parametrize(("image", "problem"), [
    ("../secret.png", "image '../secret.png' is outside the data folder"),
    ("ABSOLUTE", "is absolute; give it relative to the data folder"),
    ("link.png", "image 'link.png' is outside the data folder"),
])
def test_build_data_refuses_record_images_outside_their_folder(
        tmp_path: Path, image: str, problem: str) -> None:
    source = write_output(tmp_path / "out", {"a": [(90, True)], "b": [(80, True)]})
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (source / "link.png").symlink_to(tmp_path / "secret.png")
    image = str(tmp_path / "secret.png") if image == "ABSOLUTE" else image
    lines = (source / "records.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "image": image})
    (source / "records.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInputError) as caught:
        load_records(source)
    assert f"{source / 'records.jsonl'}, line 2: " in str(caught.value)
    assert problem in str(caught.value)
    result = runner.invoke(app, ["build-data", "sft-reason", "--from", str(source), "--out",
                                 str(tmp_path / "ds")])
    refused(result, problem)
    assert not (tmp_path / "ds").exists()


def test_record_images_in_the_output_folder_or_a_moved_data_folder_load(
        tmp_path: Path) -> None:
    source = write_output(tmp_path / "out", {"a": [(90, True)]})
    (source / "images").mkdir()
    (source / "images" / "e.png").write_bytes(png_bytes())
    record = json.loads((source / "records.jsonl").read_text())
    (source / "records.jsonl").write_text(
        json.dumps({**record, "image": "images/e.png", "image_root": "out"}) + "\n")
    records = load_records(source)
    assert records.image(records.questions["a"][0]) == str(source / "images" / "e.png")
    (source / "records.jsonl").write_text(json.dumps(record) + "\n")
    moved = tmp_path / "moved"
    moved.mkdir()
    with pytest.raises(InvalidInputError, match="if the data moved, pass its folder"):
        load_records(source, images=moved)
    (moved / "img.png").write_bytes(png_bytes())
    assert load_records(source, images=moved).data_root == moved
    (source / "records.jsonl").write_text(json.dumps({**record, "image_root": "cloud"}) + "\n")
    with pytest.raises(InvalidInputError, match="`image_root` is 'cloud'"):
        load_records(source)


def test_a_damaged_training_run_file_or_adapter_config_is_a_typed_error(tmp_path: Path) -> None:
    from insightv_agents.trained import TRAINING_FILE, resolve_model
    from insightv_agents.trainers.common import finished_run

    (tmp_path / TRAINING_FILE).write_text('{"train_loss": ')
    with pytest.raises(InvalidInputError, match=r"the training run file .*line 1: not JSON"):
        finished_run(tmp_path)
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{oops")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"the adapter's config .*line 1: not JSON"):
        resolve_model(adapter)
