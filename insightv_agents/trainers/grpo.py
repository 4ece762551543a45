"""GRPO of either agent (Insight-V++'s online RL) with TRL's ``GRPOTrainer``.

The reasoning agent is trained in chain mode on questions (:func:`reasoning_grpo_dataset`:
the synthesis input format), rewarded by :mod:`~insightv_agents.trainers.rewards` (the
stated answer, the format, optionally a path scorer); the summary agent is trained as a
judge on chains written by a reasoning agent (:func:`judge_grpo_dataset`: right and flawed
ones from a synthesis output), rewarded for a verdict that matches the chain and a right
answer. TRL's loss variants are chosen with ``loss_type`` (``grpo``, ``dr_grpo``, ``dapo``,
``bnpo``, ``cispo``, ...).

Rollouts come from TRL's own generation in-process, or (:class:`VLLMRollouts`) from a vLLM
server that loads the policy's current LoRA adapter at each step, as iterative DPO's vLLM
sampler does, through TRL's ``rollout_func`` hook. Every logged step writes its rollouts,
rewards and advantages to ``<output_dir>/completions/completions_<step>.parquet`` (TRL's
``log_completions``; images are left out).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import trl

from insightv_agents.answers import DEFAULT_RULES, AnswerRules
from insightv_agents.cards import AgentCard, Role, read_card
from insightv_agents.errors import BackendError, ConfigError, InvalidInputError
from insightv_agents.formats import FormatProfile, card_profile, format_profile
from insightv_agents.prompts import Prompts, format_question, summary_messages
from insightv_agents.trainers.common import (
    AgentTraining,
    check_config,
    checkpoint_to_resume,
    load_dataset_arg,
    load_for_training,
    option,
    output_card,
    save_output,
)
from insightv_agents.trainers.data import (
    IMAGE_PLACEHOLDER,
    Records,
    reasoning_prompt,
    to_trl_messages,
)
from insightv_agents.trainers.rewards import Agent, default_rewards
from insightv_agents.trainers.sft import TrainResult

GRPO_DEFAULTS: dict[str, tuple[float, float]] = {"full": (1e-6, 1), "lora": (1e-5, 1)}


@dataclass
class GRPOConfig(AgentTraining, trl.GRPOConfig):  # type: ignore[misc]
    """TRL's ``GRPOConfig`` for training either agent: the fields of
    :class:`~insightv_agents.trainers.common.AgentTraining`, ``agent`` (which one), and
    every GRPO option of TRL's (``num_generations``, ``loss_type``, ``beta``,
    ``scale_rewards``, ``reward_weights``, ``temperature``, ``max_completion_length``, ...).

    Changed defaults: batches of 8 completions per device (one question's group of
    ``num_generations`` = 8), 512 new tokens per completion, the learning rate 1e-5 for LoRA
    and 1e-6 for full fine-tuning, and ``log_completions`` on (each logged step's rollouts,
    rewards and advantages in ``<output_dir>/completions/``), none printed.
    """

    agent: Agent = option("reasoning", "reasoning (chains rewarded for answer and format) or "
                                      "summary (the judge: verdict and answer).")
    per_device_train_batch_size: int = option(8, "Completions per device and step (a "
                                                 "multiple of num_generations overall).")
    max_completion_length: int | None = option(512, "Most new tokens per completion.")
    log_completions: bool = option(True, "Write each logged step's rollouts, rewards and "
                                         "advantages to <output_dir>/completions/.")
    num_completions_to_print: int | None = option(0, "Completions printed per logged step.")

    def __post_init__(self) -> None:
        if self.agent not in ("reasoning", "summary"):
            raise ConfigError("invalid GRPOConfig: agent must be reasoning or summary.")
        rate, epochs = GRPO_DEFAULTS.get(self.finetune, (None, None))
        if self.learning_rate is None:
            self.learning_rate = rate
        if self.num_train_epochs is None:
            self.num_train_epochs = epochs
        super().__post_init__()

    def changed(self, **changes: Any) -> Self:
        """A copy of this config with ``changes`` (checked again; the generation batch size
        is derived again from ``steps_per_generation``, which TRL derived from it)."""
        return replace(self, generation_batch_size=None, **changes)


# --- datasets --------------------------------------------------------------------------------


def reasoning_grpo_dataset(items: str | Path, *, prompts: Prompts | None = None,
                           limit: int | None = None) -> Any:
    """The reasoning agent's GRPO prompts for the questions in ``items`` (the synthesis
    input format: image, question, answer[, id, choices]): the chain-mode opening turn, and
    the ``image``, ``question``, ``answer``, ``choices`` and ``id`` columns the rewards read.

    Raises:
        InvalidInputError: for bad items (every one is checked first).
    """
    from insightv_agents.synthesize import load_items

    profile = format_profile(mode="chain", prompts=prompts)
    loaded, _ = load_items(items, limit=limit)
    rows = []
    for item in loaded:
        question = format_question(item.question, item.choices, profile.prompts)
        messages = reasoning_prompt({"question": item.question, "choices": item.choices},
                                    "chain", profile.prompts)
        rows.append({"id": item.id, "prompt": to_trl_messages(messages),
                     "image": item.image_bytes(), "question": question,
                     "answer": item.answer, "choices": item.choices})
    return _dataset(rows)


def judge_grpo_dataset(records: Records, *, prompts: Prompts | None = None,
                       profile: FormatProfile | str | None = None, balance: bool = True,
                       limit: int | None = None, seed: int = 0) -> Any:
    """The summary agent's GRPO prompts: for each usable path in ``records`` (a synthesis
    output written by a reasoning agent, or by a teacher that writes flawed paths on
    purpose), the summary agent's turn on that chain, with ``chain_correct`` (whether the
    path's answer was right) and the ``answer``/``choices``/``question``/``id`` columns.
    Paths whose correctness is undecided are left out; with ``balance``, as many right as
    flawed chains are drawn (at random, by ``seed``), so that always saying "correct" does
    not pay.

    Raises:
        InvalidInputError: when no usable right or flawed chain is left.
    """
    chosen = format_profile(profile, prompts=prompts) if profile is not None \
        else format_profile(mode="chain", prompts=prompts)
    right: list[dict[str, Any]] = []
    flawed: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}  # a question's paths share their image: read it once
    for identifier, paths in records.questions.items():
        for path in paths:
            correct = path.get("correct")
            if path["status"] != "ok" or not path["steps"] or correct is None:
                continue
            question = format_question(path["question"], path.get("choices"), chosen.prompts)
            messages = summary_messages(prompts=chosen.prompts, question=question,
                                        images=[IMAGE_PLACEHOLDER], steps=path["steps"],
                                        render=chosen.render_reasoning)
            row = {"id": f"{identifier}/{path['path_index']}",
                   "prompt": to_trl_messages(messages),
                   "image": _read_once(images, records.image(path)), "question": question,
                   "answer": path["answer"], "choices": path.get("choices"),
                   "chain_correct": bool(correct)}
            (right if correct else flawed).append(row)
    if balance:
        if not right or not flawed:
            raise InvalidInputError(f"a balanced judge set needs right and flawed chains; "
                                    f"found {len(right)} right, {len(flawed)} flawed.",
                                    field="from")
        rng = random.Random(seed)
        count = min(len(right), len(flawed))
        right, flawed = rng.sample(right, count), rng.sample(flawed, count)
    rows = [row for pair in zip(right, flawed, strict=False) for row in pair] if balance \
        else right + flawed
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise InvalidInputError("no usable chain with a decided answer in the records.",
                                field="from")
    return _dataset(rows)


def _read_once(cache: dict[str, bytes], path: str) -> bytes:
    if path not in cache:
        cache[path] = Path(path).read_bytes()
    return cache[path]


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())


# --- rollouts from a vLLM server -------------------------------------------------------------


@dataclass
class VLLMRollouts:
    """Rollouts from a running vLLM server (:class:`~insightv_agents.backends.vllm.
    VLLMServer` started on the base model with ``runtime_lora=True``), for TRL's
    ``rollout_func``: at each new training step the policy's current LoRA adapter is saved
    to ``<output_dir>/rollout-adapter/`` and loaded into the server by name, then each
    question's group is sampled in one request (``n`` completions) with the trainer's
    ``temperature``, ``top_p`` and ``max_completion_length``, seeded by
    :func:`rollout_seed`; token ids and log-probabilities come back (TRL corrects for the gap
    between the server's and the trainer's probabilities with its importance sampling).
    Needs LoRA (``finetune="lora"``).

    Args:
        server: the vLLM server.
        concurrency: requests at once.
        timeout: seconds per request.
    """

    server: Any
    concurrency: int = 16
    timeout: float = 600.0
    _step: int = field(default=-1, init=False, repr=False)
    _name: str = field(default="", init=False, repr=False)
    _calls: int = field(default=0, init=False, repr=False)

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        name = self._sync(trainer)
        self._calls += 1
        call = (trainer.args.seed, self._step, trainer.accelerator.process_index, self._calls)
        image_token = getattr(trainer.accelerator.unwrap_model(trainer.model).config,
                              "image_token_id", None)
        groups: list[list[int]] = []
        for index, prompt in enumerate(prompts):
            if groups and prompts[groups[-1][0]] == prompt:
                groups[-1].append(index)
            else:
                groups.append([index])

        def sample(number: int, group: list[int]) -> list[tuple[list[int], list[float]]]:
            return self._sample(name, prompts[group[0]], len(group), trainer.args,
                                image_token, seed=rollout_seed(*call, number))

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            replies = list(pool.map(sample, range(len(groups)), groups))
        prompt_ids: list[list[int]] = []
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        for group, choices in zip(groups, replies, strict=True):
            encoded = _prompt_ids(trainer.processing_class, prompts[group[0]])
            for tokens, probabilities in choices:
                prompt_ids.append(encoded)
                completion_ids.append(tokens)
                logprobs.append(probabilities)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": logprobs}

    def _sync(self, trainer: Any) -> str:
        """Load the policy's adapter of the current step into the server (main process)."""
        step = trainer.state.global_step
        if step == self._step:
            return self._name
        name = f"policy-step-{step}"
        if trainer.accelerator.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model)
            if not hasattr(model, "peft_config"):
                raise ConfigError("VLLMRollouts needs a LoRA policy (finetune='lora'): the "
                                  "server loads its adapter, not full weights.")
            folder = Path(str(trainer.args.output_dir)) / "rollout-adapter" / name
            model.save_pretrained(str(folder), safe_serialization=True)
            self.server.load_adapter(name, folder)
            if self._name and self._name in self.server.adapters:
                previous = Path(self.server.adapters[self._name])
                self.server.unload_adapter(self._name)
                shutil.rmtree(previous, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        self._step, self._name = step, name
        return name

    def _sample(self, name: str, prompt: list[dict[str, Any]], count: int, args: Any,
                image_token: int | None, *, seed: int
                ) -> list[tuple[list[int], list[float]]]:
        import httpx

        body: dict[str, Any] = {
            "model": name, "messages": _openai_messages(prompt), "n": count,
            "temperature": args.temperature, "top_p": args.top_p,
            "max_tokens": args.max_completion_length, "logprobs": True,
            "return_token_ids": True, "skip_special_tokens": False, "seed": seed}
        if args.top_k:
            body["top_k"] = args.top_k
        if image_token is not None:  # a sampled image token would not match the image features
            body["logit_bias"] = {str(image_token): -100}
        try:
            response = httpx.post(f"{self.server.base_url}/chat/completions", json=body,
                                  timeout=self.timeout)
            response.raise_for_status()
            reply = response.json()
        except httpx.HTTPError as err:
            raise BackendError(f"rollouts from the vLLM server failed: {err}") from err
        choices = sorted(reply["choices"], key=lambda choice: choice["index"])
        return [
            (list(choice["token_ids"]),
             [float(entry["logprob"]) for entry in (choice.get("logprobs") or {})
              .get("content") or []])
            for choice in choices]


def rollout_seed(*parts: int) -> int:
    """The sampling seed of one group's request (31 bits), a hash of ``parts`` (the run's
    seed, the step, the process, the call, the group): a rerun samples the same rollouts
    whatever order the requests run in, and no two requests share seeds (vLLM gives the
    k-th completion of a request the seed plus k, so seeds one apart would repeat them)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") >> 1


def _openai_messages(prompt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL's conversational prompt (images inlined by TRL) as OpenAI chat messages."""
    from insightv_agents.images import load_images

    messages = []
    for message in prompt:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    parts.append({"type": "image_url",
                                  "image_url": {"url": load_images(part["image"])[0]}})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part["text"]})
            content = parts
        messages.append({"role": message["role"], "content": content})
    return messages


