"""Questions about a scene, their answers, and the reading of a question back into its form.

Five categories; all but ``perception`` need several steps:

- ``perception``: one attribute of the shape in a given cell;
- ``count``: counting under conditions ("How many large red shapes are there?");
- ``compare``: comparing two counts;
- ``arithmetic``: sums, differences and removals over counts;
- ``spatial``: relations between shapes named by their look.

A :class:`Query` is the question's form; :meth:`Query.text` writes it, :func:`parse_question`
reads it back, and :meth:`Query.answer` computes the answer from a scene, so every label can
be checked against the scene description.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal, cast

from insightv_agents.answers import AnswerRules
from insightv_agents.errors import InvalidInputError
from insightv_research.shapes.scenes import COLOURS, GRID, KINDS, SIZES, Scene, Shape

Category = Literal["perception", "count", "compare", "arithmetic", "spatial"]
# Every answer is a number or one of these words: a rule check with them as labels decides
# every answer (``AnswerRules(labels=...)``: "red" for "3" is wrong, not undecided).
ANSWER_RULES = AnswerRules(labels=frozenset({"yes", "no", *COLOURS, *SIZES, *KINDS}))
CATEGORIES: tuple[Category, ...] = ("perception", "count", "compare", "arithmetic", "spatial")
QueryKind = Literal["attribute", "count", "more", "total", "difference", "remove", "left_count",
                    "below", "left_of"]
Attribute = Literal["colour", "kind", "size"]
_CATEGORY: dict[str, Category] = {
    "attribute": "perception", "count": "count", "more": "compare", "total": "arithmetic",
    "difference": "arithmetic", "remove": "arithmetic", "left_count": "spatial",
    "below": "spatial", "left_of": "spatial",
}


@dataclass(frozen=True)
class Filter:
    """A condition on shapes: any of size, colour and kind (``None``: any)."""

    size: str | None = None
    colour: str | None = None
    kind: str | None = None

    def matches(self, shape: Shape) -> bool:
        return all(want is None or want == have for want, have in
                   ((self.size, shape.size), (self.colour, shape.colour),
                    (self.kind, shape.kind)))

    def select(self, scene: Scene) -> list[Shape]:
        return [shape for shape in scene.shapes if self.matches(shape)]

    def plural(self) -> str:
        """``"large red circles"``, ``"blue shapes"``, ``"shapes"``."""
        words = [word for word in (self.size, self.colour) if word]
        return " ".join([*words, f"{self.kind}s" if self.kind else "shapes"])

    def singular(self) -> str:
        """``"large red circle"`` (a reference names all three attributes)."""
        return " ".join(word for word in (self.size, self.colour, self.kind or "shape") if word)

    @classmethod
    def of(cls, shape: Shape) -> Filter:
        return cls(shape.size, shape.colour, shape.kind)


@dataclass(frozen=True)
class Query:
    """A question's form. Which fields are set depends on ``kind``: ``cell`` and
    ``attribute`` (perception), ``a``/``b`` (counts), ``a`` as the reference shape and ``b``
    as the second one (spatial)."""

    kind: QueryKind
    a: Filter | None = None
    b: Filter | None = None
    cell: tuple[int, int] | None = None
    attribute: Attribute | None = None

    @property
    def category(self) -> Category:
        return _CATEGORY[self.kind]

    def text(self) -> str:
        """The question in words."""
        a, b = self.a or Filter(), self.b or Filter()
        if self.kind == "attribute":
            row, column = self.cell or (0, 0)
            where = f"row {row}, column {column}"
            return {"colour": f"What colour is the shape at {where}?",
                    "kind": f"What kind of shape is at {where}?",
                    "size": f"Is the shape at {where} small or large?"}[self.attribute or "kind"]
        return {
            "count": f"How many {a.plural()} are there?",
            "more": f"Are there more {a.plural()} than {b.plural()}?",
            "total": f"How many {a.plural()} and {b.plural()} are there in total?",
            "difference": f"How many more {a.plural()} than {b.plural()} are there?",
            "remove": f"How many shapes are left if all {a.plural()} are removed?",
            "left_count": f"How many shapes are to the left of the {a.singular()}?",
            "below": f"What colour is the shape directly below the {a.singular()}?",
            "left_of": f"Is the {a.singular()} to the left of the {b.singular()}?",
        }[self.kind]

    def answer(self, scene: Scene) -> str:
        """The answer in ``scene``. Raises ``InvalidInputError`` when the question does not
        fit the scene (an empty cell, a reference that is missing or not unique)."""
        a, b = self.a or Filter(), self.b or Filter()
        count = lambda f: len(f.select(scene))  # noqa: E731
        if self.kind == "attribute":
            shape = scene.at(*(self.cell or (0, 0)))
            if shape is None:
                raise InvalidInputError("the cell is empty", field="question")
            return str(getattr(shape, self.attribute or "kind"))
        if self.kind == "count":
            return str(count(a))
        if self.kind == "more":
            return "yes" if count(a) > count(b) else "no"
        if self.kind == "total":
            return str(count(a) + count(b))
        if self.kind == "difference":
            return str(count(a) - count(b))
        if self.kind == "remove":
            return str(len(scene.shapes) - count(a))
        ref = reference(scene, a)
        if self.kind == "left_count":
            return str(sum(shape.column < ref.column for shape in scene.shapes))
        if self.kind == "below":
            below = scene.at(ref.row + 1, ref.column) if ref.row < GRID else None
            if below is None:
                raise InvalidInputError("nothing is directly below the reference",
                                        field="question")
            return below.colour
        return "yes" if ref.column < reference(scene, b).column else "no"


def reference(scene: Scene, ref: Filter) -> Shape:
    """The one shape ``ref`` names in ``scene``."""
    found = ref.select(scene)
    if len(found) != 1:
        raise InvalidInputError(f"the scene has {len(found)} {ref.plural()}, not one",
                                field="question")
    return found[0]


# --- reading questions back -------------------------------------------------------------------

PLURAL_PHRASE = (rf"((?:(?:{'|'.join(SIZES)}) )?(?:(?:{'|'.join(COLOURS)}) )?"
           rf"(?:{'|'.join(f'{k}s' for k in KINDS)}|shapes))")
_SINGULAR = rf"((?:{'|'.join(SIZES)}) (?:{'|'.join(COLOURS)}) (?:{'|'.join(KINDS)}))"
_CELL = r"row (\d), column (\d)"
_FORMS = [
    ("colour", rf"what colou?r is the shape at {_CELL}\?"),
    ("kind", rf"what kind of shape is at {_CELL}\?"),
    ("size", rf"is the shape at {_CELL} small or large\?"),
    ("count", rf"how many {PLURAL_PHRASE} are there\?"),
    ("more", rf"are there more {PLURAL_PHRASE} than {PLURAL_PHRASE}\?"),
    ("total", rf"how many {PLURAL_PHRASE} and {PLURAL_PHRASE} are there in total\?"),
    ("difference", rf"how many more {PLURAL_PHRASE} than {PLURAL_PHRASE} are there\?"),
    ("remove", rf"how many shapes are left if all {PLURAL_PHRASE} are removed\?"),
    ("left_count", rf"how many shapes are to the left of the {_SINGULAR}\?"),
    ("below", rf"what colou?r is the shape directly below the {_SINGULAR}\?"),
    ("left_of", rf"is the {_SINGULAR} to the left of the {_SINGULAR}\?"),
]
_PATTERNS = [(name, re.compile(pattern, re.I)) for name, pattern in _FORMS]


def parse_filter(phrase: str) -> Filter:
    """``"large red circles"`` / ``"large red circle"`` → :class:`Filter`."""
    words = phrase.lower().split()
    noun = words[-1].rstrip("s") if words else ""
    return Filter(size=next((w for w in words if w in SIZES), None),
                  colour=next((w for w in words if w in COLOURS), None),
                  kind=noun if noun in KINDS else None)


def parse_question(text: str) -> Query:
    """The :class:`Query` a question of this world was written from.

    Raises:
        InvalidInputError: for a question that is not one of this world's forms.
    """
    clean = " ".join(text.strip().split())
    for name, pattern in _PATTERNS:
        match = pattern.fullmatch(clean)
        if not match:
            continue
        groups = match.groups()
        if name in ("colour", "kind", "size"):
            return Query("attribute", cell=(int(groups[0]), int(groups[1])),
                         attribute=cast(Attribute, name))
        filters = [parse_filter(group) for group in groups] + [None]
        return Query(cast(QueryKind, name), filters[0], filters[1])
    raise InvalidInputError(f"not a question of the shapes world: {text[:200]!r}",
                            field="question")


# --- sampling questions -----------------------------------------------------------------------


def sample_query(scene: Scene, category: Category, rng: random.Random,
                 attempts: int = 50) -> Query:
    """A question of ``category`` that fits ``scene``, drawn from ``rng``.

    Conditions are mostly taken from shapes in the scene, so that counts of zero are not the
    rule. Raises ``InvalidInputError`` if none fits in ``attempts`` tries.
    """
    for _ in range(attempts):
        query = _draw(scene, category, rng)
        if query is None:
            continue
        try:
            query.answer(scene)
        except InvalidInputError:
            continue
        return query
    raise InvalidInputError(f"no {category} question fits this scene", field="scene")


def _draw(scene: Scene, category: Category, rng: random.Random) -> Query | None:
    shapes = scene.shapes
    if category == "perception":
        shape = rng.choice(shapes)
        return Query("attribute", cell=shape.cell,
                     attribute=rng.choice(("colour", "kind", "size")))
    if category == "count":
        return Query("count", _condition(rng.choice(shapes), rng, at_least=1))
    if category == "compare":
        a, b = _two_conditions(scene, rng)
        return Query("more", a, b)
    if category == "arithmetic":
        kind: QueryKind = rng.choice(("total", "difference", "remove"))
        if kind == "remove":
            return Query("remove", _condition(rng.choice(shapes), rng, at_least=1))
        a, b = _two_conditions(scene, rng, disjoint=True)
        if kind == "difference" and len(a.select(scene)) < len(b.select(scene)):
            a, b = b, a
        return Query(kind, a, b)
    unique = [s for s in shapes if len(Filter.of(s).select(scene)) == 1]
    if not unique:
        return None
    ref = rng.choice(unique)
    relation: QueryKind = rng.choice(("left_count", "below", "left_of"))
    if relation == "left_of":
        others = [s for s in unique if s.column != ref.column]
        return Query("left_of", Filter.of(ref), Filter.of(rng.choice(others))) if others else None
    return Query(relation, Filter.of(ref))


def _condition(shape: Shape, rng: random.Random, *, at_least: int) -> Filter:
    """A filter of ``at_least`` to 2 attributes, taken from ``shape``."""
    names = rng.sample(["size", "colour", "kind"], rng.randint(at_least, 2))
    return Filter(**{name: getattr(shape, name) for name in names})


def _two_conditions(scene: Scene, rng: random.Random, *, disjoint: bool = False
                    ) -> tuple[Filter, Filter]:
    """Two different one-attribute filters; ``disjoint``: on the same attribute."""
    name = rng.choice(["colour", "kind", "size"])
    values = {"colour": list(COLOURS), "kind": list(KINDS), "size": list(SIZES)}
    first = getattr(rng.choice(scene.shapes), name)
    if disjoint or rng.random() < 0.5:
        second = rng.choice([v for v in values[name] if v != first])
        return Filter(**{name: first}), Filter(**{name: second})
    other = rng.choice([n for n in values if n != name])
    return Filter(**{name: first}), Filter(**{other: getattr(rng.choice(scene.shapes), other)})
