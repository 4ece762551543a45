"""The paper's comparison at small scale, from nothing, in the shapes world (``make reproduce``).

Every model starts from the same randomly initialised tiny Idefics3 and the same pre-training:
each training image described cell by cell (``base``, LLaVA's alignment stage), optionally
after text-only pre-training (``text_steps``: the run's texts and span copies, so that the
model can copy what it read, :mod:`~insightv_agents.trainers.text`; off by default). Then:

- **(a) direct**: trained on direct answers
  (:func:`~insightv_agents.trainers.data.build_direct_sft`);
- **(b) chain**: the reasoning agent alone, trained on the long chains (which end on the
  answer), its answer read from the last step;
- **(c) insightv**: the reasoning agent + the summary agent (trained on the mix of optimal
  and flawed paths);
- **(d) / (e)**: (c) with the reasoning agent after one / all rounds of iterative DPO, each
  round sampling from the current model through the synthesis graph, scored by the scene;
- **(f) stages / stage-beam**: a LLaVA-CoT four-stage model, alone and with stage-level
  beam search, the model judging its own candidates (its training set also teaches it the
  pairwise judgement: :func:`~insightv_agents.trainers.data.build_stage_judge_sft`).

The data: the teacher (:class:`~insightv_research.shapes.teacher.SceneTeacher`) writes several
paths per question through the library's synthesis graph, some flawed, and the scene scorer
scores them; the library's builders, trainers and iterative DPO do the rest, unchanged.
Each stage writes into ``out`` and is skipped when already done, so an interrupted run
resumes. The results (``results.json``, ``results.md``, ``results.svg``) cover the held-out
test split, with the wall time of every stage and the machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from insightv_agents.cards import AgentCard, Sampling
from insightv_agents.prompts import Prompts, StagePrompts
from insightv_agents.trainers.common import write_atomic
from insightv_agents.trainers.data import SummaryMix
from insightv_agents.trainers.text import TextPretrainSettings
from insightv_research.shapes.captions import CaptionAccuracy
from insightv_research.shapes.dataset import DATASET_FILE, make_dataset
from insightv_research.shapes.questions import ANSWER_RULES, CATEGORIES
from insightv_research.shapes.scenes import CELL_TAGS, SceneIndex, describe_grid

CAPTION_REQUEST = "List the shapes in the image."
CAPTION_PROBE = 20  # held-out pictures the caption probe describes
CAPTION_PROBE_FILE = "caption-probe.json"
# The tiny models read the picture by position: what they write about it must come right
# after it. So the agents' user turns put it after the question, and a path's first step
# (the grid description) follows it as the caption follows the picture in pre-training.
# No system prompts: they teach an untrained model the format, which the agents learn from
# their training rows, and the default ones were a third of every row (~290 tokens) and
# stood between the question and the reasoning that has to read it. The summary agent's
# turn puts the question after the chain, right before the picture and its verdict: a
# question hundreds of tokens back is one the tiny model cannot reach (with the question
# first it answered "no" to 47 of 60 test questions and (c) scored 15.0%; after: 23, 33.3%).
PROMPTS = Prompts(images_after_text=True, reasoning_chain_system="", summary_system="",
                  summary_user="Reasoning process:\n{reasoning}\n\nQuestion: {question}")
# A model trained on four-stage data needs no format instruction.
STAGE_PROMPTS = StagePrompts(system="", images_after_text=True)
SYSTEMS: dict[str, str] = {
    "a-direct": "(a) direct answers",
    "b-chain": "(b) long chains, one model",
    "c-insightv": "(c) reasoning + summary agents",
    "d-dpo-1": "(d) (c) + 1 DPO round",
    "e-dpo-3": "(e) (c) + iterative DPO",
    "f-stages": "(f) LLaVA-CoT stages",
    "f-stage-beam": "(f) + stage-level beam search",
    "g-grpo": "(g) (c) + GRPO",
    "h-loop": "(h) (c) + self-improving loop",
}
OPTIMAL_ONLY = SummaryMix(optimal=1, flawed=0, self_made=0, qa=0)
RESULTS_FILE = "results.json"
TRAINED = ("direct", "reasoner", "summary", "stages")  # the SFT runs, in order
# The training sets of the two agents, by their dataset kind: saved with an agent card in the
# run's prompts, which the agents trained on them carry (and whatever loads them then uses).
AGENT_SETS = {"reasoner": "sft-reason", "summary": "sft-summary"}
MULTI_STEP = tuple(c for c in CATEGORIES if c != "perception")
# The goals as paired comparisons: (first, second, the questions compared, in words;
# None: all of them).
PAIRS: tuple[tuple[str, str, tuple[str, ...] | None, str], ...] = (
    ("c-insightv", "a-direct", MULTI_STEP, "multi-step"),
    ("c-insightv", "b-chain", MULTI_STEP, "multi-step"),
    ("d-dpo-1", "c-insightv", None, "all"),
    ("e-dpo-3", "d-dpo-1", None, "all"),
    ("e-dpo-3", "c-insightv", None, "all"),
    ("c-insightv", "a-direct", ("perception",), "perception"),
    ("f-stage-beam", "f-stages", None, "all"),
    ("g-grpo", "c-insightv", None, "all"),
    ("g-grpo", "e-dpo-3", None, "all"),
    ("h-loop", "c-insightv", None, "all"),
    ("h-loop", "e-dpo-3", None, "all"),
)
# The reinforcement-learned reasoning agents against (c)'s and (e)'s on what their chains
# stated, whatever the summary agents answered (on all questions).
CHAIN_PAIRS: tuple[tuple[str, str], ...] = (
    ("e-dpo-3", "c-insightv"), ("g-grpo", "c-insightv"), ("g-grpo", "e-dpo-3"),
    ("h-loop", "c-insightv"), ("h-loop", "e-dpo-3"),
)
CHAINS = "all, chains' answers"
# The stages that make models (``timings.json`` keys): everything but the data and the eval.
TRAINING_STAGES = ("text", "base", "sft", "reasoner samples", "iterative", "grpo", "loop")


def dpo_losses(sft_weight: float) -> dict[str, Any]:
    """TRL's DPO ``loss_type`` / ``loss_weights`` for an NLL term of ``sft_weight`` (none: 0)."""
    if not sft_weight:
        return {}
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}


