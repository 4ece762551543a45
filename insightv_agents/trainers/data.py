"""Training sets from synthesis records, as TRL-ready Hugging Face datasets.

- :func:`build_reasoning_sft`: the best-scoring correct path per question, in the exact
  conversation the reasoning node sends (one step per turn, or the whole chain in one turn).
- :func:`build_summary_sft`: the summary agent's mix — optimal paths, flawed paths drawn from
  score bins, paths written by the reasoning agent itself, plain question answering — in
  the proportions asked, with a report of what was available and used.
- :func:`build_dpo_pairs`: chosen = best-scoring correct path, rejected = a wrong or
  lower-scoring path at least ``min_margin`` points below it.
- :func:`build_direct_sft`: plain question answering (the direct-answer baseline).
- :func:`build_stage_sft`: LLaVA-CoT's four tagged stages made from the best correct path.
- :func:`build_stage_judge_sft`: the stage-level beam search's pairwise judge, taught on a
  correct and a wrong path of the same question.

Rows are conversational with image placeholders (``{"type": "image"}``) and an ``images``
column, TRL's format for vision-language SFT (``messages``) and DPO (``prompt``/``chosen``/
``rejected``). Each row also has ``id`` and ``kind`` (where it came from).

(About 500 lines: the six builders share the loading of records, the choice of paths and the
rendering of conversations, which would otherwise cross module boundaries.)
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.files import Fields, is_file, path_inside, read_jsonl
from insightv_agents.parsing import format_chain, format_stages, format_verdict
from insightv_agents.prompts import (
    DEFAULT_PROMPTS,
    DEFAULT_STAGE_PROMPTS,
    Prompts,
    ReasoningMode,
    StagePrompts,
    format_question,
    pairwise_messages,
    reasoning_messages,
    stage_messages,
    summary_messages,
    user_content,
)
from insightv_agents.schema import Stage, Stages, Verdict
from insightv_agents.synthesize import RECORDS_FILE, read_run_file

Record = dict[str, Any]
Row = dict[str, Any]
_NONE = type(None)
_RECORD_FIELDS: Fields = {
    "id": (str, int), "path_index": int, "num_paths": int, "image": str, "image_root": str,
    "question": str, "answer": str, "choices": (list, _NONE), "status": str, "steps": list,
    "correct": (bool, _NONE), "check": (dict, _NONE), "score": (int, float, _NONE),
    "comment": (str, _NONE)}
"""The fields of a synthesis record the builders read, and their types."""
IMAGE_PLACEHOLDER = "data:image/png;base64,"  # stands for the image while messages are built


@dataclass(frozen=True)
class Records:
    """The records of one synthesis output folder, grouped by question, with their images
    resolved to files."""

    folder: Path
    questions: dict[str, list[Record]]
    data_root: Path

    def image(self, record: Record) -> str:
        root = self.folder if record["image_root"] == "out" else self.data_root
        return str(root / record["image"])


def load_records(folder: str | Path, *, images: str | Path | None = None) -> Records:
    """Read ``<folder>/records.jsonl`` (a synthesis output). ``images`` replaces the data
    folder recorded in ``run.json`` (when the data has moved).

    The questions come in the order of their ids (numbers in an id compare as numbers), each
    question's paths in path order: not in the order the synthesis finished them, which
    its concurrency decides, so what is built from the records is the same every run.

    Raises:
        InvalidInputError: when the folder is not a synthesis output, a record is damaged,
            or names an image that is missing or outside its folder (an absolute path, a
            ``..`` or a symbolic link leading out of it).
    """
    folder = Path(folder)
    settings = read_run_file(folder)
    path = folder / RECORDS_FILE
    if not path.exists():
        raise InvalidInputError(f"{folder} has no {RECORDS_FILE} yet.", field="from")
    root = Path(images) if images is not None else Path(settings["data_root"])
    questions: dict[str, list[Record]] = {}
    checked: set[tuple[str, str]] = set()  # the paths of a question share their image
    for line, record in read_jsonl(path, what="synthesis records", fields=_RECORD_FIELDS,
                                   torn_tail=True, field="from"):
        image = (record["image_root"], record["image"])
        try:
            if image not in checked:
                _check_image(record, folder, root)
        except InvalidInputError as err:
            raise InvalidInputError(f"synthesis records {path}, line {line}: {err}",
                                    field="from") from None
        checked.add(image)
        questions.setdefault(str(record["id"]), []).append(record)
    for paths in questions.values():
        paths.sort(key=lambda record: record["path_index"])
    questions = dict(sorted(questions.items(), key=lambda item: _natural(item[0])))
    return Records(folder=folder, questions=questions, data_root=root)


def _check_image(record: Record, folder: Path, data_root: Path) -> None:
    """Refuse a record whose image is not a file inside its folder."""
    if record["image_root"] == "out":
        root, where = folder, "the synthesis output folder"
    elif record["image_root"] == "data":
        root, where = data_root, "the data folder"
    else:
        raise InvalidInputError(f"`image_root` is {record['image_root']!r}, not 'data' or "
                                "'out'", field="from")
    if not is_file(path_inside(root, record["image"], where=where), field="from"):
        moved = " (if the data moved, pass its folder: --images, load_records(images=...))" \
            if record["image_root"] == "data" else ""
        raise InvalidInputError(f"image {record['image']!r}: no such file in {root}{moved}",
                                field="from")


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key that orders ``q2`` before ``q10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", text) if part)


# --- conversations ---------------------------------------------------------------------------


def to_trl_messages(messages: Iterable[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as TRL conversational dicts; images become ``{"type": "image"}``."""
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    converted = []
    for message in messages:
        content = message.content
        parts: list[dict[str, Any]] = []
        for part in [content] if isinstance(content, str) else content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            elif part.get("type") == "image_url":
                parts.append({"type": "image"})
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
        converted.append({"role": roles[message.type], "content": parts})
    return converted


