"""`accelerate launch` with 2 processes on CPU (gloo): SFT and DPO of the tiny model reach
the same losses as one process with the same global batch, and what they save loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes, write_output

from insightv_agents.backends.transformers import ChatTransformersVLM
from insightv_agents.testing import build_tiny_idefics3

ACCELERATE = Path(sys.executable).with_name("accelerate")
QUESTIONS = {"a": [(90, True), (10, False)], "b": [(80, True), (20, False)],
             "c": [(70, True), (30, False)], "d": [(95, True), (5, False)]}
TOLERANCE = 2e-3
"""Largest difference between the per-step losses of 1 and 2 processes (measured: below
1e-4; a run whose batches differ, 1 process at batch 1, is up to 1e-2 away)."""
# the torchrun launcher (--multi_gpu) with TrainingArguments' use_cpu: gloo on CPU
TWO_PROCESSES = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize(("name", "kind", "stage"), [
    ("ddp", "MULTI_GPU", None), ("zero2", "DEEPSPEED", 2), ("zero3", "DEEPSPEED", 3),
    ("fsdp", "FSDP", None)])
def test_shipped_launch_configs_are_accelerate_configs(name: str, kind: str,
                                                       stage: int | None) -> None:
    """They parse as accelerate's own config files (they have not run here: no GPU, no
    DeepSpeed; see the training guide)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from insightv_agents.configs import launch_config

    config = load_config_from_file(str(launch_config(name)))
    assert config.distributed_type.name == kind and config.mixed_precision == "bf16"
    assert config.deepspeed_config.get("zero_stage") == stage
    if name == "zero3":
        assert config.deepspeed_config["zero3_save_16bit_model"]  # one file, gathered
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    build_tiny_idefics3(root / "model")
    write_output(root / "records", QUESTIONS)
    for kind, folder in (("sft-reason", "sft"), ("dpo", "dpo")):
        subprocess.run([sys.executable, "-m", "insightv_agents.cli", "build-data", kind,
                        "--from", str(root / "records"), "--out", str(root / folder),
                        "--mode", "chain"], check=True, capture_output=True, timeout=300)
    return root


def train(root: Path, kind: str, out: str, launcher: list[str], batch: int,
          finetune: str, steps: int = 6, rate: float = 1e-3) -> dict[str, Any]:
    data = root / ("sft" if kind == "sft" else "dpo")
    command = [*launcher, "-m", "insightv_agents.cli", "train", kind, "--model",
               str(root / "model"), "--data", str(data), "--output_dir", str(root / out),
               "--max_steps", str(steps), "--learning_rate", str(rate), "--logging_steps", "1",
               "--save_steps", "1000", "--seed", "0", "--finetune", finetune,
               "--report_to", "none", "--per_device_train_batch_size", str(batch),
               "--use_cpu", "true"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((root / out / "insightv_training.json").read_text())


def losses(run: dict[str, Any]) -> list[float]:
    return [entry["loss"] for entry in run["log_history"] if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "finetune"), [("sft", "full"), ("dpo", "lora")])
def test_two_processes_reach_the_losses_of_one_with_the_same_global_batch(
        prepared: Path, kind: str, finetune: str) -> None:
    one = train(prepared, kind, f"{kind}-one", [sys.executable], 2, finetune)
    two = train(prepared, kind, f"{kind}-two", TWO_PROCESSES, 1, finetune)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert len(losses(one)) == len(losses(two)) == 6
    gaps = [abs(a - b) for a, b in zip(losses(one), losses(two), strict=True)]
    assert max(gaps) <= TOLERANCE, (losses(one), losses(two))
    assert losses(two)[-1] < losses(two)[0]  # it learned
    saved = prepared / f"{kind}-two"
    weights = "adapter_model" if finetune == "lora" else "model"
    assert (saved / f"{weights}.safetensors").is_file()
    assert not list(saved.glob("*model*.bin"))
    image = prepared / "image.png"
    image.write_bytes(png_bytes())
    model = ChatTransformersVLM(model_path=str(saved), max_new_tokens=4, temperature=0)
    from langchain_core.messages import HumanMessage

    from insightv_agents.images import load_images

    (url,) = load_images([str(image)])
    reply = model.invoke([HumanMessage(content=[
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "How many?"}])])
    assert isinstance(reply.content, str)


@pytest.mark.slow
def test_iterative_dpo_samples_on_the_main_process_and_trains_on_both(
        prepared: Path, tmp_path: Path) -> None:
    """One round under 2 processes: the policy (the tiny model taught our chain format)
    samples once, on the main process, through a scripted summary agent that answers right
    and wrong in turn; DPO then trains on both processes."""
    from itertools import count

    from helpers import FakeOpenAIServer, verdict
    from test_trainers import write_items

    train(prepared, "sft", "policy", [sys.executable], 2, "full", steps=150, rate=3e-3)
    policy = prepared / "policy"
    turns = count()

    def summary(body: dict[str, Any]) -> str:
        return verdict("7") if next(turns) % 2 == 0 else verdict("9", correct=False)

    items = write_items(tmp_path / "data")
    with FakeOpenAIServer(summary) as server:
        command = [*TWO_PROCESSES, "-m", "insightv_agents.cli", "train", "iterate",
                   "--model", str(policy), "--input", str(items), "--output_dir",
                   str(tmp_path / "run"), "--rounds", "1", "--paths", "2", "--concurrency", "1",
                   "--reasoning_max_steps", "3", "--learning_rate", "1e-2", "--max_steps", "3",
                   "--logging_steps", "1", "--save_steps", "1000", "--summarizer", "s",
                   "--summarizer_url", server.url, "--use_cpu", "true", "--report_to", "none"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary_calls = len(server.requests)
    records = (tmp_path / "run" / "round-1" / "samples" / "records.jsonl").read_text()
    assert len(records.splitlines()) == 6  # sampled once (3 questions, 2 paths), not twice
    assert 0 < summary_calls <= 6
    round_file = json.loads((tmp_path / "run" / "round-1" / "round.json").read_text())
    assert round_file["trained"] and round_file["pairs"] > 0
    run = json.loads((Path(round_file["model_out"]) / "insightv_training.json").read_text())
    assert run["processes"] == 2