class ReproduceSettings(BaseModel):
    """The reproduction's settings (``timings.json`` records what each stage took). The runs
    that chose each default are in the research docs (``settings.md``).

    Args:
        out: the run's folder.
        seed: seeds the dataset, the teacher and every training run.
        train, dpo, test: questions in the training split (synthesis), sampled by each DPO
            round (fresh ones every round: the dpo split holds ``rounds`` x ``dpo``), and in
            the held-out test split (each split drawn from its own seeded generator, so the
            first questions of a bigger split are those of a smaller one).
        paths, flaw_rate: paths the teacher writes per question, and the share with flaws.
        plan_step: the teacher's paths state their plan as their second step
            (:func:`~insightv_research.shapes.reasoning.with_plan_step`).
        plan_first: the plan step comes first, right after the picture and the question,
            before the description (with ``plan_step``).
        vocab_size: the tokenizer's size (trained on the run's texts).
        text_steps: steps of text-only pre-training before the images (the run's texts and
            span-copy sequences: :func:`~insightv_agents.trainers.text.pretrain_text`);
            0 skips it.
        text_far_copy_target: the text stage's long phase goes on (up to 1200 long steps)
            until its held-out far copy accuracy reaches this (None: 400 long steps).
        text_near_copy_target: the text stage's long phase starts only once its held-out
            near copy accuracy reaches this (None: at step ``text_steps`` - 400;
            :class:`~insightv_agents.trainers.text.TextPretrainSettings`).
        caption_epochs, sft_epochs: epochs of the caption pre-training and of each SFT.
        caption_cell_target: the caption probe (:mod:`~insightv_research.shapes.captions`:
            greedy descriptions of ``CAPTION_PROBE`` held-out pictures of the DPO split) is
            taken after the caption pre-training and recorded (``caption-probe.json``); with
            a target, while it describes less than this share of the cells right the
            pre-training goes on ``caption_more_epochs`` at a time (each a new schedule from
            the last model), up to ``max_caption_epochs`` in all.
        caption_learning_rate: of the caption pre-training.
        learning_rate, batch_size: of the SFT runs (full fine-tuning); batch_size of the
            caption pre-training too.
        micro_batches: each SFT batch runs as this many micro-batches of rows of similar
            length (:class:`~insightv_agents.trainers.sft.SFTConfig` ``micro_batches``).
        precision: ``"bf16-mixed"`` trains the caption stage, the SFT runs and DPO in
            bfloat16 autocast with float32 weights (generation stays float32); ``"auto"``
            picks it where bfloat16 is native (:func:`~insightv_agents.trainers.common.
            native_bf16`) and float32 elsewhere; the choice made is recorded in the results.
            The text stage trains in float32 either way.
        group_by_length: the reasoning agent's SFT batches rows of similar length together
            (transformers' ``group_by_length`` sampling).
        rounds, dpo_paths, dpo_learning_rate, dpo_epochs, dpo_beta: iterative DPO.
        dpo_sft_weight: weight of an NLL term on the chosen paths added to each round's DPO
            loss (TRL's ``loss_type=["sigmoid", "sft"]``: Iterative RPO); 0: plain DPO, as
            the paper.
        dpo_answer: how a DPO round finds each sampled chain's answer: ``"summary"``, the
            run's summary agent answers from the chain (as Insight-V's system does);
            ``"stated"``, the chain's own last step (the pairs then reward chains that reach
            the answer themselves).
        dpo_score_share: how the DPO rounds' ``SceneScorer`` counts the reasoning: the share
            of claims that hold, or of steps whose claims all hold (``share``).
        dpo_on_plan: the DPO rounds' ``SceneScorer`` counts a sampled path's right answer only
            when the path follows a plan for the question (``on_plan``).
        beam_size: candidates per stage in (f)'s stage-level beam search.
        grpo_steps, grpo_generations, grpo_learning_rate: (g), GRPO of the reasoning agent
            from its SFT model (full fine-tuning) on the DPO split's questions: steps of one
            question's group of ``grpo_generations`` chains, rewarded for the stated answer
            (1), the format (0.5) and ``SceneScorer``'s score of the chain (0.5: a
            process-level reward).
        loop_rounds, loop_revisions: (h), the self-improving loop from the SFT agents on the
            DPO split (``dpo`` fresh questions a round, ``dpo_paths`` chains each, the summary
            agent sending a flawed chain back up to ``loop_revisions`` times), both agents
            retrained by GRPO each round (``grpo_steps`` steps each).
        summary_rows, summary_mix: rows of the summary agent's SFT set, and their shares of
            optimal and flawed paths, the agent's own paths and plain question answering
            (:class:`~insightv_agents.trainers.data.SummaryMix`; the default is optimal paths
            only, not the paper's ``SummaryMix()``).
        summary_epochs: epochs of the summary agent's SFT (None: ``sft_epochs``).
        self_questions, self_paths: the first ``self_questions`` training questions, each
            answered ``self_paths`` times by the trained reasoning agent (sampled through the
            synthesis graph, scored by the scene) before the summary agent is trained: its
            ``self_made`` share of rows (Insight-V's paths "from the reasoning agent itself"),
            judged by the chain's own final answer (only when ``summary_mix`` has that
            share). 0: the summary agent sees only the teacher's paths.
        judge_rows: pairwise judge rows added to (f)'s training set (0: the model judges
            untaught, as LLaVA-CoT's large model does).
        max_new_tokens: cap of every generated reply.
        concurrency: items evaluated (and DPO questions sampled) at once; the in-process
            agents generate the calls that overlap as one batch
            (:class:`~insightv_agents.backends.transformers.ChatTransformersVLM`).
    """

    model_config = ConfigDict(extra="forbid")

    out: Path
    seed: int = 0
    train: int = Field(2000, ge=10)
    dpo: int = Field(48, ge=2)
    test: int = Field(240, ge=5)
    paths: int = Field(4, ge=2, le=16)
    flaw_rate: float = Field(0.5, ge=0, le=1)
    plan_step: bool = True
    plan_first: bool = False
    vocab_size: int = Field(1024, ge=300)
    text_steps: int = Field(0, ge=0)
    text_far_copy_target: float | None = Field(0.5, gt=0, le=1)
    text_near_copy_target: float | None = Field(0.5, gt=0, le=1)
    caption_epochs: float = Field(15, gt=0)
    caption_cell_target: float | None = Field(None, gt=0, le=1)
    caption_more_epochs: float = Field(5, gt=0)
    max_caption_epochs: float = Field(35, gt=0)
    caption_learning_rate: float = Field(5e-4, gt=0)
    sft_epochs: float = Field(3, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    micro_batches: int = Field(1, ge=1)
    precision: Literal["auto", "float32", "bf16-mixed"] = "float32"
    group_by_length: bool = False
    rounds: int = Field(3, ge=1, le=10)
    dpo_paths: int = Field(4, ge=2, le=16)
    dpo_learning_rate: float = Field(1e-4, gt=0)
    dpo_epochs: float = Field(2, gt=0)
    dpo_beta: float = Field(0.1, gt=0)
    dpo_sft_weight: float = Field(0.0, ge=0)
    dpo_answer: Literal["summary", "stated"] = "stated"
    dpo_score_share: Literal["claims", "steps"] = "claims"
    dpo_on_plan: bool = False
    beam_size: int = Field(2, ge=2, le=8)
    grpo_steps: int = Field(48, ge=1)
    grpo_generations: int = Field(8, ge=2, le=64)
    grpo_learning_rate: float = Field(2e-5, gt=0)
    loop_rounds: int = Field(2, ge=1, le=10)
    loop_revisions: int = Field(1, ge=0, le=16)
    summary_rows: int = Field(1200, ge=10)
    summary_mix: SummaryMix = Field(default_factory=lambda: OPTIMAL_ONLY)
    summary_epochs: float | None = Field(4, gt=0)
    self_questions: int = Field(60, ge=0)
    self_paths: int = Field(2, ge=1, le=16)
    judge_rows: int = Field(600, ge=0)
    max_new_tokens: int = Field(512, ge=16)
    concurrency: int = Field(8, ge=1)

    @field_validator("summary_mix")
    @classmethod
    def _check_mix(cls, mix: SummaryMix) -> SummaryMix:
        """A mix that cannot make rows is refused now, not after an hour of training."""
        from insightv_agents.errors import ConfigError

        try:
            mix.proportions()
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return mix

    @model_validator(mode="after")
    def _check_caption_stage(self) -> ReproduceSettings:
        if self.caption_cell_target is not None and self.max_caption_epochs < self.caption_epochs:
            raise ValueError(f"max_caption_epochs ({self.max_caption_epochs:g}) is less than "
                             f"caption_epochs ({self.caption_epochs:g}).")
        return self

    @model_validator(mode="after")
    def _check_text_stage(self) -> ReproduceSettings:
        """Text-stage settings that cannot run are refused now, not after the synthesis."""
        if self.text_steps:
            self.text_settings()
        return self

    def text_settings(self) -> TextPretrainSettings:
        """The text stage's settings."""
        return TextPretrainSettings(
            output_dir=self.out / "models" / "text", steps=self.text_steps,
            far_copy_target=self.text_far_copy_target,
            near_copy_target=self.text_near_copy_target, seed=self.seed)


class Run:
    """One reproduction: its folders, its stage clock, and the stages in order."""

    TICK_SECONDS = 60.0  # how often a running stage's time is written

    def __init__(self, settings: ReproduceSettings, log: Callable[[str], None] = print):
        self.settings = settings
        self.out = settings.out
        self.log = log
        self.data = self.out / "data"
        self.models = self.out / "models"
        self.timings_file = self.out / "timings.json"
        self.timings: dict[str, float] = (json.loads(self.timings_file.read_text())
                                          if self.timings_file.exists() else {})

    # --- the clock ---------------------------------------------------------------------------

    @cached_property
    def precision(self) -> Literal["float32", "bf16-mixed"]:
        """The training precision: the settings' choice, ``"auto"`` resolved here."""
        from insightv_agents.trainers.common import native_bf16

        if self.settings.precision == "auto":
            return "bf16-mixed" if native_bf16() else "float32"
        return self.settings.precision

    def timed(self, name: str, work: Callable[[], Any]) -> Any:
        """Run one stage, adding its wall time to ``timings.json``. The time is written
        every ``TICK_SECONDS`` while the stage runs, so an interrupted stage's time counts
        too: a resumed stage's total is the time of all its runs (the work lost since its
        last checkpoint included), not only of the run that finished it."""
        self.log(f"[{name}] ...")
        earlier = self.timings.get(name, 0.0)
        started = time.perf_counter()
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.TICK_SECONDS):
                self.record(name, earlier + time.perf_counter() - started)

        ticker = threading.Thread(target=tick, name=f"clock {name}", daemon=True)
        ticker.start()
        try:
            result = work()
        finally:
            stop.set()
            ticker.join()
        seconds = time.perf_counter() - started
        self.record(name, earlier + seconds)
        self.log(f"[{name}] done in {seconds:.0f} s")
        return result

    def record(self, name: str, seconds: float) -> None:
        """Write one stage's time into ``timings.json``."""
        self.timings[name] = round(seconds, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.timings_file, json.dumps(self.timings, indent=2))

    # --- the stages --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / "settings.json", s.model_dump_json(indent=2))
        self.timed("dataset", lambda: make_dataset(
            self.data, sizes={"train": s.train, "dpo": s.dpo * s.rounds, "test": s.test},
            seed=s.seed))
        self.index = SceneIndex.from_folder(self.data)
        records = self.timed("synthesis", self.synthesize)
        reader = self.timed("text pre-training", lambda: self.read(records))
        self.timed("base model", lambda: self.pretrain(reader))
        # the summary agent's set waits for the reasoner's own paths, if its mix has them
        later = ("summary",) if s.self_questions and s.summary_mix.self_made else ()
        rows = self.timed("training sets", lambda: self.build(
            records, [name for name in TRAINED if name not in later]))
        for name in TRAINED:
            if name in later:
                own = self.timed("reasoner samples", self.sample_reasoner)
                rows |= self.timed("training sets", partial(self.build, records, later, own))
            self.timed(f"sft {name}", partial(self.sft, name, rows[name]))
        rounds = self.timed("iterative dpo", self.iterate)
        self.grpo_result = self.timed("grpo", self.grpo)
        self.loop_rounds = self.timed("loop", self.loop)
        reports = {system: self.timed(f"eval {system}", partial(self.evaluate, system, rounds))
                   for system in SYSTEMS}
        results = self.results(reports, rounds)
        write_atomic(self.out / RESULTS_FILE, json.dumps(results, indent=2))
        write_atomic(self.out / "results.md", results_markdown(results))
        write_atomic(self.out / "results.svg", results_plot(results))
        return results

    def synthesize(self) -> Any:
        """The teacher's paths on every training question, scored against the scenes."""
        from insightv_agents.graphs.synthesis import create_synthesis_graph
        from insightv_research.shapes.scorer import SceneScorer
        from insightv_research.shapes.teacher import SceneTeacher

        s = self.settings
        teacher = SceneTeacher(index=self.index, flaw_rate=s.flaw_rate,
                               plan_step=s.plan_step, plan_first=s.plan_first, seed=s.seed)
        graph = create_synthesis_graph(teacher=teacher, scorer=SceneScorer(index=self.index),
                                       mode="chain", paths=s.paths).compile()
        return self.run_graph(graph, "synthesis", concurrency=16, paths=s.paths,
                              teacher="SceneTeacher", flaw_rate=s.flaw_rate,
                              plan_step=s.plan_step, plan_first=s.plan_first)

    def run_graph(self, graph: Any, folder_name: str, *, concurrency: int,
                  limit: int | None = None, **info: Any) -> Any:
        """A synthesis graph over the training questions (the first ``limit``), its paths
        appended to ``out/<folder_name>`` (resumable), ``info`` recorded in its run file."""
        from insightv_agents.synthesize import load_items, synthesize, write_run_file
        from insightv_agents.trainers.data import load_records

        folder = self.out / folder_name
        source = self.data / "train.jsonl"
        items, root = load_items(source, out=folder, limit=limit)
        write_run_file(folder, {"input": str(source), "data_root": str(root), **info,
                                "seed": self.settings.seed})
        report = asyncio.run(synthesize(graph, items, folder, concurrency=concurrency))
        if report.errors:
            raise RuntimeError(f"{folder_name}: {len(report.errors)} items failed "
                               f"(see {folder / 'errors.jsonl'}); rerun to resume.")
        return load_records(folder)

    def read(self, records: Any) -> Path:
        """A fresh model, its tokenizer trained on every text the run uses, then (with
        ``text_steps``) taught to read those texts and to copy spans, text only. Returns the
        model the caption pre-training starts from."""
        from insightv_agents.tiny import build_idefics3
        from insightv_agents.trainers.text import pretrain_text

        s = self.settings
        init = self.models / "init"
        corpus = self.corpus(records)  # the tokenizer's texts and the text stage's, built once
        if not (init / "config.json").exists():
            build_idefics3(init, corpus=corpus, vocab_size=s.vocab_size, words=CELL_TAGS,
                           seed=s.seed)
        if not s.text_steps:
            return init
        return pretrain_text(init, corpus, s.text_settings(), log=self.log)

    def pretrain(self, start: Path) -> None:
        """The shared base: ``start`` taught to describe the images, row by row; with
        ``caption_cell_target``, ``caption_more_epochs`` at a time more until it sees."""
        from insightv_agents.trainers.common import finished_run

        s, base = self.settings, self.models / "base"
        if finished_run(base):
            return
        rows = []  # the training split's images only: nothing of the test split is seen
        for line in (self.data / "train.jsonl").read_text().splitlines():
            image = self.data / json.loads(line)["image"]
            rows.append({"id": f"caption-{image.stem}", "kind": "caption",
                         "messages": [_user([{"type": "image"},
                                             {"type": "text", "text": CAPTION_REQUEST}]),
                                      _assistant(describe_grid(self.index.lookup(image)))],
                         "images": [str(image)]})
        model, epochs, probes = start, s.caption_epochs, []
        for part in itertools.count(1):
            out = self.models / "caption" / f"part-{part}"
            self.train(model, _dataset(rows), out, s.caption_epochs if part == 1
                       else s.caption_more_epochs, learning_rate=s.caption_learning_rate)
            seen = self.seeing(out)
            probes.append({"epochs": epochs, "cells": seen.cells, "pictures": seen.pictures})
            write_atomic(self.out / CAPTION_PROBE_FILE, json.dumps(probes, indent=2))
            self.log(f"  caption probe after {epochs:g} epochs: {seen.cells:.1%} of the cells "
                     f"of {seen.n} held-out pictures right ({seen.pictures:.0%} whole)")
            if s.caption_cell_target is None or seen.cells >= s.caption_cell_target or \
                    epochs + s.caption_more_epochs > s.max_caption_epochs:
                break
            model, epochs = out, epochs + s.caption_more_epochs
        out.replace(base)

    def seeing(self, model: Path) -> CaptionAccuracy:
        """The caption probe: ``model``'s descriptions of the first ``CAPTION_PROBE``
        pictures of the DPO split (held out from the caption rows; never the test split)."""
        from insightv_research.shapes.captions import caption_accuracy

        lines = (self.data / "dpo.jsonl").read_text().splitlines()[:CAPTION_PROBE]
        images = [self.data / json.loads(line)["image"] for line in lines]
        return caption_accuracy(model, [(image, self.index.lookup(image)) for image in images],
                                request=CAPTION_REQUEST)

    def corpus(self, records: Any) -> list[str]:
        from insightv_agents.parsing import format_chain, format_stages, format_verdict
        from insightv_agents.trainers.data import path_stages

        p = PROMPTS
        texts = [text for text in (p.reasoning_chain_system, p.summary_system, p.final_answer,
                                   CAPTION_REQUEST, STAGE_PROMPTS.judge_system,
                                   STAGE_PROMPTS.judge_user) if text]
        for paths in list(records.questions.values())[:1500]:
            path = paths[0]
            texts += [p.question.format(question=path["question"]), format_chain(path["steps"]),
                      format_stages(path_stages(path)),
                      format_verdict({"reasoning_correct": True, "critique": "",
                                      "answer": path["answer"]})]
        texts += [describe_grid(scene) for scene in list(self.index.values())[:1500]]
        return texts

    def build(self, records: Any, names: Sequence[str], own: Any = None) -> dict[str, Path]:
        """The training sets ``names`` (each built once); ``own``: the reasoner's sampled
        paths for the summary agent's mix."""
        from insightv_agents.trainers.common import dataset_card
        from insightv_agents.trainers.data import (
            build_direct_sft,
            build_reasoning_sft,
            build_summary_sft,
        )

        builders = {
            "direct": lambda: build_direct_sft(records, prompts=PROMPTS),
            "reasoner": lambda: build_reasoning_sft(records, mode="chain", prompts=PROMPTS),
            "summary": lambda: build_summary_sft(records, self_records=own,
                                                 total=self.settings.summary_rows,
                                                 mix=self.settings.summary_mix,
                                                 prompts=PROMPTS),
            "stages": lambda: self.stage_set(records),
        }
        folders = {}
        for name in names:
            build = builders[name]
            folder = self.out / "training-sets" / name
            if not folder.exists():
                dataset, report = build()
                staging = folder.with_name(f".{name}.tmp")
                shutil.rmtree(staging, ignore_errors=True)
                dataset.save_to_disk(str(staging))
                (staging / "build_report.txt").write_text("\n".join(report.lines()) + "\n")
                if name in AGENT_SETS:  # the agents trained on it carry the run's prompts
                    dataset_card(AGENT_SETS[name], mode="chain", prompts=PROMPTS).save(staging)
                staging.replace(folder)
            folders[name] = folder
        return folders

    def sample_reasoner(self) -> Any:
        """The reasoning agent's own paths on the first ``self_questions`` training
        questions: the synthesis graph with the agent as its teacher (sampled), the scene
        scoring, each path's answer the one its last step states."""
        from insightv_agents.graphs.synthesis import create_synthesis_graph
        from insightv_agents.trainers.iterative import InProcessPolicy
        from insightv_research.shapes.scorer import SceneScorer

        s = self.settings
        policy = InProcessPolicy(max_new_tokens=s.max_new_tokens, seed=s.seed)
        graph = create_synthesis_graph(
            teacher=policy.chat_model(str(self.models / "reasoner"), 0),
            scorer=SceneScorer(index=self.index), mode="chain", paths=s.self_paths,
            prompts=PROMPTS, rules=ANSWER_RULES, final_answer="stated").compile()
        return self.run_graph(graph, "reasoner-samples", concurrency=s.concurrency,
                              limit=s.self_questions, paths=s.self_paths,
                              teacher="the reasoning agent", temperature=policy.temperature)

    def stage_set(self, records: Any) -> tuple[Any, Any]:
        """(f)'s training set: the four-stage responses, and judge rows mixed in."""
        import datasets

        from insightv_agents.trainers.data import build_stage_judge_sft, build_stage_sft

        stages, report = build_stage_sft(records, prompts=STAGE_PROMPTS)
        if not self.settings.judge_rows:
            return stages, report
        judge, judged = build_stage_judge_sft(records, limit=self.settings.judge_rows,
                                              seed=self.settings.seed, prompts=STAGE_PROMPTS)
        report.rows += judged.rows
        report.kinds.update(judged.kinds)
        mixed = datasets.concatenate_datasets([stages, judge]).shuffle(seed=self.settings.seed)
        return mixed.flatten_indices(), report

    def sft(self, name: str, rows: Path) -> None:
        from insightv_agents.trainers.common import finished_run

        s = self.settings
        epochs = s.summary_epochs if name == "summary" and s.summary_epochs else s.sft_epochs
        if not finished_run(self.models / name):
            self.train(self.models / "base", str(rows), self.models / name, epochs,
                       group_by_length=s.group_by_length and name == "reasoner",
                       agent="summary" if name == "summary" else "reasoning")

    def train(self, model: Path, rows: Any, out: Path, epochs: float, *,
              learning_rate: float | None = None, group_by_length: bool = False,
              agent: Literal["reasoning", "summary"] = "reasoning") -> None:
        from insightv_agents.trainers.sft import SFTConfig, train_sft

        s = self.settings
        train_sft(model, rows, SFTConfig(
            output_dir=str(out), agent=agent, finetune="full",
            learning_rate=learning_rate or s.learning_rate,
            num_train_epochs=epochs, per_device_train_batch_size=s.batch_size,
            warmup_steps=0.05, logging_steps=20, save_steps=200, seed=s.seed,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
            micro_batches=1 if group_by_length else s.micro_batches, dtype=self.precision))

    def iterate(self) -> list[dict[str, Any]]:
        from insightv_agents.trainers.iterative import (
            InProcessPolicy,
            IterativeDPOConfig,
            iterative_dpo,
        )
        from insightv_research.shapes.scorer import SceneScorer

        s = self.settings
        result = iterative_dpo(
            self.models / "reasoner", self.data / "dpo.jsonl",
            IterativeDPOConfig(
                output_dir=str(self.models / "dpo"), rounds=s.rounds, paths=s.dpo_paths,
                mode="chain", concurrency=s.concurrency, questions_per_round=s.dpo,
                final_answer="stated" if s.dpo_answer == "stated" else "ask",
                finetune="full", learning_rate=s.dpo_learning_rate,
                num_train_epochs=s.dpo_epochs, beta=s.dpo_beta,
                per_device_train_batch_size=8, seed=s.seed, logging_steps=5,
                dtype=self.precision, **dpo_losses(s.dpo_sft_weight)),
            scorer=SceneScorer(index=self.index, share=s.dpo_score_share,
                               on_plan=s.dpo_on_plan),
            summarizer=self.chat(self.models / "summary") if s.dpo_answer == "summary" else None,
            prompts=PROMPTS, rules=ANSWER_RULES,
            policy=InProcessPolicy(max_new_tokens=s.max_new_tokens, seed=s.seed),
            on_round=lambda metrics: self.log(f"  round {metrics['round']}: {metrics}"))
        return result.rounds

    def grpo_config(self, output_dir: Path, **extra: Any) -> dict[str, Any]:
        """The GRPO settings of (g) and of each round of (h)."""
        s = self.settings
        return {"output_dir": str(output_dir), "finetune": "full",
                "learning_rate": s.grpo_learning_rate, "max_steps": s.grpo_steps,
                "num_generations": s.grpo_generations,
                "per_device_train_batch_size": s.grpo_generations,
                "max_completion_length": s.max_new_tokens, "seed": s.seed, "logging_steps": 1,
                "save_steps": 50, "dtype": self.precision, "report_to": [], **extra}

    def grpo(self) -> dict[str, Any]:
        """(g): GRPO of the SFT reasoning agent on the DPO split's questions."""
        from insightv_agents.trainers.common import finished_run
        from insightv_agents.trainers.grpo import reasoning_grpo_dataset, train_grpo
        from insightv_agents.trainers.rewards import ScoreReward, default_rewards
        from insightv_research.shapes.scorer import SceneScorer

        out = self.models / "grpo"
        run = finished_run(out)
        if run is None:
            rewards = [*default_rewards("reasoning", rules=ANSWER_RULES),
                       ScoreReward(SceneScorer(index=self.index), rules=ANSWER_RULES,
                                   weight=0.5)]
            metrics = train_grpo(
                self.models / "reasoner",
                reasoning_grpo_dataset(self.data / "dpo.jsonl", prompts=PROMPTS),
                self.grpo_config(out), rewards=rewards, rules=ANSWER_RULES).metrics
        else:
            metrics = run["metrics"]
        return {key: metrics.get(key) for key in
                ("first_logged_reward", "last_logged_reward", "train_loss", "wall_seconds")}

    def loop(self) -> list[dict[str, Any]]:
        """(h): the self-improving loop from the SFT agents on the DPO split."""
        from insightv_agents.trainers.iterative import InProcessPolicy
        from insightv_agents.trainers.loop import LoopConfig, self_improving_loop
        from insightv_research.shapes.scorer import SceneScorer

        s = self.settings
        result = self_improving_loop(
            self.models / "reasoner", self.models / "summary", self.data / "dpo.jsonl",
            LoopConfig(**self.grpo_config(
                self.models / "loop", rounds=s.loop_rounds, paths=s.dpo_paths,
                max_revisions=s.loop_revisions, questions_per_round=s.dpo,
                concurrency=s.concurrency)),
            scorer=SceneScorer(index=self.index), rules=ANSWER_RULES, prompts=PROMPTS,
            policy=InProcessPolicy(max_new_tokens=s.max_new_tokens, seed=s.seed),
            summary_policy=InProcessPolicy(temperature=0.0, max_new_tokens=s.max_new_tokens,
                                           seed=s.seed),
            on_round=lambda metrics: self.log(f"  loop round {metrics['round']}: {metrics}"))
        return result.rounds

    def chat(self, model: Path | str, temperature: float = 0.0) -> Any:
        from insightv_agents.backends.transformers import ChatTransformersVLM

        return ChatTransformersVLM(model_path=str(model), temperature=temperature,
                                   max_new_tokens=self.settings.max_new_tokens,
                                   seed=self.settings.seed)

    def predictor(self, system: str, rounds: list[dict[str, Any]]) -> Any:
        from insightv_agents.evaluate import chain_predictor, direct_predictor, graph_predictor
        from insightv_agents.graphs.insightv import create_insightv_graph
        from insightv_agents.graphs.stage_beam import create_stage_beam_graph

        models = self.models
        if system == "a-direct":
            return direct_predictor(self.chat(models / "direct"), prompts=PROMPTS)
        if system == "b-chain":
            return chain_predictor(self.chat(models / "reasoner"), prompts=PROMPTS)
        if system.startswith("f-"):
            beam = system == "f-stage-beam"
            model = self.chat(models / "stages", temperature=0.7 if beam else 0.0)
            return graph_predictor(create_stage_beam_graph(
                model, search="stage" if beam else "single", beam_size=self.settings.beam_size,
                check_reasoning=False, prompts=STAGE_PROMPTS).compile())
        reasoner, summary = str(models / "reasoner"), str(models / "summary")
        if system in ("d-dpo-1", "e-dpo-3"):
            reasoner = rounds[0 if system == "d-dpo-1" else -1]["model_out"]
        elif system == "g-grpo":
            reasoner = str(models / "grpo")
        elif system == "h-loop":
            reasoner, summary = (self.loop_rounds[-1]["reasoner_out"],
                                 self.loop_rounds[-1]["summarizer_out"])
        return graph_predictor(create_insightv_graph(
            reasoner=self.chat(reasoner), summarizer=self.chat(summary),
            mode="chain", prompts=PROMPTS).compile())

    def evaluate(self, system: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        from insightv_agents.evaluate import evaluate
        from insightv_agents.synthesize import load_items
        from insightv_research.shapes.scorer import reasoning_check

        items, _ = load_items(self.data / "test.jsonl")
        return asyncio.run(evaluate(
            self.predictor(system, rounds), items, self.out / "eval" / system,
            settings={"system": system, "seed": self.settings.seed},
            concurrency=self.settings.concurrency, reasoning_check=reasoning_check(self.index),
            rules=ANSWER_RULES))

    # --- the results -------------------------------------------------------------------------

    def results(self, reports: dict[str, dict[str, Any]], rounds: list[dict[str, Any]]
                ) -> dict[str, Any]:
        systems = {}
        for system, report in reports.items():
            accuracy = report["accuracy"]
            multi = [accuracy[c] for c in CATEGORIES if c != "perception" and c in accuracy]
            right = sum(c["correct"] for c in multi)
            total = sum(c["n"] for c in multi)
            flawed = report.get("flawed_reasoning") or {}
            systems[system] = {
                "label": SYSTEMS[system], "accuracy": round(accuracy["all"]["accuracy"], 4),
                "multi_step": round(right / total, 4) if total else None,
                "perception": accuracy.get("perception", {}).get("accuracy"),
                "categories": {c: round(v["accuracy"], 4) for c, v in accuracy.items()
                               if c != "all"},
                "failed": report["failed"], "recovery": flawed.get("recovery_rate"),
                "flawed_reasoning": flawed or None,
                "summary_agent": report.get("summary_agent"),
                "mean_seconds": round(report.get("mean_seconds", 0.0), 3),
            }
        return {"settings": json.loads(self.settings.model_dump_json()), "systems": systems,
                "dpo_rounds": rounds, "grpo": self.grpo_result, "loop_rounds": self.loop_rounds,
                "timings_seconds": self.timings,
                "training_seconds": round(sum(v for k, v in self.timings.items()
                                              if k.startswith(TRAINING_STAGES)), 1),
                "total_seconds": round(sum(self.timings.values()), 1), "machine": machine(),
                "precision": self.precision, "caption_probe": self.caption_probes(),
                "paired": self.paired(reports)}

    def paired(self, reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The goals' comparisons question by question (:data:`PAIRS`, then
        :data:`CHAIN_PAIRS` on the chains' stated answers): how many test questions only the
        first system got right, how many only the second, and the sign test's p-value on
        those."""
        from insightv_agents.evaluate import compare_predictions

        rows = []
        comparisons = [(*pair, False) for pair in PAIRS] + [
            (first, second, None, CHAINS, True) for first, second in CHAIN_PAIRS]
        for first, second, categories, questions, stated in comparisons:
            if first in reports and second in reports:
                paired = compare_predictions(self.out / "eval" / first,
                                             self.out / "eval" / second, categories=categories,
                                             stated=stated)
                rows.append({"first": first, "second": second, "questions": questions,
                             "items": paired.items, "only_first": paired.only_first,
                             "only_second": paired.only_second,
                             "p_value": round(paired.p_value, 4)})
        return rows

    def caption_probes(self) -> list[dict[str, float]]:
        """The caption probes taken while the base model was trained."""
        probes = self.out / CAPTION_PROBE_FILE
        return json.loads(probes.read_text()) if probes.exists() else []


def machine() -> str:
    """The machine in words: CPU cores, and the GPU when there is one."""
    import os

    import torch

    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()})"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} + {cpu}"
    return cpu


def results_markdown(results: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    lines = ["| System | All | Multi-step | Perception | Count | Compare | Arithmetic | Spatial "
             "| Recovered from flawed reasoning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for system in results["systems"].values():
        cats = system["categories"]
        lines.append(
            f"| {system['label']} | {pct(system['accuracy'])} | {pct(system['multi_step'])} "
            f"| {pct(system['perception'])} | " + " | ".join(
                pct(cats.get(c)) for c in ("count", "compare", "arithmetic", "spatial"))
            + f" | {pct(system['recovery'])} |")
    summaries = [(system["label"], system["summary_agent"])
                 for system in results["systems"].values() if system.get("summary_agent")]
    if summaries:
        lines += ["", "| System | Chains stating an answer | Chain's answer right | Summary "
                  "agent kept it | Right answers lost | Wrong answers fixed |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {label} | {a['chains']} | {a['chain_right']} | {a['kept']} | {a['lost']} "
                  f"| {a['fixed']} |" for label, a in summaries]
    s = results["settings"]
    minutes = results["total_seconds"] / 60
    lines += ["", f"Accuracy (%) on {s['test']} held-out test questions. "
              f"Wall time {minutes:.0f} min in all ({results['training_seconds'] / 60:.0f} min "
              f"of training, {results.get('precision', 'float32')}) on {results['machine']}; "
              f"seed {s['seed']}."]
    accuracies = [system["accuracy"] for system in results["systems"].values()]
    if accuracies:
        from insightv_agents.evaluate import accuracy_interval

        mean = sum(accuracies) / len(accuracies)
        low, high = accuracy_interval(round(mean * s["test"]), s["test"])
        lines += ["", f"One question is {100 / s['test']:.1f} points. At these systems' mean "
                  f"accuracy ({100 * mean:.1f}%) the 95% interval of one system's accuracy is "
                  f"{100 * low:.1f}-{100 * high:.1f}%; the paired comparisons "
                  "say which differences between two systems are more than noise."]
    if results.get("caption_probe"):
        lines += ["", "Caption probe (held-out cells, pictures whole): " + "; ".join(
            f"{p['epochs']:g} epochs {100 * p['cells']:.1f}%, {100 * p['pictures']:.0f}%"
            for p in results["caption_probe"]) + "."]
    if results.get("paired"):
        lines += ["", "| Goal, question by question | Questions | Only the first right | "
                  "Only the second right | Sign test p |", "|---|---|---|---|---|"]
        lines += [f"| {_short(p['first'])} vs {_short(p['second'])} ({p['questions']}) "
                  f"| {p['items']} | {p['only_first']} | {p['only_second']} "
                  f"| {p['p_value']:.2f} |" for p in results["paired"]]
    lines += ["", "| DPO round | Pairs | Sampled accuracy | Mean score | Train loss |",
              "|---|---|---|---|---|"]
    for r in results["dpo_rounds"]:
        loss = r.get("train_loss")
        lines.append(f"| {r['round']} | {r['pairs']} | {pct(r.get('accuracy'))} "
                     f"| {r.get('mean_score')} | {'–' if loss is None else f'{loss:.3f}'} |")
    if results.get("grpo"):
        g = results["grpo"]
        lines += ["", f"GRPO (g): reward {_number(g.get('first_logged_reward'))} at its first "
                  f"step, {_number(g.get('last_logged_reward'))} at its last."]
    if results.get("loop_rounds"):
        lines += ["", "| Loop round | Sampled accuracy | Verdict accuracy | Revised | Paths "
                  "kept | Reasoner reward | Summary reward |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {pct(r.get('accuracy'))} | {pct(r.get('verdict_accuracy'))}"
                  f" | {r.get('revised_paths')} | {r.get('kept_paths')} "
                  f"| {_number(r.get('reasoner_reward'))} | {_number(r.get('summary_reward'))} |"
                  for r in results["loop_rounds"]]
    return "\n".join(lines) + "\n"


def runs_markdown(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Several runs' results side by side (e.g. seeds): per system, each run's overall and
    multi-step accuracy and their means; then, per run, whether the issue's goals hold there
    ((c) above (a) and (b) on multi-step, (e) > (d) > (c), perception not below (a)); and,
    for runs that compared the goals question by question (``paired``), those counts summed
    over the runs with the sign test on the sums."""
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    names = [name for name in SYSTEMS if any(name in r["systems"] for _, r in runs)]
    lines = ["| System | " + " | ".join(label for label, _ in runs) + " | Mean |",
             "|---|" + "---|" * (len(runs) + 1)]
    for name in names:
        cells = [r["systems"].get(name, {}) for _, r in runs]
        alls = [c.get("accuracy") for c in cells]
        multis = [c.get("multi_step") for c in cells]
        lines.append(f"| {SYSTEMS[name]} | " + " | ".join(
            f"{pct(a)} ({pct(m)})" for a, m in zip(alls, multis, strict=True))
            + f" | {pct(mean(alls))} ({pct(mean(multis))}) |")
    lines += ["", "Accuracy (%) on each run's held-out test split, all questions (multi-step "
              "in brackets).", "", "| Goal | " + " | ".join(label for label, _ in runs) + " |",
              "|---|" + "---|" * len(runs)]
    goals = [("(c) > (a), (b) on multi-step", lambda s: _above(s, "c-insightv", "multi_step",
                                                              "a-direct", "b-chain")),
             ("(d) > (c)", lambda s: _above(s, "d-dpo-1", "accuracy", "c-insightv")),
             ("(e) > (d)", lambda s: _above(s, "e-dpo-3", "accuracy", "d-dpo-1")),
             ("perception of (c) not below (a)", lambda s: _above(
                 s, "c-insightv", "perception", "a-direct", strict=False))]
    for goal, holds in goals:
        lines.append(f"| {goal} | " + " | ".join(
            {True: "yes", False: "no", None: "–"}[holds(r["systems"])] for _, r in runs) + " |")
    pooled: dict[tuple[str, str, str], list[int]] = {}
    for _, r in runs:
        for p in r.get("paired") or []:
            counts = pooled.setdefault((p["first"], p["second"], p["questions"]), [0, 0, 0, 0])
            counts[0] += 1
            counts[1] += p["items"]
            counts[2] += p["only_first"]
            counts[3] += p["only_second"]
    if pooled:
        from insightv_agents.evaluate import sign_test

        lines += ["", "| Pooled, question by question | Runs | Questions | Only the first "
                  "right | Only the second right | Sign test p |", "|---|---|---|---|---|---|"]
        lines += [f"| {_short(first)} vs {_short(second)} ({questions}) | {n} | {items} "
                  f"| {wins} | {losses} | {sign_test(wins, losses):.2f} |"
                  for (first, second, questions), (n, items, wins, losses) in pooled.items()]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _short(name: str) -> str:
    """A system's letter: ``(c)``; ``(f)+beam`` for the stage-level beam search."""
    return "(f)+beam" if name == "f-stage-beam" else SYSTEMS[name].split()[0]


def _above(systems: dict[str, Any], name: str, key: str, *others: str,
           strict: bool = True) -> bool | None:
    values = [systems.get(n, {}).get(key) for n in (name, *others)]
    if any(v is None for v in values):
        return None
    return all(values[0] > v if strict else values[0] >= v for v in values[1:])


def results_plot(results: dict[str, Any], width: int = 720, height: int = 300) -> str:
    """A grouped bar chart (SVG): overall, multi-step and perception accuracy per system."""
    series = (("accuracy", "all", "#4c78a8"), ("multi_step", "multi-step", "#f58518"),
              ("perception", "perception", "#54a24b"))
    systems = list(results["systems"].items())
    left, bottom, top = 40, 60, 20
    slot = (width - left - 10) / max(1, len(systems))
    bar = slot / (len(series) + 1)
    plot = height - bottom - top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="10">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for tick in range(0, 101, 25):
        y = top + plot * (1 - tick / 100)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#ddd"/><text x="{left - 4}" y="{y + 3:.1f}" '
                     f'text-anchor="end">{tick}</text>')
    for index, (name, system) in enumerate(systems):
        x0 = left + index * slot + bar / 2
        for offset, (key, _, colour) in enumerate(series):
            value = system.get(key) or 0.0
            h = plot * value
            parts.append(f'<rect x="{x0 + offset * bar:.1f}" y="{top + plot - h:.1f}" '
                         f'width="{bar - 1:.1f}" height="{h:.1f}" fill="{colour}"/>')
        parts.append(f'<text x="{x0 + slot / 2 - bar / 2:.1f}" y="{height - bottom + 14}" '
                     f'text-anchor="middle">{name}</text>')
    for offset, (_, label, colour) in enumerate(series):
        x = left + offset * 110
        parts.append(f'<rect x="{x}" y="{height - 22}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{x + 14}" y="{height - 13}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def reproduce(settings: ReproduceSettings | dict[str, Any],
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole comparison; returns the results (also written to
    ``<out>/results.json``, ``results.md`` and ``results.svg``)."""
    config = settings if isinstance(settings, ReproduceSettings) \
        else ReproduceSettings.model_validate(settings)
    return Run(config, log).run()


def _user(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows).cast_column("images",
                                                        datasets.List(datasets.Image()))


DEMO_SLICE = 60  # the demo agents' accuracy is measured (and tested) on these test items


def demo_card(name: str, max_new_tokens: int, folder: Path) -> AgentCard:
    """The agent card of a demo agent (``name``: ``reasoner`` or ``summary``) saved in
    ``folder``: chain mode, the reproduction's prompts, greedy, the shapes world's answers."""
    config = json.loads((folder / "config.json").read_text())
    limit = (config.get("text_config") or config).get("max_position_embeddings")
    return AgentCard(
        role="reasoning" if name == "reasoner" else "summary", profile="chain",
        prompts={field.name: getattr(PROMPTS, field.name) for field in fields(Prompts)
                 if getattr(PROMPTS, field.name) != field.default},
        answer_rules={"labels": sorted(ANSWER_RULES.labels)},
        sampling=Sampling(temperature=0.0, max_tokens=max_new_tokens), max_model_len=limit,
        dtype="float32",  # as measured: greedy replies can differ in bfloat16
        description=f"the shapes world's {'reasoning' if name == 'reasoner' else 'summary'} "
                    "agent, made by make reproduce")


def export_demo(out: str | Path, dest: str | Path, *, slice_size: int = DEMO_SLICE
                ) -> dict[str, Any]:
    """Ship a run's agents as the demo agents: the reasoning agent of the best of (c), (d)
    and (e) on the test split (the later on a tie; (c)'s while the run has no results yet)
    and the summary agent, as bfloat16 safetensors in ``dest``; then measure them, as loaded
    from there, on the first ``slice_size`` test questions and write ``demo.json`` (how they
    were made, the dataset to remake the slice, what they scored)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from insightv_agents.backends.transformers import ChatTransformersVLM
    from insightv_agents.evaluate import evaluate, graph_predictor
    from insightv_agents.graphs.insightv import create_insightv_graph
    from insightv_agents.synthesize import load_items

    run_dir, target = Path(out), Path(dest)
    results = (json.loads((run_dir / RESULTS_FILE).read_text())
               if (run_dir / RESULTS_FILE).exists() else None)
    systems = results["systems"] if results else {}
    # the reasoning agent of the best two-agent system (the later one on a tie)
    chosen = max(("e-dpo-3", "d-dpo-1", "c-insightv") if systems else ("c-insightv",),
                 key=lambda name: systems[name]["accuracy"] if systems else 0)
    reasoners = {"c-insightv": str(run_dir / "models" / "reasoner")}
    if results:
        reasoners |= {"d-dpo-1": results["dpo_rounds"][0]["model_out"],
                      "e-dpo-3": results["dpo_rounds"][-1]["model_out"]}
    sources = {"reasoner": reasoners[chosen], "summary": str(run_dir / "models" / "summary")}
    settings = json.loads((run_dir / "settings.json").read_text())
    for name, source in sources.items():
        folder = target / name
        shutil.rmtree(folder, ignore_errors=True)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16,
                                                            use_safetensors=True)
        model.save_pretrained(folder, safe_serialization=True)
        AutoProcessor.from_pretrained(source).save_pretrained(folder)
        demo_card(name, settings["max_new_tokens"], folder).save(folder)
    items, _ = load_items(run_dir / "data" / "test.jsonl", limit=slice_size)
    agents = [ChatTransformersVLM(model_path=str(target / name)) for name in sources]
    graph = create_insightv_graph(reasoner=agents[0], summarizer=agents[1])  # as the cards say
    with tempfile.TemporaryDirectory() as scratch:
        report = asyncio.run(evaluate(graph_predictor(graph.compile()), items, scratch,
                                      concurrency=4))
        predictions = [json.loads(line) for line in
                       (Path(scratch) / "predictions.jsonl").read_text().splitlines()]
    measured = report["accuracy"]["all"]["accuracy"]
    info = {
        "made_by": "make reproduce (insightv_research.reproduce), then export_demo",
        "reasoner": f"the reasoning agent of {SYSTEMS[chosen]}", "mode": "chain",
        "prompts": {field.name: getattr(PROMPTS, field.name) for field in fields(Prompts)
                    if getattr(PROMPTS, field.name) != field.default},
        "settings": settings, "machine": machine(),
        "dataset": json.loads((run_dir / "data" / DATASET_FILE).read_text()),
        "test_slice": {"split": "test", "first": slice_size, "accuracy": round(measured, 4),
                       "by_category": {key: round(value["accuracy"], 4) for key, value
                                       in report["accuracy"].items() if key != "all"}},
        # what the README claims and tests/test_demo.py checks: the measured accuracy rounded
        # down to 5 points (greedy decoding, but float sums differ between CPUs)
        "claimed_accuracy": int(measured * 20) / 20,
        "results": {name: {"accuracy": system["accuracy"], "perception": system["perception"]}
                    for name, system in systems.items()},
        "answered_right": [row["id"] for row in predictions if row["correct"]],
    }
    write_atomic(target / "demo.json", json.dumps(info, indent=2) + "\n")
    return info


def main(out: str = "runs/reproduce", seed: int = 0,
         export_to: str | None = None, settings: str | None = None) -> None:
    """``python -m insightv_research.reproduce --out DIR``: the comparison with the
    default sizes (rerun the same command to resume). ``--export-to DIR`` then ships the
    run's agents there as demo agents (the package's are in ``insightv_agents/demo``).
    ``--settings FILE.json`` sets any other :class:`ReproduceSettings` field (e.g.
    ``{"text_near_copy_target": 0.5}``), checked before anything runs."""
    extra = json.loads(Path(settings).read_text()) if settings else {}
    results = reproduce(ReproduceSettings(**{**extra, "out": Path(out), "seed": seed}))
    print(results_markdown(results))
    print(f"-> {out}/results.md, results.json, results.svg")
    if export_to:
        info = export_demo(out, export_to)
        print(f"demo agents -> {export_to}: {info['test_slice']}")


if __name__ == "__main__":
    import typer

    typer.run(main)
