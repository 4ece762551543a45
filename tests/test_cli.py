"""The ``insightv`` command line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeOpenAIServer, step, verdict
from typer.testing import CliRunner

from insightv_agents.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_demo_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests run the scripted stand-in (what ``run`` uses when the package has no demo
    agents); the demo agents themselves are tested in test_demo.py."""
    monkeypatch.setattr("insightv_agents.demo.demo_available", lambda: False)


def test_run_with_the_stand_in_says_what_it_is(image_path: Path) -> None:
    result = runner.invoke(app, ["run", "--image", str(image_path), "--question", "What?"])
    assert result.exit_code == 0, result.output
    assert "scripted stand-in" in result.output
    assert "step 1" in result.output and "step 2" in result.output
    assert "answer" in result.output


def test_json_output(image_path: Path) -> None:
    result = runner.invoke(app, ["run", "-i", str(image_path), "-q", "What?", "--json"])
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["status"] == "ok" and len(payload["steps"]) == 2


def test_run_stage_beam_with_the_stand_in(image_path: Path) -> None:
    result = runner.invoke(app, ["run", "-i", str(image_path), "-q", "What?", "--method",
                                 "stage-beam", "--beam-size", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["target"] for r in payload["search"]] == ["summary", "caption", "reasoning",
                                                        "conclusion"]
    assert all(len(r["candidates"]) == 3 and len(r["judgements"]) == 2
               for r in payload["search"])
    assert payload["answer"] == "(no model configured: scripted stand-in)"
    shown = runner.invoke(app, ["run", "-i", str(image_path), "-q", "What?", "--method",
                                "best-of-n"])
    assert shown.exit_code == 0 and "response" in shown.output and "stand-in" in shown.output


@pytest.mark.parametrize(("args", "message"), [
    (["--image", "/no/such.png", "--question", "q"], "no such file"),
    (["--image", "{img}", "--question", "q", "--method", "tree"], "--method must be"),
    (["--image", "{img}", "--question", "q", "--method", "stage-beam", "--beam-size", "0"],
     "beam_size must be"),
    (["--image", "{img}", "--question", "  "], "`question` is empty"),
    (["--image", "{img}", "--question", "q", "--mode", "tree"], "--mode must be"),
    (["--image", "{img}", "--question", "q", "--max-steps", "0"], "max_steps must be"),
    (["--image", "{img}", "--question", "q", "--max-revisions", "-1"], "max_revisions must be"),
    (["--image", "https://example.com/a.png", "--question", "q"], "URLs are not allowed"),
    (["--image", "{img}", "--question", "q", "--summary-model", "s"], "need --base-url"),
    (["--image", "{img}", "--question", "q", "--base-url", "localhost:8000"], "http(s) URL"),
])
def test_bad_arguments_exit_2_with_a_message(image_path: Path, args: list[str],
                                             message: str) -> None:
    args = [a.replace("{img}", str(image_path)) for a in args]
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


def _reply(body: dict[str, Any]) -> str:
    messages = body["messages"]
    if "summary agent" in str(messages[0]["content"]):
        return verdict("4")
    if any(m["role"] == "assistant" for m in messages):
        return step("count", "4 shapes", "summary")
    return step("look", "I see shapes")


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(_reply) as server:
        yield server


def test_run_against_an_openai_compatible_server(image_path: Path,
                                                 openai_server: FakeOpenAIServer) -> None:
    url = f"http://127.0.0.1:{openai_server.server_address[1]}/v1"
    result = runner.invoke(app, ["run", "-i", str(image_path), "-q", "How many?", "--base-url",
                                 url, "--model", "reason", "--summary-model", "summ", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer"] == "4"
    models = [r["model"] for r in openai_server.requests]
    assert models == ["reason", "reason", "summ"]
    first = openai_server.requests[0]["messages"][1]["content"]
    assert first[0]["type"] == "image_url"
    assert first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert openai_server.requests[0]["temperature"] == 0.2
    # Each node constrains the server to exactly the text it was sent back (vLLM structured
    # outputs: a bounded pattern of the canonical JSON the agents are trained on).
    for request in openai_server.requests:
        reply = _reply(request)
        assert re.fullmatch(request["structured_outputs"]["regex"], reply)
    assert not re.fullmatch(openai_server.requests[0]["structured_outputs"]["regex"],
                            json.dumps(json.loads(step("look", "x")), separators=(",", ":")))


@pytest.mark.parametrize(("args", "message"), [
    (["--adapter", "noequals"], "NAME=FOLDER"),
    (["--adapter", "reason=/no/such/folder"], "is not a folder"),
])
def test_serve_refuses_bad_adapters(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["serve", "--model", "m", *args])
    assert result.exit_code == 2 and message in result.output


def test_serve_reports_a_server_that_never_gets_ready(tmp_path: Path) -> None:
    never_ready = tmp_path / "python"
    never_ready.write_text("#!/bin/sh\necho 'still loading'\nexec sleep 600\n")
    never_ready.chmod(0o755)
    result = runner.invoke(app, ["serve", "--model", "m", "--python", str(never_ready),
                                 "--startup-timeout", "1"])
    assert result.exit_code == 2
    assert "not ready after 1 s" in result.output and "still loading" in result.output
