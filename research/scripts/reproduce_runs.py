"""Several ``make reproduce`` runs side by side (e.g. seeds), with their means and which of
the issue's goals hold in each.

    python research/scripts/reproduce_runs.py runs/seed0 runs/seed1 [docs/reproduce-v10.json]

Each argument is a run's folder or its ``results.json``; prints a Markdown table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from insightv_research.reproduce import RESULTS_FILE, runs_markdown

from insightv_agents.errors import InvalidInputError


def main(runs: Annotated[list[Path], typer.Argument(help="run folders or results.json")]
         ) -> None:
    loaded = []
    for run in runs:
        path = run / RESULTS_FILE if run.is_dir() else run
        if not path.exists():
            raise InvalidInputError(f"{path} does not exist: is the run finished?")
        results = json.loads(path.read_text())
        loaded.append((f"{run.name} (seed {results['settings']['seed']})", results))
    print(runs_markdown(loaded))


if __name__ == "__main__":
    typer.run(main)
