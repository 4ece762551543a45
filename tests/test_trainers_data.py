"""Dataset builders: reasoning SFT, summary SFT mix, DPO pairs; TRL formats."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes, teacher, write_output
from typer.testing import CliRunner

from insightv_agents.cli import app
from insightv_agents.graphs.synthesis import create_synthesis_graph
from insightv_agents.parsing import parse_choice, parse_stages, parse_steps, parse_verdict
from insightv_agents.prompts import Prompts, StagePrompts
from insightv_agents.synthesize import load_items, synthesize, write_run_file
from insightv_agents.testing import ScriptedChatModel
from insightv_agents.trainers.data import (
    SummaryMix,
    build_direct_sft,
    build_dpo_pairs,
    build_reasoning_sft,
    build_stage_judge_sft,
    build_stage_sft,
    build_summary_sft,
    load_records,
)

runner = CliRunner()


QUESTIONS: dict[str, list[tuple[int | None, bool | None]]] = {
    "a": [(60, True), (90, True), (20, False)],  # best: path 1
    "b": [(30, False), (50, False), (None, None)],  # no correct path
    "c": [(80, True), (75, True), (70, True)],  # correct but close scores
    "d": [(None, True), (None, False), (40, True)],
}


@pytest.fixture
def records(tmp_path: Path) -> Any:
    return load_records(write_output(tmp_path / "out", QUESTIONS))


@pytest.mark.parametrize("mode", ["step", "chain"])
def test_reasoning_sft_takes_the_best_correct_path_in_the_node_format(records: Any,
                                                                     mode: str) -> None:
    dataset, report = build_reasoning_sft(records, mode=mode)  # type: ignore[arg-type]
    assert dataset["id"] == ["a", "c", "d"]
    assert report.skipped == {"no correct path": 1}
    row = dataset[0]
    messages = row["messages"]
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    assert messages[1]["content"][0] == {"type": "image", "text": None}
    assistant = [m for m in messages if m["role"] == "assistant"]
    # What the builder writes is what the reasoning node reads back.
    steps = [s for m in assistant for s in parse_steps(m["content"][0]["text"])]
    assert [s["summary"] for s in steps] == ["a-1-0", "a-1-1"]
    assert len(assistant) == (2 if mode == "step" else 1)
    assert messages[-1]["role"] == "assistant"
    assert row["images"][0].size == (16, 12)  # a real image, loaded by datasets


def test_direct_sft_answers_every_question_with_the_ground_truth(records: Any) -> None:
    dataset, report = build_direct_sft(records)
    assert dataset["id"] == ["a", "b", "c", "d"] and report.rows == 4
    messages = dataset[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # no system prompt
    assert messages[0]["content"][0]["type"] == "image"
    assert messages[1]["content"][0]["text"] == records.questions["a"][0]["answer"]


def test_stage_sft_writes_the_best_correct_path_as_four_stages(records: Any) -> None:
    dataset, report = build_stage_sft(records, prompts=StagePrompts(system=""))
    assert dataset["id"] == ["a", "c", "d"] and report.skipped == {"no correct path": 1}
    messages = dataset[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    stages = parse_stages(messages[1]["content"][0]["text"])  # what the stage graph reads
    best = records.questions["a"][1]
    assert stages["summary"] == "To answer, I will: a-1-0; a-1-1."
    assert stages["caption"] == best["steps"][0]["reasoning"]
    assert stages["reasoning"] == best["steps"][1]["reasoning"]
    assert stages["conclusion"] == best["answer"]
    with_system, _ = build_stage_sft(records)
    assert with_system[0]["messages"][0]["role"] == "system"


def test_stage_judge_rows_pick_the_correct_path_in_the_judge_conversation(records: Any
                                                                        ) -> None:
    dataset, report = build_stage_judge_sft(records, prompts=StagePrompts(system=""))
    # a and d have a correct and a wrong path; their steps' texts are alike, so the stage
    # that differs is the conclusion (7, the truth, against the wrong path's 9)
    assert sorted(dataset["id"]) == ["a", "d"] and report.skipped == {
        "no correct and wrong path": 2}
    assert report.kinds == {"judge-conclusion": 2}
    for row in dataset:
        system, user, reply = row["messages"]
        assert system["content"][0]["text"] == StagePrompts().judge_system
        text = user["content"][1]["text"]
        assert "<SUMMARY> To answer, I will:" in text and "<CONCLUSION>" not in text
        choice, _ = parse_choice(reply["content"][0]["text"])  # what the knockout reads
        assert f"Response {choice}:\n7" in text and f"Response {3 - choice}:\n9" in text
    limited, report = build_stage_judge_sft(records, limit=1)
    assert len(limited) == 1 and report.rows == 1


def test_builders_put_the_image_where_the_prompts_say(records: Any) -> None:
    after = Prompts(images_after_text=True)
    for dataset, _ in (build_reasoning_sft(records, mode="chain", prompts=after),
                       build_direct_sft(records, prompts=after),
                       build_summary_sft(records, prompts=after)):
        user = next(m for m in dataset[0]["messages"] if m["role"] == "user")
        assert [part["type"] for part in user["content"]] == ["text", "image"]


def test_reasoning_sft_min_score(records: Any) -> None:
    dataset, report = build_reasoning_sft(records, min_score=85)
    assert dataset["id"] == ["a"] and sum(report.skipped.values()) == 3


def test_dpo_pairs_need_a_margin(records: Any) -> None:
    dataset, report = build_dpo_pairs(records, min_margin=20, pairs_per_question=2)
    pairs = [(r["id"], r["score_chosen"], r["score_rejected"]) for r in dataset]
    assert pairs == [("a", 90, 20), ("a", 90, 60), ("d", 40, None)]
    assert report.skipped == {"no correct path": 1, "no path 20+ points below the chosen one": 1}
    row = dataset[0]
    assert row["kind"] == "wrong" and [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert parse_steps(row["chosen"][0]["content"][0]["text"])[0]["summary"] == "a-1-0"
    assert parse_steps(row["rejected"][0]["content"][0]["text"])[0]["summary"] == "a-2-0"
    strict, report = build_dpo_pairs(records, min_margin=20, min_chosen_score=50)
    assert strict["id"] == ["a"]


def test_summary_mix_follows_the_proportions_and_reports(tmp_path: Path, records: Any) -> None:
    own = load_records(write_output(tmp_path / "own", {
        "x": [(50, True), (20, False), (None, None)], "y": [(80, True), (10, False), (5, False)]}))
    mix = SummaryMix(optimal=1, flawed=1, self_made=1, qa=1, flawed_bins=((1, 40), (41, 70)))
    dataset, report = build_summary_sft(records, mix=mix, self_records=own)
    kinds = report.kinds
    # 3 optimal, 5 flawed (1-40: 20, 30; 41-70: 60, 50, 40->1-40...), 5 self, 4 qa available:
    assert report.details["available"]["optimal"] == 3
    assert kinds["optimal"] == 3 and kinds["qa"] == 3 and kinds["self"] == 3
    assert sum(v for k, v in kinds.items() if k.startswith("flawed")) == 3
    assert report.rows == len(dataset) == 12
    by_kind: dict[str, dict[str, Any]] = {}
    for row in dataset:
        by_kind.setdefault(row["kind"].split(" ")[0], row)
    optimal = parse_verdict(by_kind["optimal"]["messages"][-1]["content"][0]["text"])
    assert optimal == {"reasoning_correct": True, "critique": "", "answer": "7"}
    flawed = by_kind["flawed"]["messages"]
    assert "Reasoning process:" in flawed[1]["content"][1]["text"]
    assert parse_verdict(flawed[-1]["content"][0]["text"])["answer"] == "7"
    qa = by_kind["qa"]["messages"]
    assert [m["role"] for m in qa] == ["user", "assistant"]
    assert qa[-1]["content"][0]["text"] == "7"


def test_summary_mix_without_self_records_leaves_that_kind_out(records: Any) -> None:
    dataset, report = build_summary_sft(records, mix=SummaryMix(), total=8)
    assert report.details["left out (none available)"] == ["self"]
    assert "self" not in report.kinds and len(dataset) <= 8


def test_wrong_flawed_paths_carry_the_scorers_comment(records: Any) -> None:
    dataset, _ = build_summary_sft(records, mix=SummaryMix(optimal=0, flawed=1, self_made=0,
                                                           qa=0))
    verdicts = [parse_verdict(row["messages"][-1]["content"][0]["text"]) for row in dataset]
    wrong = [v for v in verdicts if not v["reasoning_correct"]]
    assert wrong and all(v["critique"].startswith("comment ") for v in wrong)
    assert all(v["answer"] == "7" for v in verdicts)


def test_build_data_cli(tmp_path: Path) -> None:
    source = write_output(tmp_path / "out", QUESTIONS)
    for kind, extra in [("sft-reason", ["--mode", "chain"]), ("dpo", ["--min-margin", "10"]),
                        ("sft-summary", ["--mix", "optimal=1,flawed=1,qa=1"])]:
        target = tmp_path / kind
        result = runner.invoke(app, ["build-data", kind, "--from", str(source), "--out",
                                     str(target), *extra])
        assert result.exit_code == 0, result.output
        assert "rows from 4 questions" in result.output
        import datasets

        assert len(datasets.load_from_disk(str(target))) > 0
    bad = runner.invoke(app, ["build-data", "sft-summary", "--from", str(source), "--out",
                              str(tmp_path / "x"), "--mix", "optimal=nope"])
    assert bad.exit_code == 2 and "--mix takes" in bad.output
    missing = runner.invoke(app, ["build-data", "dpo", "--from", str(tmp_path), "--out",
                                  str(tmp_path / "y")])
    assert missing.exit_code == 2
    assert "not a synthesis output folder" in " ".join(missing.output.split())


def test_records_load_in_id_order_whatever_order_the_synthesis_finished_them(
        tmp_path: Path) -> None:
    """The synthesis writes questions as its threads finish them; what is built from the
    records (and the shapes world's tokenizer corpus) must not depend on that."""
    finished = {"q10": [(50, True), (60, True)], "q2": [(40, False)], "q1": [(30, True)]}
    folder = write_output(tmp_path / "out", finished)
    lines = (folder / "records.jsonl").read_text().splitlines()
    (folder / "records.jsonl").write_text("\n".join([lines[1], *lines[2:], lines[0]]) + "\n")
    records = load_records(folder)
    assert list(records.questions) == ["q1", "q2", "q10"]
    assert [r["path_index"] for r in records.questions["q10"]] == [0, 1]


def test_pipeline_records_feed_the_builders(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "i.png").write_bytes(png_bytes())
    (tmp_path / "data" / "d.jsonl").write_text(json.dumps(
        {"id": "q", "image": "i.png", "question": "How many?", "answer": "3"}) + "\n")
    items, root = load_items(tmp_path / "data" / "d.jsonl")
    model = ScriptedChatModel([teacher(steps=3, scores=[90, 30])], cycle=True)
    graph = create_synthesis_graph(teacher=model, paths=2).compile()
    write_run_file(tmp_path / "out", {"data_root": str(root), "paths": 2})
    asyncio.run(synthesize(graph, items, tmp_path / "out"))
    records = load_records(tmp_path / "out")
    sft, _ = build_reasoning_sft(records)
    assert len(sft) == 1 and sum(m["role"] == "assistant" for m in sft[0]["messages"]) == 3
    dpo, _ = build_dpo_pairs(records)
    assert (dpo[0]["score_chosen"], dpo[0]["score_rejected"]) == (90, 30)


@pytest.mark.slow
def test_builders_outputs_train_in_trl(tmp_path: Path, records: Any) -> None:
    """One optimisation step of TRL's SFTTrainer and DPOTrainer on each built dataset, with a
    tiny Idefics3: the formats are the ones TRL consumes."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from insightv_agents.testing import build_tiny_idefics3

    model_path = build_tiny_idefics3(tmp_path / "model")
    processor = AutoProcessor.from_pretrained(model_path)
    common = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 2,
              "report_to": [], "bf16": False, "save_strategy": "no", "max_length": None,
              "logging_steps": 1}
    for dataset in (build_reasoning_sft(records, mode="step")[0],
                    build_reasoning_sft(records, mode="chain")[0],
                    build_summary_sft(records, total=4)[0]):
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, assistant_only_loss=True),
                             train_dataset=dataset, processing_class=processor)
        result = trainer.train()
        assert result.training_loss > 0
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    pairs = build_dpo_pairs(records, min_margin=10, pairs_per_question=2)[0]
    trainer = DPOTrainer(model=model, ref_model=reference, args=DPOConfig(**common),
                         train_dataset=pairs, processing_class=processor)
    assert trainer.train().training_loss > 0
