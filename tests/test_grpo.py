"""GRPO of both agents, its rewards, the synthesis graph's revise loop and the
self-improving loop, on tiny offline models, on CPU.

What is asserted is measured: the reward rises through both rollout backends (TRL's own
generation, and a real vLLM CPU server loading the policy's adapter at each step), the
judge's verdict accuracy on held-out chains rises, a killed loop resumes at its round.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import textwrap
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes
from test_trainers import kill_once_written

from insightv_agents import ConfigError
from insightv_agents.assessment import RuleScorer
from insightv_agents.cards import AgentCard, read_card
from insightv_agents.formats import format_profile
from insightv_agents.graphs.synthesis import create_synthesis_graph
from insightv_agents.parsing import format_chain
from insightv_agents.prompts import Prompts
from insightv_agents.synthesize import RECORD_FIELDS, write_run_file
from insightv_agents.testing import ScriptedChatModel, build_tiny_idefics3
from insightv_agents.trainers.data import load_records
from insightv_agents.trainers.grpo import (
    GRPOConfig,
    judge_grpo_dataset,
    reasoning_grpo_dataset,
    train_grpo,
)
from insightv_agents.trainers.rewards import (
    AnswerReward,
    FormatReward,
    ScoreReward,
    VerdictReward,
    default_rewards,
    verdict_of,
)

CHAIN = format_profile("chain")


def chain(answer: str, word: str = "square") -> str:
    return format_chain([
        {"summary": "Look", "reasoning": f"I look at the {word}.", "action": "continue"},
        {"summary": "Answer", "reasoning": f"It has {answer} dots. The answer is {answer}.",
         "action": "summary"}])


def completions(*texts: str) -> list[list[dict[str, str]]]:
    return [[{"role": "assistant", "content": text}] for text in texts]


def write_items(folder: Path, count: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colours = ("red", "blue", "green", "yellow")
    for index, colour in enumerate(colours):
        (folder / f"{index}.png").write_bytes(png_bytes(color=colour))
    rows = [{"id": f"q{index}", "image": f"{index % 4}.png", "question": f"Question {index}?",
             "answer": "7"} for index in range(count)]
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "items.jsonl"


def steerable(folder: Path) -> Path:
    """A tiny random Idefics3 whose output head is ten times its initial scale. A random
    head of the usual scale gives near-equal logits that an adapter on the language model
    cannot move (a pretrained head can); this one can be steered by LoRA."""
    import torch
    from transformers import AutoModelForImageTextToText

    source = build_tiny_idefics3(folder.parent / f"{folder.name}-source")
    model = AutoModelForImageTextToText.from_pretrained(source)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(folder)
    for path in source.iterdir():
        if not (folder / path.name).exists():
            shutil.copy(path, folder / path.name)
    return folder


def rewards_logged(output_dir: Path) -> list[float]:
    run = json.loads((output_dir / "insightv_training.json").read_text())
    return [entry["reward"] for entry in run["log_history"] if "reward" in entry]


FAST = {"max_completion_length": 32, "lr_scheduler_type": "constant", "logging_steps": 1,
        "save_strategy": "no", "report_to": [], "dtype": "float32"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return steerable(tmp_path_factory.mktemp("grpo") / "model")


# --- rewards -----------------------------------------------------------------------------------


def test_format_reward_grades_parsed_unfinished_and_partial_chains() -> None:
    reward = FormatReward()
    unfinished = format_chain([{"summary": "Look", "reasoning": "A square.",
                                "action": "continue"}])
    assert reward(completions(chain("7"), unfinished, '{"summary"', "noise")) == \
        [1.0, 0.5, 0.25 * 2 / 5, 0.0]
    summary = FormatReward(agent="summary")
    verdict = json.dumps({"reasoning_correct": True, "critique": "", "answer": "7"})
    assert summary(completions(verdict, "The answer is 7.")) == [1.0, 0.0]


def test_answer_reward_reads_the_stated_answer_with_the_rules_and_choices() -> None:
    reward = AnswerReward()
    assert reward(completions(chain("7"), chain("9"), "garbage"),
                  answer=["7", "7", "7"]) == [1.0, 0.0, 0.0]
    lettered = reward(completions(chain("B"), chain("A")), answer=["blue", "blue"],
                      choices=[["red", "blue"], ["red", "blue"]])
    assert lettered == [1.0, 0.0]
    undecided = AnswerReward(undecided=0.25)(completions(chain("a cat")), answer=["a dog"])
    assert undecided == [0.25]


def test_answer_reward_with_a_summarizer_asks_it_through_the_summary_node() -> None:
    summarizer = ScriptedChatModel([json.dumps({"reasoning_correct": False, "critique": "x",
                                                "answer": "7"})], cycle=True)
    reward = AnswerReward(summarizer=summarizer, concurrency=2)
    rewards = reward(completions(chain("9"), "garbage"), answer=["7", "7"],
                     question=["How many?", "How many?"],
                     image=[png_bytes(), png_bytes()])
    assert rewards == [1.0, 0.0]  # the summary agent's answer, not the chain's
    assert len(summarizer.calls) == 1  # an unreadable chain is not sent


def test_verdict_reward_matches_the_verdict_with_the_chain() -> None:
    def reply(correct: bool | None) -> str:
        return json.dumps({"reasoning_correct": correct, "critique": "", "answer": "7"})

    reward = VerdictReward()
    assert reward(completions(reply(True), reply(False), reply(False), "7"),
                  chain_correct=[True, True, False, False]) == [1.0, 0.0, 1.0, 0.0]
    assert verdict_of("no verdict", CHAIN) is None


def test_score_reward_scores_each_questions_chains_together() -> None:
    reward = ScoreReward(RuleScorer())
    rewards = reward(completions(chain("7"), chain("9"), "garbage", chain("7")),
                     answer=["7"] * 4, question=["Q?"] * 4, id=["a", "a", "a", "b"],
                     image=[png_bytes()] * 4)
    assert rewards[0] > 0.6 > 0.3 > rewards[1] > 0 and rewards[2] == 0.0
    assert rewards[3] == rewards[0]
    with pytest.raises(ConfigError, match="PathScorer"):
        ScoreReward(object())


def test_default_rewards_and_config_checks() -> None:
    assert [(r.__name__, r.weight) for r in default_rewards("reasoning")] == \
        [("answer", 1.0), ("format", 0.5)]
    assert [r.__name__ for r in default_rewards("summary")] == ["verdict", "answer", "format"]
    with pytest.raises(ConfigError, match="agent"):
        GRPOConfig(output_dir="x", agent="both")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weight"):
        FormatReward(weight=-1)


# --- datasets -----------------------------------------------------------------------------------


def write_chains(folder: Path, questions: int, seed: int) -> Any:
    """A synthesis output of right chains (about a square, stating 7) and flawed ones
    (about a circle, stating 5), one of each per question."""
    folder.mkdir(parents=True)
    (folder / "img.png").write_bytes(png_bytes())
    write_run_file(folder, {"data_root": str(folder), "paths": 2})
    rng = random.Random(seed)
    with open(folder / "records.jsonl", "w") as handle:
        for index in range(questions):
            for path, correct in enumerate((True, False)):
                record = dict.fromkeys(RECORD_FIELDS)
                answer, word = ("7", "square") if correct else ("5", "circle")
                record.update({
                    "id": f"q{index}", "path_index": path, "num_paths": 2, "image": "img.png",
                    "image_root": "data", "question": f"How many dots {rng.randint(0, 99)}?",
                    "answer": "7", "choices": None, "status": "ok",
                    "steps": json.loads("[" + chain(answer, word).replace("\n", ",") + "]"),
                    "final_answer": answer, "correct": correct, "check": None, "score": None,
                    "comment": "", "failures": []})
                handle.write(json.dumps(record) + "\n")
    return load_records(folder)


def test_grpo_datasets_hold_the_prompts_and_what_the_rewards_read(tmp_path: Path) -> None:
    data = reasoning_grpo_dataset(write_items(tmp_path / "data", 3))
    assert len(data) == 3 and {"prompt", "image", "answer", "question", "id"} <= \
        set(data.column_names)
    assert data[0]["prompt"][-1]["content"][0] == {"type": "image", "text": None}
    judge = judge_grpo_dataset(write_chains(tmp_path / "chains", 4, 0))
    assert [row["chain_correct"] for row in judge] == [True, False] * 4
    assert "circle" in json.dumps(judge[1]["prompt"])


def test_grpo_refuses_data_without_its_columns_and_a_one_sided_judge_set(
        tmp_path: Path) -> None:
    from insightv_agents import InvalidInputError

    questions = reasoning_grpo_dataset(write_items(tmp_path / "data", 2))
    with pytest.raises(ConfigError, match="chain_correct"):  # before any model is loaded
        train_grpo(tmp_path / "no-model", questions,
                   {"output_dir": str(tmp_path / "out"), "agent": "summary"})
    records = write_chains(tmp_path / "chains", 2, 0)
    for paths in records.questions.values():
        paths[:] = [path for path in paths if path["correct"]]
    with pytest.raises(InvalidInputError, match="0 flawed"):
        judge_grpo_dataset(records)
    assert len(judge_grpo_dataset(records, balance=False)) == 2


# --- the synthesis graph's revise loop ---------------------------------------------------------


def test_a_path_judged_flawed_is_revised_with_the_critique() -> None:
    teacher = ScriptedChatModel([chain("9"), chain("7")])
    summarizer = ScriptedChatModel([
        json.dumps({"reasoning_correct": False, "critique": "Count again.", "answer": "9"}),
        json.dumps({"reasoning_correct": True, "critique": "", "answer": "7"})])
    graph = create_synthesis_graph(teacher=teacher, scorer=RuleScorer(), summarizer=summarizer,
                                   mode="chain", paths=1, max_revisions=2).compile()
    result = graph.invoke({"image": png_bytes(), "question": "How many dots?", "answer": "7"})
    (path,) = result["paths"]
    assert path["revisions"] == 1 and path["answer"] == "7"
    assert path["check"]["correct"] is True and path["verdict"]["reasoning_correct"] is True
    revised_request = json.dumps([m.content for m in teacher.calls[1]], default=str)
    assert "Count again." in revised_request
    with pytest.raises(ConfigError, match="summarizer"):
        create_synthesis_graph(teacher=teacher, max_revisions=1)


# --- GRPO training ---------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_in_process_raises_the_format_reward_from_a_fresh_start(
        model: Path, tmp_path: Path) -> None:
    data = reasoning_grpo_dataset(write_items(tmp_path / "data"))
    result = train_grpo(model, data, {**FAST, "output_dir": tmp_path / "out", "max_steps": 30,
                                      "learning_rate": 3e-2}, rewards=[FormatReward()])
    rewards = rewards_logged(result.output_dir)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert last >= 0.04 and last > 3 * first, rewards
    parquet = sorted((result.output_dir / "completions").glob("*.parquet"))
    assert len(parquet) == 30  # rollouts, rewards and advantages of every step
    import pandas

    table = pandas.read_parquet(parquet[-1])
    assert {"prompt", "completion", "format", "advantage"} <= set(table.columns)
    assert "base64" not in table.to_json()  # no image payloads in the logs
    card = read_card(result.output_dir)
    assert card is not None and card.role == "reasoning" and card.profile == "chain"
    run = json.loads((result.output_dir / "insightv_training.json").read_text())
    assert run["kind"] == "grpo" and run["rewards"] == ["format"] and run["rollouts"] == "trl"


@pytest.mark.slow
def test_grpo_with_vllm_rollouts_raises_the_reward(model: Path, tmp_path: Path) -> None:
    """Rollouts from a real vLLM CPU server that loads the policy's LoRA adapter at every
    step (TRL's rollout_func)."""
    from helpers import vllm_python
    from test_vllm_server import ENGINE

    from insightv_agents.backends.vllm import VLLMServer
    from insightv_agents.trainers.grpo import VLLMRollouts

    data = reasoning_grpo_dataset(write_items(tmp_path / "data"))
    server = VLLMServer(model, python=vllm_python(), runtime_lora=True, max_lora_rank=16,
                        **ENGINE)
    with server:
        result = train_grpo(model, data, {**FAST, "output_dir": tmp_path / "out",
                                          "max_steps": 30, "learning_rate": 3e-2},
                            rewards=[FormatReward()], rollouts=VLLMRollouts(server))
        assert set(server.adapters) == {"policy-step-29"}  # one adapter per step, in turn
    rewards = rewards_logged(result.output_dir)  # seeded rollouts: the same on a rerun
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 0.03 and last > 3 * first, rewards
    run = json.loads((result.output_dir / "insightv_training.json").read_text())
    assert run["rollouts"] == "vllm" and not (result.output_dir / "rollout-adapter").exists()
    with pytest.raises(ConfigError, match="lora"):
        train_grpo(model, data, {**FAST, "output_dir": tmp_path / "full", "finetune": "full"},
                   rollouts=VLLMRollouts(server))


def held_out_accuracy(model: Path, data: Any) -> float:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    network = AutoModelForImageTextToText.from_pretrained(model).eval()
    right = 0
    for row in data:
        text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                             tokenize=False)
        encoded = processor(text=[text], images=[[row["image"]]], return_tensors="pt")
        with torch.no_grad():
            output = network.generate(**encoded, max_new_tokens=40, do_sample=False)
        reply = processor.decode(output[0, encoded["input_ids"].shape[1]:],
                                 skip_special_tokens=True)
        right += verdict_of(reply, CHAIN) is row["chain_correct"]
    return right / len(data)


