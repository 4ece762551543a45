"""Regenerate docs/reliability.md: run every case of the bad-input catalogue
(tests/catalogue.py) and the loopback faults, write what happened to each, and add the
figures of the last load test (docs/load.json, from benchmarks/load.py).

    python scripts/reliability.py        # or: make reliability
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bad_inputs import ACCEPTED, Case, Ctx  # noqa: E402
from catalogue import CASES, SECTIONS  # noqa: E402
from helpers import Drop, FakeOpenAIServer, Refusal, png_bytes  # noqa: E402

from insightv_agents import create_insightv_graph  # noqa: E402
from insightv_agents.backends.vllm import vllm_chat_model  # noqa: E402

LOAD = ROOT / "docs" / "load.json"
TIMEOUT, RETRIES = 1.0, 2


def _cell(text: str, limit: int = 150) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_case(case: Case, server: FakeOpenAIServer) -> tuple[str, str, bool, bool]:
    """(what was raised, its message, whether it is the error expected, whether no model or
    server was called)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(Path(tmp), server.url)
        before = len(server.requests)
        try:
            case.call(ctx)
        except Exception as err:  # the table reports whatever happened
            raised, message, typed = type(err).__name__, str(err), isinstance(err, case.error)
        else:
            raised, message, typed = "nothing raised", "", False
        quiet = ctx.model.calls == [] and len(server.requests) == before
    message = message.replace(tmp, "<tmp>").replace(server.url, "<server>")
    return raised, message, typed, quiet


def faults() -> list[str]:
    """Each fault injected on loopback during a graph run: what the run raised, after how
    many requests and how long."""
    lines = ["## Faults", "",
             f"A loopback stand-in server misbehaves during a graph run; the client is "
             f"`vllm_chat_model(timeout={TIMEOUT}, max_retries={RETRIES})`. Expected: retries "
             "with backoff (or the server's `Retry-After`) while the pause ends within the "
             "call's deadline (`timeout` covers the whole call, retries included), then a typed "
             "`ModelCallError` naming the node. "
             "`tests/test_faults.py` also kills the server during synthesis, restarts it, "
             "and checks that the rerun writes exactly one group of records per item.", "",
             "| Fault | Raised | Requests sent | Seconds to the error |", "|---|---|---|---|"]
    for name, fault, delay in [("HTTP 500", Refusal(500, "internal error"), 0.0),
                               ("HTTP 503", Refusal(503, "overloaded"), 0.0),
                               ("connection dropped", Drop(), 0.0),
                               ("no reply (hangs 30 s)", "late", 30.0)]:
        with FakeOpenAIServer(lambda body, fault=fault: fault, delay=delay) as server:
            model = vllm_chat_model(server.url, "m", temperature=0.0, timeout=TIMEOUT,
                                    max_retries=RETRIES)
            graph = create_insightv_graph(reasoner=model).compile()
            started = time.perf_counter()
            try:
                graph.invoke({"image": png_bytes(), "question": "How many?"})
                raised = "nothing raised"
            except Exception as err:  # the table reports whatever happened
                raised = _cell(f"{type(err).__name__}: {str(err).splitlines()[0]}", 110)
            seconds = time.perf_counter() - started
            lines.append(f"| {name} | {raised} | {len(server.requests)} | {seconds:.1f} |")
    return lines


def load() -> list[str]:
    lines = ["## Load", ""]
    if not LOAD.exists():
        return [*lines, "Not measured yet: run `python benchmarks/load.py --out docs/load.json` "
                "(it needs the vLLM CPU server of `make test`)."]
    figures = json.loads(LOAD.read_text())
    rss = figures["rss_mib"]
    return [*lines,
            f"`benchmarks/load.py` (figures in `docs/load.json`): {figures['items']} synthesis "
            f"items ({figures['paths']} paths of {figures['steps']} steps, then scoring) at "
            f"concurrency {figures['concurrency']} against the CPU vLLM server with a tiny "
            f"Idefics3, limited to {figures['limit_seconds']:.0f} s.", "",
            "| Measure | Value |", "|---|---|",
            f"| wall time | {figures['seconds']} s (time limit hit: {figures['timed_out']}) |",
            f"| items written / errors / unfinished | {figures['written']} / "
            f"{figures['errors']} / {figures['unfinished']} |",
            f"| records (items with a wrong record count) | {figures['records']} "
            f"({figures['items_with_wrong_record_count']}) |",
            f"| throughput | {figures['items_per_second']} items/s |",
            f"| client RSS start / peak / end | {rss['start']} / {rss['peak']} / {rss['end']} "
            "MiB |"]


def main() -> int:
    lines = ["# Reliability", "",
             "Regenerated by `python scripts/reliability.py` (`make reliability`); the same cases "
             "run as tests in `tests/test_bad_inputs.py`.", "",
             "## Bad inputs", "",
             f"{len(CASES)} malformed inputs across the Python API and every CLI command "
             "(`tests/catalogue.py`). Expected: a typed error (an `InsightVError`; a CLI exits "
             "with status 2 and prints it) naming what to fix, before any model or server is "
             "called. A dataset is checked whole before the first model call: a bad row stops "
             "`load_items`, `insightv synthesize` and `insightv eval`, which list every bad "
             "row; `--skip-bad` (`on_bad_row=` in Python) reports them and keeps the good "
             "ones."]
    failures, number = 0, 0
    with FakeOpenAIServer(lambda body: "unused") as server:
        for section, cases in SECTIONS.items():
            lines += ["", f"### {section}", "",
                      "| # | Where | Bad input | Raised | Message (what to fix) | Model called |",
                      "|---|---|---|---|---|---|"]
            for case in cases:
                number += 1
                raised, message, typed, quiet = run_case(case, server)
                ok = typed and case.says.lower() in message.lower() and quiet
                failures += not ok
                lines.append(f"| {number} | {case.surface} | {_cell(case.what, 60)} | "
                             f"{raised}{'' if ok else ' **(unexpected)**'} | {_cell(message)} "
                             f"| {'no' if quiet else '**yes**'} |")
    lines += ["", "Unusual images that are valid are accepted and converted, not refused:", "",
              "| Image | What the model receives |", "|---|---|"]
    for accepted in ACCEPTED:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = Ctx(Path(tmp), "http://127.0.0.1:9/v1")
            try:
                status = ctx.ask(accepted.data())["status"]
                outcome = f"an RGB PNG data URL; the run ends `{status}`"
            except Exception as err:  # reported, and counted
                outcome, failures = f"**{type(err).__name__}: {_cell(str(err))}**", failures + 1
        lines.append(f"| {accepted.what} | {outcome} |")
    lines += ["", *faults(), "", *load()]
    out = ROOT / "docs" / "reliability.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"{out}: {len(CASES)} bad inputs, {len(ACCEPTED)} accepted images, "
          f"{failures} unexpected outcome(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
