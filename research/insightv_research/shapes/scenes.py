"""Scenes of coloured shapes on a 4 x 4 grid, their pictures, and the index from picture to
scene.

A scene is its description: each shape's kind, colour, size and grid cell. :func:`draw_scene`
renders it deterministically, so the description is the ground truth of the picture. The
grid matches how small vision towers see: at 64 px with 8 px patches and a 2 x 2 pixel
shuffle (the tiny Idefics3 the demo agents use), one image token covers exactly one cell.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from insightv_agents.errors import InvalidInputError
from insightv_agents.images import open_image

GRID = 4
"""Rows and columns of the grid (numbered from 1, rows top to bottom, columns left to right)."""
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
}
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUND = (245, 245, 245)
IMAGE_SIZE = 128
MIN_SHAPES, MAX_SHAPES = 3, 8


@dataclass(frozen=True, order=True)
class Shape:
    """One shape: its grid cell (``row``, ``column``, from 1) and its look."""

    row: int
    column: int
    kind: str
    colour: str
    size: str

    def __post_init__(self) -> None:
        if not (1 <= self.row <= GRID and 1 <= self.column <= GRID):
            raise InvalidInputError(f"cell ({self.row}, {self.column}) is off the grid",
                                    field="scene")
        if self.kind not in KINDS or self.colour not in COLOURS or self.size not in SIZES:
            raise InvalidInputError(f"unknown shape {self.size} {self.colour} {self.kind}",
                                    field="scene")

    @property
    def name(self) -> str:
        """``"large red circle"``."""
        return f"{self.size} {self.colour} {self.kind}"

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.column)

    def mention(self) -> str:
        """How reasoning refers to it: ``"large red circle at row 1, column 2"``."""
        return f"{self.name} at row {self.row}, column {self.column}"


@dataclass(frozen=True)
class Scene:
    """A scene's description: its shapes in reading order (row by row, left to right)."""

    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        cells = [shape.cell for shape in self.shapes]
        if len(set(cells)) != len(cells):
            raise InvalidInputError("two shapes share a cell", field="scene")
        object.__setattr__(self, "shapes", tuple(sorted(self.shapes)))

    def at(self, row: int, column: int) -> Shape | None:
        """The shape in a cell, if any."""
        return next((s for s in self.shapes if s.cell == (row, column)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": [asdict(shape) for shape in self.shapes]}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Scene:
        try:
            return cls(tuple(Shape(**shape) for shape in value["shapes"]))
        except (KeyError, TypeError) as err:
            raise InvalidInputError(f"not a scene description: {err}", field="scene") from None

    def describe(self) -> str:
        """The scene in words, one shape per line."""
        return "\n".join(shape.mention() for shape in self.shapes)


def random_scene(rng: random.Random, *, min_shapes: int = MIN_SHAPES,
                 max_shapes: int = MAX_SHAPES) -> Scene:
    """A scene of ``min_shapes`` to ``max_shapes`` shapes in distinct cells, drawn from ``rng``."""
    count = rng.randint(min_shapes, max_shapes)
    cells = rng.sample([(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)], count)
    return Scene(tuple(Shape(row, column, rng.choice(KINDS), rng.choice(list(COLOURS)),
                             rng.choice(SIZES)) for row, column in cells))


def cell_tag(row: int, column: int) -> str:
    """A cell's name in reasoning: ``"r2c3"`` (row 2, column 3)."""
    return f"r{row}c{column}"


CELL_TAGS = tuple(cell_tag(row, column) for row in range(1, GRID + 1)
                  for column in range(1, GRID + 1))
"""Every cell's tag, in reading order (one token each in the demo agents' tokenizer)."""


def describe_grid(scene: Scene, separator: str = "\n") -> str:
    """The scene cell by cell, row by row ("empty" too), each cell named by its tag
    (:func:`cell_tag`): ``"r1c1 empty, r1c2 large red circle, r1c3 empty, r1c4 empty."``.
    The caption of the base model's pre-training, and the first step of every teacher path:
    later steps name a cell by its tag and copy what follows it here, a lookup by content
    that small models learn (unlike finding the k-th phrase of a row).
    """
    def cell(row: int, column: int) -> str:
        shape = scene.at(row, column)
        return f"{cell_tag(row, column)} {shape.name if shape else 'empty'}"

    return separator.join(", ".join(cell(row, column) for column in range(1, GRID + 1)) + "."
                          for row in range(1, GRID + 1))


def draw_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene's picture: an RGB image ``size`` pixels square, the same every time."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for shape in scene.shapes:
        extent = cell * (0.84 if shape.size == "large" else 0.46)
        cx, cy = (shape.column - 0.5) * cell, (shape.row - 0.5) * cell
        box = (round(cx - extent / 2), round(cy - extent / 2),
               round(cx + extent / 2) - 1, round(cy + extent / 2) - 1)
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])],
                         fill=fill)
    return image


def image_key(image: Any) -> str:
    """A key of an image's pixels (any form :func:`~insightv_agents.images.open_image`
    takes): the same for a PNG file, its bytes or its data URL."""
    picture = open_image(image).convert("RGB")
    digest = hashlib.sha256(f"{picture.size}".encode() + picture.tobytes())
    return digest.hexdigest()[:20]


class SceneIndex(Mapping[str, Scene]):
    """Scenes by :func:`image_key`: how scene-grounded components find the description of
    the picture they are shown. Build it from a dataset folder (its ``scenes.jsonl``) or
    from scenes."""

    def __init__(self, scenes: Mapping[str, Scene] | None = None) -> None:
        self._scenes: dict[str, Scene] = dict(scenes or {})

    @classmethod
    def from_scenes(cls, scenes: Iterable[Scene]) -> SceneIndex:
        return cls({image_key(draw_scene(scene)): scene for scene in scenes})

    @classmethod
    def from_folder(cls, folder: str | Path) -> SceneIndex:
        """The scenes of a dataset made by :func:`~insightv_research.shapes.make_dataset`."""
        path = Path(folder) / "scenes.jsonl"
        if not path.is_file():
            raise InvalidInputError(f"{path} does not exist: not a shapes dataset folder",
                                    field="scenes")
        scenes = {}
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                scenes[row["key"]] = Scene.from_dict(row["scene"])
        return cls(scenes)

    def lookup(self, image: Any) -> Scene:
        """The scene of ``image``; raises ``InvalidInputError`` for a picture not indexed."""
        key = image_key(image)
        if key not in self._scenes:
            raise InvalidInputError("this image is not a scene of the index", field="image")
        return self._scenes[key]

    def __getitem__(self, key: str) -> Scene:
        return self._scenes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scenes)

    def __len__(self) -> int:
        return len(self._scenes)
