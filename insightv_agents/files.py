"""Reading the files the tools read: JSON and JSONL, as strict UTF-8.

Every file a command or library function reads but did not just write (a dataset, a
synthesis run's ``run.json`` and ``records.jsonl``, an evaluation's ``eval.json`` and
``predictions.jsonl``) is read here. A damaged file is an
:class:`~insightv_agents.errors.InvalidInputError` that names the file, the line and what to
do, never a ``JSONDecodeError``, ``KeyError`` or ``UnicodeDecodeError``; text that is not
UTF-8 is refused, not replaced.

:func:`output_folder` checks a folder a command will write into, and :func:`path_inside`
resolves a path a file names relative to a folder, refusing one that leaves it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from insightv_agents.errors import InvalidInputError

Fields = Mapping[str, type | tuple[type, ...]]
"""The fields an object must have, each with the type(s) its value may be (``type(None)``
for null)."""

_BOM = b"\xef\xbb\xbf"


def read_json(path: str | Path, *, what: str, fields: Fields | None = None,
              fix: str = "Fix or remove the file.", field: str | None = None
              ) -> dict[str, Any]:
    """The JSON object in ``path``, with ``fields`` checked.

    Args:
        what: what the file is, for messages ("synthesis settings").
        fix: what the user should do about a damaged file.
        field: the ``field`` of the error (the option or argument that named the file).

    Raises:
        InvalidInputError: for a file that cannot be read, is not UTF-8, not JSON, not an
            object, or lacks one of ``fields``; naming the file, the line and ``fix``.
    """
    path = Path(path)
    data = _read_bytes(path, what, field)
    try:
        text = data.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise InvalidInputError(f"{what} {path}, line {line}: {_not_utf8(err, column)}. {fix}",
                                field=field) from None
    value, problem, line = _parse(text)
    if problem is not None:
        raise InvalidInputError(f"{what} {path}, line {line}: {problem}. {fix}", field=field)
    problem = _object_problem(value, fields)
    if problem is not None:
        raise InvalidInputError(f"{what} {path}: {problem}. {fix}", field=field)
    result: dict[str, Any] = value
    return result


def read_jsonl(path: str | Path, *, what: str, fields: Fields | None = None,
               torn_tail: bool = False, fix: str = "Fix or remove that line.",
               field: str | None = None,
               on_bad_line: Callable[[int, str], None] | None = None,
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each object of the JSONL file ``path`` with its line number (from 1), blank lines
    skipped, ``fields`` checked on every object.

    Args:
        what, fix, field: as for :func:`read_json`.
        torn_tail: the file is an append-only log: a last line without its newline is a
            write a kill cut short, and is skipped.
        on_bad_line: called with the number of a bad line and what is wrong with it, which
            is then skipped; without it the first bad line raises.

    Raises:
        InvalidInputError: for a file that cannot be read, or (without ``on_bad_line``) a
            line that is not UTF-8, not JSON, not an object or lacks one of ``fields``.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after the last line
    except OSError as err:
        raise _unreadable(path, what, err, field) from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if torn_tail and not raw.endswith(b"\n"):
                return
            if number == 1:
                raw = raw.removeprefix(_BOM)
            if not raw.strip():
                continue
            value, problem = _parse_line(raw, fields)
            if problem is None:
                yield number, value
            elif on_bad_line is not None:
                on_bad_line(number, problem)
            else:
                raise InvalidInputError(f"{what} {path}, line {number}: {problem}. {fix}",
                                        field=field)


def output_folder(path: str | Path) -> Path:
    """``path`` as a folder to write into: one that exists, or can be made.

    Raises:
        InvalidInputError: when ``path``, or a folder above it, is a file.
    """
    folder = Path(path)
    for place in (folder, *folder.parents):
        if place.is_dir():
            return folder
        if place.exists() or place.is_symlink():
            where = "is a file" if place == folder else f"is inside {place}, a file"
            raise InvalidInputError(f"the output folder {folder} {where}: name a new folder "
                                    "(or one an earlier run of the same command wrote).",
                                    field="out")
    return folder


def path_inside(root: Path, value: str, *, where: str, field: str = "image") -> Path:
    """``root / value`` resolved (symlinks followed), for a path a file gives relative to
    the folder ``root`` (``where`` names it: "the data folder").

    Raises:
        InvalidInputError: when ``value`` is absolute or resolves outside ``root``.
    """
    if Path(value).is_absolute():
        raise InvalidInputError(f"{field} {value!r} is absolute; give it relative to {where}",
                                field=field)
    try:
        resolved = (root / value).resolve()
        inside = resolved.is_relative_to(root.resolve())
    except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a symlink loop
        raise InvalidInputError(f"{field} {value!r}: not a usable path ({err})",
                                field=field) from None
    if not inside:
        raise InvalidInputError(f"{field} {value!r} is outside {where}", field=field)
    return resolved


def is_file(path: Path, *, field: str = "image") -> bool:
    """Whether ``path`` is a regular file (following symlinks).

    Raises:
        InvalidInputError: when it cannot be looked at (no permission, say).
    """
    try:
        return path.is_file()
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{field} {str(path)!r}: cannot be read ({err})",
                                field=field) from None


def _read_bytes(path: Path, what: str, field: str | None) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise _unreadable(path, what, err, field) from None


def _unreadable(path: Path, what: str, err: OSError, field: str | None) -> InvalidInputError:
    if isinstance(err, FileNotFoundError):
        return InvalidInputError(f"{what} {path}: no such file.", field=field)
    if isinstance(err, IsADirectoryError):
        return InvalidInputError(f"{what} {path} is a folder, not a file.", field=field)
    return InvalidInputError(f"{what} {path} cannot be read ({err.strerror}).", field=field)


def _parse_line(raw: bytes, fields: Fields | None) -> tuple[dict[str, Any], str | None]:
    """One JSONL line's object, or what is wrong with the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return {}, _not_utf8(err, err.start + 1)
    value, problem, _ = _parse(text)
    if problem is not None:
        return {}, problem
    if b"\\u" in raw and _lone_surrogate(value):
        return {}, "a \\u escape names half of a UTF-16 pair (a lone surrogate), not text"
    problem = _object_problem(value, fields)
    return (value, None) if problem is None else ({}, problem)


def _parse(text: str) -> tuple[Any, str | None, int]:
    """The JSON value of ``text``, or why it is not JSON and on which of its lines."""
    try:
        return json.loads(text), None, 0
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg} at column {err.colno})", err.lineno
    except (ValueError, RecursionError) as err:  # an integer of 5000 digits, deep nesting
        return None, f"not JSON that can be read ({type(err).__name__}: {err})", 1


def _not_utf8(err: UnicodeDecodeError, column: int) -> str:
    return (f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at column {column}); save "
            "the file as UTF-8")


def _lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _object_problem(value: Any, fields: Fields | None) -> str | None:
    if not isinstance(value, dict):
        return f"{_kind(value)}, not a JSON object"
    for name, types in (fields or {}).items():
        if name not in value:
            return f"no `{name}` field"
        if not isinstance(value[name], types):
            wanted = types if isinstance(types, tuple) else (types,)
            return (f"`{name}` is {_kind(value[name])}, not "
                    f"{' or '.join(_TYPE_NAMES[kind] for kind in wanted)}")
    return None


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               float: "a number", bool: "true/false", type(None): "null"}


def _kind(value: Any) -> str:
    for kind in (bool, dict, list, str, int, float, type(None)):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind]
    return type(value).__name__
