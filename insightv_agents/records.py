"""An append-only JSONL log of record groups that survives being killed at any moment.

Records come in groups (all paths of one item). A group is written with one ``write`` call
on a file opened for appending, then flushed to disk, so a crash can leave at most one torn
group at the very end of the file. Opening the log repairs that: the unfinished tail is cut
off (and reported), complete groups are kept, and their keys are known to be finished, so a
rerun skips them. Every line in the file is therefore one complete JSON record, and every
group appears once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from insightv_agents.errors import InvalidInputError
from insightv_agents.files import Fields, read_jsonl


class RecordLog:
    """Append-only JSONL file of record groups.

    Args:
        path: the JSONL file (created with its folder if missing).
        key: the field naming a record's group (e.g. the item ``id``).
        size: the field giving how many records its group has.
        fsync: force each group to disk before returning (slower, safe against power loss;
            a process kill alone never loses a written group).

    Raises:
        InvalidInputError: when a line before the end of the file is not a complete record
            (the file was damaged by something else; nothing is cut).
    """

    def __init__(self, path: str | Path, *, key: str = "id", size: str = "num_paths",
                 fsync: bool = True) -> None:
        self.path = Path(path)
        self.key = key
        self.size = size
        self.fsync = fsync
        self.repaired_bytes = 0
        self.finished: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Write one complete group in a single write call."""
        if not records:
            return
        keys = {str(record[self.key]) for record in records}
        if len(keys) != 1 or any(record[self.size] != len(records) for record in records):
            raise ValueError(f"a group is the {len(records)} records of one {self.key!r}")
        (group,) = keys
        if group in self.finished:
            raise ValueError(f"{self.key} {group!r} is already in {self.path}")
        data = b"".join(json.dumps(record, ensure_ascii=False).encode() + b"\n"
                        for record in records)
        written = os.write(self._fd, data)
        while written < len(data):  # a short write (rare: full disk, signals) is finished
            written += os.write(self._fd, data[written:])
        if self.fsync:
            os.fsync(self._fd)
        self.finished.add(group)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repair(self) -> None:
        """Read the file once, line by line: learn the finished groups, cut a torn tail."""
        if not self.path.exists():
            return
        complete_end = 0  # byte offset just after the last complete group
        position, group, count, expected = 0, None, 0, 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith(b"\n"):
                    break  # a torn last line
                try:
                    record = json.loads(line)
                    record_group, record_size = str(record[self.key]), int(record[self.size])
                except (ValueError, KeyError, TypeError):
                    record_group, record_size = None, 0
                in_order = record_group is not None and group in (None, record_group)
                if not in_order or record_group in self.finished:
                    if handle.read(1) or record_group in self.finished:
                        raise InvalidInputError(
                            f"{self.path}, line {number}: not the next record of a group "
                            "written by this library; the file was changed by something "
                            "else. Fix or remove it.", field="out")
                    break  # the damaged last line of a torn write
                if group is None:
                    group, count, expected = record_group, 0, record_size
                count, position = count + 1, position + len(line)
                if count == expected:
                    self.finished.add(str(group))
                    complete_end, group = position, None
        size = self.path.stat().st_size
        if complete_end < size:
            with open(self.path, "r+b") as handle:
                handle.truncate(complete_end)
            self.repaired_bytes = size - complete_end


def read_records(path: str | Path, *, fields: Fields | None = None
                 ) -> Iterator[dict[str, Any]]:
    """The records of a log written by :class:`RecordLog`, in order (a torn last line, the
    write a kill cut short, is skipped), each with ``fields`` checked.

    Raises:
        InvalidInputError: for a line that is not a JSON object with ``fields``, naming it.
    """
    for _, record in read_jsonl(path, what="records", fields=fields, torn_tail=True):
        yield record


def merge_shards(folder: Path, stem: str, size: str) -> int:
    """Move each group of the shards ``<folder>/<stem>.<i>.jsonl`` into
    ``<folder>/<stem>.jsonl`` (a group already there is not added again; a group a killed
    worker left unfinished is dropped), then remove the shards; returns the groups moved.
    Safe to interrupt: a rerun finishes it."""
    moved = 0
    merged = shards(folder, stem)
    with RecordLog(folder / f"{stem}.jsonl", size=size) as log:
        for shard in merged:
            for group in whole_groups(shard, size):
                if str(group[0]["id"]) not in log.finished:
                    log.append(group)
                    moved += 1
        for shard in merged:
            shard.unlink()
    return moved


def finished_groups(path: str | Path, size: str, key: str = "id") -> set[str]:
    """The groups a record log holds whole, read without writing to it (a torn tail, or a
    group still being written, is left alone)."""
    return {str(group[0][key]) for group in whole_groups(path, size, key)}


def whole_groups(path: str | Path, size: str, key: str = "id"
                 ) -> Iterator[list[dict[str, Any]]]:
    """The complete groups of a record log, in order, read without writing to it (none
    when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return
    group: list[dict[str, Any]] = []
    for record in read_records(path):
        if group and str(record[key]) != str(group[0][key]):
            group = []  # an unfinished group, cut off by a kill
        group.append(record)
        if len(group) == int(record[size]):
            yield group
            group = []


def shards(folder: Path, stem: str) -> list[Path]:
    """The shards of ``<folder>/<stem>.jsonl``: ``<stem>.<i>.jsonl``, by name."""
    return sorted(path for path in folder.glob(f"{stem}.*.jsonl")
                  if path.name[len(stem) + 1:-len(".jsonl")].isdigit())
