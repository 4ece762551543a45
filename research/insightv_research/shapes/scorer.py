"""A path scorer grounded in the scene: every claim a path makes is checked against the
scene description.

Claims are read in the shapes world's fixed wording (see
:mod:`~insightv_research.shapes.reasoning`): a shape seen in a cell ("small red circle at row 1,
column 2"), a cell named by its tag ("r1c2 small red circle", "r1c3 empty": in the grid's
description and wherever a step repeats it), a cell-by-cell check ("Checking each cell for red
shapes: Row 1: r1c1 empty no, r1c2 small red circle 1, ...": each mark, running count and
count per row or column), a count ("the number of red shapes is
3", "the number of shapes left of column 3 is 2"), a sum or difference ("2 + 1 = 3"), a
comparison ("3 > 2", "column 1 < column 4").
The score (1-100) weighs the share of claims that hold and whether the final answer is right,
so a path with injected errors scores lower than the same path without them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from insightv_agents.answers import extract_answer, match_answer
from insightv_agents.assessment import ScoreRequest
from insightv_agents.errors import InvalidInputError
from insightv_agents.schema import PathResult, PathScore, ReasoningStep
from insightv_research.shapes.questions import PLURAL_PHRASE, Query, parse_filter, parse_question
from insightv_research.shapes.reasoning import follows_plan
from insightv_research.shapes.scenes import COLOURS, GRID, KINDS, SIZES, Scene, SceneIndex, Shape

_MENTION = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)}) "
                      r"(?:is )?at row (\d+), column (\d+)", re.I)
_CELL = rf"empty|(?:{'|'.join(SIZES)}) (?:{'|'.join(COLOURS)}) (?:{'|'.join(KINDS)})"
_TAGGED = re.compile(rf"\br(\d+)c(\d+) ({_CELL})\b", re.I)
_CHECK = re.compile(r"\bChecking each (?:cell|row|column) for ([a-z ]+?)"
                    r"(?: left of column (\d+))?: ((?:(?:Row|Column) \d+: [^.]*\.\s*)+)", re.I)
_MARK = r"(?:no|yes|\d+)"
_ENTRY = rf"r\d+c\d+ (?:{_CELL}) {_MARK}"
_UNIT = re.compile(rf"\b(Row|Column) (\d+): ({_ENTRY}(?:, {_ENTRY})*)(?:, so (\d+))?\.", re.I)
_MARKED = re.compile(rf"r(\d+)c(\d+) (?:{_CELL}) ({_MARK})", re.I)
_LEFT = re.compile(r"\bthe number of shapes left of column (\d+) is (-?\d+)", re.I)
_COUNT = re.compile(rf"\bthe number of {PLURAL_PHRASE} is (-?\d+)", re.I)
_EQUATION = re.compile(r"(?<![\d\-+] )(?<!\d)(\d+(?: [+-] \d+)*) = (-?\d+)")
_COMPARISON = re.compile(r"(?<![\d+-] )(?<!column )\b(\d+) ([<>]) (\d+)\b(?! [+-=])")
_COLUMNS = re.compile(r"\bcolumn (\d+) ([<>=]) column (\d+)", re.I)


@dataclass(frozen=True)
class Claim:
    """One checkable statement of a path and whether it holds in the scene."""

    text: str
    holds: bool


def check_claims(scene: Scene, steps: list[ReasoningStep]) -> list[Claim]:
    """Every claim in ``steps`` that can be checked against ``scene``, in order."""
    return [claim for step in steps for claim in step_claims(scene, step)]


def step_claims(scene: Scene, step: ReasoningStep) -> list[Claim]:
    """Every claim in one step that can be checked against ``scene``, in order."""
    claims: list[Claim] = []
    text = step["reasoning"]
    for tag_row, tag_column, seen in tagged_cells(text):
        on_grid = 1 <= tag_row <= GRID and 1 <= tag_column <= GRID
        shape = scene.at(tag_row, tag_column) if on_grid else None
        holds = on_grid and (seen == "empty" if shape is None else seen == shape.name)
        claims.append(Claim(f"row {tag_row}, column {tag_column}: {seen}", holds))
    for match in _CHECK.finditer(text):
        claims += _check_marks(scene, match)
    for match in _MENTION.finditer(text):
        size, colour, kind, row, column = match.groups()
        shape = scene.at(int(row), int(column))
        claims.append(Claim(match.group(0), shape is not None and
                            (shape.size, shape.colour, shape.kind) ==
                            (size.lower(), colour.lower(), kind.lower())))
    for match in _COUNT.finditer(text):
        phrase, number = match.groups()
        claims.append(Claim(match.group(0),
                            len(parse_filter(phrase).select(scene)) == int(number)))
    for match in _LEFT.finditer(text):
        column, number = int(match.group(1)), int(match.group(2))
        claims.append(Claim(match.group(0), number ==
                            sum(shape.column < column for shape in scene.shapes)))
    for match in _EQUATION.finditer(text):
        terms, result = match.groups()
        tokens = terms.split()
        value = int(tokens[0])
        for sign, term in zip(tokens[1::2], tokens[2::2], strict=True):
            value += int(term) if sign == "+" else -int(term)
        claims.append(Claim(match.group(0), value == int(result)))
    for pattern in (_COMPARISON, _COLUMNS):
        for match in pattern.finditer(text):
            left, sign, right = int(match.group(1)), match.group(2), int(match.group(3))
            holds = {"<": left < right, ">": left > right, "=": left == right}[sign]
            claims.append(Claim(match.group(0), holds))
    return claims


def tagged_cells(text: str) -> list[tuple[int, int, str]]:
    """Every cell ``text`` names by its tag ("r1c2 small red circle", "r1c3 empty"), in order:
    (row, column, what it says is there, lower case). Tags off the grid are kept as written."""
    return [(int(match.group(1)), int(match.group(2)), match.group(3).lower())
            for match in _TAGGED.finditer(text)]


def described_scene(text: str) -> Scene | None:
    """The scene a grid description (tagged cells, as :func:`~insightv_research.shapes.scenes.
    describe_grid` writes it) states; ``None`` unless it names every cell once, validly."""
    cells: dict[tuple[int, int], Shape | None] = {}
    for row, column, seen in tagged_cells(text):
        if seen == "empty":
            cells[(row, column)] = None
            continue
        size, colour, kind = seen.split()
        try:
            cells[(row, column)] = Shape(row, column, kind, colour, size)
        except InvalidInputError:
            return None
    if len(cells) != GRID * GRID or any(not (1 <= r <= GRID and 1 <= c <= GRID)
                                        for r, c in cells):
        return None
    return Scene(tuple(shape for shape in cells.values() if shape is not None))


def _check_marks(scene: Scene, match: re.Match[str]) -> list[Claim]:
    """The claims of one cell-by-cell check: each cell's mark (``no``, ``yes`` or the running
    count of matching cells, in the order written), and each ``so N`` count of a row or column
    (which must walk all the cells of that row or column)."""
    condition = parse_filter(match.group(1))
    limit = int(match.group(2)) if match.group(2) else GRID + 1
    what = match.group(1) + (f" left of column {limit}" if match.group(2) else "")
    claims: list[Claim] = []
    running = 0
    for unit in _UNIT.finditer(match.group(3)):
        by_column = unit.group(1).lower() == "column"
        number = int(unit.group(2))
        found, cells = 0, set()
        for entry in _MARKED.finditer(unit.group(3)):
            row, column, mark = int(entry.group(1)), int(entry.group(2)), entry.group(3).lower()
            cells.add((row, column))
            on_grid = 1 <= row <= GRID and 1 <= column <= GRID
            shape = scene.at(row, column) if on_grid else None
            truth = shape is not None and condition.matches(shape) and column < limit
            found += truth
            running += truth
            holds = on_grid and (not truth if mark == "no" else truth and (
                mark == "yes" or int(mark) == running))
            claims.append(Claim(f"row {row}, column {column} for {what}: {mark}", holds))
        if unit.group(4) is not None:
            whole = {(place, number) if by_column else (number, place)
                     for place in range(1, GRID + 1)}
            claims.append(Claim(f"{unit.group(1)} {number} has {unit.group(4)} {what}",
                                cells == whole and int(unit.group(4)) == found))
    return claims


class SceneScorer:
    """Scores all paths of a question against the scene of its image (a
    :class:`~insightv_agents.assessment.PathScorer`).

    ``score = 1 + 99 * (answer_weight * right answer + (1 - answer_weight) * share)``; a path
    with no checkable claim gets nothing for the share. Images not in the index get no score
    (``None``), with a comment saying so.

    Args:
        index: the scenes of the images.
        answer_weight: the weight of the right answer against the share.
        share: ``"claims"``, the share of the path's claims that hold; ``"steps"``, the share
            of its steps with checkable claims whose claims all hold (a process-level
            score: one wrong mark or count makes its step wrong). Per claim, a counting step
            that marks every cell "no" keeps most of its claims, since most cells do not
            match: in the from-scratch run's DPO rounds the chosen paths (the best-scoring
            right ones) all scored 92-100 (README).
        on_plan: a right answer counts only when the path follows a plan for the question
            (its step summaries are the teacher's for it, any strategy:
            :func:`~insightv_research.shapes.reasoning.follows_plan`), as a judge reading the
            question would discount a right answer reached by reasoning about something else
            (a yes/no or small-count question is often answered right by luck). The scene
            knows the right claims but not what the question asks; this adds that.
    """

    name = "scene"

    def __init__(self, index: SceneIndex, *, answer_weight: float = 0.5,
                 share: Literal["claims", "steps"] = "claims", on_plan: bool = False) -> None:
        if not 0 <= answer_weight <= 1:
            raise ValueError("answer_weight must be between 0 and 1")
        if share not in ("claims", "steps"):
            raise ValueError("share must be 'claims' or 'steps'")
        self.index = index
        self.answer_weight = answer_weight
        self.share = share
        self.on_plan = on_plan

    def score_paths(self, request: ScoreRequest) -> list[PathScore]:
        try:
            scene = self.index.lookup(request["images"][0])
        except (InvalidInputError, IndexError):
            return [{"score": None, "comment": "the image is not a scene of the index"}
                    for _ in request["paths"]]
        query = None
        if self.on_plan:
            try:
                query = parse_question(request["question"])
            except InvalidInputError:
                return [{"score": None, "comment": "the question is not one of the shapes world"}
                        for _ in request["paths"]]
        return [self.score(scene, path, request["truth"], query) for path in request["paths"]]

    def score(self, scene: Scene, path: PathResult, truth: str,
              query: Query | None = None) -> PathScore:
        """One path's score; with ``query``, its right answer counts only if it follows a
        plan for it."""
        per_step = [claims for step in path["steps"] if (claims := step_claims(scene, step))]
        claims = [claim for step in per_step for claim in step]
        held = sum(claim.holds for claim in claims)
        sound = sum(all(claim.holds for claim in step) for step in per_step)
        if self.share == "steps":
            share = sound / len(per_step) if per_step else 0.0
        else:
            share = held / len(claims) if claims else 0.0
        check = path.get("check")
        correct = check["correct"] if check else match_answer(path["answer"], truth)["correct"]
        on_plan = query is None or follows_plan(scene, query, path["steps"])
        value = self.answer_weight * bool(correct and on_plan) + (1 - self.answer_weight) * share
        wrong = [claim.text for claim in claims if not claim.holds]
        comment = (f"{held}/{len(claims)} claims hold ({sound}/{len(per_step)} steps); answer "
                   f"{'right' if correct else 'wrong'}"
                   + ("" if on_plan else ", not by a plan for the question")
                   + (f"; wrong: {'; '.join(wrong[:3])}" if wrong else ""))
        return {"score": 1 + round(99 * value), "comment": comment}


def reasoning_check(index: SceneIndex) -> Callable[[Any, dict[str, Any]], bool | None]:
    """For :func:`~insightv_agents.evaluate.evaluate`: whether a prediction's reasoning is
    sound — every checkable claim holds and its last step states the right answer — judged
    against the scene of the item's image (``None`` for an image not in ``index``)."""
    def check(item: Any, result: dict[str, Any]) -> bool | None:
        try:
            scene = index.lookup(item.image)
        except InvalidInputError:
            return None
        steps = result.get("steps") or []
        stated = extract_answer(steps[-1]["reasoning"]) if steps else ""
        right = match_answer(stated, item.answer, choices=item.choices)["correct"] is True
        return right and all(claim.holds for claim in check_claims(scene, steps))
    return check
