"""Running the synthesis graph over a dataset: resumable, append-only, concurrent.

:func:`load_items` reads and validates a whole dataset (JSONL, or a Hugging Face dataset
folder saved with ``save_to_disk``), every image decoded, before any model is called.
:func:`synthesize` runs the graph over the items not yet done, ``concurrency`` at a time,
and appends each item's paths to ``<out>/records.jsonl`` as one group (see
:mod:`insightv_agents.records`): a rerun of the same command resumes where a crash or kill
left off.

Each line of ``records.jsonl`` is one path of one item (the :data:`RECORD_FIELDS`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from insightv_agents import __version__
from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.files import is_file, output_folder, path_inside, read_json, read_jsonl
from insightv_agents.graphs.synthesis import check_truth
from insightv_agents.images import ImagePolicy, open_image
from insightv_agents.prompts import PROMPTS_VERSION
from insightv_agents.records import RecordLog, merge_shards

RECORDS_FILE = "records.jsonl"
RUN_FILE = "run.json"
ERRORS_FILE = "errors.jsonl"
RECORD_FIELDS = (
    "id", "path_index", "num_paths", "image", "image_root", "question", "answer", "choices",
    "category", "status", "steps", "final_answer", "correct", "check", "score", "comment",
    "failures", "scoring_failures", "verdict", "revisions", "provenance",
)
"""The fields of a record. ``answer`` is the ground truth, ``final_answer`` the path's own;
``correct`` is the answer filter's verdict (``None``: undecided); ``verdict`` is the
summary agent's on the path (when one answered) and ``revisions`` how often it sent the
path back; ``image`` is relative to
the data folder (``image_root="data"``) or, for images embedded in a dataset, to the output
folder (``"out"``)."""
_MAX_ERRORS_SHOWN = 10
_DECODE_BATCH = 256


@dataclass(frozen=True)
class Item:
    """One validated input item. ``image`` is what the graph reads (a file path or bytes; a
    list of them for a question with several images, as harnesses give); ``image_ref`` and
    ``image_root`` are what the records say."""

    id: str
    image: str | bytes | list[str | bytes]
    image_ref: str
    image_root: str
    question: str
    answer: str
    choices: list[str] | None
    category: str | None
    line: int

    def image_bytes(self) -> bytes:
        """The encoded image (read from its file when ``image`` is a path).

        Raises:
            InvalidInputError: for an item with several images.
        """
        if isinstance(self.image, list):
            raise InvalidInputError(f"item {self.id!r} has several images; one is needed "
                                    "here.", field="image")
        return self.image if isinstance(self.image, bytes) else Path(self.image).read_bytes()

    def graph_input(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.image, "question": self.question,
                "answer": self.answer, "choices": self.choices, "category": self.category}


@dataclass
class SynthesisReport:
    """What a run did: items done now and before, failed paths, items that raised."""

    total: int = 0
    skipped: int = 0
    written: int = 0
    paths_failed: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    repaired_bytes: int = 0
    seconds: float = 0.0


def load_items(source: str | Path, *, out: str | Path | None = None,
               limit: int | None = None, on_bad_row: Callable[[str], None] | None = None,
               image_policy: ImagePolicy | None = None) -> tuple[list[Item], Path]:
    """Read and validate every item of ``source`` before anything runs.

    ``source`` is a JSONL file (one object per line, UTF-8) or a folder saved with
    ``datasets.Dataset.save_to_disk``, with fields ``image`` (a path relative to the data
    folder — the JSONL's folder, or the dataset folder — or an embedded image), ``question``,
    ``answer`` and optionally ``id``, ``choices``, ``category``. Every image is decoded (in
    threads) under ``image_policy``, the one the graph will apply. Embedded images are written to
    ``<out>/images/`` so that records can point at them. With ``limit``, only the first
    ``limit`` good items are read.

    A bad row (a line that is not UTF-8 text or not a JSON object, a missing field, an image
    missing, outside the data folder or not decodable, a duplicate id) refuses the whole
    dataset, every bad row listed, unless ``on_bad_row`` is given: then each bad row is
    reported to it (``"data.jsonl, line 3: ..."``) and skipped, and the good rows are
    returned (the CLI's ``--skip-bad``).

    Returns:
        The items and the data folder.

    Raises:
        InvalidInputError: listing the bad rows (line and why), before any model is called;
            when no good row is left; for an ``out`` that is a file.
    """
    path = Path(source)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder.", field="input")
    target = output_folder(out) if out is not None else None
    problems: list[tuple[int, str]] = []
    rows: Iterable[tuple[int, dict[str, Any]]]
    if path.is_dir():
        unit, root, rows = "row", path.resolve(), _dataset_rows(path)
    else:
        unit, root = "line", path.resolve().parent
        rows = read_jsonl(path, what="dataset", field="input",
                          on_bad_line=lambda number, why: problems.append((number, why)))
    checked = _checked(rows, root, target, unit, problems)
    decode = partial(_image_problem, policy=image_policy or ImagePolicy())
    items: list[Item] = []
    with ThreadPoolExecutor() as pool:  # decoding is most of the time; Pillow frees the GIL
        while limit is None or len(items) < limit:
            wanted = _DECODE_BATCH if limit is None else min(_DECODE_BATCH, limit - len(items))
            batch = list(islice(checked, wanted))
            if not batch:
                break
            for item, problem in zip(batch, pool.map(decode, batch), strict=True):
                if problem is None:
                    items.append(item)
                else:
                    problems.append((item.line, problem))
    problems.sort(key=lambda problem: problem[0])
    if problems and (on_bad_row is None or not items):
        shown = "\n  ".join(f"{unit} {line}: {why}"
                             for line, why in problems[:_MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(problems) - _MAX_ERRORS_SHOWN} more" \
            if len(problems) > _MAX_ERRORS_SHOWN else ""
        advice = "fix them, or skip them (--skip-bad; load_items(on_bad_row=...))" \
            if on_bad_row is None else "and no good one"
        raise InvalidInputError(f"{path}: {len(problems)} bad item(s), {advice}:\n  {shown}{more}",
                                field="input")
    if on_bad_row is not None:
        for line, why in problems:
            on_bad_row(f"{path}, {unit} {line}: {why}")
    if not items:
        raise InvalidInputError(f"{path} holds no items.", field="input")
    for item in items:
        _store(item, target)
    return items, root


def describe_model(model: Any) -> dict[str, Any]:
    """Provenance of a model: its name and sampling settings, as far as they are known."""
    if model is None:
        return {}
    description: dict[str, Any] = {"type": type(model).__name__}
    for attribute in ("model_name", "model", "model_path", "openai_api_base", "adapter_path",
                      "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
                      "max_new_tokens", "repetition_penalty", "n", "seed", "extra_body"):
        value = getattr(model, attribute, None)
        if value is not None and isinstance(value, str | int | float | bool | dict):
            description[attribute] = value
    name = getattr(model, "name", None)
    if isinstance(name, str) and "model_name" not in description:
        description["name"] = name
    return description


async def synthesize(
    graph: Any,
    items: Sequence[Item],
    out: str | Path,
    *,
    concurrency: int = 32,
    provenance: dict[str, Any] | None = None,
    on_item: Callable[[SynthesisReport], None] | None = None,
    fsync: bool = True,
) -> SynthesisReport:
    """Run the compiled synthesis ``graph`` on the items not yet in ``<out>/records.jsonl``.

    At most ``concurrency`` items are in flight; each finished item's paths are appended as
    one group; shards a run over Ray left (``records.<i>.jsonl``) are merged in first. An
    item that raises (a server error, say) is logged to ``<out>/errors.jsonl`` and left for
    the next run. ``on_item`` is called after each item (for a progress bar).
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, not {concurrency}.")
    out = output_folder(out)
    report = SynthesisReport(total=len(items))
    started = time.perf_counter()
    step = synthesis_step(graph, provenance or {})
    merge_shards(out, "records", "num_paths")  # what a run over Ray left (--ray)
    with RecordLog(out / RECORDS_FILE, fsync=fsync) as log:
        report.repaired_bytes = log.repaired_bytes
        pending = [item for item in items if item.id not in log.finished]
        report.skipped = len(items) - len(pending)
        queue = iter(pending)

        async def worker() -> None:  # a fixed pool: memory stays flat however many items
            for item in queue:
                try:
                    records = await step(item)
                except Exception as err:  # logged, and retried by a rerun
                    log_error(out, item.id, err)
                    report.errors.append((item.id, f"{type(err).__name__}: {err}"))
                else:
                    log.append(records)
                    report.written += 1
                    report.paths_failed += sum(r["status"] == "failed" for r in records)
                if on_item is not None:
                    on_item(report)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(pending)))))
    report.seconds = time.perf_counter() - started
    return report


