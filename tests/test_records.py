"""The append-only record log: groups written whole, torn tails cut, damage refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from insightv_agents import InvalidInputError
from insightv_agents.records import RecordLog, finished_groups, merge_shards, read_records


def group(identifier: str, size: int = 3) -> list[dict[str, object]]:
    return [{"id": identifier, "path_index": i, "num_paths": size, "text": "é\n" * i}
            for i in range(size)]


def test_groups_are_appended_and_known_finished(tmp_path: Path) -> None:
    path = tmp_path / "out" / "records.jsonl"
    with RecordLog(path) as log:
        log.append(group("a"))
        log.append(group("b", 2))
    with RecordLog(path) as log:
        assert log.finished == {"a", "b"} and log.repaired_bytes == 0
        with pytest.raises(ValueError, match="already"):
            log.append(group("a"))
        with pytest.raises(ValueError, match="group"):
            log.append(group("c")[:2])
    assert [(r["id"], r["path_index"]) for r in read_records(path)] == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


@pytest.mark.parametrize("cut", [1, 10, 40, -1])
def test_a_torn_last_group_is_cut_off(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "records.jsonl"
    with RecordLog(path) as log:
        log.append(group("a"))
    whole = path.read_bytes()
    torn = b"".join(json.dumps(r).encode() + b"\n" for r in group("b"))
    path.write_bytes(whole + torn[:cut])  # what a kill in the middle of a write leaves
    with RecordLog(path) as log:
        assert log.finished == {"a"}
        assert log.repaired_bytes == len(torn[:cut])
        log.append(group("b"))
    records = list(read_records(path))
    assert [(r["id"], r["path_index"]) for r in records] == [
        ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]


def test_damage_before_the_end_is_refused_not_cut(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordLog(path) as log:
        log.append(group("a"))
        log.append(group("b"))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([lines[0], b"garbage\n", *lines[2:]]))
    before = path.read_bytes()
    with pytest.raises(InvalidInputError, match="line 2"):
        RecordLog(path)
    assert path.read_bytes() == before


def test_a_repeated_group_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordLog(path) as log:
        log.append(group("a", 1))
    path.write_bytes(path.read_bytes() * 2)
    with pytest.raises(InvalidInputError, match="changed by something else"):
        RecordLog(path)


def test_read_records_names_a_damaged_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordLog(path) as log:
        log.append(group("a", 1))
    path.write_bytes(path.read_bytes() + b'{"text": "no id"}\n' + b'{"id": "torn')
    assert [r.get("id") for r in read_records(path)] == ["a", None]  # no field asked for
    with pytest.raises(InvalidInputError, match=r"records\.jsonl, line 2: no `id` field"):
        list(read_records(path, fields={"id": str}))


def test_merging_shards_keeps_each_group_once_and_survives_a_second_merge(
        tmp_path: Path) -> None:
    def group(identifier: str) -> list[dict[str, Any]]:
        return [{"id": identifier, "num_paths": 2, "path_index": i} for i in range(2)]

    with RecordLog(tmp_path / "records.jsonl") as main:
        main.append(group("a"))
    with RecordLog(tmp_path / "records.0.jsonl") as shard:
        shard.append(group("a"))  # merged before, by a merge that was interrupted
        shard.append(group("b"))
    with RecordLog(tmp_path / "records.1.jsonl") as shard:
        shard.append(group("c"))
    with open(tmp_path / "records.1.jsonl", "ab") as torn:
        torn.write(b'{"id": "d", "num_paths": 2, "path_index": 0}\n{"id": "d", "num')
    assert merge_shards(tmp_path, "records", "num_paths") == 2
    assert merge_shards(tmp_path, "records", "num_paths") == 0
    ids = [r["id"] for r in read_records(tmp_path / "records.jsonl")]
    assert ids == ["a", "a", "b", "b", "c", "c"]
    assert not list(tmp_path.glob("records.*.jsonl"))


def test_finished_groups_reads_a_log_without_cutting_its_tail(tmp_path: Path) -> None:
    """How the Ray driver reads a dead worker's shard: a torn tail is left as it is."""
    path = tmp_path / "records.0.jsonl"
    with RecordLog(path) as log:
        log.append([{"id": "a", "num_paths": 1}])
    with open(path, "ab") as torn:
        torn.write(b'{"id": "b", "num_paths": 2}\n{"id": "b", "num')
    size = path.stat().st_size
    assert finished_groups(path, "num_paths") == {"a"}
    assert path.stat().st_size == size
    assert finished_groups(tmp_path / "missing.jsonl", "num_paths") == set()