def reasoning_prompt(record: Record, mode: ReasoningMode, prompts: Prompts) -> list[BaseMessage]:
    """The reasoning agent's opening conversation for a record's question."""
    return reasoning_messages(prompts=prompts, mode=mode, question=_question(record, prompts),
                              images=[IMAGE_PLACEHOLDER], steps=[])


def reasoning_conversation(record: Record, mode: ReasoningMode, prompts: Prompts
                           ) -> list[BaseMessage]:
    """The whole conversation in which the reasoning agent writes ``record``'s steps."""
    steps = record["steps"]
    if mode == "chain":
        return [*reasoning_prompt(record, mode, prompts), AIMessage(format_chain(steps))]
    messages = reasoning_messages(prompts=prompts, mode="step",
                                  question=_question(record, prompts), images=[IMAGE_PLACEHOLDER],
                                  steps=steps)
    return messages[:-1]  # ends on the last step, not on a request for another


def summary_conversation(record: Record, verdict: Verdict, prompts: Prompts
                         ) -> list[BaseMessage]:
    """The summary agent judging ``record``'s steps, then giving ``verdict``."""
    return [*summary_messages(prompts=prompts, question=_question(record, prompts),
                              images=[IMAGE_PLACEHOLDER], steps=record["steps"]),
            AIMessage(format_verdict(verdict))]


def qa_conversation(record: Record, prompts: Prompts) -> list[BaseMessage]:
    """Plain question answering: the image and question, then the ground truth."""
    return [HumanMessage(content=user_content(prompts, [IMAGE_PLACEHOLDER],
                                              _question(record, prompts))),
            AIMessage(record["answer"])]


# --- reasoning-agent SFT ---------------------------------------------------------------------


