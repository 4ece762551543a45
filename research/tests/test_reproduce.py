"""``make reproduce`` at toy size: every stage of the comparison runs on real (tiny) models,
writes its results, and a rerun resumes without redoing anything."""

from __future__ import annotations

import json
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from insightv_research.reproduce import (
    PROMPTS,
    SYSTEMS,
    ReproduceSettings,
    Run,
    export_demo,
    reproduce,
    results_markdown,
    runs_markdown,
)

from insightv_agents.cards import read_card
from insightv_agents.evaluate import sign_test
from insightv_agents.trainers.common import prompt_changes
from insightv_agents.trainers.data import SummaryMix, load_records


@pytest.mark.slow
@pytest.mark.timeout(1200)  # every stage of the comparison, at toy size
def test_reproduce_runs_every_system_and_resumes(tmp_path: Path) -> None:
    settings = ReproduceSettings(out=tmp_path / "run", train=20, dpo=4, test=5,
                                 text_steps=10, text_far_copy_target=None,
                                 text_near_copy_target=None, caption_epochs=1,
                                 sft_epochs=1, rounds=2, dpo_paths=2,
                                 self_questions=3, self_paths=2,
                                 grpo_steps=2, grpo_generations=2,
                                 max_new_tokens=16, concurrency=2,
                                 precision="auto", micro_batches=2)  # the speed options
    log: list[str] = []
    results = reproduce(settings, log=log.append)
    assert list(results["systems"]) == list(SYSTEMS)
    for system in results["systems"].values():
        assert 0 <= system["accuracy"] <= 1 and set(system["categories"]) == {
            "perception", "count", "compare", "arithmetic", "spatial"}
    assert [r["round"] for r in results["dpo_rounds"]] == [1, 2]
    assert [probe["epochs"] for probe in results["caption_probe"]] == [1]  # the base's probe
    # the goals question by question: the paired counts give the accuracies' difference
    assert len(results["paired"]) == 16  # 11 on the answers, 5 on the chains' answers
    for pair in results["paired"]:
        if pair["questions"] == "all":
            first, second = (results["systems"][pair[k]]["accuracy"] for k in ("first",
                                                                                "second"))
            assert pair["items"] == 5 and pair["only_first"] - pair["only_second"] == round(
                5 * (first - second))
    # the two agents carry the run's prompts (whatever loads them asks them in those)
    for name, role in (("reasoner", "reasoning"), ("summary", "summary")):
        card = read_card(settings.out / "models" / name)
        assert card is not None and card.role == role and card.profile == "chain"
        assert card.prompts == prompt_changes(PROMPTS) != {}
    # training time: every stage but the data, the training sets and the evaluation
    timings = results["timings_seconds"]
    assert {"text pre-training", "iterative dpo"} <= set(timings)
    assert results["training_seconds"] == round(sum(
        seconds for stage, seconds in timings.items()
        if stage not in ("dataset", "synthesis", "training sets")
        and not stage.startswith("eval")), 1)
    out = settings.out
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    assert all(label in table for label in SYSTEMS.values()) and results["machine"] in table
    # what the summary agent did with the chains' answers: for (c)-(e) only, where it ran
    # (here the 16-token chains state no answer: test_results_table_says_what_the_summary...)
    assert not any(system["summary_agent"] for name, system in results["systems"].items()
                   if name[0] not in "cdegh")
    ET.fromstring((out / "results.svg").read_text())  # well-formed SVG
    # The caption pre-training saw only training images: the test split stays held out.
    trained = {json.loads(line)["image"] for line in (out / "data" / "train.jsonl")
               .read_text().splitlines()}
    tested = {json.loads(line)["image"] for line in (out / "data" / "test.jsonl")
              .read_text().splitlines()}
    assert not trained & tested
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("insightv_training.json")}
    # text, base, 4 SFT runs, each DPO round that had pairs to train on, (g)'s GRPO, and
    # each loop round's trainings (the summary agent's needs right and flawed chains)
    assert [r["round"] for r in results["loop_rounds"]] == [1, 2]
    assert results["grpo"]["last_logged_reward"] is not None
    assert len(stamps) == 7 + sum(r["trained"] for r in results["dpo_rounds"]) + sum(
        r["reasoner_trained"] + r["summarizer_trained"] for r in results["loop_rounds"])
    assert json.loads((out / "models" / "text" / "insightv_training.json").read_text()
                      )["metrics"]["step"] == 10
    # the caption pre-training at its own learning rate, the SFT runs at theirs
    rates = {name: json.loads((out / "models" / name / "insightv_training.json").read_text()
                              )["settings"]["learning_rate"] for name in ("base", "reasoner")}
    assert rates == {"base": settings.caption_learning_rate, "reasoner": settings.learning_rate}
    assert settings.caption_learning_rate != settings.learning_rate
    # every training run in the precision "auto" chose here, its SFT in micro-batches
    from insightv_agents.trainers.common import native_bf16

    assert results["precision"] == ("bf16-mixed" if native_bf16() else "float32")
    assert results["precision"] in table
    runs = [json.loads((out / "models" / name / "insightv_training.json").read_text()
                       )["settings"] for name in ("base", "reasoner", "stages")]
    assert {run["dtype"] for run in runs} == {results["precision"]}
    assert {run["micro_batches"] for run in runs} == {settings.micro_batches}
    text = json.loads((out / "models" / "text" / "insightv_training.json").read_text())
    assert text["settings"]["dtype"] == "float32"

    # each DPO round sampled its own 4 of the 8 DPO questions
    sampled = [{json.loads(line)["id"] for line in (out / "models" / "dpo" / f"round-{n}" /
                                                   "samples" / "records.jsonl").open()}
               for n in (1, 2)]
    assert len(sampled[0]) == len(sampled[1]) == 4 and not sampled[0] & sampled[1]
    assert len((out / "data" / "dpo.jsonl").read_text().splitlines()) == 8

    info = export_demo(out, tmp_path / "demo", slice_size=3)
    best = max(results["systems"][name]["accuracy"] for name in ("c-insightv", "d-dpo-1",
                                                                 "e-dpo-3"))
    assert info["reasoner"].endswith(next(
        label for name, label in reversed(SYSTEMS.items())
        if name[0] in "cde" and results["systems"][name]["accuracy"] == best))
    assert info["dataset"]["sizes"] == {"train": 20, "dpo": 8, "test": 5}
    assert info["test_slice"]["first"] == 3
    assert {path.name for path in (tmp_path / "demo" / "reasoner").glob("*.safetensors")}

    again = reproduce(settings, log=[].append)
    assert again["systems"] == results["systems"]
    assert {path: path.stat().st_mtime_ns for path in out.rglob("insightv_training.json")} \
        == stamps  # nothing trained twice

    # The same run with the paper's summary agent (its mix, with the reasoning agent's own
    # paths; 2 epochs) and the DPO rounds judged by that agent: only those, the loop and
    # (c)-(e), (g), (h) are redone.
    paper = settings.model_copy(update={
        "out": tmp_path / "paper", "dpo_answer": "summary", "summary_epochs": 2,
        "summary_mix": SummaryMix()})
    shutil.copytree(out, paper.out, ignore=shutil.ignore_patterns(
        "dpo", "summary", "loop", "c-*", "d-*", "e-*", "g-*", "h-*"))
    redone = reproduce(paper, log=[].append)
    assert {path.relative_to(paper.out): path.stat().st_mtime_ns
            for path in paper.out.rglob("insightv_training.json")
            if not {"dpo", "summary", "loop"} & set(path.parts)} \
        == {path.relative_to(out): stamp for path, stamp in stamps.items()
            if not {"dpo", "summary", "loop"} & set(path.parts)}  # the rest not trained again
    import datasets

    kinds = {name: set(datasets.load_from_disk(str(run / "training-sets" / "summary"))["kind"])
             for name, run in (("default", out), ("paper", paper.out))}
    # (the toy reasoner's 16-token paths state no answer, so none of them makes a row)
    assert kinds["default"] == {"optimal"} and {"optimal", "qa"} <= kinds["paper"]
    assert json.loads((paper.out / "models" / "summary" / "insightv_training.json").read_text()
                      )["settings"]["num_train_epochs"] == 2
    # the paper's mix has the reasoning agent's own paths: sampled after it was trained
    own = load_records(paper.out / "reasoner-samples")
    assert len(own.questions) == 3 and all(len(p) == 2 for p in own.questions.values())
    built = (paper.out / "training-sets" / "summary" / "build_report.txt").stat().st_mtime_ns
    assert (paper.out / "models" / "reasoner" / "model.safetensors").stat().st_mtime_ns \
        < (paper.out / "reasoner-samples" / "records.jsonl").stat().st_mtime_ns < built
    assert not (out / "reasoner-samples").exists()  # the default mix needs none
    run_files = [json.loads((run / "models" / "dpo" / "round-1" / "samples" / "run.json")
                            .read_text()) for run in (out, paper.out)]
    assert [(f["final_answer"], bool(f["summarizer"])) for f in run_files] == [
        ("stated", False), ("ask", True)]  # the chains' own answers, then the summary agent
    assert [r["round"] for r in redone["dpo_rounds"]] == [1, 2]
    assert all(redone["systems"][name] == results["systems"][name] for name in SYSTEMS
               if name[0] not in "cdegh")  # (g), (h) use the summary agent too


