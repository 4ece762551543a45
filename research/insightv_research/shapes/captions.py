"""How well a model describes the shapes world's pictures: the caption pre-training's probe.

The caption stage teaches the base model to list every cell of a picture (``r1c1 large red
square, r1c2 empty, ...``: :func:`~insightv_research.shapes.scenes.describe_grid`). It learns
that abruptly, and not always within the same number of steps: ``caption_accuracy`` measures
where a model stands, on held-out pictures, greedy, so that ``make reproduce`` can train on
until its base model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insightv_research.shapes.scenes import Scene, cell_tag, describe_grid
from insightv_research.shapes.scorer import tagged_cells


@dataclass(frozen=True)
class CaptionAccuracy:
    """Held-out caption accuracy.

    Attributes:
        cells: the share of the pictures' cells described right (by tag; a cell left out or
            named twice with different contents is wrong).
        pictures: the share of pictures whose every cell is right.
        n: the pictures measured.
    """

    cells: float
    pictures: float
    n: int


def described_cells(text: str) -> dict[str, str]:
    """The cells a description names, tag -> contents (the first mention of a tag wins)."""
    cells: dict[str, str] = {}
    for row, column, seen in tagged_cells(text):
        cells.setdefault(cell_tag(row, column), seen)
    return cells


def cells_right(text: str, scene: Scene) -> tuple[int, int]:
    """How many of ``scene``'s cells ``text`` describes right, and how many there are."""
    truth, said = described_cells(describe_grid(scene)), described_cells(text)
    return sum(said.get(tag) == contents for tag, contents in truth.items()), len(truth)


def caption_accuracy(model: str | Path, pictures: Sequence[tuple[str | Path, Scene]], *,
                     request: str, max_new_tokens: int = 256,
                     trust_remote_code: bool = False) -> CaptionAccuracy:
    """``model``'s greedy descriptions of ``pictures`` (image path, its scene), asked with
    ``request`` after the picture, as the caption stage trains it, scored cell by cell."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from insightv_agents.errors import InvalidInputError
    from insightv_agents.trained import check_remote_code

    if not pictures:
        raise InvalidInputError("caption_accuracy needs at least one picture.")
    check_remote_code(model, trust_remote_code)
    processor: Any = AutoProcessor.from_pretrained(str(model),
                                                   trust_remote_code=trust_remote_code)
    net: Any = AutoModelForImageTextToText.from_pretrained(
        str(model), dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    right = total = whole = 0
    for image, scene in pictures:
        with Image.open(image) as picture:
            inputs = processor(text=prompt, images=[picture.convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        ok, cells = cells_right(text, scene)
        right, total, whole = right + ok, total + cells, whole + (ok == cells)
    return CaptionAccuracy(cells=round(right / total, 4), pictures=round(whole / len(pictures), 4),
                           n=len(pictures))
