"""SFT of both agents, DPO, and iterative DPO on tiny offline models, on CPU.

The models are tiny random Idefics3 models; what is asserted is measured: the loss falls,
greedy output moves towards its target, the DPO margin rises, rounds run and resume.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes, write_output

from insightv_agents import ConfigError, InvalidInputError
from insightv_agents.assessment import RuleScorer
from insightv_agents.backends.transformers import ChatTransformersVLM
from insightv_agents.cards import read_card
from insightv_agents.parsing import format_chain, format_verdict, parse_verdict
from insightv_agents.prompts import DEFAULT_PROMPTS
from insightv_agents.testing import ScriptedChatModel, build_tiny_idefics3, build_tiny_llava
from insightv_agents.trainers.common import check_config, checkpoint_to_resume
from insightv_agents.trainers.data import (
    SummaryMix,
    build_dpo_pairs,
    build_reasoning_sft,
    build_summary_sft,
    load_records,
    reasoning_prompt,
    summary_conversation,
)
from insightv_agents.trainers.dpo import (
    DPOConfig,
    preference_logprobs,
    preference_margins,
    train_dpo,
)
from insightv_agents.trainers.iterative import (
    InProcessPolicy,
    IterativeDPOConfig,
    iterative_dpo,
)
from insightv_agents.trainers.sft import (
    SFTConfig,
    loss_mask,
    to_prompt_completion,
    train_sft,
    with_lengths,
)

QUESTIONS = {"a": [(90, True), (10, False)], "b": [(80, True), (20, False)]}
FAST = {"logging_steps": 5, "save_steps": 1000, "num_train_epochs": 1000}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_idefics3(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_records(write_output(tmp_path_factory.mktemp("records") / "out", QUESTIONS))


def kill_once_written(command: list[str], written: Path, within: float = 240) -> int:
    """Run ``command`` and SIGKILL its process group as soon as ``written`` exists (or it
    ends, or ``within`` seconds pass); its return code."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + within
    while not written.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):  # it may have ended by itself
        os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


def with_image(messages: list[Any]) -> list[Any]:
    """The builders' messages carry an image placeholder; put a real image in."""
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    for message in messages:
        if isinstance(message.content, list):
            for part in message.content:
                if part.get("type") == "image_url":
                    part["image_url"] = {"url": url}
    return messages


def similarity(model: Path | str, messages: list[Any], target: str) -> float:
    reply = ChatTransformersVLM(model_path=str(model), max_new_tokens=160,
                                temperature=0).invoke(with_image(messages)).content
    return difflib.SequenceMatcher(None, str(reply), target).ratio()


def logged_losses(output_dir: Path) -> list[float]:
    run = json.loads((output_dir / "insightv_training.json").read_text())
    return [entry["loss"] for entry in run["log_history"] if "loss" in entry]


