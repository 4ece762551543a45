"""The demo agents shipped in the package (insightv_agents/demo): what ``make demo`` shows, and
the accuracy the README claims, measured again on the same fixed test slice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from helpers import demo_example
from insightv_research.shapes import make_dataset
from typer.testing import CliRunner

from insightv_agents import create_insightv_graph
from insightv_agents.cli import app
from insightv_agents.demo import DEMO_DIR, demo_agents, demo_available, demo_info, demo_prompts
from insightv_agents.evaluate import evaluate, graph_predictor
from insightv_agents.synthesize import load_items

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parent.parent / "README.md"


def test_demo_agents_ship_as_small_safetensors_without_code() -> None:
    assert demo_available()
    for name in ("reasoner", "summary"):
        folder = DEMO_DIR / name
        assert (folder / "model.safetensors").stat().st_size < 10_000_000
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.py"))
        assert "auto_map" not in json.loads((folder / "config.json").read_text())
    info = demo_info()
    assert demo_prompts().images_after_text is info["prompts"]["images_after_text"]


def test_make_demo_streams_steps_and_answers_the_example_right() -> None:
    image, question, truth = demo_example()
    result = CliRunner().invoke(app, ["run", "--image", str(image), "--question", question,
                                      "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["status"] == "ok" and len(out["steps"]) >= 2
    assert out["steps"][0]["summary"] == "Describe the image"
    assert out["answer"].strip().lower() == truth
    shown = CliRunner().invoke(app, ["run", "--image", str(image), "--question", question])
    assert shown.exit_code == 0 and "Describe the image" in shown.output  # streamed steps
    assert "demo agents" in shown.output


@pytest.mark.timeout(1800)
def test_demo_agents_reach_the_claimed_accuracy_on_the_fixed_test_slice(tmp_path: Path) -> None:
    info = demo_info()
    claimed = info["claimed_accuracy"]
    assert f"{100 * claimed:.0f}%" in README.read_text()  # the README states this claim
    made = info["dataset"]  # the run's dataset, remade the same (the generator is seeded)
    data = make_dataset(tmp_path / "data", seed=made["seed"], sizes=made["sizes"])
    items, _ = load_items(data / "test.jsonl", limit=info["test_slice"]["first"])
    reasoner, summarizer = demo_agents()
    graph = create_insightv_graph(reasoner=reasoner, summarizer=summarizer, mode="chain",
                                  prompts=demo_prompts()).compile()
    report = asyncio.run(evaluate(graph_predictor(graph), items, tmp_path / "eval",
                                  concurrency=4))
    assert report["accuracy"]["all"]["n"] == info["test_slice"]["first"]
    assert report["accuracy"]["all"]["accuracy"] >= claimed
