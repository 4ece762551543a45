"""Per-step orchestration overhead of the Insight-V graph.

Runs the same zero-latency scripted model two ways, interleaved in one process so machine
noise hits both alike:
  - plain: a hand-written loop (build messages, call the model, parse the step, repeat,
    then the summary call) — the least work any implementation must do;
  - graph: ``create_insightv_graph(...).compile().invoke(...)``.
Prints the ratio and the graph's extra microseconds per reasoning step (target: < 1000 us).

    python benchmarks/overhead.py [--steps 16] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from insightv_agents import create_insightv_graph
from insightv_agents.images import load_images
from insightv_agents.parsing import parse_steps, parse_verdict
from insightv_agents.prompts import DEFAULT_PROMPTS, reasoning_messages, summary_messages
from insightv_agents.testing import ScriptedChatModel

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def script(steps: int) -> list[str]:
    replies = [json.dumps({"summary": f"step {i}", "reasoning": "some reasoning text " * 5,
                           "action": "continue" if i < steps else "summary"})
               for i in range(1, steps + 1)]
    return [*replies, json.dumps({"reasoning_correct": True, "critique": "", "answer": "3"})]


def plain_loop(model: ScriptedChatModel, question: str) -> str:
    images = load_images(PNG)
    steps: list = []
    while True:
        messages = reasoning_messages(prompts=DEFAULT_PROMPTS, mode="step", question=question,
                                      images=images, steps=steps)
        steps += parse_steps(model.invoke(messages).text)
        if steps[-1]["action"] == "summary":
            break
    messages = summary_messages(prompts=DEFAULT_PROMPTS, question=question, images=images,
                                steps=steps)
    return parse_verdict(model.invoke(messages).text)["answer"]


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    replies = script(args.steps)
    graph = create_insightv_graph(reasoner=ScriptedChatModel(replies, cycle=True),
                                  max_steps=args.steps).compile()
    model = ScriptedChatModel(replies, cycle=True)
    inputs = {"image": PNG, "question": "How many?"}
    for _ in range(3):  # warm-up
        graph.invoke(inputs)
        plain_loop(model, "How many?")
    plain, graphed = [], []
    for _ in range(args.rounds):
        plain.append(timed(lambda: plain_loop(model, "How many?")))
        graphed.append(timed(lambda: graph.invoke(inputs)))
    p, g = statistics.median(plain), statistics.median(graphed)
    per_step_us = (g - p) / args.steps * 1e6
    print(f"steps per run: {args.steps} (+1 summary call); rounds: {args.rounds}; medians")
    print(f"plain loop : {p * 1e3:8.2f} ms/run  ({p / args.steps * 1e6:7.0f} us/step)")
    print(f"graph      : {g * 1e3:8.2f} ms/run  ({g / args.steps * 1e6:7.0f} us/step)")
    print(f"ratio graph/plain: {g / p:.2f}x; graph overhead: {per_step_us:.0f} us per step "
          f"({'under' if per_step_us < 1000 else 'OVER'} the 1 ms target)")


if __name__ == "__main__":
    main()