def test_results_table_says_what_the_summary_agent_did_with_the_chains_answers() -> None:
    def system(label: str, summary: dict[str, int] | None) -> dict[str, object]:
        return {"label": label, "accuracy": 0.5, "multi_step": 0.5, "perception": 0.5,
                "categories": {}, "recovery": None, "summary_agent": summary}

    results = {"systems": {"b-chain": system("(b)", None), "c-insightv": system(
        "(c)", {"chains": 50, "chain_right": 19, "kept": 14, "lost": 17, "fixed": 8})},
        "settings": {"test": 60, "seed": 0}, "total_seconds": 60.0,
        "training_seconds": 30.0, "machine": "2 CPU cores", "dpo_rounds": []}
    table = results_markdown(results)
    assert "| (c) | 50 | 19 | 14 | 17 | 8 |" in table
    assert "One question is 1.7 points. At these systems' mean accuracy (50.0%) the 95% " \
        "interval of one system's accuracy is 37.7-62.3%;" in table
    below = table.split("Summary agent kept it")[1].split("\n\n")[0]
    assert [line.split(" | ")[0] for line in below.splitlines() if line.startswith("| (")] \
        == ["| (c)"]  # a system without a summary agent has no row there


def test_runs_side_by_side_give_means_and_say_which_goals_hold_in_each() -> None:
    def run(**accuracies: tuple[float, float, float]) -> dict[str, object]:
        return {"systems": {name: {"accuracy": a, "multi_step": m, "perception": p}
                            for name, (a, m, p) in accuracies.items()}}

    first = run(**{"a-direct": (0.3, 0.3, 0.5), "b-chain": (0.3, 0.2, 0.5),
                   "c-insightv": (0.4, 0.4, 0.5), "d-dpo-1": (0.5, 0.5, 0.5),
                   "e-dpo-3": (0.6, 0.6, 0.5)})
    second = run(**{"a-direct": (0.5, 0.5, 0.6), "b-chain": (0.3, 0.2, 0.5),
                    "c-insightv": (0.2, 0.4, 0.5), "d-dpo-1": (0.1, 0.1, 0.1)})
    table = runs_markdown([("seed 0", first), ("seed 1", second)])
    assert "| (a) direct answers | 30.0 (30.0) | 50.0 (50.0) | 40.0 (40.0) |" in table
    assert "| (e) (c) + iterative DPO | 60.0 (60.0) | – (–) | 60.0 (60.0) |" in table
    assert "(f) LLaVA-CoT" not in table  # no run has it
    assert "| (c) > (a), (b) on multi-step | yes | no |" in table
    assert "| (d) > (c) | yes | no |" in table
    assert "| (e) > (d) | yes | – |" in table
    assert "| perception of (c) not below (a) | yes | no |" in table
    assert "Pooled" not in table  # no run compared question by question


