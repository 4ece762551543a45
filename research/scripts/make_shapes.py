"""The example scene of ``make demo``: ``shapes.json`` (its description) and ``shapes.png``
(its picture, drawn from the description by the shapes world).

    python research/scripts/make_shapes.py                      # redraw shapes.png from shapes.json
    python research/scripts/make_shapes.py --data DIR --item ID # take a dataset item's scene

``--data``/``--item`` copy the scene of one item of a shapes dataset (``make reproduce``
writes one to ``runs/reproduce/data``) and print its question and answer, for the Makefile.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from insightv_research.shapes import SceneIndex, draw_scene
from insightv_research.shapes.scenes import Scene

HERE = Path(__file__).resolve().parents[2] / "examples"


def main(data: Path | None = None, item: str | None = None) -> None:
    scene_file = HERE / "shapes.json"
    if data is not None and item is not None:
        rows = [json.loads(line) for split in data.glob("*.jsonl") if split.name != "scenes.jsonl"
                for line in split.read_text().splitlines() if line.strip()]
        row = next(r for r in rows if r["id"] == item)
        scene = SceneIndex.from_folder(data).lookup(data / row["image"])
        scene_file.write_text(json.dumps(scene.to_dict(), indent=1) + "\n")
        print(f"question: {row['question']}\nanswer: {row['answer']}")
    scene = Scene.from_dict(json.loads(scene_file.read_text()))
    draw_scene(scene).save(HERE / "shapes.png", optimize=True)


if __name__ == "__main__":
    typer.run(main)