@pytest.mark.slow
def test_judge_grpo_raises_verdict_accuracy_on_held_out_chains(
        model: Path, tmp_path: Path) -> None:
    """The summary agent, first taught the verdict format with verdicts at random (so it
    judges no better than chance), is trained by GRPO on right and flawed chains; its
    greedy verdicts on chains it never saw get better."""
    import datasets

    from insightv_agents.trainers.sft import train_sft

    train = judge_grpo_dataset(write_chains(tmp_path / "train", 32, 0))
    held = judge_grpo_dataset(write_chains(tmp_path / "held", 16, 1))
    rng = random.Random(0)
    rows = [{"messages": row["prompt"] + [{"role": "assistant", "content": [
        {"type": "text", "text": json.dumps({"reasoning_correct": rng.random() < 0.5,
                                             "critique": "", "answer": "7"})}]}],
             "images": [row["image"]]} for row in train]
    start = train_sft(model, datasets.Dataset.from_list(rows), {
        "output_dir": str(tmp_path / "sft"), "agent": "summary", "finetune": "full",
        "num_train_epochs": 8, "learning_rate": 3e-3, "per_device_train_batch_size": 4,
        "report_to": [], "save_strategy": "no", "dtype": "float32"},
        card=AgentCard(role="summary", profile="chain"))
    before = held_out_accuracy(start.output_dir, held)
    result = train_grpo(start.output_dir, train, {
        **FAST, "output_dir": tmp_path / "judge", "agent": "summary", "finetune": "full",
        "max_steps": 60, "learning_rate": 3e-4, "max_completion_length": 40,
        "per_device_train_batch_size": 32}, rewards=[VerdictReward()])
    after = held_out_accuracy(result.output_dir, held)
    assert before <= 0.6 and after >= before + 0.15, (before, after)
    card = read_card(result.output_dir)
    assert card is not None and card.role == "summary"


