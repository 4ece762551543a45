"""A small stand-in for VLMEvalKit's inference loop (VLMEvalKit is not on PyPI, so it cannot
run here): what its ``vlmeval/inference.py`` does with a model, and the prompts its datasets
build, as its source reads (December 2026).

- A benchmark is a table of rows (``index``, ``question``, an optional ``hint``, options
  ``A``, ``B``, ... for a multiple-choice item, ``answer``, ``image`` as base64).
- ``infer`` hands the model the dataset's ``dump_image`` (``set_dump_image``), then for each
  row takes the model's prompt when ``use_custom_prompt(dataset)`` says so, else the
  dataset's, and keeps what ``generate(message=..., dataset=...)`` returns.
- The dataset prompts: ``ImageMCQDataset.build_prompt`` (hint, question, options, the
  instruction) and ``ImageVQADataset.build_prompt`` (question and the short-answer
  instruction), images first.
"""

from __future__ import annotations

import base64
import string
from pathlib import Path
from typing import Any

MCQ, VQA = "MCQ", "VQA"


def row(index: int, question: str, answer: str, image: bytes,
        options: list[str] | None = None, hint: str | None = None) -> dict[str, Any]:
    """A benchmark row as VLMEvalKit's TSV holds it (options as columns A, B, ...)."""
    line: dict[str, Any] = {"index": index, "question": question, "answer": answer,
                            "image": base64.b64encode(image).decode()}
    if hint is not None:
        line["hint"] = hint
    for letter, option in zip(string.ascii_uppercase, options or [], strict=False):
        line[letter] = option
    return line


class Dataset:
    """One benchmark: its rows, its kind (``MCQ`` or ``VQA``) and where it puts images."""

    def __init__(self, name: str, kind: str, rows: list[dict[str, Any]], root: Path) -> None:
        self.name, self.kind, self.rows, self.root = name, kind, rows, root

    def dump_image(self, line: dict[str, Any]) -> list[str]:
        """The row's image as a file (VLMEvalKit decodes the base64 into its image root)."""
        path = self.root / self.name / f"{line['index']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(base64.b64decode(line["image"]))
        return [str(path)]

    def build_prompt(self, line: dict[str, Any]) -> list[dict[str, str]]:
        """The dataset's own prompt for the row."""
        images = [{"type": "image", "value": path} for path in self.dump_image(line)]
        if self.kind == VQA:
            text = f"{line['question']}\nAnswer the question using a single word or phrase."
            return [*images, {"type": "text", "value": text}]
        options = {letter: line[letter] for letter in string.ascii_uppercase if letter in line}
        prompt = f"Hint: {line['hint']}\n" if line.get("hint") else ""
        prompt += f"Question: {line['question']}\n"
        if options:
            prompt += "Options:\n" + "".join(f"{key}. {value}\n" for key, value in
                                              options.items())
            prompt += "Please select the correct answer from the options above. \n"
        return [*images, {"type": "text", "value": prompt}]


def infer(model: Any, dataset: Dataset) -> dict[int, str]:
    """``vlmeval.inference.infer_data`` for a local model: each row's prediction by index."""
    if not getattr(model, "is_api", False):
        model.set_dump_image(dataset.dump_image)
    predictions = {}
    for line in dataset.rows:
        if model.use_custom_prompt(dataset.name):
            struct = model.build_prompt(line, dataset=dataset.name)
        else:
            struct = dataset.build_prompt(line)
        predictions[line["index"]] = model.generate(message=struct, dataset=dataset.name)
    return predictions
