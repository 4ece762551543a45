"""The round metrics of an iterative-DPO or self-improving-loop run as a table (Markdown
and JSON) and a plot (SVG, drawn here: no plotting library needed)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from insightv_agents.trainers.common import write_atomic

COLUMNS = (("round", "round"), ("accuracy", "sample accuracy"), ("mean_score", "mean score"),
           ("failed_paths", "failed paths"), ("paths", "paths"), ("pairs", "pairs"),
           ("train_loss", "DPO loss"), ("reward_margin", "reward margin"),
           ("sampling_seconds", "sampling s"), ("training_seconds", "training s"))


Series = tuple[tuple[str, float, str, str], ...]
SERIES: Series = (("accuracy", 1.0, "#1f77b4", "sample accuracy"),
                  ("mean_score", 100.0, "#d62728", "mean score / 100"))


def round_table(rounds: list[dict[str, Any]],
                columns: tuple[tuple[str, str], ...] = COLUMNS) -> str:
    """A Markdown table of the rounds' metrics (the samples of round t come from M_t)."""
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    for metrics in rounds:
        lines.append("| " + " | ".join(_cell(metrics.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def round_plot(rounds: list[dict[str, Any]], width: int = 480, height: int = 260,
               series: Series = SERIES) -> str:
    """An SVG line plot by round of ``series`` (key, scale, colour, label): by default
    sample accuracy and mean score / 100."""
    left, right, top, bottom = 48, 16, 28, 40
    count = max(len(rounds), 1)

    def x(index: int) -> float:
        return left + (width - left - right) * (index / max(count - 1, 1))

    def y(value: float) -> float:
        return top + (height - top - bottom) * (1 - value)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" '
                     f'y2="{y(tick):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">'
                     f'{tick:g}</text>')
    for index, metrics in enumerate(rounds):
        parts.append(f'<text x="{x(index):.1f}" y="{height - bottom + 16}" '
                     f'text-anchor="middle">{escape(str(metrics.get("round", index + 1)))}'
                     '</text>')
    parts.append(f'<text x="{(width + left) / 2:.0f}" y="{height - 6}" '
                 'text-anchor="middle">round (samples from M_t)</text>')
    for position, (key, scale, colour, label) in enumerate(series):
        points = [(x(i), y(min(max(m[key] / scale, 0.0), 1.0)))
                  for i, m in enumerate(rounds) if m.get(key) is not None]
        if points:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                         'stroke-width="2"/>')
            parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>'
                      for px, py in points]
        parts.append(f'<text x="{left + 120 * position}" y="16" fill="{colour}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_round_report(folder: Path, rounds: list[dict[str, Any]],
                       columns: tuple[tuple[str, str], ...] = COLUMNS,
                       series: Series = SERIES) -> None:
    """Write ``rounds.md``, ``rounds.json`` and ``rounds.svg`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "rounds.md", round_table(rounds, columns))
    write_atomic(folder / "rounds.json", json.dumps(rounds, indent=2, default=str))
    write_atomic(folder / "rounds.svg", round_plot(rounds, series=series))


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