@dataclass
class BuildReport:
    """What a builder made and why it skipped what it skipped."""

    questions: int = 0
    rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    details: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = [f"{self.rows} rows from {self.questions} questions"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.kinds.items())]
        lines += [f"  skipped ({reason}): {count}" for reason, count
                  in sorted(self.skipped.items())]
        lines += [f"  {key}: {value}" for key, value in self.details.items()]
        return lines


def best_correct_path(paths: Sequence[Record], min_score: int | None = None) -> Record | None:
    """The highest-scoring path whose answer was checked correct (ties: the earlier path)."""
    correct = [p for p in paths if p["status"] == "ok" and p["correct"] is True]
    if min_score is not None:
        correct = [p for p in correct if p["score"] is not None and p["score"] >= min_score]
    if not correct:
        return None
    return max(correct, key=lambda p: (p["score"] if p["score"] is not None else -1,
                                       -p["path_index"]))


def build_reasoning_sft(records: Records, *, mode: ReasoningMode = "step",
                        min_score: int | None = None, prompts: Prompts = DEFAULT_PROMPTS
                        ) -> tuple[Any, BuildReport]:
    """Reasoning-agent SFT: per question, its best-scoring correct path.

    ``mode="step"`` gives the multi-turn conversation of the step-mode node (one step per
    assistant turn); ``"chain"`` the whole chain in one assistant turn.
    """
    _check_mode(mode)
    report = BuildReport(questions=len(records.questions))
    rows: list[Row] = []
    for identifier, paths in records.questions.items():
        best = best_correct_path(paths, min_score)
        if best is None:
            report.skipped["no correct path" + (f" scoring >= {min_score}"
                                                if min_score is not None else "")] += 1
            continue
        rows.append(_row(identifier, f"best path (score {best['score']})",
                         reasoning_conversation(best, mode, prompts), records.image(best)))
    report.rows = len(rows)
    report.kinds["best path"] = len(rows)
    return _dataset(rows, "messages"), report


# --- summary-agent SFT -----------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryMix:
    """Proportions of the summary agent's training mix (normalised; zero leaves a kind out).

    Args:
        optimal: the best correct path of a question, judged correct.
        flawed: other paths, drawn evenly from ``flawed_bins`` (score ranges, inclusive),
            each labelled by its answer check, with the scorer's comment as critique.
        self_made: paths written by the trained reasoning agent itself (``self_records``).
        qa: plain question answering (no reasoning), to keep direct answering.
        flawed_bins: the score ranges flawed paths are drawn from.
        seed: the sampling seed.
    """

    optimal: float = 0.35
    flawed: float = 0.35
    self_made: float = 0.1
    qa: float = 0.2
    flawed_bins: tuple[tuple[int, int], ...] = ((1, 40), (41, 70), (71, 90))
    seed: int = 0

    def proportions(self) -> dict[str, float]:
        shares = {"optimal": self.optimal, "flawed": self.flawed, "self": self.self_made,
                  "qa": self.qa}
        if any(share < 0 for share in shares.values()) or not sum(shares.values()):
            raise ConfigError("mix proportions must be >= 0 and not all zero.")
        total = sum(shares.values())
        return {kind: share / total for kind, share in shares.items()}