def _prompt_ids(processor: Any, prompt: list[dict[str, Any]]) -> list[int]:
    """The prompt's token ids as the trainer's processor makes them (image tokens
    expanded), so that the forward pass matches the image features."""
    images = [part["image"] for message in prompt if isinstance(message["content"], list)
              for part in message["content"] if part.get("type") == "image"]
    text = trl.apply_chat_template({"prompt": prompt}, processor)["prompt"]
    encoded = processor(text=[text], images=[images] if images else None)
    return list(encoded["input_ids"][0])


# --- training --------------------------------------------------------------------------------


def train_grpo(model: str | Path, dataset: Any, config: GRPOConfig | dict[str, Any], *,
               rewards: Sequence[Any] | None = None,
               rollouts: VLLMRollouts | None = None, adapter: str | Path | None = None,
               eval_dataset: Any = None, callbacks: list[Any] | None = None,
               card: AgentCard | None = None, rules: AnswerRules | None = None
               ) -> TrainResult:
    """Train ``model`` (a base model, a full model output, or an adapter output, trained
    further) with GRPO on ``dataset`` (:func:`reasoning_grpo_dataset` or
    :func:`judge_grpo_dataset`, or a folder saved from one).

    Args:
        rewards: the reward functions (default: :func:`~insightv_agents.trainers.rewards.
            default_rewards` for ``config.agent``, in the model's format profile, with its
            card's answer rules); their ``weight`` attributes become TRL's
            ``reward_weights`` unless the config gives them.
        rollouts: :class:`VLLMRollouts` to sample from a vLLM server (default: TRL's own
            generation, in-process).
        card: the output's agent card (default: the starting model's, in the role trained).
        rules: the answer rules of the default rewards (default: the card's, else ours).

    Raises:
        ConfigError: for an invalid config, rewards or rollouts; InvalidInputError: for a
            missing or empty dataset.
    """
    config = check_config(config, GRPOConfig)
    data = load_dataset_arg(dataset)
    needed = ["prompt", "answer"] + (["chain_correct"] if config.agent == "summary" else [])
    missing = [name for name in needed if name not in data.column_names]
    if missing:
        raise ConfigError(f"GRPO of the {config.agent} agent needs {', '.join(needed)} "
                          f"columns; missing {', '.join(missing)} (see "
                          f"{'judge' if config.agent == 'summary' else 'reasoning'}"
                          "_grpo_dataset).")
    if rollouts is not None and config.finetune != "lora":
        raise ConfigError("vLLM rollouts need finetune='lora' (the server loads the "
                          "policy's adapter at each step).")
    started_card = card or read_card(adapter) or read_card(model)
    profile = card_profile(started_card, mode="chain" if config.agent == "reasoning" else None)
    rules = rules or AnswerRules.from_card(started_card) or DEFAULT_RULES
    chosen: list[Any] = list(rewards) if rewards is not None else default_rewards(
        config.agent, profile=profile, rules=rules)
    if not chosen or not all(callable(reward) for reward in chosen):
        raise ConfigError("rewards must be one or more reward functions.")
    if config.reward_weights is None:
        config = config.changed(reward_weights=[float(getattr(reward, "weight", 1.0))
                                                for reward in chosen])
    loaded = load_for_training(model, config, adapter=adapter)
    eval_data = load_dataset_arg(eval_dataset) if eval_dataset is not None else None
    if rollouts is not None:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is documented
    trainer = trl.GRPOTrainer(model=loaded.model, reward_funcs=chosen, args=config,
                              train_dataset=data, eval_dataset=eval_data,
                              processing_class=loaded.processor,
                              peft_config=loaded.peft_config, callbacks=callbacks,
                              rollout_func=rollouts)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint_to_resume(config))
    metrics = {**output.metrics, "train_loss": output.training_loss,
               "wall_seconds": round(time.perf_counter() - started, 3), "prompts": len(data)}
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    if logged:
        metrics["first_logged_reward"] = logged[0]["reward"]
        metrics["last_logged_reward"] = logged[-1]["reward"]
    if rollouts is not None:
        shutil.rmtree(Path(str(config.output_dir)) / "rollout-adapter", ignore_errors=True)
    role: Role = config.agent
    out = save_output(trainer, loaded, config, "grpo", metrics,
                      {"agent": role, "rewards": [getattr(reward, "__name__", repr(reward))
                                                  for reward in chosen],
                       "rollouts": "vllm" if rollouts is not None else "trl"},
                      output_card(role, card=card, sources=[loaded.adapter, model],
                                  profile=profile.name, dtype=config.dtype))
    return TrainResult(output_dir=out, adapter=config.finetune == "lora",
                       base_model=loaded.base, metrics=metrics)

