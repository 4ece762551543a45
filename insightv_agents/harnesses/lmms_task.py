"""An lmms-eval task over a dataset of ours: ``insightv lmms-task`` writes it.

:func:`write_lmms_task` turns items in the synthesis input format (image, question, answer[,
id, choices, category]) into a saved Hugging Face dataset and a task file that lmms-eval
loads from disk (nothing from a hub). The task asks each question as ``insightv eval`` does
(the question with its lettered options, :func:`doc_to_text`) and scores the reply with the
same rules (:func:`process_results`: :func:`~insightv_agents.answers.match_answer`), so any
model's ``accuracy`` in lmms-eval is the accuracy ``insightv eval`` reports on the same items.
The functions below are what the task file names; lmms-eval imports them from this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from insightv_agents.answers import match_answer
from insightv_agents.errors import InvalidInputError
from insightv_agents.files import output_folder
from insightv_agents.prompts import DEFAULT_PROMPTS, format_question
from insightv_agents.synthesize import Item
from insightv_agents.trainers.common import write_atomic

_HERE = "insightv_agents.harnesses.lmms_task"
DATASET_FOLDER = "dataset"


def write_lmms_task(items: list[Item], out: str | Path, *, task: str) -> Path:
    """Write ``<out>/dataset`` (the items, their images embedded, as the split ``test``) and
    ``<out>/<task>.yaml`` (the task); returns the task file.

    Raises:
        InvalidInputError: for a task name lmms-eval cannot use, no items, or an ``out``
            that is a file.
    """
    import datasets

    if not task.replace("_", "").replace("-", "").isalnum():
        raise InvalidInputError(f"a task name is letters, digits, '_' and '-'; not {task!r}.",
                                field="task")
    if not items:
        raise InvalidInputError("no items to write.", field="data")
    folder = output_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": item.id, "image": {"bytes": item.image_bytes(), "path": None},
             "question": item.question, "answer": item.answer, "choices": item.choices,
             "category": item.category} for item in items]
    split = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": split}).save_to_disk(str(folder / DATASET_FOLDER))
    path = folder / f"{task}.yaml"
    write_atomic(path, _task_yaml(task, (folder / DATASET_FOLDER).resolve()))
    return path


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The item's image (lmms-eval's ``doc_to_visual``)."""
    return [doc["image"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    """The question as ``insightv eval`` asks it: with its lettered options, if it has any."""
    return format_question(doc["question"], doc.get("choices") or None, DEFAULT_PROMPTS)


def doc_to_target(doc: dict[str, Any]) -> str:
    """The ground-truth answer."""
    return str(doc["answer"])


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``accuracy``: 1 when the reply is right by :func:`~insightv_agents.answers.match_answer`
    with the default rules (those of ``insightv eval``; a closed answer set, from an agent
    card or ``--labels``, tells wrong from undecided and changes no accuracy), else 0."""
    reply = results[0] if results else ""
    check = match_answer(reply, str(doc["answer"]), choices=doc.get("choices") or None)
    return {"accuracy": float(check["correct"] is True)}


def _task_yaml(task: str, dataset: Path) -> str:
    return f"""# An lmms-eval task written by `insightv lmms-task`: the items of {json.dumps(task)},
# loaded from disk, asked and scored as `insightv eval` asks and scores them.
task: {json.dumps(task)}
dataset_path: {json.dumps(str(dataset))}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function {_HERE}.doc_to_visual
doc_to_text: !function {_HERE}.doc_to_text
doc_to_target: !function {_HERE}.doc_to_target
process_results: !function {_HERE}.process_results
generation_kwargs:
  max_new_tokens: 1024
  temperature: 0
  do_sample: false
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 1.0
"""