# --- the self-improving loop -------------------------------------------------------------------


class ChainPolicy:
    """The reasoning agent's sampler in the loop tests: chains stating 7 (right) and 9
    (wrong) in turn (a tiny random model writes no readable chain). ``models`` keeps the
    chat models made, so a test can read what they were asked."""

    def __init__(self) -> None:
        self.models: list[ScriptedChatModel] = []

    def chat_model(self, model: str, round_number: int) -> ScriptedChatModel:
        self.models.append(ScriptedChatModel([chain("7"), chain("9")], cycle=True))
        return self.models[-1]


class JudgePolicy(ChainPolicy):
    """The summary agent's sampler: judges a chain by the answer it states."""

    def chat_model(self, model: str, round_number: int) -> ScriptedChatModel:
        def judge(messages: list[Any]) -> str:
            right = "The answer is 7." in json.dumps([m.content for m in messages], default=str)
            return json.dumps({"reasoning_correct": right,
                               "critique": "" if right else "Count the dots again.",
                               "answer": "7" if right else "9"})
        self.models.append(ScriptedChatModel([judge], cycle=True))
        return self.models[-1]


def first_turns(policy: ChainPolicy) -> set[str]:
    """The first message of every call the policy's chat models answered."""
    return {str(call[0].content) for model in policy.models for call in model.calls}


