"""Bytes a checkpointed run stores, images in the state against images in LangGraph's store.

A run of the Insight-V graph with a 1 MB image (a PNG of 1.0e6 bytes), checkpointed by
LangGraph's ``SqliteSaver`` (which writes the whole state at every step), two ways side by side:
  - in the state: compiled without a store, the state's ``images`` holds the data URL, so
    every checkpoint carries the image (how every run was checkpointed before images moved
    to the store; the caller's own ``image`` was then kept in every checkpoint too);
  - in the store: compiled with a ``SqliteStore``, the image is kept there once and the
    state holds its SHA-256.
Bytes stored = the SQLite files (checkpointer, and store where there is one) after VACUUM.
Prints both for runs of 4 and 16 steps, the ratio, and whether the store way stays under
1.5 MB and flat in the number of steps.

    python benchmarks/checkpoint_size.py [--steps 4 16] [--side 577]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sqlite3
import tempfile
from contextlib import ExitStack
from pathlib import Path

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.store.sqlite import SqliteStore
from PIL import Image

from insightv_agents import create_insightv_graph
from insightv_agents.testing import ScriptedChatModel


def noise_png(side: int) -> bytes:
    """A PNG of random pixels (incompressible: about ``3 * side**2`` bytes)."""
    pixels = random.Random(0).randbytes(side * side * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), pixels).save(buffer, "PNG")
    return buffer.getvalue()


def script(steps: int) -> list[str]:
    replies = [json.dumps({"summary": f"step {i}", "reasoning": "some reasoning text " * 5,
                           "action": "continue" if i < steps else "summary"})
               for i in range(1, steps + 1)]
    return [*replies, json.dumps({"reasoning_correct": True, "critique": "", "answer": "3"})]


def stored_bytes(image: Path, steps: int, folder: Path, *, store: bool) -> int:
    files = [folder / "checkpoints.db"] + ([folder / "store.db"] if store else [])
    with ExitStack() as stack:
        saver = stack.enter_context(SqliteSaver.from_conn_string(str(files[0])))
        kept = None
        if store:
            kept = stack.enter_context(SqliteStore.from_conn_string(str(files[1])))
            kept.setup()
        graph = create_insightv_graph(reasoner=ScriptedChatModel(script(steps)),
                                      max_steps=steps).compile(checkpointer=saver, store=kept)
        out = graph.invoke({"image": str(image), "question": "What is shown?"},
                           {"configurable": {"thread_id": "run"}}, durability="sync")
        assert out["status"] == "ok" and len(out["steps"]) == steps
    for file in files:
        with sqlite3.connect(file) as db:
            db.execute("VACUUM")
    return sum(file.stat().st_size for file in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--side", type=int, default=577, help="image side (577: 1.0 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.png"
        image.write_bytes(noise_png(args.side))
        print(f"image: {image.stat().st_size / 1e6:.2f} MB PNG ({args.side}x{args.side}), "
              "SqliteSaver, durability='sync'")
        print(f"{'steps':>5}  {'in the state':>14}  {'in the store':>14}  {'ratio':>6}")
        sizes = {}
        for steps in args.steps:
            run = Path(tmp) / str(steps)
            row = []
            for store in (False, True):
                folder = run / ("store" if store else "state")
                folder.mkdir(parents=True)
                row.append(stored_bytes(image, steps, folder, store=store))
            sizes[steps] = row[1]
            print(f"{steps:>5}  {row[0] / 1e6:>11.2f} MB  {row[1] / 1e6:>11.2f} MB  "
                  f"{row[0] / row[1]:>5.1f}x")
    most, least = max(sizes.values()), min(sizes.values())
    print(f"store way: largest {most / 1e6:.2f} MB (target < 1.5 MB: "
          f"{'met' if most < 1.5e6 else 'NOT met'}); grows by {(most - least) / 1e3:.0f} kB "
          f"from {min(sizes)} to {max(sizes)} steps")


if __name__ == "__main__":
    main()