# --- SFT ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_reasoning_agent_overfits_and_its_greedy_output_moves_to_the_target(
        base: Path, records: Any, tmp_path: Path) -> None:
    dataset, _ = build_reasoning_sft(records, mode="chain")
    record = records.questions["a"][0]
    prompt, target = reasoning_prompt(record, "chain", DEFAULT_PROMPTS), format_chain(
        record["steps"])
    before = similarity(base, prompt, target)
    result = train_sft(base, dataset, SFTConfig(
        agent="reasoning", finetune="full", output_dir=tmp_path / "run", learning_rate=3e-3,
        max_steps=60, **FAST))
    losses = logged_losses(result.output_dir)
    assert losses[-1] < losses[0] / 4, losses
    after = similarity(result.output_dir, reasoning_prompt(record, "chain", DEFAULT_PROMPTS),
                       target)
    assert after > before + 0.3 and after > 0.7, (before, after)
    assert not result.adapter and (result.output_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_sft_summary_agent_overfits_and_answers_like_its_target(
        base: Path, records: Any, tmp_path: Path) -> None:
    dataset, _ = build_summary_sft(records, mix=SummaryMix(optimal=1, flawed=0, self_made=0,
                                                           qa=0))
    record = records.questions["a"][0]
    verdict = {"reasoning_correct": True, "critique": "", "answer": record["answer"]}
    conversation = summary_conversation(record, verdict, DEFAULT_PROMPTS)
    prompt, target = conversation[:-1], format_verdict(verdict)
    before = similarity(base, list(prompt), target)
    result = train_sft(base, dataset, SFTConfig(
        agent="summary", finetune="full", output_dir=tmp_path / "run", learning_rate=3e-3,
        max_steps=150, **FAST))
    losses = logged_losses(result.output_dir)
    assert losses[-1] < losses[0] / 4, losses
    reply = ChatTransformersVLM(model_path=str(result.output_dir), max_new_tokens=80,
                                temperature=0).invoke(with_image(list(prompt))).content
    after = difflib.SequenceMatcher(None, str(reply), target).ratio()
    assert after > before + 0.3, (before, after)
    assert parse_verdict(str(reply))["answer"] == record["answer"]


@pytest.mark.slow
def test_sft_lora_adapts_the_language_model_only_and_loads_by_folder(
        base: Path, records: Any, tmp_path: Path) -> None:
    dataset, _ = build_reasoning_sft(records, mode="step")
    result = train_sft(base, dataset, SFTConfig(output_dir=tmp_path / "run",
                                                  learning_rate=1e-2, max_steps=30, **FAST))
    assert result.adapter and result.metrics["train_loss"] > 0
    losses = logged_losses(result.output_dir)
    assert losses[-1] < losses[0], losses
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    from safetensors import safe_open

    with safe_open(str(result.output_dir / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert names and all(".text_model.layers." in name for name in names)
    assert any("mlp" in name for name in names) and any("self_attn" in name for name in names)
    # The output folder alone is enough for the in-process backend.
    reply = ChatTransformersVLM(model_path=str(result.output_dir), max_new_tokens=4).invoke("hi")
    assert isinstance(reply.content, str)
    run = json.loads((result.output_dir / "insightv_training.json").read_text())
    assert run["kind"] == "sft-reasoning" and run["loss_mask"] == "assistant"
    assert run["settings"]["learning_rate"] == 1e-2 and run["settings"]["lora_r"] == 16
    card = read_card(result.output_dir)  # read off the data: several steps, one per turn
    assert card is not None and (card.role, card.profile) == ("reasoning", "steps")


def test_sft_defaults_follow_the_paper() -> None:
    def schedule(kind: type, **kwargs: Any) -> tuple[float, float]:
        config = kind(output_dir="x", **kwargs)
        return config.learning_rate, config.num_train_epochs

    assert schedule(SFTConfig, agent="reasoning", finetune="full") == (5e-6, 2)
    assert schedule(SFTConfig, agent="summary", finetune="full") == (1e-5, 1)
    assert schedule(SFTConfig, agent="summary") == (2e-4, 1)
    assert schedule(SFTConfig, agent="summary", learning_rate=3e-4,
                    num_train_epochs=3) == (3e-4, 3)
    assert schedule(DPOConfig, finetune="full") == (5e-7, 1)
    config = DPOConfig(output_dir="x")
    assert (config.beta, config.loss_type) == (0.1, ["sigmoid"])
    # TRL's defaults that agent training changes
    assert (config.max_length, config.save_total_limit, config.warmup_steps) == (None, 2, 0.03)
    assert not config.gradient_checkpointing and not config.remove_unused_columns


def test_completion_loss_splits_a_conversation_per_assistant_turn(records: Any) -> None:
    dataset, _ = build_reasoning_sft(records, mode="step")
    turns = sum(m["role"] == "assistant" for row in dataset for m in row["messages"])
    split = to_prompt_completion(dataset)
    assert len(split) == turns and set(split.column_names) >= {"prompt", "completion", "images"}
    for row in split:
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        assert row["prompt"][-1]["role"] != "assistant"


def test_row_lengths_count_the_text_of_every_turn_not_the_images(records: Any) -> None:
    dataset, _ = build_reasoning_sft(records, mode="step")
    expected = [sum(len(part["text"]) if isinstance(part, dict) else len(part)
                    for message in row["messages"]
                    for part in ([message["content"]] if isinstance(message["content"], str)
                                 else message["content"])
                    if not isinstance(part, dict) or part["type"] == "text")
                for row in dataset]
    assert with_lengths(dataset)["length"] == expected and min(expected) > 0
    split = to_prompt_completion(dataset)
    assert sum(with_lengths(split)["length"]) > sum(expected)  # each prompt repeats turns
    kept = with_lengths(dataset).map(lambda row: {"length": 7})
    assert set(with_lengths(kept)["length"]) == {7}  # a length column of its own is kept


def short_and_long_rows(folder: Path) -> Any:
    """32 rows about one picture, whose answers are in turn 60 and 4 words long."""
    import datasets

    image = folder / "image.png"
    image.write_bytes(png_bytes())
    return datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": "Question?"}]},
                      {"role": "assistant", "content": [
                          {"type": "text", "text": "yes " * (4 if row % 2 else 60)}]}],
         "images": [str(image)]} for row in range(32)])