def synthesis_step(graph: Any, provenance: dict[str, Any]
                   ) -> Callable[[Item], Awaitable[list[dict[str, Any]]]]:
    """What synthesis does with one item: run the compiled ``graph`` on it and return its
    records (one per path); an error is raised."""
    async def step(item: Item) -> list[dict[str, Any]]:
        started = time.perf_counter()
        result = await graph.ainvoke(item.graph_input())
        return to_records(item, result, provenance, time.perf_counter() - started)
    return step


def to_records(item: Item, result: dict[str, Any], provenance: dict[str, Any],
               seconds: float) -> list[dict[str, Any]]:
    """The records (one per path) of one item's synthesis result."""
    paths = sorted(result["paths"], key=lambda path: path["index"])
    created = datetime.now(UTC).isoformat(timespec="seconds")
    records = []
    for path in paths:
        check = path["check"]
        records.append({
            "id": item.id, "path_index": path["index"], "num_paths": len(paths),
            "image": item.image_ref, "image_root": item.image_root,
            "question": item.question, "answer": item.answer, "choices": item.choices,
            "category": item.category, "status": path["status"], "steps": path["steps"],
            "final_answer": path["answer"], "correct": check["correct"] if check else None,
            "check": check, "score": path["score"], "comment": path["comment"],
            "failures": path["failures"], "scoring_failures": result["scoring_failures"],
            "verdict": path.get("verdict"), "revisions": path.get("revisions", 0),
            "provenance": {
                **provenance, "prompts_version": PROMPTS_VERSION, "library": __version__,
                "created": created,
                "timings": {"path_seconds": path["seconds"],
                            "scoring_seconds": result["scoring_seconds"],
                            "item_seconds": round(seconds, 3)},
            },
        })
    return records