def build_summary_sft(records: Records, *, mix: SummaryMix = SummaryMix(),
                      self_records: Records | None = None, total: int | None = None,
                      prompts: Prompts = DEFAULT_PROMPTS) -> tuple[Any, BuildReport]:
    """The summary agent's SFT mix. The target is always the ground truth; the verdict says
    whether the reasoning shown reached it.

    With ``total=None`` the mix is as large as the scarcest kind allows at the asked
    proportions; kinds with nothing available are left out (and reported).
    """
    shares = mix.proportions()
    rng = random.Random(mix.seed)
    pools: dict[str, list[Row]] = {"optimal": [], "flawed": [], "self": [], "qa": []}
    bins: dict[tuple[int, int], list[Row]] = {bounds: [] for bounds in mix.flawed_bins}
    for identifier, paths in records.questions.items():
        best = best_correct_path(paths)
        if best is not None:
            pools["optimal"].append(_row(identifier, "optimal", summary_conversation(
                best, _verdict(best, True), prompts), records.image(best)))
        for path in paths:
            if path is best or path["status"] != "ok" or path["score"] is None:
                continue
            for low, high in mix.flawed_bins:
                if low <= path["score"] <= high:
                    bins[(low, high)].append(_row(
                        identifier, f"flawed {low}-{high}",
                        summary_conversation(path, _verdict(path, path["correct"] is True),
                                             prompts), records.image(path)))
                    break
        pools["qa"].append(_row(identifier, "qa", qa_conversation(paths[0], prompts),
                                records.image(paths[0])))
    pools["flawed"] = _even_draw(list(bins.values()), rng)
    if self_records is not None:
        for identifier, paths in self_records.questions.items():
            for path in paths:
                if path["status"] == "ok" and path["correct"] is not None:
                    pools["self"].append(_row(identifier, "self", summary_conversation(
                        path, _verdict(path, path["correct"]), prompts),
                        self_records.image(path)))
    available = {kind: len(pool) for kind, pool in pools.items()}
    used_kinds = {kind: share for kind, share in shares.items() if share and available[kind]}
    if not used_kinds:
        raise InvalidInputError("no training rows can be made from these records.",
                                field="from")
    norm = sum(used_kinds.values())
    if total is None:
        total = min(int(available[kind] / (share / norm)) for kind, share in used_kinds.items())
    counts = {kind: min(available[kind], round(total * share / norm))
              for kind, share in used_kinds.items()}
    rows: list[Row] = []
    for kind, count in counts.items():
        pool = pools[kind] if kind == "flawed" else rng.sample(pools[kind], len(pools[kind]))
        rows += pool[:count]
    rng.shuffle(rows)
    report = BuildReport(questions=len(records.questions), rows=len(rows))
    report.kinds.update(Counter(row["kind"] for row in rows))
    report.details["asked proportions"] = {k: round(v, 3) for k, v in shares.items()}
    report.details["made proportions"] = {
        kind: round(counts.get(kind, 0) / max(1, len(rows)), 3) for kind in shares}
    report.details["available"] = available
    report.details["flawed by bin"] = {f"{low}-{high}": len(rows_in_bin)
                                       for (low, high), rows_in_bin in bins.items()}
    left_out = [kind for kind, share in shares.items() if share and not available[kind]]
    if left_out:
        report.details["left out (none available)"] = left_out
    return _dataset(rows, "messages"), report


# --- DPO pairs -------------------------------------------------------------------------------


def build_dpo_pairs(records: Records, *, min_margin: int = 20,
                    min_chosen_score: int | None = None, pairs_per_question: int = 1,
                    prompts: Prompts = DEFAULT_PROMPTS) -> tuple[Any, BuildReport]:
    """DPO pairs for the reasoning agent (chain mode: the whole reasoning is one completion).

    Chosen: the best-scoring correct path. Rejected: a wrong path or a lower-scoring one, at
    least ``min_margin`` points below the chosen (a wrong path without a score qualifies),
    lowest scores first, up to ``pairs_per_question`` per question.
    """
    if min_margin < 0 or pairs_per_question < 1:
        raise ConfigError("min_margin must be >= 0 and pairs_per_question >= 1.")
    report = BuildReport(questions=len(records.questions))
    rows: list[Row] = []
    for identifier, paths in records.questions.items():
        chosen = best_correct_path(paths)
        if chosen is None:
            report.skipped["no correct path"] += 1
            continue
        if chosen["score"] is None:
            report.skipped["chosen path has no score"] += 1
            continue
        if min_chosen_score is not None and chosen["score"] < min_chosen_score:
            report.skipped[f"best correct path scores below {min_chosen_score}"] += 1
            continue
        rejected = [p for p in paths if p is not chosen and p["status"] == "ok" and (
            (p["score"] is None and p["correct"] is False)
            or (p["score"] is not None and chosen["score"] - p["score"] >= min_margin))]
        if not rejected:
            report.skipped[f"no path {min_margin}+ points below the chosen one"] += 1
            continue
        rejected.sort(key=lambda p: (p["score"] if p["score"] is not None else -1,
                                     p["correct"] is not False))
        prompt = to_trl_messages(reasoning_prompt(chosen, "chain", prompts))
        for loser in rejected[:pairs_per_question]:
            rows.append({
                "id": identifier,
                "kind": "wrong" if loser["correct"] is False else "low score",
                "prompt": prompt,
                "chosen": [_assistant(format_chain(chosen["steps"]))],
                "rejected": [_assistant(format_chain(loser["steps"]))],
                "images": [records.image(chosen)],
                "score_chosen": chosen["score"], "score_rejected": loser["score"],
            })
    report.rows = len(rows)
    report.kinds.update(Counter(row["kind"] for row in rows))
    return _dataset(rows, "prompt"), report