LOOP = {"rounds": 2, "paths": 2, "max_revisions": 1, "concurrency": 1,
        "reasoning_max_steps": 3, "max_steps": 2, "num_generations": 2,
        "per_device_train_batch_size": 2, "max_completion_length": 8, "logging_steps": 1,
        "save_steps": 1000, "learning_rate": 1e-3, "report_to": [], "dtype": "float32"}


@pytest.mark.slow
def test_the_loop_samples_judges_revises_and_retrains_both_agents(
        model: Path, tmp_path: Path) -> None:
    from insightv_agents.trainers.loop import self_improving_loop

    summary = tmp_path / "summary"
    shutil.copytree(model, summary)
    AgentCard(role="summary", profile="chain").save(summary)
    seen: list[int] = []
    reasoner, judge = ChainPolicy(), JudgePolicy()
    prompts = Prompts(reasoning_chain_system="Reason in short steps.",
                      summary_system="Judge the reasoning.")
    result = self_improving_loop(model, summary, write_items(tmp_path / "data", 3),
                                 {**LOOP, "output_dir": tmp_path / "run"},
                                 scorer=RuleScorer(), policy=reasoner, summary_policy=judge,
                                 prompts=prompts,
                                 on_round=lambda metrics: seen.append(metrics["round"]))
    assert seen == [1, 2]
    # both agents are asked with the prompts given, not the cards' (ours)
    assert first_turns(reasoner) == {"Reason in short steps."}
    assert first_turns(judge) == {"Judge the reasoning."}
    first = result.rounds[0]
    assert first["paths"] == 6 and first["verdict_accuracy"] == 1.0
    assert first["revised_paths"] >= 1 and first["kept_paths"] >= 3
    assert first["reasoner_trained"] and first["summarizer_trained"]
    assert result.reasoner.endswith("round-2/reasoner")
    assert result.summarizer.endswith("round-2/summary")
    assert read_card(result.summarizer).role == "summary"  # type: ignore[union-attr]
    table = (tmp_path / "run" / "rounds.md").read_text()
    assert "verdict accuracy" in table and table.count("\n") == 4
    assert (tmp_path / "run" / "rounds.svg").read_text().startswith("<svg")