def write_run_file(out: str | Path, settings: dict[str, Any]) -> None:
    """Record the run's settings in ``<out>/run.json``; refuse to resume a run whose
    record layout (``paths`` per item) differs."""
    out = output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    if run_file.exists():
        earlier = read_run_file(out)
        if earlier.get("paths") != settings.get("paths"):
            raise ConfigError(f"{out} holds a run with {earlier.get('paths')} paths per item; "
                              f"this one asks for {settings.get('paths')}. Use another --out.")
        return
    temporary = run_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    temporary.replace(run_file)


def read_run_file(folder: str | Path) -> dict[str, Any]:
    """The settings of a synthesis run (see :func:`write_run_file`).

    Raises:
        InvalidInputError: when ``folder`` holds no ``run.json``, or a damaged one.
    """
    run_file = Path(folder) / RUN_FILE
    if not run_file.exists():
        raise InvalidInputError(f"{folder} is not a synthesis output folder (no {RUN_FILE}).",
                                field="from")
    return read_json(run_file, what="synthesis settings", fields={"data_root": str},
                     fix="Remove it and rerun the same `insightv synthesize` command: it "
                         "writes the file again and resumes.", field="from")


def log_error(out: Path, identifier: str, error: BaseException | str) -> None:
    """Add an item's error to ``<out>/errors.jsonl`` (one line)."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    line = json.dumps({"id": identifier, "error": message[:2000],
                       "time": datetime.now(UTC).isoformat(timespec="seconds")})
    with open(out / ERRORS_FILE, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def _dataset_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError("reading a dataset folder needs `datasets`: "
                          "pip install 'insightv-agents[hf]'") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise InvalidInputError(f"{path}: not a dataset saved with save_to_disk ({err}).",
                                field="input") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise InvalidInputError(f"{path} holds several splits ({', '.join(dataset)}); point "
                                "--input at one of them.", field="input")
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    return [(index + 1, dict(row)) for index, row in enumerate(dataset)]


def _checked(rows: Iterable[tuple[int, dict[str, Any]]], root: Path, out: Path | None,
             unit: str, problems: list[tuple[int, str]]) -> Iterator[Item]:
    """The items of ``rows`` whose fields, image path and id are good (their images not yet
    decoded); what is wrong with each other row is added to ``problems``."""
    seen: dict[str, int] = {}
    for line, row in rows:
        try:
            item = _item(row, line, root, out)
        except InvalidInputError as err:
            problems.append((line, str(err)))
            continue
        if item.id in seen:
            problems.append((line, f"id {item.id!r} is also on {unit} {seen[item.id]}"))
            continue
        seen[item.id] = line
        yield item


def _item(row: dict[str, Any], line: int, root: Path, out: Path | None) -> Item:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError("`question` must be a non-empty string", field="question")
    answer, choices = check_truth(row.get("answer"), row.get("choices"))
    category = row.get("category")
    image, image_ref, image_root = _image(row.get("image"), root, out)
    identifier = row.get("id")
    if identifier is None or not str(identifier).strip():
        digest = hashlib.sha1(json.dumps([image_ref, question, answer]).encode())
        identifier = digest.hexdigest()[:16]
    return Item(id=str(identifier).strip(), image=image, image_ref=image_ref,
                image_root=image_root, question=question.strip(), answer=answer, choices=choices,
                category=str(category) if category is not None else None, line=line)


def _image(value: Any, root: Path, out: Path | None) -> tuple[str | bytes, str, str]:
    """(what the graph reads, the record's reference, its root) for an item's image."""
    if isinstance(value, dict) and value.get("bytes"):  # a datasets Image, not decoded
        data = value["bytes"]
        if not isinstance(data, bytes | bytearray):
            raise InvalidInputError("`image` bytes must be bytes (an undecoded datasets "
                                    f"Image), not {type(data).__name__}", field="image")
        data = bytes(data)
        if out is None:
            return data, "", "out"
        return data, f"images/{hashlib.sha1(data).hexdigest()[:20]}{_suffix(data)}", "out"
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError("`image` must be a path relative to the data folder",
                                field="image")
    resolved = path_inside(root, value, where="the data folder")
    if not is_file(resolved):
        raise InvalidInputError(f"image {value!r}: no such file in {root}", field="image")
    return str(resolved), Path(value).as_posix(), "data"


def _image_problem(item: Item, policy: ImagePolicy) -> str | None:
    """Why the graph could not read ``item``'s image (``None``: it can), found by decoding
    it as the graph will."""
    for image in item.image if isinstance(item.image, list) else [item.image]:
        try:
            open_image(image if isinstance(image, bytes) else Path(image), policy)
        except InvalidInputError as err:
            what = "the embedded image" if isinstance(image, bytes) else \
                f"image {item.image_ref!r}"
            return f"{what}: {err}"
    return None


def _store(item: Item, out: Path | None) -> None:
    """Write an embedded image to ``out`` where the records will point at it."""
    if not isinstance(item.image, bytes) or out is None:
        return
    target = out / item.image_ref
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(".tmp")
        temporary.write_bytes(item.image)
        temporary.replace(target)


def _suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    return ".img"
