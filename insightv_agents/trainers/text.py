"""Text-only pre-training of a model trained from scratch: span-copy sequences, the spans
separated by windows of the texts the model will read and write (and, optionally, plain
windows of those texts).

A small transformer trained from scratch only on a few hundred SFT steps does not learn to
copy a span it saw earlier by its content (an induction circuit): it cannot restate the
question it was asked, nor fetch what its own description said of a cell. Large models bring
that from pre-training; this stage gives it to a tiny one on short text-only sequences,
before any image is seen. A copy sequence repeats each span (random tokens, or windows of the
texts) after a stretch of text, so only a copy of the first occurrence predicts the second.
The run file's ``copy_accuracy`` measures exactly that on held-out random spans, and
``far_copy_accuracy`` on spans copied from up to ~400 tokens back.

Copying appears abruptly and late in training, near copying before far copying, and not
always in time: ``long_steps``, ``far_copy_target`` and ``near_copy_target`` are there for
that, and :func:`measure_copying` says what a later stage keeps of it. What was measured on
the shapes world is in the research pages (``research/docs/text-pretraining.md``).

The output is a full model with its processor, like the other trainers' full fine-tunes,
marked finished by its run file (``insightv_training.json``), written last.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from insightv_agents.errors import InvalidInputError
from insightv_agents.trained import TRAINING_FILE, check_remote_code
from insightv_agents.trainers.common import finished_run, write_atomic

FAR_SEQ_LEN = 512
"""Length of the held-out sequences whose spans are copied from far back (up to ~400 tokens)."""


class TextPretrainSettings(BaseModel):
    """How long and on what the text pre-training runs.

    Args:
        output_dir: where the model goes (skipped when a finished run is already there).
        steps, batch_size, seq_len: optimiser steps, sequences per step, tokens per sequence.
        long_steps: the last steps (all, when more) train on 512-token sequences (as many
            tokens per step; spans twice as long, copied from up to ~400 tokens back):
            copying learnt on short sequences does not reach that far.
        far_copy_target: when set, the long phase goes on until far copying is learnt: where
            the learning rate would start to decay, the held-out ``far_copy_accuracy`` is
            measured, and while it is below the target the long phase runs ``log_every``
            more steps at the full rate (measured again after each), up to
            ``max_long_steps`` long steps in all; then the decay. Far copying, like near
            copying, appears abruptly and at an unpredictable step; a fixed ``long_steps``
            can end before it does.
        max_long_steps: the cap on the whole long phase (decay included) with
            ``far_copy_target`` (at least ``long_steps``). The run file records the steps
            run and the extra long steps.
        near_copy_target: when set, the long phase starts only once near copying is learnt:
            where it would start, the held-out ``copy_accuracy`` is measured, and while it is
            below the target the short phase runs ``log_every`` more steps (the long phase
            and the decay move on with it), up to ``max_short_steps`` short steps in all.
            Long sequences do not teach near copying, and can take away what there was.
        max_short_steps: the cap on the short phase with ``near_copy_target``. The run file
            records the extra short steps.
        learning_rate, warmup_steps: AdamW: linear warm-up, constant, then a linear decay to
            10% over the last tenth of the steps.
        copy_share: the share of sequences that are span-copy sequences (the rest are
            windows of the texts).
        random_share: the share of copied spans that are random tokens (the rest are
            windows of the texts).
        min_span, max_span: length of a copied span, in tokens.
        max_gap: the most text tokens between a span and its copy.
        log_every: steps between log lines (training loss and held-out copy accuracy).
        dtype: ``"bf16-mixed"`` computes the training steps in bfloat16 (autocast; the
            weights stay float32), on a GPU or a CPU with native bfloat16
            (:func:`~insightv_agents.trainers.common.native_bf16`).
        seed: seeds the sequences and the run.
    """

    model_config = ConfigDict(extra="forbid")

    output_dir: Path
    steps: int = Field(3000, ge=1)
    long_steps: int = Field(400, ge=0)
    far_copy_target: float | None = Field(None, gt=0, le=1)
    max_long_steps: int = Field(1200, ge=1)
    near_copy_target: float | None = Field(None, gt=0, le=1)
    max_short_steps: int = Field(6000, ge=0)
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(64, ge=32)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    copy_share: float = Field(1.0, ge=0, le=1)
    random_share: float = Field(1.0, ge=0, le=1)
    min_span: int = Field(4, ge=2)
    max_span: int = Field(12, ge=2)
    max_gap: int = Field(8, ge=0)
    log_every: int = Field(100, ge=1)
    dtype: Literal["float32", "bf16-mixed"] = "float32"
    seed: int = 0

    @model_validator(mode="after")
    def _check_long_phase(self) -> TextPretrainSettings:
        long = min(self.long_steps, self.steps)
        if self.far_copy_target is not None and long < max(1, self.steps // 10):
            raise ValueError("far_copy_target extends the long phase where the learning rate "
                             "would start to decay: long_steps must cover the last tenth of "
                             f"the steps ({max(1, self.steps // 10)}), not {self.long_steps}.")
        if self.far_copy_target is not None and self.max_long_steps < long:
            raise ValueError(f"max_long_steps ({self.max_long_steps}) is less than long_steps "
                             f"({long}).")
        if self.near_copy_target is not None and self.max_short_steps < self.steps - long:
            raise ValueError(f"max_short_steps ({self.max_short_steps}) is less than the short "
                             f"steps planned ({self.steps - long}).")
        if self.near_copy_target is not None and self.steps <= long:
            raise ValueError("near_copy_target starts the long phase once near copying is "
                             "there: it needs a short phase (long_steps < steps).")
        return self


class _Sequences:
    """Draws training sequences: windows of the texts, or span-copy sequences."""

    def __init__(self, texts: list[list[int]], vocab: Sequence[int], settings: TextPretrainSettings,
                 seed: int) -> None:
        self.texts = [ids for ids in texts if ids]
        self.vocab = list(vocab)
        self.s = settings
        self.rng = random.Random(seed)

    def window(self, length: int) -> list[int]:
        out: list[int] = []
        while len(out) < length:
            ids = self.rng.choice(self.texts)
            start = self.rng.randrange(max(1, len(ids) - (length - len(out)) + 1))
            out += ids[start:start + length - len(out)]
        return out

    def text(self) -> tuple[list[int], list[bool]]:
        return self.window(self.s.seq_len), [False] * self.s.seq_len

    def copy(self, random_share: float = 0.5) -> tuple[list[int], list[bool]]:
        """Spans (random tokens with probability ``random_share``, else windows of the
        texts), each followed by other text and then by itself; ``copied`` marks the tokens
        of each repeat after its first (a random span's are predictable only by copying)."""
        s = self.s
        ids: list[int] = []
        copied: list[bool] = []
        while len(ids) < s.seq_len:
            k = self.rng.randint(s.min_span, s.max_span)
            span = ([self.rng.choice(self.vocab) for _ in range(k)]
                    if self.rng.random() < random_share else self.window(k))
            gap = self.window(self.rng.randint(0, s.max_gap)) if s.max_gap else []
            ids += span + gap + span
            copied += [False] * (k + len(gap)) + [False] + [True] * (k - 1)
        return ids[:s.seq_len], copied[:s.seq_len]

    def batch(self, size: int) -> list[list[int]]:
        """``size`` training sequences: copy sequences with probability ``copy_share``."""
        return [(self.copy(self.s.random_share) if self.rng.random() < self.s.copy_share
                 else self.text())[0] for _ in range(size)]


def pretrain_text(model: str | Path, texts: Sequence[str], settings: TextPretrainSettings, *,
                  log: Callable[[str], None] = print, trust_remote_code: bool = False
                  ) -> Path:
    """Pre-train ``model``'s language part on ``texts`` and span-copy sequences; save the
    whole model (vision tower unchanged) with its processor in ``settings.output_dir``.

    Returns the output folder. Runs on the GPU when there is one. A finished run in the
    folder is kept as it is (the stage is skipped).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = Path(settings.output_dir)
    if finished_run(out):
        return out
    if not texts:
        raise InvalidInputError("pretrain_text needs at least one text.")
    check_remote_code(model, trust_remote_code)
    processor = AutoProcessor.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    tokenizer = processor.tokenizer
    net: Any = AutoModelForImageTextToText.from_pretrained(str(model), dtype=torch.float32,
                                                      trust_remote_code=trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device).train()
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    far = _far(settings)
    short, long = (_Sequences(encoded, vocab, settings, settings.seed),
                   _Sequences(encoded, vocab, far, settings.seed + 3))
    probe_rows = _probe_rows(encoded, vocab, settings)

    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate,
                                  weight_decay=0.01, betas=(0.9, 0.98))

    decay_len = max(1, settings.steps // 10)
    long_start = max(0, settings.steps - settings.long_steps)  # moved on while near copying
    planned_long_start = long_start                            # is not there yet
    decay_start = settings.steps - decay_len  # moved on while far copying is not there yet

    def factor(step: int) -> float:
        """Warm-up, then constant (copying appears abruptly, late: a decaying rate delays
        it), then a linear decay to 10% over the last tenth."""
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        left = (decay_start + decay_len - step) / decay_len
        return 0.1 + 0.9 * min(1.0, left)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    started, losses = time.perf_counter(), []
    history: list[dict[str, Any]] = []
    def accuracy_now(name: str) -> float:
        """A held-out copy accuracy at this step: the log line's, if it measured one here."""
        if history and history[-1]["step"] == step:
            return float(history[-1][name])
        return _copy_accuracy(net, probe_rows[name])

    step, target, near_target = 0, settings.far_copy_target, settings.near_copy_target
    while step < decay_start + decay_len:
        if (near_target is not None and step == long_start
                and step + settings.log_every <= settings.max_short_steps):
            near_now = accuracy_now("copy_accuracy")
            if near_now < near_target:
                long_start += settings.log_every
                decay_start += settings.log_every
                log(f"  text step {step}: copy accuracy {near_now:.4f} is below "
                    f"{near_target}: {settings.log_every} more short steps")
        if (target is not None and step == decay_start
                and step - long_start + settings.log_every + decay_len
                <= settings.max_long_steps):
            far_now = accuracy_now("far_copy_accuracy")
            if far_now < target:
                decay_start += settings.log_every
                log(f"  text step {step}: far copy accuracy {far_now:.4f} is below {target}: "
                    f"{settings.log_every} more long steps")
        ids = (long.batch(far.batch_size) if step >= long_start
               else short.batch(settings.batch_size))
        batch = torch.tensor(ids, device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=settings.dtype == "bf16-mixed"):
            loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % settings.log_every == 0 or step == decay_start + decay_len:
            entry = {"step": step, "loss": round(sum(losses) / len(losses), 4),
                     **{name: round(_copy_accuracy(net, rows), 4)
                        for name, rows in probe_rows.items()},
                     "seconds": round(time.perf_counter() - started, 1)}
            history.append(entry)
            losses = []
            log(f"  text step {entry['step']}: loss {entry['loss']}, copy accuracy "
                f"{entry['copy_accuracy']} (far apart: {entry['far_copy_accuracy']})")

    extra_short = long_start - planned_long_start
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    net.eval().to("cpu").save_pretrained(str(staging), safe_serialization=True)
    processor.save_pretrained(str(staging))
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    write_atomic(out / TRAINING_FILE, json.dumps({
        "kind": "text-pretrain", "base_model": str(model),
        "settings": json.loads(settings.model_dump_json()), "texts": len(texts),
        "steps": step, "extra_short_steps": extra_short,
        "extra_long_steps": step - settings.steps - extra_short,
        "metrics": history[-1] if history else {}, "log_history": history}, indent=2))
    return out


def measure_copying(model: str | Path, texts: Sequence[str],
                    settings: TextPretrainSettings | None = None, *,
                    trust_remote_code: bool = False) -> dict[str, float]:
    """The text pre-training's held-out copy accuracy (``copy_accuracy``: short sequences;
    ``far_copy_accuracy``: 512 tokens) of any saved model: how much copying a later stage
    (the caption pre-training, an SFT, DPO) kept. ``texts`` fill the gaps between the spans
    (random tokens of the model's vocabulary); ``settings`` (default: the defaults) set the
    lengths and the seed, so the text stage's own settings and texts give its last log line."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    if not texts:
        raise InvalidInputError("measure_copying needs at least one text.")
    check_remote_code(model, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    net: Any = AutoModelForImageTextToText.from_pretrained(str(model), dtype=torch.float32,
                                                      trust_remote_code=trust_remote_code)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    settings = settings or TextPretrainSettings(output_dir=Path(model))
    return {name: round(_copy_accuracy(net, rows), 4)
            for name, rows in _probe_rows(encoded, vocab, settings).items()}


def _far(settings: TextPretrainSettings) -> TextPretrainSettings:
    """The long sequences (as many tokens per batch) whose spans are copied from far back:
    the agents copy across hundreds of tokens (from the question, from their description)."""
    return settings.model_copy(update={
        "seq_len": FAR_SEQ_LEN, "batch_size": max(1, settings.batch_size * settings.seq_len
                                                   // FAR_SEQ_LEN),
        "max_span": 2 * settings.max_span, "max_gap": FAR_SEQ_LEN - 112})


def _probe_rows(encoded: list[list[int]], vocab: Sequence[int], settings: TextPretrainSettings
                ) -> dict[str, list[tuple[list[int], list[bool]]]]:
    """The held-out copy sequences (random spans), near and far, seeded apart from training."""
    probes = {"copy_accuracy": _Sequences(encoded, vocab, settings, settings.seed + 1),
              "far_copy_accuracy": _Sequences(encoded, vocab, _far(settings), settings.seed + 2)}
    return {name: [held.copy(random_share=1.0) for _ in range(16)]
            for name, held in probes.items()}


def _copy_accuracy(net: Any, rows: list[tuple[list[int], list[bool]]]) -> float:
    """The share of the copied tokens (after each repeat's first) predicted greedily."""
    import torch

    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    with torch.no_grad():
        ids = torch.tensor([r[0] for r in rows], device=device)
        mask = torch.tensor([r[1] for r in rows], device=device)[:, 1:]
        guess = net(input_ids=ids).logits[:, :-1].argmax(-1)
        right = (guess == ids[:, 1:]) & mask
    net.train(was_training)
    return float(right.sum() / mask.sum())


__all__ = ["TextPretrainSettings", "measure_copying", "pretrain_text"]