@pytest.mark.slow
def test_a_killed_loop_resumes_at_its_round(model: Path, tmp_path: Path) -> None:
    summary = tmp_path / "summary"
    shutil.copytree(model, summary)
    AgentCard(role="summary", profile="chain").save(summary)
    items = write_items(tmp_path / "data", 3)
    run = tmp_path / "run"
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_grpo import LOOP, ChainPolicy, JudgePolicy
        from insightv_agents.assessment import RuleScorer
        from insightv_agents.trainers.loop import self_improving_loop
        self_improving_loop({str(model)!r}, {str(summary)!r}, {str(items)!r},
                            {{**LOOP, "output_dir": {str(run)!r}}}, scorer=RuleScorer(),
                            policy=ChainPolicy(), summary_policy=JudgePolicy())
    """))
    marker = run / "round-2" / "reasoner" / "insightv_training.json"
    kill_once_written([sys.executable, str(script)], marker)
    finished = run / "round-1" / "round.json"
    assert finished.exists() and marker.exists(), "round 2 did not get that far"
    assert not (run / "round-2" / "round.json").exists()
    first = finished.read_text()
    trained = marker.read_text()
    from insightv_agents.trainers.loop import self_improving_loop

    seen: list[int] = []
    result = self_improving_loop(model, summary, items, {**LOOP, "output_dir": run},
                                 scorer=RuleScorer(), policy=ChainPolicy(),
                                 summary_policy=JudgePolicy(),
                                 on_round=lambda metrics: seen.append(metrics["round"]))
    assert seen == [2] and finished.read_text() == first  # round 1 was not run again
    assert marker.read_text() == trained  # round 2's finished training was not redone
    records = (run / "round-2" / "samples" / "records.jsonl").read_text().splitlines()
    assert len(records) == 6  # one record per (question, path), none twice
    assert [r["round"] for r in result.rounds] == [1, 2]


def test_cli_train_grpo_and_loop_parse_their_configs(tmp_path: Path) -> None:
    from insightv_agents.cli.training import training_arguments

    inputs, config = training_arguments("grpo", [
        "--model", "m", "--input", "q.jsonl", "--output_dir", str(tmp_path), "--agent",
        "summary", "--loss_type", "dr_grpo", "--num_generations", "4"])
    assert config.agent == "summary" and config.loss_type == "dr_grpo"
    assert config.num_generations == 4 and inputs.sampler == "trl"
    inputs, config = training_arguments("loop", [
        "--reasoner", "r", "--summarizer", "s", "--input", "q.jsonl", "--output_dir",
        str(tmp_path), "--rounds", "3", "--method", "sft"])
    assert (config.rounds, config.method, inputs.scorer) == (3, "sft", "rule")
    with pytest.raises(ConfigError, match="rounds"):
        training_arguments("loop", ["--reasoner", "r", "--summarizer", "s", "--input", "q",
                                    "--output_dir", str(tmp_path), "--rounds", "0"])


def summary_adapter(model: Path, folder: Path) -> Path:
    """A summary agent as a LoRA adapter on ``model`` (the reasoning agent's base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=r".*text_model\.layers\.\d+\.self_attn\.(q|v)_proj")
    base = AutoModelForImageTextToText.from_pretrained(model)
    get_peft_model(base, config).save_pretrained(folder)
    AgentCard(role="summary", profile="chain").save(folder)
    return folder


def loop_command(model: Path, summary: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "loop", "--reasoner", str(model), "--summarizer", str(summary),
            "--input", str(write_items(tmp_path / "data", 2)), "--output_dir",
            str(tmp_path / "run"), "--rounds", "2", "--paths", "2", "--concurrency", "1",
            "--reasoning_max_steps", "2", "--max_steps", "2", "--num_generations", "2",
            "--per_device_train_batch_size", "2", "--max_completion_length", "8",
            "--learning_rate", "1e-3", "--dtype", "float32", "--lora_r", "8",
            "--save_steps", "1000", "--max_tokens", "64", *extra]


def test_cli_loop_through_vllm_is_refused_before_a_server_starts(model: Path,
                                                                 tmp_path: Path) -> None:
    """`train loop --sampler vllm` serves both agents' rounds from one server as adapters:
    full fine-tuning, or agents on two different base models, are refused first."""
    from typer.testing import CliRunner

    from insightv_agents.cli import app
    from insightv_agents.cli.training import training_arguments

    inputs, _ = training_arguments("loop", ["--reasoner", "r", "--summarizer", "s",
                                            "--input", "q", "--output_dir", str(tmp_path)])
    assert inputs.sampler == "local"
    summary = summary_adapter(model, tmp_path / "summary")
    full = CliRunner().invoke(app, loop_command(model, summary, tmp_path, "--sampler", "vllm",
                                                "--finetune", "full"))
    assert full.exit_code != 0 and "--finetune lora" in full.output
    other = tmp_path / "other-base"
    shutil.copytree(model, other)
    result = CliRunner().invoke(app, loop_command(other, summary, tmp_path, "--sampler",
                                                  "vllm"))
    assert result.exit_code != 0 and "one vLLM server" in " ".join(result.output.split())
    bad = CliRunner().invoke(app, [*loop_command(model, model, tmp_path, "--sampler", "vllm"),
                                   "--input", str(tmp_path / "missing.jsonl")])
    assert bad.exit_code != 0 and "missing.jsonl" in bad.output and bad.exception is not None
    assert not isinstance(bad.exception, TypeError)  # a typed refusal, not a crash
    assert not (tmp_path / "run").exists()  # nothing sampled, nothing trained


def test_rollout_seeds_are_reproducible_and_far_apart() -> None:
    """vLLM seeds the k-th completion of a request with its seed plus k: the requests of
    every step, process and group must be far apart, and the same on a rerun."""
    from insightv_agents.trainers.grpo import rollout_seed

    assert rollout_seed(42, 3, 0, 1, 5) == rollout_seed(42, 3, 0, 1, 5)
    seeds = sorted(rollout_seed(42, step, process, step + 1, group) for step in range(20)
                   for process in range(2) for group in range(16))
    assert all(0 <= seed < 2**31 for seed in seeds) and len(set(seeds)) == 640
    assert min(b - a for a, b in pairwise(seeds)) > 64


@pytest.mark.slow
def test_cli_loop_samples_both_agents_from_one_vllm_server(
        model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train loop --sampler vllm` on a real vLLM CPU server: each round's reasoning and
    summary adapters are loaded into the one server live, under their own names."""
    from helpers import vllm_python
    from typer.testing import CliRunner

    from insightv_agents.backends.vllm import VLLM_PYTHON_ENV
    from insightv_agents.cli import app

    monkeypatch.setenv(VLLM_PYTHON_ENV, vllm_python())
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    summary = summary_adapter(model, tmp_path / "summary")
    result = CliRunner().invoke(app, loop_command(model, summary, tmp_path, "--sampler",
                                                  "vllm"))
    assert result.exit_code == 0, result.output
    rounds = json.loads((tmp_path / "run" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["reasoner_trained"]
    for number in (1, 2):
        records = load_records(tmp_path / "run" / f"round-{number}" / "samples")
        provenance = [path["provenance"] for group in records.questions.values()
                      for path in group]
        assert len(provenance) == 4
        # round 1 samples the base model itself; round 2 its round-1 adapter, by name
        assert {p["teacher"]["model_name"] for p in provenance} == {
            "reasoner-2" if number == 2 else str(model)}
        assert {p["summarizer"]["model_name"] for p in provenance} == {f"summary-{number}"}