def test_length_grouped_sft_batches_rows_of_similar_length(base: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    dataset = short_and_long_rows(tmp_path)

    class Batches(TrainerCallback):
        """The share of real (not padding) tokens in each batch of the epoch."""

        def __init__(self) -> None:
            self.real: list[float] = []

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for batch in kwargs["train_dataloader"]:
                mask = batch["attention_mask"]
                self.real.append(float(mask.sum() / mask.numel()))

    shares = {}
    for grouped in (False, True):
        batches = Batches()
        train_sft(base, dataset, SFTConfig(
            agent="summary", finetune="full", output_dir=tmp_path / f"run-{grouped}",
            max_steps=1, per_device_train_batch_size=2, save_steps=1000, resume=False,
            train_sampling_strategy="group_by_length" if grouped else "random"),
            callbacks=[batches])
        shares[grouped] = sum(batches.real) / len(batches.real)
    # shuffled, about half the batches pair a short row with a long one; grouped, only a
    # mega-batch whose long rows are odd in number mixes them (at most one batch in four)
    assert shares[True] > 0.93 and shares[True] > shares[False] + 0.05, shares


def test_mean_token_loss_scale_divides_every_step_by_the_same_count(
        base: Path, tmp_path: Path) -> None:
    """Grouped batches of long and of short rows: transformers divides each step by its own
    supervised tokens (so they differ by ~10x); loss_scale="mean_tokens" by one count for
    all, the mean of those (every batch full, every row counted)."""
    import torch

    from insightv_agents.trainers.sft import _sft_trainer

    dataset = short_and_long_rows(tmp_path)
    counts = {}
    for scale in ("batch_tokens", "mean_tokens"):
        trainer, _, _ = _sft_trainer(base, dataset, SFTConfig(
            agent="summary", finetune="full", output_dir=tmp_path / scale,
            per_device_train_batch_size=2, train_sampling_strategy="group_by_length",
            loss_scale=scale))
        counts[scale] = [float(trainer.get_batch_samples(iter([batch]), 1,
                                                         torch.device("cpu"))[1])
                         for batch in trainer.get_train_dataloader()]
    shown = counts["batch_tokens"]
    assert len(shown) == 16 and max(shown) > 5 * min(shown)
    assert len(set(counts["mean_tokens"])) == 1
    assert counts["mean_tokens"][0] == pytest.approx(sum(shown) / len(shown))


def test_mean_token_loss_scale_refuses_a_model_whose_loss_takes_no_count(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose loss ignores the token count would silently average per step again:
    refused with a typed error before training."""
    from transformers import Idefics3ForConditionalGeneration

    from insightv_agents.trainers.sft import _sft_trainer

    monkeypatch.setattr(Idefics3ForConditionalGeneration, "accepts_loss_kwargs", False,
                        raising=False)
    with pytest.raises(ConfigError, match="loss_scale='mean_tokens' needs a model whose loss"):
        _sft_trainer(base, short_and_long_rows(tmp_path), SFTConfig(
            agent="summary", finetune="full", output_dir=tmp_path / "out",
            loss_scale="mean_tokens"))


def test_micro_batches_split_each_random_batch_by_length_with_the_same_loss(
        base: Path, tmp_path: Path) -> None:
    """micro_batches=2: each step's random 4 rows run as two micro-batches of similar
    lengths (less padding), and the step's loss, divided by the tokens of the whole step, is
    the loss of those 4 rows as one batch."""
    import torch

    from insightv_agents.trainers.sft import _sft_trainer

    dataset = short_and_long_rows(tmp_path)
    trainer, _, _ = _sft_trainer(base, dataset, SFTConfig(
        agent="summary", finetune="full", output_dir=tmp_path / "split",
        per_device_train_batch_size=4, micro_batches=2, seed=3))
    assert trainer.args.gradient_accumulation_steps == 2
    sampler = trainer._get_train_sampler()
    assert sampler.seed == 3  # the run's seed, not transformers' 42
    micro = list(sampler)
    pairs = list(zip(micro[::2], micro[1::2], strict=True))
    assert len(micro) == 16 and all(len(a) + len(b) == 4 for a, b in pairs)
    lengths = trainer.train_dataset["length"]
    mixed = sum(len({lengths[i] for i in batch}) > 1 for batch in micro)
    steps = [set(a) | set(b) for a, b in pairs]
    assert mixed <= 2 < sum(len({lengths[i] for i in step}) > 1 for step in steps)
    assert sorted(i for step in steps for i in step) == list(range(32))  # every row, once

    model, collate = trainer.model.eval(), trainer.data_collator
    first, second = micro[0], micro[1]
    rows = [dataset[i] for i in first + second]
    with torch.no_grad():  # TRL's own loss, as the training step calls it
        whole = collate(rows)
        count = int(whole["labels"][..., 1:].ne(-100).sum())
        split = sum(trainer.compute_loss(model, collate([dataset[i] for i in part]),
                                         num_items_in_batch=count) for part in (first, second))
        together = trainer.compute_loss(model, whole, num_items_in_batch=count)
    assert float(split) == pytest.approx(float(together), rel=1e-4)


def test_bf16_mixed_trains_float32_weights_in_bfloat16(base: Path, tmp_path: Path) -> None:
    """dtype="bf16-mixed" on a CPU: TRL's bf16 autocast (transformers needs use_cpu for it),
    the weights loaded and saved in float32."""
    from safetensors.torch import load_file

    from insightv_agents.trainers.sft import _sft_trainer

    settings = SFTConfig(agent="summary", finetune="full", output_dir=tmp_path / "mixed",
                         max_steps=2, per_device_train_batch_size=4, save_steps=1000,
                         dtype="bf16-mixed")
    trainer, _, _ = _sft_trainer(base, short_and_long_rows(tmp_path), settings)
    assert trainer.args.bf16 and trainer.args.use_cpu
    assert str(next(trainer.model.parameters()).dtype) == "torch.float32"
    result = train_sft(base, short_and_long_rows(tmp_path), settings)
    assert 0 < result.metrics["train_loss"] < 100
    weights = load_file(result.output_dir / "model.safetensors")
    assert {str(tensor.dtype) for tensor in weights.values()} == {"torch.float32"}


def test_native_bf16_on_a_cpu_needs_avx512_bf16_or_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN says "bf16 supported" on plain AVX512 too (emulated, slower than float32): only
    the CPU's own bfloat16 instructions count."""
    import torch

    from insightv_agents.trainers.common import native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True,
                        raising=False)
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True),
                                       (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16() is expected


def test_loss_mask_follows_the_chat_template(base: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    assert loss_mask(processor, "auto") == "assistant"  # the template has generation markers
    assert loss_mask(processor, "completion") == "completion"
    processor.chat_template = ("{% for m in messages %}{{ m['role'] }}: "
                               "{{ m['content'][0]['text'] }}\n{% endfor %}")
    assert loss_mask(processor, "auto") == "completion"
    with pytest.raises(ConfigError, match="generation"):
        loss_mask(processor, "assistant")


def test_bad_settings_and_data_are_refused_before_loading(tmp_path: Path, base: Path,
                                                          records: Any) -> None:
    sft, _ = build_reasoning_sft(records)
    pairs, _ = build_dpo_pairs(records)
    with pytest.raises(ConfigError, match="learning_rate"):
        train_sft(base, sft, {"output_dir": tmp_path, "learning_rate": -1})
    with pytest.raises(ConfigError, match="unexpected keyword argument 'learnin_rate'"):
        train_sft(base, sft, {"output_dir": tmp_path, "learnin_rate": 1e-4})
    with pytest.raises(ConfigError, match="messages"):
        train_sft(base, pairs, {"output_dir": tmp_path})
    with pytest.raises(ConfigError, match="chosen"):
        train_dpo(base, sft, {"output_dir": tmp_path})
    with pytest.raises(InvalidInputError, match="not a folder"):
        train_sft(base, tmp_path / "missing", {"output_dir": tmp_path})
    with pytest.raises(ConfigError, match="full fine-tuning"):
        train_sft(base, sft, {"output_dir": tmp_path, "finetune": "full"},
                  adapter=tmp_path)
    with pytest.raises(ConfigError, match="multiple of micro_batches"):
        train_sft(base, sft, {"output_dir": tmp_path, "per_device_train_batch_size": 16,
                              "micro_batches": 3})
    with pytest.raises(ConfigError, match="choose one"):
        train_sft(base, sft, {"output_dir": tmp_path, "per_device_train_batch_size": 4,
                              "micro_batches": 2, "train_sampling_strategy": "group_by_length"})


@pytest.mark.slow
def test_sft_on_llava_with_completion_loss(tmp_path: Path, records: Any) -> None:
    model = build_tiny_llava(tmp_path / "llava")
    dataset, _ = build_reasoning_sft(records, mode="step")
    result = train_sft(model, dataset, SFTConfig(
        output_dir=tmp_path / "run", loss_mask="completion", learning_rate=1e-2, max_steps=10,
        **FAST))
    run = json.loads((result.output_dir / "insightv_training.json").read_text())
    turns = sum(m["role"] == "assistant" for row in dataset for m in row["messages"])
    assert run["loss_mask"] == "completion" and run["metrics"]["rows"] == turns == 4


# --- DPO ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_dpo_raises_the_chosen_vs_rejected_margin(base: Path, records: Any, tmp_path: Path,
                                                  finetune: str) -> None:
    pairs, _ = build_dpo_pairs(records)
    before = preference_margins(base, pairs)
    result = train_dpo(base, pairs, DPOConfig(
        output_dir=tmp_path / "run", finetune=finetune,  # type: ignore[arg-type]
        learning_rate=1e-2 if finetune == "lora" else 1e-3, max_steps=20, **FAST))
    after = preference_margins(result.output_dir, pairs)
    assert all(a > b + 5 for a, b in zip(after, before, strict=True)), (before, after)
    assert result.metrics["last_logged_reward_margin"] > 0


@pytest.mark.slow
def test_dpo_continues_an_adapter_with_it_as_reference(base: Path, records: Any,
                                                       tmp_path: Path) -> None:
    sft = train_sft(base, build_reasoning_sft(records, mode="chain")[0], SFTConfig(
        output_dir=tmp_path / "sft", learning_rate=1e-2, max_steps=10, **FAST))
    pairs, _ = build_dpo_pairs(records)
    before = preference_margins(sft.output_dir, pairs)
    result = train_dpo(sft.output_dir, pairs, DPOConfig(
        output_dir=tmp_path / "dpo", learning_rate=1e-2, max_steps=10, **FAST))
    run = json.loads((result.output_dir / "insightv_training.json").read_text())
    assert read_card(result.output_dir) == read_card(sft.output_dir)  # carried on, chain
    assert run["started_from_adapter"] == str(sft.output_dir.resolve())
    assert run["base_model"] == str(base.resolve())
    after = preference_margins(result.output_dir, pairs)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_dpo_config_is_trls_with_checked_values() -> None:
    rpo = check_config({"output_dir": "x", "loss_type": ["sigmoid", "sft"],
                        "loss_weights": [1.0, 0.5]}, DPOConfig)
    assert (rpo.loss_type, rpo.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])
    with pytest.raises(ConfigError, match="beta"):
        check_config({"output_dir": "x", "beta": 0}, DPOConfig)
    with pytest.raises(ConfigError, match="output_dir is required"):
        check_config({}, DPOConfig)


