"""Where a ``make reproduce`` run's chains go wrong: seeing or reasoning.

    python research/scripts/reproduce_analysis.py runs/reproduce

For every system whose predictions hold reasoning steps, on the held-out test split:

- ``cells``: the share of grid cells the chain's first step ("Describe the image") gets right;
- ``pictures``: the share of chains whose description is right in all 16 cells;
- ``faithful``: the share of chains whose every later claim holds *in the scene the chain
  itself described* (reasoning right from what it saw, whether or not it saw right);
- ``right | seen right``: accuracy on the items whose description was all right;
- ``plan``: the share of chains whose step summaries are those of the teacher's plan for the
  question (any strategy): whether the chain is about the question at all;
- ``repeated``: of the later steps' mentions of a cell the description said holds a shape
  (``r1c4 large blue circle``), the share that repeat the description's words for that cell:
  whether a step can look a cell up by its tag in what the chain itself wrote.

Then, for every model the run trained, the text pre-training's held-out copy accuracy
(``trainers.text.measure_copying``: near and far random spans, the gaps filled with the run's
questions and descriptions): how much of the copying the text stage taught each later stage
kept.

Prints two Markdown tables (and writes ``analysis.json`` beside the results).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from insightv_research.shapes.questions import parse_question
from insightv_research.shapes.reasoning import follows_plan
from insightv_research.shapes.scenes import (
    GRID,
    SceneIndex,
    describe_grid,
)
from insightv_research.shapes.scorer import check_claims, described_scene, tagged_cells

from insightv_agents.trainers.text import TextPretrainSettings, measure_copying


def repeated_mentions(steps: list[dict[str, Any]]) -> tuple[int, int]:
    """(mentions that repeat the description, mentions) over the later steps' mentions of the
    cells the first step described as holding a shape."""
    described = {(row, column): seen
                 for row, column, seen in tagged_cells(steps[0].get("reasoning", ""))}
    same = total = 0
    for step in steps[1:]:
        for row, column, content in tagged_cells(step.get("reasoning", "")):
            if described.get((row, column), "empty") != "empty":
                total += 1
                same += content == described[(row, column)]
    return same, total


def analyse(run: Path, index: SceneIndex) -> dict[str, Any]:
    items = {json.loads(line)["id"]: json.loads(line)
             for line in (run / "data" / "test.jsonl").read_text().splitlines()}
    table: dict[str, Any] = {}
    for folder in sorted((run / "eval").iterdir()):
        rows = [json.loads(line) for line in
                (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
        rows = [row for row in rows if row.get("steps")]
        if not rows or rows[0]["steps"][0].get("summary") != "Describe the image":
            continue
        cells = cells_right = pictures = faithful = seen_right = seen_right_correct = plans = 0
        repeats = mentions = 0
        for row in rows:
            item = items[row["id"]]
            truth = index.lookup(run / "data" / item["image"])
            plans += follows_plan(truth, parse_question(item["question"]), row["steps"])
            same, total = repeated_mentions(row["steps"])
            repeats, mentions = repeats + same, mentions + total
            claims = check_claims(truth, row["steps"][:1])
            cells += GRID * GRID
            cells_right += sum(claim.holds for claim in claims[:GRID * GRID])
            whole = len(claims) == GRID * GRID and all(claim.holds for claim in claims)
            pictures += whole
            seen = described_scene(row["steps"][0]["reasoning"])
            later = check_claims(seen, row["steps"][1:]) if seen is not None else []
            faithful += seen is not None and all(claim.holds for claim in later)
            if whole:
                seen_right += 1
                seen_right_correct += bool(row.get("correct"))
        table[folder.name] = {
            "n": len(rows), "cells": cells_right / cells, "pictures": pictures / len(rows),
            "faithful": faithful / len(rows), "plan": plans / len(rows),
            "right_if_seen_right": seen_right_correct / seen_right if seen_right else None,
            "seen_right": seen_right,
            "repeated": repeats / mentions if mentions else None, "mentions": mentions}
    return table


def copying(run: Path, index: SceneIndex) -> dict[str, dict[str, float]]:
    """measure_copying for every finished model of the run, in training order."""
    seed = json.loads((run / "settings.json").read_text())["seed"]
    texts = [json.loads(line)["question"] for line in
             (run / "data" / "train.jsonl").read_text().splitlines()[:500]]
    texts += [describe_grid(scene) for scene in list(index.values())[:500]]
    models = run / "models"
    names = ["text", "base", "direct", "reasoner", "summary", "stages"]
    names += sorted(str(path.relative_to(models)) for path in models.glob("dpo/round-*/model"))
    settings = TextPretrainSettings(output_dir=models / "text", seed=seed)
    return {name: measure_copying(models / name, texts, settings) for name in names
            if (models / name / "model.safetensors").exists()}


def main(run: Annotated[Path, typer.Argument(help="the run's folder")] = Path("runs/reproduce")
         ) -> None:
    index = SceneIndex.from_folder(run / "data")  # read once, for both tables
    table = analyse(run, index)
    kept = copying(run, index)
    (run / "analysis.json").write_text(json.dumps({"chains": table, "copying": kept},
                                                  indent=2) + "\n")
    print("| System | Plan followed | Cells seen right | Pictures seen right | Faithful chains "
          "| Right when seen right | Shapes repeated |\n|---|---|---|---|---|---|---|")
    for name, row in table.items():
        given = row["right_if_seen_right"]
        print(f"| {name} | {100 * row['plan']:.1f} | {100 * row['cells']:.1f} "
              f"| {100 * row['pictures']:.1f} "
              f"| {100 * row['faithful']:.1f} | "
              + ("–" if given is None else f"{100 * given:.1f} (n={row['seen_right']})")
              + " | " + ("–" if row["repeated"] is None
                         else f"{100 * row['repeated']:.1f} (n={row['mentions']})") + " |")

    print("\n| Model | Copy accuracy (near) | Copy accuracy (far) |\n|---|---|---|")
    for name, accuracy in kept.items():
        print(f"| {name} | {100 * accuracy['copy_accuracy']:.1f} "
              f"| {100 * accuracy['far_copy_accuracy']:.1f} |")


if __name__ == "__main__":
    typer.run(main)
