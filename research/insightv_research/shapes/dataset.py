"""Seeded train/val/test splits of the shapes world, in the synthesis input format.

A dataset folder holds ``images/<key>.png``, one JSONL file per split (``id``, ``image``,
``question``, ``answer``, ``category``, ``kind``: what ``insightv eval`` and
:func:`~insightv_agents.synthesize.load_items` read), ``scenes.jsonl`` (each image's
scene description) and ``dataset.json`` (how it was made). The same seed and sizes give
the same files, byte for byte; no scene appears in two splits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from insightv_agents.errors import InvalidInputError
from insightv_research.shapes.questions import CATEGORIES, Category, sample_query
from insightv_research.shapes.scenes import IMAGE_SIZE, draw_scene, image_key, random_scene

DATASET_FILE = "dataset.json"
DATASET_VERSION = 1
DEFAULT_SIZES: Mapping[str, int] = {"train": 3000, "val": 200, "test": 500}


def make_dataset(out: str | Path, *, sizes: Mapping[str, int] = DEFAULT_SIZES, seed: int = 0,
                 categories: Sequence[Category] = CATEGORIES,
                 image_size: int = IMAGE_SIZE) -> Path:
    """Write a shapes dataset to ``out`` (created; written whole, then moved into place).

    Each item is a new scene with one question; categories take turns, so every split is
    balanced. A folder already holding the same dataset is left as it is.

    Raises:
        InvalidInputError: for unknown categories, negative sizes, or an ``out`` that holds
            something else.
    """
    folder = Path(out)
    settings = {"version": DATASET_VERSION, "seed": seed, "sizes": dict(sizes),
                "categories": list(categories), "image_size": image_size}
    unknown = set(categories) - set(CATEGORIES)
    if unknown or not categories:
        raise InvalidInputError(f"unknown categories {sorted(unknown)}; choose from "
                                f"{list(CATEGORIES)}", field="categories")
    if any(size < 0 for size in sizes.values()):
        raise InvalidInputError("split sizes must be 0 or more", field="sizes")
    if (folder / DATASET_FILE).is_file():
        if json.loads((folder / DATASET_FILE).read_text()) == settings:
            return folder
        raise InvalidInputError(f"{folder} holds a different shapes dataset", field="out")
    if folder.exists() and any(folder.iterdir()):
        raise InvalidInputError(f"{folder} is not empty", field="out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=folder.parent))
    try:
        _write(staging, settings, sizes, seed, categories, image_size)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _write(folder: Path, settings: dict[str, Any], sizes: Mapping[str, int], seed: int,
           categories: Sequence[Category], image_size: int) -> None:
    (folder / "images").mkdir()
    seen: set[str] = set()
    scenes = []
    for split, size in sizes.items():
        rng = random.Random(f"shapes:{seed}:{split}")
        rows: list[dict[str, Any]] = []
        while len(rows) < size:
            scene = random_scene(rng)
            picture = draw_scene(scene, image_size)
            key = image_key(picture)
            if key in seen:
                continue
            category = categories[len(rows) % len(categories)]
            try:
                query = sample_query(scene, category, rng)
            except InvalidInputError:
                continue
            seen.add(key)
            image = f"images/{key}.png"
            picture.save(folder / image, format="PNG", optimize=True)
            scenes.append({"key": key, "image": image, "scene": scene.to_dict()})
            rows.append({"id": f"{split}-{len(rows):05d}", "image": image,
                         "question": query.text(), "answer": query.answer(scene),
                         "category": category, "kind": query.kind})
        _write_jsonl(folder / f"{split}.jsonl", rows)
    _write_jsonl(folder / "scenes.jsonl", scenes)
    (folder / DATASET_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