@pytest.mark.slow
def test_dpo_with_an_sft_weight_raises_the_chosen_paths_likelihood(
        base: Path, records: Any, tmp_path: Path) -> None:
    """Plain DPO may lower both sides; with the NLL term the chosen paths become likelier
    than under plain DPO trained the same way, and the margin still rises."""
    pairs, _ = build_dpo_pairs(records)
    before = preference_logprobs(base, pairs)
    trained = {}
    for weight in (0.0, 1.0):
        losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, weight]} if weight \
            else {}
        result = train_dpo(base, pairs, DPOConfig(
            output_dir=tmp_path / f"run-{weight}", finetune="full", learning_rate=1e-3,
            max_steps=20, **losses, **FAST))
        run = json.loads((result.output_dir / "insightv_training.json").read_text())
        assert run["settings"]["loss_type"] == (["sigmoid", "sft"] if weight else ["sigmoid"])
        trained[weight] = preference_logprobs(result.output_dir, pairs)
    for (chosen, rejected), (plain, _), (rpo, rpo_rejected) in zip(
            before, trained[0.0], trained[1.0], strict=True):
        assert rpo > plain and rpo > chosen, (chosen, plain, rpo)
        assert rpo - rpo_rejected > chosen - rejected + 5


# --- iterative DPO -----------------------------------------------------------------------


