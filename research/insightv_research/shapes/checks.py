"""The shapes world's checks for its evaluations:
``insightv eval --checks insightv_research.shapes.checks:for_dataset``."""

from __future__ import annotations

from pathlib import Path

from insightv_agents.evaluate import DatasetChecks
from insightv_research.shapes.questions import ANSWER_RULES
from insightv_research.shapes.scenes import SceneIndex
from insightv_research.shapes.scorer import reasoning_check


def for_dataset(root: Path) -> DatasetChecks:
    """A shapes dataset's checks: its closed answer set, and each prediction's reasoning
    judged against the scenes (when the folder has ``scenes.jsonl``)."""
    has_scenes = (Path(root) / "scenes.jsonl").is_file()
    return DatasetChecks(rules=ANSWER_RULES, reasoning_check=reasoning_check(
        SceneIndex.from_folder(root)) if has_scenes else None)
