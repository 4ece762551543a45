"""Stage-beam benchmark: what LLaVA-CoT's search costs per question on a vLLM server.

For a single pass, best-of-N (N=4) and stage-level beam search at beam 2 and 4, measured
side by side in one run (interleaved rounds) on a tiny random Idefics3 served by vLLM:
model requests and wall time per question, with every search's candidates sampled in one
request through ``n`` vs one request per candidate (sent together), and the speed-up.

Every generation is exactly MAX_TOKENS tokens (``ignore_eos``), so both variants do the
same decoding work. The judge is the same random model: its verdicts cannot be read, so
every match is re-asked 0 times and decided by the fallback rule (one request per match,
as a working judge would take).

    INSIGHTV_VLLM_PYTHON=.vllm-venv/bin/python python benchmarks/stage_beam.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import pin, questions

from insightv_agents import create_stage_beam_graph
from insightv_agents.backends.vllm import VLLMServer, vllm_chat_model
from insightv_agents.testing import build_tiny_idefics3

ROUNDS = 3
QUESTIONS = 4
MAX_TOKENS = 32
METHODS: list[tuple[str, str, int]] = [
    ("single pass", "single", 1), ("best-of-N (4)", "best_of_n", 4),
    ("stage beam 2", "stage", 2), ("stage beam 4", "stage", 4)]


class Requests(BaseCallbackHandler):
    """Counts chat-model requests (a request with ``n`` samples counts once)."""

    def __init__(self) -> None:
        self.count = 0

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.count += 1


def per_question(graph: Any, inputs: list[dict[str, Any]]) -> tuple[float, float]:
    """Mean wall time and requests per question, one question at a time."""
    counter = Requests()
    started = time.perf_counter()
    for item in inputs:
        graph.invoke(item, {"callbacks": [counter]})
    return (time.perf_counter() - started) / len(inputs), counter.count / len(inputs)


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="insightv-bench-"))
    model_path = build_tiny_idefics3(folder / "model")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    if len(cores) > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[0])
        pin({cores[0]})  # the server's processes inherit this
    server = VLLMServer(model_path, served_model_name="tiny", dtype="float32",
                        max_model_len=2048, enforce_eager=True, env=env)
    with server:
        if len(cores) > 1:
            pin(set(cores[1:]))
        model = vllm_chat_model(server.base_url, "tiny", temperature=0.8,
                                max_tokens=MAX_TOKENS, ignore_eos=True)
        graphs = {(label, batch): create_stage_beam_graph(
                      model, search=search, beam_size=beam, max_retries=0,  # type: ignore[arg-type]
                      batch_candidates=batch).compile()
                  for label, search, beam in METHODS for batch in (True, False)}
        inputs = questions(QUESTIONS)
        for graph in graphs.values():  # warm-up
            graph.invoke(inputs[0])
        times: dict[Any, list[float]] = {key: [] for key in graphs}
        requests: dict[Any, float] = {}
        for _ in range(ROUNDS):  # interleaved, so machine noise hits every variant alike
            for key, graph in graphs.items():
                seconds, count = per_question(graph, inputs)
                times[key].append(seconds)
                requests[key] = count
    print(f"tiny Idefics3 on vLLM (CPU), {MAX_TOKENS} tokens per generation, {QUESTIONS} "
          f"questions one at a time, medians of {ROUNDS} interleaved rounds\n")
    print(f"{'method':<15} {'requests (n)':>13} {'requests (1 each)':>18} {'s/question (n)':>15} "
          f"{'s/question (1 each)':>20} {'speed-up of n':>14}")
    single = statistics.median(times[("single pass", True)])
    for label, _, _ in METHODS:
        with_n = statistics.median(times[(label, True)])
        each = statistics.median(times[(label, False)])
        print(f"{label:<15} {requests[(label, True)]:>13.1f} {requests[(label, False)]:>18.1f} "
              f"{with_n:>15.2f} {each:>20.2f} {each / with_n:>14.2f}")
    print("\ncost relative to a single pass (with n): " + ", ".join(
        f"{label} {statistics.median(times[(label, True)]) / single:.1f}x"
        for label, _, _ in METHODS[1:]))


if __name__ == "__main__":
    main()
