"""Reasoning paths for questions of the shapes world, in the library's step format.

:func:`plan_path` writes a path from the scene description. Every path first describes the
image cell by cell, each cell named by its tag (``r1c2``:
:func:`~insightv_research.shapes.scenes.describe_grid`); every later step works on that
description cell by cell, in a fixed order, naming each cell by its tag, repeating what the
description says of it and marking it, so that each word it writes is a copy of what follows
the same tag earlier, or depends on the words just before it. Three strategies count:
``cells`` (each matching cell gets the running count: "Row 1: r1c1 empty no, r1c2 small red
circle 1, ..."), ``rows`` (``yes``/``no`` and a count per row, then the sum) and ``columns``
(the same, column by column). Flawed paths
come from :class:`Flaw` s of controlled kinds: perception errors change what the path
*believes* the scene is (``omit`` a shape, ``misperceive`` its colour or kind, ``misplace``
it by a column) and the reasoning then follows that belief faithfully; reasoning errors
(``miscount``, ``arithmetic``) put one wrong number in an otherwise right path, and the error
carries on from there.

With ``plan_step=True`` a path's second step is its plan: the summaries of the steps still
to come, in one sentence ("Count the triangles row by row, then count the squares row by row,
then compare the counts."), written right after the description, while the question is still
near; each later step then finds what it does in the plan rather than in a question hundreds
of tokens back.

Every claim a path makes has one fixed wording, so :mod:`~insightv_research.shapes.scorer`
can check it against the scene.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from insightv_agents.errors import InvalidInputError
from insightv_agents.schema import ReasoningStep
from insightv_research.shapes.questions import Filter, Query, reference
from insightv_research.shapes.scenes import (
    COLOURS,
    GRID,
    KINDS,
    Scene,
    Shape,
    cell_tag,
    describe_grid,
)

Strategy = Literal["cells", "rows", "columns"]
STRATEGIES: tuple[Strategy, ...] = ("cells", "rows", "columns")
FlawKind = Literal["omit", "misperceive", "misplace", "miscount", "arithmetic"]
FLAW_KINDS: tuple[FlawKind, ...] = ("omit", "misperceive", "misplace", "miscount", "arithmetic")
_PERCEPTION_FLAWS = ("omit", "misperceive", "misplace")
PLAN_SUMMARY = "Plan"


@dataclass(frozen=True)
class Flaw:
    """One error put into a path: ``kind``, and for perception errors the ``shape`` seen
    wrongly and what it was seen as (``into``; ``None`` for ``omit``); for reasoning errors
    the ``delta`` added to the number stated."""

    kind: FlawKind
    shape: Shape | None = None
    into: Shape | None = None
    delta: int = 0


@dataclass
class Path:
    """A written path: its steps, the answer it reaches, and how it was made."""

    steps: list[ReasoningStep]
    answer: str
    strategy: Strategy
    flaws: tuple[Flaw, ...] = ()
    used: list[FlawKind] = field(default_factory=list)
    """The reasoning flaws that found a number to change (perception flaws always apply)."""


def plan_path(scene: Scene, query: Query, *, strategy: Strategy = "cells",
              flaws: Sequence[Flaw] = (), plan_step: bool = False,
              plan_first: bool = False) -> Path:
    """The reasoning path for ``query`` about ``scene`` (with ``plan_step``, its plan as its
    second step; with ``plan_first`` too, as its first, before the description).

    Raises:
        InvalidInputError: when the question does not fit the scene as the path believes it
            (for example a flaw removed the shape the question names).
    """
    believed = scene
    for flaw in flaws:
        if flaw.kind in _PERCEPTION_FLAWS and flaw.shape is not None:
            rest = tuple(s for s in believed.shapes if s != flaw.shape)
            believed = Scene(rest if flaw.into is None else (*rest, flaw.into))
    writer = _Writer(believed, strategy, [f for f in flaws if f.kind not in _PERCEPTION_FLAWS])
    answer = writer.solve(query)
    steps = with_plan_step(writer.steps, first=plan_first) if plan_step else writer.steps
    return Path(steps, answer, strategy, tuple(flaws), writer.used)


def follows_plan(scene: Scene, query: Query, steps: Sequence[ReasoningStep]) -> bool:
    """Whether the step summaries of ``steps`` are those of :func:`plan_path` for ``query``
    (any strategy; a plan step, if there is one, left out): whether a chain is about the
    question at all, whatever it then gets right."""
    summaries = [step.get("summary") for step in steps if step.get("summary") != PLAN_SUMMARY]
    for strategy in STRATEGIES:
        try:
            path = plan_path(scene, query, strategy=strategy)
        except InvalidInputError:
            continue
        if summaries == [step["summary"] for step in path.steps]:
            return True
    return False


def with_plan_step(steps: list[ReasoningStep], *, first: bool = False) -> list[ReasoningStep]:
    """``steps`` with the plan after the first (the description), or with ``first`` before
    it: the summaries of the steps after the description, joined ("Count the red shapes row
    by row, then give the count.")."""
    later = [step["summary"] for step in steps[1:]]
    if not later:
        return steps
    plan = ", then ".join([later[0], *(text[:1].lower() + text[1:] for text in later[1:])])
    step: ReasoningStep = {"summary": PLAN_SUMMARY, "reasoning": f"{plan}.", "action": "continue"}
    return [step, *steps] if first else [steps[0], step, *steps[1:]]


def draw_flaws(scene: Scene, query: Query, rng: random.Random, amount: int = 1) -> list[Flaw]:
    """``amount`` flaws suited to ``query``, mostly on shapes that matter for it."""
    flaws: list[Flaw] = []
    relevant = _relevant(scene, query)
    for _ in range(amount):
        kind = rng.choice(_kinds_for(query))
        if kind in ("miscount", "arithmetic"):
            flaws.append(Flaw(kind, delta=rng.choice((-1, 1))))
            continue
        taken = {f.shape for f in flaws}
        pool = [s for s in (relevant if relevant and rng.random() < 0.8 else scene.shapes)
                if s not in taken] or [s for s in scene.shapes if s not in taken]
        if not pool:
            break
        shape = rng.choice(pool)
        flaws.append(Flaw(kind, shape, _seen_as(scene, shape, kind, rng)))
    return flaws


def _kinds_for(query: Query) -> tuple[FlawKind, ...]:
    if query.category == "perception":
        return ("misperceive",)
    if query.category == "spatial":
        return ("misplace", "misperceive", "miscount") if query.kind == "left_count" else \
            ("misplace", "misperceive")
    if query.kind == "count":
        return ("omit", "misperceive", "miscount")
    return ("omit", "misperceive", "miscount", "arithmetic")


def _relevant(scene: Scene, query: Query) -> list[Shape]:
    if query.kind == "attribute":
        shape = scene.at(*(query.cell or (0, 0)))
        return [shape] if shape else []
    return [s for f in (query.a, query.b) if f for s in f.select(scene)]


def _seen_as(scene: Scene, shape: Shape, kind: FlawKind, rng: random.Random) -> Shape | None:
    if kind == "omit":
        return None
    if kind == "misplace":
        free = [c for c in (shape.column - 1, shape.column + 1)
                if 1 <= c <= GRID and scene.at(shape.row, c) is None]
        return replace(shape, column=rng.choice(free)) if free else \
            replace(shape, colour=rng.choice([c for c in COLOURS if c != shape.colour]))
    if rng.random() < 0.6:
        return replace(shape, colour=rng.choice([c for c in COLOURS if c != shape.colour]))
    return replace(shape, kind=rng.choice([k for k in KINDS if k != shape.kind]))


Style = Literal["running", "tally", "find"]


def _units(by_column: bool) -> list[list[tuple[int, int]]]:
    """The cells a check walks through, row by row or column by column."""
    if by_column:
        return [[(row, column) for row in range(1, GRID + 1)] for column in range(1, GRID + 1)]
    return [[(row, column) for column in range(1, GRID + 1)] for row in range(1, GRID + 1)]


class _Writer:
    """Writes the steps of one path over the scene it believes, applying reasoning flaws.

    Every step after the description works on it cell by cell, in the same order as it was
    written, so each word a step writes depends on one cell (and on the words just before):
    the kind of step a small model learns to do, unlike re-listing shapes from memory."""

    def __init__(self, scene: Scene, strategy: Strategy, flaws: list[Flaw]) -> None:
        self.scene = scene
        self.strategy = strategy
        self.pending = list(flaws)
        self.used: list[FlawKind] = []
        self.steps: list[ReasoningStep] = []

    def step(self, summary: str, reasoning: str) -> None:
        self.steps.append({"summary": summary, "reasoning": reasoning, "action": "continue"})

    def finish(self, summary: str, reasoning: str, answer: str) -> str:
        self.steps.append({"summary": summary, "reasoning": f"{reasoning} The answer is {answer}.",
                           "action": "summary"})
        return answer

    def flawed(self, kind: FlawKind, value: int) -> int:
        """``value``, or ``value + delta`` if a flaw of ``kind`` is still to be used."""
        for flaw in self.pending:
            if flaw.kind == kind:
                self.pending.remove(flaw)
                self.used.append(kind)
                return value + flaw.delta
        return value

    # --- checking the cells ---

    def check(self, what: str, matches: Callable[[Shape], bool], style: Style) -> tuple[str, int]:
        """``"Checking each cell for <what>: Row 1: r1c1 empty no, r1c2 small red circle 1,
        ..."``: each cell by its tag and what the description says of it, then marked ``no``,
        or when its shape ``matches``: with the running count (``running``), ``yes`` and a
        count per row or column (``tally``), or ``yes`` (``find``). Walks column by column for
        the ``columns`` strategy, else row by row. The text and the count."""
        by_column = self.strategy == "columns"
        unit = "Column" if by_column else "Row"
        label = unit.lower() if style == "tally" else "cell"
        parts: list[str] = []
        counts: list[int] = []
        for number, cells in enumerate(_units(by_column), 1):
            marks, entries = [], []
            for cell in cells:
                shape = self.scene.at(*cell)
                if shape is None or not matches(shape):
                    marks.append("no")
                else:
                    marks.append(str(sum(counts) + len(marks) - marks.count("no") + 1)
                                 if style == "running" else "yes")
                seen = shape.name if shape else "empty"
                entries.append(f"{cell_tag(*cell)} {seen} {marks[-1]}")
            counts.append(len(marks) - marks.count("no"))
            tail = f", so {counts[-1]}" if style == "tally" else ""
            parts.append(f"{unit} {number}: {', '.join(entries)}{tail}.")
        text = f"Checking each {label} for {what}: {' '.join(parts)}"
        if style == "tally":
            text += f" That is {' + '.join(map(str, counts))}"
        return text, sum(counts)

    def count(self, condition: Filter) -> int:
        """The step counting the shapes matching ``condition``; the number it states."""
        name = condition.plural()
        style: Style = "running" if self.strategy == "cells" else "tally"
        text, found = self.check(name, condition.matches, style)
        number = self.flawed("miscount", found)
        if style == "tally":  # the step adds up the rows (or columns): a sum to get wrong
            number = self.flawed("arithmetic", number)
        text += f" = {number}, so" if style == "tally" else " So"
        self.step(f"Count the {name}" + ("" if style == "running" else
                                         f" {self.strategy[:-1]} by {self.strategy[:-1]}"),
                  f"{text} the number of {name} is {number}.")
        return number

    def locate(self, ref: Filter) -> Shape:
        shape = reference(self.scene, ref)
        text, _ = self.check(f"the {ref.singular()}", ref.matches, "find")
        self.step(f"Locate the {ref.singular()}",
                  f"{text} So the {shape.name} is at row {shape.row}, column {shape.column}.")
        return shape

    # --- the questions ---

    def solve(self, query: Query) -> str:
        self.step("Describe the image", describe_grid(self.scene, separator=" "))
        a, b = query.a or Filter(), query.b or Filter()
        if query.kind == "attribute":
            row, column = query.cell or (0, 0)
            shape = self.scene.at(row, column)
            if shape is None:
                raise InvalidInputError("the cell is empty", field="question")
            attribute = query.attribute or "kind"
            value = str(getattr(shape, attribute))
            # the summary names what is looked up: the last step must not have to find it
            # in the question, hundreds of tokens back (v6's chains answered the size of the
            # right shape whatever was asked, 4 perception questions right of 12)
            looked_up = {"colour": "the colour of the shape", "kind": "the kind of shape",
                         "size": "the size of the shape"}[attribute]
            return self.finish(f"Look at {looked_up} at row {row}, column {column}",
                               f"The shape at row {row}, column {column} is "
                               f"{cell_tag(row, column)} {shape.name}, so its {attribute} "
                               f"is {value}.",
                               value)
        if query.kind == "count":
            number = self.count(a)
            return self.finish("Give the count", f"The number of {a.plural()} is {number}.",
                               str(number))
        if query.kind in ("more", "total", "difference"):
            first, second = self.count(a), self.count(b)
            if query.kind == "more":
                more = first > second
                if self.flawed("arithmetic", 0):
                    more = not more
                sign = ">" if more else ("=" if first == second else "<")
                return self.finish(
                    "Compare the counts", f"{first} {sign} {second}, so there are "
                    f"{'more' if more else 'not more'} {a.plural()} than {b.plural()}.",
                    "yes" if more else "no")
            if query.kind == "total":
                result = self.flawed("arithmetic", first + second)
                return self.finish("Add the counts", f"{first} + {second} = {result}.",
                                   str(result))
            result = self.flawed("arithmetic", first - second)
            return self.finish("Subtract the counts", f"{first} - {second} = {result}.",
                               str(result))
        if query.kind == "remove":
            everything = self.count(Filter())
            removed = self.count(a)
            result = self.flawed("arithmetic", everything - removed)
            return self.finish("Take the removed shapes away",
                               f"{everything} - {removed} = {result}.", str(result))
        ref = self.locate(a)
        if query.kind == "left_count":
            what = f"shapes left of column {ref.column}"
            text, found = self.check(what, lambda s: s.column < ref.column, "running")
            number = self.flawed("miscount", found)
            self.step("Find the shapes to its left",
                      f"{text} So the number of {what} is {number}.")
            return self.finish("Give the count", f"{number} shapes are to its left.", str(number))
        if query.kind == "below":
            below = self.scene.at(ref.row + 1, ref.column) if ref.row < GRID else None
            if below is None:
                raise InvalidInputError("nothing is directly below the reference",
                                        field="question")
            self.step("Look directly below it", f"Directly below it is "
                      f"{cell_tag(below.row, below.column)} {below.name}.")
            return self.finish("Give its colour", f"Its colour is {below.colour}.", below.colour)
        other = self.locate(b)
        is_left = ref.column < other.column
        sign = "<" if is_left else (">" if ref.column > other.column else "=")
        return self.finish("Compare the columns",
                           f"Column {ref.column} {sign} column {other.column}, so the "
                           f"{a.singular()} is {'' if is_left else 'not '}to the left of the "
                           f"{b.singular()}.", "yes" if is_left else "no")