def test_goals_compared_question_by_question_within_a_run_and_pooled_over_runs() -> None:
    def pair(first: str, second: str, wins: int, losses: int) -> dict[str, object]:
        return {"first": first, "second": second, "questions": "all", "items": 60,
                "only_first": wins, "only_second": losses, "p_value": sign_test(wins, losses)}

    system = {"label": "(d)", "accuracy": 0.5, "multi_step": 0.5, "perception": 0.5,
              "categories": {}, "recovery": None}
    first = {"systems": {"d-dpo-1": system}, "settings": {"test": 60, "seed": 0},
             "total_seconds": 60.0, "training_seconds": 30.0, "machine": "2 CPU cores",
             "dpo_rounds": [], "paired": [pair("d-dpo-1", "c-insightv", 8, 2),
                                          pair("f-stage-beam", "f-stages", 1, 1)]}
    second = {**first, "paired": [pair("d-dpo-1", "c-insightv", 4, 7)]}
    table = results_markdown(first)
    assert "| (d) vs (c) (all) | 60 | 8 | 2 | 0.11 |" in table
    assert "| (f)+beam vs (f) (all) | 60 | 1 | 1 | 1.00 |" in table
    pooled = runs_markdown([("seed 0", first), ("seed 1", second)])
    assert f"| (d) vs (c) (all) | 2 | 120 | 12 | 9 | {sign_test(12, 9):.2f} |" in pooled
    assert "| (f)+beam vs (f) (all) | 1 | 60 | 1 | 1 | 1.00 |" in pooled


