"""Draw the example scene used by ``make demo`` (examples/shapes.png) from its description
(examples/shapes.json: a test-split scene of the shapes world, one the demo agents were not
trained on)."""

import json
from pathlib import Path

from insightv_agents.shapes import Scene, draw_scene


def draw(description: Path, picture: Path) -> None:
    draw_scene(Scene.from_dict(json.loads(description.read_text()))).save(picture)


if __name__ == "__main__":
    here = Path(__file__).parent
    draw(here / "shapes.json", here / "shapes.png")
