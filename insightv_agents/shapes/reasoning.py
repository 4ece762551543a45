"""Reasoning paths for questions of the shapes world, in the library's step format.

:func:`plan_path` writes a path from the scene description. Every path first describes the
image cell by cell (:func:`~insightv_agents.shapes.scenes.describe_grid`), then goes on with
one of several strategies (``scan``: list every shape, then pick; ``focus``: look only for
what the question names; ``rows``: count row by row and add up). Flawed paths come from
:class:`Flaw` s of controlled kinds: perception errors change what the path *believes* the
scene is (``omit`` a shape, ``misperceive`` its colour or kind, ``misplace`` it by a column)
and the reasoning then follows that belief faithfully; reasoning errors (``miscount``,
``arithmetic``) put one wrong number in an otherwise right path, and the error carries on
from there.

Every claim a path makes has one fixed wording, so :mod:`~insightv_agents.shapes.scorer`
can check it against the scene.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from insightv_agents.errors import InvalidInputError
from insightv_agents.schema import ReasoningStep
from insightv_agents.shapes.questions import Filter, Query, reference
from insightv_agents.shapes.scenes import COLOURS, GRID, KINDS, Scene, Shape, describe_grid

Strategy = Literal["scan", "focus", "rows"]
STRATEGIES: tuple[Strategy, ...] = ("scan", "focus", "rows")
FlawKind = Literal["omit", "misperceive", "misplace", "miscount", "arithmetic"]
FLAW_KINDS: tuple[FlawKind, ...] = ("omit", "misperceive", "misplace", "miscount", "arithmetic")
_PERCEPTION_FLAWS = ("omit", "misperceive", "misplace")


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


def plan_path(scene: Scene, query: Query, *, strategy: Strategy = "scan",
              flaws: Sequence[Flaw] = ()) -> Path:
    """The reasoning path for ``query`` about ``scene``.

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
    return Path(writer.steps, answer, strategy, tuple(flaws), writer.used)


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


def _listing(shapes: Sequence[Shape]) -> str:
    return "; ".join(shape.mention() for shape in shapes) if shapes else "none"


class _Writer:
    """Writes the steps of one path over the scene it believes, applying reasoning flaws."""

    def __init__(self, scene: Scene, strategy: Strategy, flaws: list[Flaw]) -> None:
        self.scene = scene
        self.strategy = strategy
        self.pending = list(flaws)
        self.used: list[FlawKind] = []
        self.steps: list[ReasoningStep] = []
        self.listed = False

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

    # --- counting ---

    def list_all(self) -> None:
        if not self.listed:
            self.listed = True
            self.step("List the shapes in the image",
                      f"Row by row, the image shows: {_listing(self.scene.shapes)}. "
                      f"So the number of shapes is {len(self.scene.shapes)}.")

    def count(self, condition: Filter) -> int:
        """Steps that count the shapes matching ``condition``; the number they state."""
        found = condition.select(self.scene)
        name = condition.plural()
        if condition == Filter() and self.strategy != "rows":
            self.list_all()
            return len(self.scene.shapes)
        if self.strategy == "rows":
            per_row = [[s for s in found if s.row == row] for row in range(1, GRID + 1)]
            rows = " ".join(f"Row {row}: {_listing(shapes)}." for row, shapes
                            in enumerate(per_row, 1))
            counts = [len(shapes) for shapes in per_row]
            total = self.flawed("arithmetic", self.flawed("miscount", sum(counts)))
            self.step(f"Count the {name} row by row",
                      f"{rows} That is {' + '.join(map(str, counts))} = {total}, so the "
                      f"number of {name} is {total}.")
            return total
        if self.strategy == "scan":
            self.list_all()
            number = self.flawed("miscount", len(found))
            self.step(f"Pick out the {name}",
                      f"Of these, the {name} are: {_listing(found)}. So the number of {name} "
                      f"is {number}.")
            return number
        number = self.flawed("miscount", len(found))
        self.step(f"Find the {name}",
                  f"Looking for {name}: {_listing(found)}. So the number of {name} is {number}.")
        return number

    def locate(self, ref: Filter) -> Shape:
        shape = reference(self.scene, ref)
        self.step(f"Locate the {ref.singular()}",
                  f"The {shape.name} is at row {shape.row}, column {shape.column}.")
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
            value = str(getattr(shape, query.attribute or "kind"))
            word = {"colour": "colour", "kind": "kind", "size": "size"}[query.attribute or "kind"]
            return self.finish(f"Look at row {row}, column {column}",
                               f"There is a {shape.mention()}, so its {word} is {value}.", value)
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
        if self.strategy == "scan":
            self.list_all()
        ref = self.locate(a)
        if query.kind == "left_count":
            left = [s for s in self.scene.shapes if s.column < ref.column]
            number = self.flawed("miscount", len(left))
            self.step("Find the shapes to its left",
                      f"The shapes in columns left of column {ref.column}: {_listing(left)}. "
                      f"So the number of shapes left of column {ref.column} is {number}.")
            return self.finish("Give the count", f"{number} shapes are to its left.", str(number))
        if query.kind == "below":
            below = self.scene.at(ref.row + 1, ref.column) if ref.row < GRID else None
            if below is None:
                raise InvalidInputError("nothing is directly below the reference",
                                        field="question")
            self.step("Look directly below it", f"Directly below it is the {below.mention()}.")
            return self.finish("Give its colour", f"Its colour is {below.colour}.", below.colour)
        other = self.locate(b)
        is_left = ref.column < other.column
        sign = "<" if is_left else (">" if ref.column > other.column else "=")
        return self.finish("Compare the columns",
                           f"Column {ref.column} {sign} column {other.column}, so the "
                           f"{a.singular()} is {'' if is_left else 'not '}to the left of the "
                           f"{b.singular()}.", "yes" if is_left else "no")