# --- baselines: direct answers, LLaVA-CoT stages -------------------------------------------


def build_direct_sft(records: Records, *, prompts: Prompts = DEFAULT_PROMPTS
                     ) -> tuple[Any, BuildReport]:
    """Direct answering: per question, the image and question, then the ground truth (no
    reasoning), as :func:`qa_conversation` writes it. The baseline the paper compares the
    multi-agent system with."""
    rows = [_row(identifier, "qa", qa_conversation(paths[0], prompts), records.image(paths[0]))
            for identifier, paths in records.questions.items()]
    report = BuildReport(questions=len(records.questions), rows=len(rows))
    report.kinds["qa"] = len(rows)
    return _dataset(rows, "question"), report


def path_stages(record: Record) -> Stages:
    """A reasoning path as LLaVA-CoT's four stages: the plan (the steps' summaries), the
    caption (what the first step saw), the reasoning (the other steps) and the conclusion
    (the ground truth, which a correct path reached)."""
    steps = record["steps"]
    plan = "; ".join(step["summary"].rstrip(".") for step in steps if step["summary"])
    rest = steps[1:] or steps
    return {"summary": f"To answer, I will: {plan}." if plan else "",
            "caption": steps[0]["reasoning"] if steps else "",
            "reasoning": " ".join(step["reasoning"] for step in rest),
            "conclusion": record["answer"]}


def build_stage_sft(records: Records, *, min_score: int | None = None,
                    prompts: StagePrompts = DEFAULT_STAGE_PROMPTS) -> tuple[Any, BuildReport]:
    """LLaVA-CoT SFT: per question, its best correct path as one tagged four-stage response
    (see :func:`path_stages`), in the conversation the stage-beam graph sends. With
    ``prompts.system=""`` the rows carry no system prompt, as LLaVA-CoT's data."""
    report = BuildReport(questions=len(records.questions))
    rows: list[Row] = []
    for identifier, paths in records.questions.items():
        best = best_correct_path(paths, min_score)
        if best is None:
            report.skipped["no correct path"] += 1
            continue
        messages = stage_messages(prompts=prompts, question=_question(best, DEFAULT_PROMPTS),
                                  images=[IMAGE_PLACEHOLDER])
        rows.append(_row(identifier, "stages", [
            *messages, AIMessage(format_stages(path_stages(best)))], records.image(best)))
    report.rows = len(rows)
    report.kinds["stages"] = len(rows)
    return _dataset(rows, "messages"), report


_JUDGE_REASONS: dict[Stage, str] = {
    "caption": "it describes the image correctly",
    "reasoning": "its reasoning has no errors",
    "conclusion": "it follows from correct reasoning",
}