def write_items(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, colour in enumerate(("red", "blue", "green")):
        (folder / f"{index}.png").write_bytes(png_bytes(color=colour))
        rows.append({"id": f"q{index}", "image": f"{index}.png", "question": "Question a?",
                     "answer": "7"})
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "items.jsonl"


def alternating_summarizer() -> ScriptedChatModel:
    """Stands in for the summary agent (a random tiny model cannot judge): it answers right
    and wrong in turn, so each question's paths get both kinds."""
    return ScriptedChatModel([json.dumps({"reasoning_correct": True, "critique": "",
                                          "answer": "7"}),
                              json.dumps({"reasoning_correct": False, "critique": "off",
                                          "answer": "9"})], cycle=True)


ROUNDS = {"rounds": 2, "paths": 2, "concurrency": 1, "reasoning_max_steps": 3,
          "learning_rate": 1e-2, "max_steps": 5, "logging_steps": 1, "save_steps": 1000}


@pytest.fixture(scope="module")
def policy_model(base: Path, records: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """M_1: the tiny model fine-tuned to write chains in our format (so paths parse)."""
    out = tmp_path_factory.mktemp("policy") / "sft"
    return train_sft(base, build_reasoning_sft(records, mode="chain")[0], SFTConfig(
        finetune="full", output_dir=out, learning_rate=3e-3, max_steps=150, **FAST)).output_dir


@pytest.mark.slow
def test_iterative_dpo_runs_two_rounds_through_the_synthesis_graph(
        policy_model: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    result = iterative_dpo(
        policy_model, write_items(tmp_path / "data"), {**ROUNDS, "output_dir": tmp_path / "run"},
        scorer=RuleScorer(), summarizer=alternating_summarizer(),
        policy=InProcessPolicy(temperature=0.5, max_new_tokens=160),
        on_round=lambda metrics: seen.append(metrics["round"]))
    assert seen == [1, 2] and [r["round"] for r in result.rounds] == [1, 2]
    first, second = result.rounds
    for metrics in result.rounds:
        assert metrics["questions"] == 3 and metrics["paths"] == 6
    assert first["trained"] and first["pairs"] > 0
    assert first["model_out"] == str(tmp_path / "run" / "round-1" / "model")
    assert second["model_in"] == first["model_out"]  # round 2 samples from M_2
    records = [json.loads(line) for line in
               (tmp_path / "run" / "round-2" / "samples" / "records.jsonl").open()]
    assert {r["provenance"]["teacher"]["policy_model"] for r in records} == {first["model_out"]}
    assert result.final_model == second["model_out"]
    # M_2 is an adapter on the SFT model (the reference of round 1), M_3 continues it.
    adapter = json.loads((Path(first["model_out"]) / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(policy_model.resolve())
    table = (tmp_path / "run" / "rounds.md").read_text()
    assert table.count("\n") == 4 and "sample accuracy" in table
    assert (tmp_path / "run" / "rounds.svg").read_text().startswith("<svg")


@pytest.mark.slow
def test_iterative_dpo_killed_resumes_after_the_finished_round(
        policy_model: Path, tmp_path: Path) -> None:
    items = write_items(tmp_path / "data")
    run = tmp_path / "run"
    script = tmp_path / "run_rounds.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_trainers import ROUNDS, alternating_summarizer
        from insightv_agents.assessment import RuleScorer
        from insightv_agents.trainers.iterative import InProcessPolicy, iterative_dpo
        iterative_dpo({str(policy_model)!r}, {str(items)!r},
                      {{**ROUNDS, "output_dir": {str(run)!r}}}, scorer=RuleScorer(),
                      summarizer=alternating_summarizer(),
                      policy=InProcessPolicy(temperature=0.5, max_new_tokens=160))
    """))
    finished = run / "round-1" / "round.json"
    kill_once_written([sys.executable, str(script)], finished)
    assert finished.exists(), "round 1 did not finish before the kill"
    assert not (run / "round-2" / "round.json").exists()
    first = finished.read_text()
    samples = (run / "round-1" / "samples" / "records.jsonl").read_text()
    rounds_seen: list[int] = []
    result = iterative_dpo(policy_model, items, {**ROUNDS, "output_dir": run},
                           scorer=RuleScorer(), summarizer=alternating_summarizer(),
                           policy=InProcessPolicy(temperature=0.5, max_new_tokens=160),
                           on_round=lambda metrics: rounds_seen.append(metrics["round"]))
    assert rounds_seen == [2]  # round 1 was not run again
    assert finished.read_text() == first
    assert (run / "round-1" / "samples" / "records.jsonl").read_text() == samples
    assert [r["round"] for r in result.rounds] == [1, 2]
    records = (run / "round-2" / "samples" / "records.jsonl").read_text().splitlines()
    assert len(records) == 6  # one record per (question, path), none twice


class ScriptedPolicy:
    """A policy whose chains state 7 (right) and 9 (wrong) in turn, each ending with a
    summary step; how a chain-trained reasoning agent writes."""

    def chat_model(self, model: str, round_number: int) -> ScriptedChatModel:
        def chain(answer: str) -> str:
            return format_chain([
                {"summary": "Look", "reasoning": "I look at the square.", "action": "continue"},
                {"summary": "Answer", "reasoning": f"It has {answer} dots. The answer is "
                                                   f"{answer}.", "action": "summary"}])
        return ScriptedChatModel([chain("7"), chain("9")], cycle=True)


@pytest.mark.slow
def test_iterative_dpo_with_stated_answers_needs_no_summarizer(
        base: Path, tmp_path: Path) -> None:
    """final_answer='stated': each path's answer is the one its last step states; nothing
    is asked after the reasoning, and the right and wrong paths make the pairs."""
    result = iterative_dpo(
        base, write_items(tmp_path / "data"),
        {**ROUNDS, "rounds": 1, "final_answer": "stated", "output_dir": tmp_path / "run"},
        scorer=RuleScorer(), policy=ScriptedPolicy())
    (metrics,) = result.rounds
    assert metrics["accuracy"] == 0.5 and metrics["failed_paths"] == 0
    assert metrics["pairs"] == 3 and metrics["trained"]
    records = [json.loads(line) for line in
               (tmp_path / "run" / "round-1" / "samples" / "records.jsonl").open()]
    assert {r["provenance"]["final_answer"] for r in records} == {"stated"}
    assert sorted(r["final_answer"] for r in records) == ["7"] * 3 + ["9"] * 3


@pytest.mark.slow
def test_iterative_dpo_rounds_sample_fresh_slices_of_the_questions(
        base: Path, tmp_path: Path) -> None:
    """questions_per_round: round 1 samples the first two questions, round 2 the next two
    (wrapping round to the first), each from the model the round before trained."""
    result = iterative_dpo(
        base, write_items(tmp_path / "data"),
        {**ROUNDS, "final_answer": "stated", "questions_per_round": 2,
         "output_dir": tmp_path / "run"},
        scorer=RuleScorer(), policy=ScriptedPolicy())
    for number, questions in ((1, ["q0", "q1"]), (2, ["q2", "q0"])):
        samples = tmp_path / "run" / f"round-{number}" / "samples"
        records = [json.loads(line) for line in (samples / "records.jsonl").open()]
        assert sorted({record["id"] for record in records}) == sorted(questions)
        assert json.loads((samples / "run.json").read_text())["question_ids"] == questions
    assert [r["questions"] for r in result.rounds] == [2, 2]
    assert all(r["trained"] for r in result.rounds)


def test_round_questions_take_turns_and_wrap_round() -> None:
    settings = IterativeDPOConfig(output_dir="x", questions_per_round=4)
    assert [settings.round_questions(number, 10) for number in (1, 2, 3)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert settings.round_questions(2, 3) == [0, 1, 2]  # fewer questions than a slice
    every = IterativeDPOConfig(output_dir="x")
    assert every.round_questions(3, 5) == [0, 1, 2, 3, 4]


def test_iterative_settings_are_checked_before_any_round(tmp_path: Path) -> None:
    items = write_items(tmp_path / "data")
    with pytest.raises(ConfigError, match="rounds"):
        iterative_dpo("m", items, {"output_dir": tmp_path, "rounds": 0}, scorer=RuleScorer())
    with pytest.raises(ConfigError, match="output_dir"):
        iterative_dpo("m", items, {"rounds": 2}, scorer=RuleScorer())
    with pytest.raises(ConfigError, match="beta"):
        iterative_dpo("m", items, {"output_dir": tmp_path, "beta": -1}, scorer=RuleScorer())
    with pytest.raises(ConfigError, match="final_answer"):
        iterative_dpo("m", items, {"output_dir": tmp_path, "final_answer": "guess"},
                      scorer=RuleScorer())
    with pytest.raises(ConfigError, match="summarizer"):
        iterative_dpo("m", items, {"output_dir": tmp_path, "final_answer": "stated"},
                      scorer=RuleScorer(), summarizer=alternating_summarizer())
    (tmp_path / "bad.jsonl").write_text('{"question": "q?"}\n')
    with pytest.raises(InvalidInputError, match="bad item"):
        iterative_dpo("m", tmp_path / "bad.jsonl", {"output_dir": tmp_path},
                      scorer=RuleScorer())


# --- command line ------------------------------------------------------------------------


@pytest.mark.slow
def test_train_cli_sft_then_dpo_from_its_adapter(base: Path, records: Any,
                                                 tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from insightv_agents.cli import app

    build_reasoning_sft(records, mode="chain")[0].save_to_disk(str(tmp_path / "sft-data"))
    build_dpo_pairs(records)[0].save_to_disk(str(tmp_path / "dpo-data"))
    (tmp_path / "run.yaml").write_text("max_steps: 3\nlora_r: 8\nlogging_steps: 1\n"
                                       "learning_rate: 0.5\n")
    runner = CliRunner()
    sft = runner.invoke(app, ["train", "sft", "--model", str(base), "--data",
                              str(tmp_path / "sft-data"), "--output_dir", str(tmp_path / "sft"),
                              "--config", str(tmp_path / "run.yaml"), "--learning-rate", "1e-3"])
    assert sft.exit_code == 0, sft.output
    run = json.loads((tmp_path / "sft" / "insightv_training.json").read_text())
    assert run["settings"]["lora_r"] == 8 and run["settings"]["learning_rate"] == 1e-3
    assert run["settings"]["max_steps"] == 3
    dpo = runner.invoke(app, ["train", "dpo", "--model", str(tmp_path / "sft"), "--data",
                              str(tmp_path / "dpo-data"), "--output_dir", str(tmp_path / "dpo"),
                              "--max_steps", "2"])
    assert dpo.exit_code == 0, dpo.output
    assert (tmp_path / "dpo" / "adapter_model.safetensors").exists()
    bad = runner.invoke(app, ["train", "sft", "--model", str(base), "--data",
                              str(tmp_path / "sft-data"), "--output_dir", str(tmp_path / "x"),
                              "--finetune", "partial"])
    assert bad.exit_code == 2 and "finetune" in bad.output
    wrong = runner.invoke(app, ["train", "dpo", "--model", str(base), "--data",
                                str(tmp_path / "sft-data"), "--output_dir", str(tmp_path / "y")])
    assert wrong.exit_code == 2 and "chosen" in wrong.output


def test_train_iterate_cli_refuses_bad_input_before_any_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from insightv_agents.cli import app

    (tmp_path / "items.jsonl").write_text('{"image": "missing.png", "question": "q?", '
                                          '"answer": "1"}\n')
    result = CliRunner().invoke(app, ["train", "iterate", "--model", "m", "--input",
                                      str(tmp_path / "items.jsonl"), "--output_dir",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2 and "missing.png" in result.output
    result = CliRunner().invoke(app, ["train", "iterate", "--model", "m", "--input",
                                      str(tmp_path / "items.jsonl"), "--output_dir",
                                      str(tmp_path / "run"), "--sampler", "remote"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_sft_killed_mid_run_resumes_from_its_last_checkpoint(base: Path, records: Any,
                                                            tmp_path: Path) -> None:
    """SIGKILL the `insightv train sft` process as soon as a checkpoint is complete; the
    same command again continues from the newest complete checkpoint (its logged history
    carries over) to the end."""
    build_reasoning_sft(records, mode="chain")[0].save_to_disk(str(tmp_path / "data"))
    (tmp_path / "settings.json").write_text(json.dumps(
        {"max_steps": 60, "save_steps": 5, "logging_steps": 1, "finetune": "full"}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "insightv_agents.cli", "train", "sft", "--model",
               str(base), "--data", str(tmp_path / "data"), "--output_dir", str(out), "--config",
               str(tmp_path / "settings.json")]
    code = kill_once_written(command, out / "checkpoint-5" / "trainer_state.json")
    assert code == -signal.SIGKILL and not (out / "model.safetensors").exists()
    time.sleep(0.1)
    # Mark the newest complete checkpoint's history: only a resumed run carries it to its end.
    newest = max((p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()),
                 key=lambda p: int(p.name.split("-")[1]))
    saved = json.loads((newest / "trainer_state.json").read_text())
    saved["log_history"][0]["loss"] = 123.0
    (newest / "trainer_state.json").write_text(json.dumps(saved))
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    history = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())
    assert history["global_step"] == 60 and history["log_history"][0]["loss"] == 123.0
    assert (out / "model.safetensors").exists()


def test_resume_passes_over_a_checkpoint_cut_short(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()  # killed while saving: no trainer state yet
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"partial")
    assert checkpoint_to_resume(SFTConfig(output_dir=str(tmp_path))) == str(
        tmp_path / "checkpoint-4")
    assert checkpoint_to_resume(SFTConfig(output_dir=str(tmp_path), resume=False)) is None


def test_a_trained_output_names_its_base_by_path_or_hub_id(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A local base by its absolute path (the adapter then loads from anywhere); a hub id
    as it is, not as a folder of the working directory."""
    from insightv_agents.trained import model_name

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_name("base") == str((tmp_path / "base").resolve())
    assert model_name("HuggingFaceTB/SmolVLM-256M-Instruct") == (
        "HuggingFaceTB/SmolVLM-256M-Instruct")