def test_a_summary_mix_that_makes_no_rows_is_refused_before_anything_runs(tmp_path: Path
                                                                           ) -> None:
    from pydantic import ValidationError

    for mix in (SummaryMix(optimal=0, flawed=0, self_made=0, qa=0), SummaryMix(optimal=-1)):
        with pytest.raises(ValidationError, match="mix proportions"):
            reproduce({"out": tmp_path / "run", "summary_mix": mix}, log=[].append)
    assert not (tmp_path / "run").exists()


def test_a_text_stage_that_cannot_run_is_refused_before_anything_runs(tmp_path: Path
                                                                      ) -> None:
    from pydantic import ValidationError

    # the near-copy gate (on by default) needs a short phase before the 400 long steps
    with pytest.raises(ValidationError, match="near_copy_target"):
        reproduce({"out": tmp_path / "run", "text_steps": 300}, log=[].append)
    assert not (tmp_path / "run").exists()
    gate = ReproduceSettings(out=tmp_path / "run", text_steps=300, text_near_copy_target=None)
    assert gate.text_settings().near_copy_target is None
    assert ReproduceSettings(out=tmp_path / "run").text_steps == 0  # no text stage by default
    text = ReproduceSettings(out=tmp_path / "run", text_steps=3000).text_settings()
    assert (text.steps, text.near_copy_target, text.far_copy_target,
            text.output_dir) == (3000, 0.5, 0.5, tmp_path / "run" / "models" / "text")


def test_an_interrupted_stage_keeps_the_time_it_ran(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage killed half-way (here: failing after 0.3 s) has its time so far in
    timings.json; the run that resumes it adds its own."""
    monkeypatch.setattr(Run, "TICK_SECONDS", 0.05)
    settings = ReproduceSettings(out=tmp_path / "run")

    def interrupted() -> None:
        time.sleep(0.3)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        Run(settings).timed("sft reasoner", interrupted)
    first = json.loads((settings.out / "timings.json").read_text())["sft reasoner"]
    assert 0.2 <= first <= 0.4
    assert Run(settings).timed("sft reasoner", lambda: time.sleep(0.2) or "done") == "done"
    total = json.loads((settings.out / "timings.json").read_text())["sft reasoner"]
    assert first + 0.15 <= total <= first + 0.4