def build_stage_judge_sft(records: Records, *, limit: int | None = None, seed: int = 0,
                          prompts: StagePrompts = DEFAULT_STAGE_PROMPTS
                          ) -> tuple[Any, BuildReport]:
    """Teach the stage-level beam search's judge (LLaVA-CoT's pairwise comparison).

    Per question with a correct path and a wrong one (wrong answer), one judgement: for a
    stage where the two differ (drawn at random among caption, reasoning, conclusion — where
    a wrong path goes wrong), the judge conversation of :func:`~insightv_agents.prompts.
    pairwise_messages` with the correct path's earlier stages as the shared prefix, the two
    candidates in random order, and the reply ``"Since <reason>, I choose response N."``
    naming the correct path's. ``limit`` caps the rows (questions drawn at random)."""
    rng = random.Random(seed)
    report = BuildReport(questions=len(records.questions))
    rows: list[Row] = []
    for identifier, paths in records.questions.items():
        best = best_correct_path(paths)
        wrong = [path for path in paths if path.get("correct") is False and path["steps"]]
        if best is None or not wrong:
            report.skipped["no correct and wrong path"] += 1
            continue
        worse = rng.choice(wrong)
        good = path_stages(best)
        bad = path_stages(worse)
        bad["conclusion"] = worse.get("final_answer") or ""  # what the wrong path concluded
        differing: list[Stage] = [stage for stage in ("caption", "reasoning", "conclusion")
                                  if bad[stage] and bad[stage] != good[stage]]
        if not differing:
            report.skipped["paths alike"] += 1
            continue
        stage = rng.choice(differing)
        choice = rng.choice((1, 2))
        first, second = (good[stage], bad[stage]) if choice == 1 else (bad[stage], good[stage])
        messages = pairwise_messages(prompts=prompts, target=stage,
                                     question=_question(best, DEFAULT_PROMPTS),
                                     images=[IMAGE_PLACEHOLDER],
                                     prefix=format_stages(good, upto=stage),
                                     first=first, second=second)
        reply = f"Since {_JUDGE_REASONS[stage]}, I choose response {choice}."
        rows.append(_row(identifier, f"judge-{stage}", [*messages, AIMessage(reply)],
                         records.image(best)))
    if limit is not None and len(rows) > limit:
        rows = rng.sample(rows, limit)
    report.rows = len(rows)
    report.kinds.update(Counter(row["kind"] for row in rows))
    return _dataset(rows, "messages"), report


# --- helpers ---------------------------------------------------------------------------------


def _question(record: Record, prompts: Prompts) -> str:
    return format_question(record["question"], record.get("choices"), prompts)


def _verdict(record: Record, correct: bool) -> Verdict:
    critique = "" if correct else (record.get("comment") or
                                   (record.get("check") or {}).get("detail") or "")
    return {"reasoning_correct": correct, "critique": critique, "answer": record["answer"]}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _row(identifier: str, kind: str, messages: list[BaseMessage], image: str) -> Row:
    return {"id": identifier, "kind": kind, "messages": to_trl_messages(messages),
            "images": [image]}


def _even_draw(groups: list[list[Row]], rng: random.Random) -> list[Row]:
    """Interleave shuffled groups so that any prefix draws evenly from them."""
    shuffled = [rng.sample(group, len(group)) for group in groups]
    drawn: list[Row] = []
    for index in range(max((len(group) for group in shuffled), default=0)):
        drawn += [group[index] for group in shuffled if index < len(group)]
    return drawn


def _dataset(rows: list[Row], first: str) -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("building datasets needs `datasets`: "
                          "pip install 'insightv-agents[hf]'") from None
    if not rows:
        raise InvalidInputError(f"no rows could be made (nothing has a usable {first}).",
                                field="from")
    dataset = datasets.Dataset.from_list(rows)
    return dataset.cast_column("images", datasets.List(datasets.Image()))


def _check_mode(mode: str) -> None:
    if mode not in ("step", "chain"):
        raise ConfigError(f"mode must be 'step' or 'chain', not {mode!r}.")
