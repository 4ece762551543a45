"""The shapes world: generator, labels, teacher, scorer, and their place in synthesis."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from insightv_research.shapes import (
    ANSWER_RULES,
    CATEGORIES,
    STRATEGIES,
    Flaw,
    Query,
    Scene,
    SceneIndex,
    SceneScorer,
    SceneTeacher,
    Shape,
    check_claims,
    draw_scene,
    make_dataset,
    parse_question,
    plan_path,
    random_scene,
    sample_query,
)
from insightv_research.shapes.questions import Filter
from insightv_research.shapes.reasoning import PLAN_SUMMARY, draw_flaws
from insightv_research.shapes.scenes import BACKGROUND, COLOURS, GRID
from PIL import Image

from insightv_agents import InvalidInputError
from insightv_agents.answers import match_answer
from insightv_agents.graphs.synthesis import create_synthesis_graph
from insightv_agents.parsing import format_chain, format_step, parse_steps
from insightv_agents.synthesize import load_items, synthesize, write_run_file
from insightv_agents.trainers.data import load_records

SIZES = {"train": 40, "val": 10, "test": 30}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes") / "data", sizes=SIZES, seed=3)


def rows(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


# --- the generator ---


def test_same_seed_same_bytes_other_seed_other_data(dataset: Path, tmp_path: Path) -> None:
    again = make_dataset(tmp_path / "again", sizes=SIZES, seed=3)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((dataset / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = make_dataset(tmp_path / "other", sizes=SIZES, seed=4)
    assert rows(other, "test") != rows(dataset, "test")
    # Made again into the same folder: left alone; different settings: refused.
    assert make_dataset(again, sizes=SIZES, seed=3) == again
    with pytest.raises(InvalidInputError, match="different"):
        make_dataset(again, sizes=SIZES, seed=5)


def test_splits_are_balanced_disjoint_and_in_the_synthesis_format(dataset: Path) -> None:
    images = {split: {row["image"] for row in rows(dataset, split)} for split in SIZES}
    assert not images["train"] & images["test"] and not images["val"] & images["test"]
    for split, size in SIZES.items():
        split_rows = rows(dataset, split)
        assert len(split_rows) == size
        counts = {c: sum(r["category"] == c for r in split_rows) for c in CATEGORIES}
        assert max(counts.values()) - min(counts.values()) <= 1
    items, root = load_items(dataset / "test.jsonl")
    assert len(items) == SIZES["test"] and root == dataset.resolve()


def test_pictures_show_their_scene(dataset: Path) -> None:
    """Each cell's centre has the shape's colour, and empty cells are background."""
    index = SceneIndex.from_folder(dataset)
    for row in rows(dataset, "test"):
        picture = Image.open(dataset / row["image"]).convert("RGB")
        scene = index.lookup(dataset / row["image"])
        cell = picture.width // GRID
        for r in range(1, GRID + 1):
            for c in range(1, GRID + 1):
                # a little below the centre: inside triangles too
                x, y = (c - 1) * cell + cell // 2, (r - 1) * cell + cell * 5 // 8
                pixel = picture.getpixel((x, y))
                shape = scene.at(r, c)
                assert pixel == (COLOURS[shape.colour] if shape else BACKGROUND)


def test_labels_agree_with_the_scene_description(dataset: Path) -> None:
    """Answers recomputed here, by plain loops over the scene description."""
    index = SceneIndex.from_folder(dataset)
    for split in SIZES:
        for row in rows(dataset, split):
            scene = index.lookup(dataset / row["image"])
            query = parse_question(row["question"])
            assert query.text() == row["question"] and query.category == row["category"]
            assert independent_answer(scene, query) == row["answer"]
            # the shapes world's rule check decides every answer against every label
            for other in ("yes", "7", "red", "small", "circle"):
                decided = match_answer(other, row["answer"], rules=ANSWER_RULES)["correct"]
                assert decided is (other == row["answer"])


def independent_answer(scene: Scene, query: Query) -> str:
    def count(f: Filter | None) -> int:
        assert f is not None
        return sum(1 for s in scene.shapes if (f.size in (None, s.size))
                   and (f.colour in (None, s.colour)) and (f.kind in (None, s.kind)))

    def find(f: Filter | None) -> Shape:
        (found,) = [s for s in scene.shapes if f and (s.size, s.colour, s.kind) ==
                    (f.size, f.colour, f.kind)]
        return found

    if query.kind == "attribute":
        shape = next(s for s in scene.shapes if (s.row, s.column) == query.cell)
        return str(getattr(shape, query.attribute or ""))
    if query.kind in ("count", "total", "difference", "more", "remove"):
        a = count(query.a)
        b = count(query.b) if query.b else 0
        return {"count": str(a), "total": str(a + b), "difference": str(a - b),
                "more": "yes" if a > b else "no",
                "remove": str(len(scene.shapes) - a)}[query.kind]
    ref = find(query.a)
    if query.kind == "left_count":
        return str(len([s for s in scene.shapes if s.column < ref.column]))
    if query.kind == "below":
        return next(s.colour for s in scene.shapes
                    if (s.row, s.column) == (ref.row + 1, ref.column))
    return "yes" if ref.column < find(query.b).column else "no"


def test_every_question_form_reads_back_and_others_are_refused() -> None:
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        scene = random_scene(rng)
        query = sample_query(scene, rng.choice(CATEGORIES), rng)
        assert parse_question(query.text()) == query
        kinds.add(query.kind)
    assert len(kinds) == 9
    with pytest.raises(InvalidInputError, match="not a question of the shapes world"):
        parse_question("What is the meaning of this chart?")


def test_scene_descriptions_are_validated() -> None:
    with pytest.raises(InvalidInputError, match="off the grid"):
        Shape(5, 1, "circle", "red", "small")
    with pytest.raises(InvalidInputError, match="unknown shape"):
        Shape(1, 1, "hexagon", "red", "small")
    with pytest.raises(InvalidInputError, match="share a cell"):
        Scene((Shape(1, 1, "circle", "red", "small"), Shape(1, 1, "square", "red", "large")))
    with pytest.raises(InvalidInputError, match="not a scene"):
        Scene.from_dict({"shapes": [{"row": 1}]})


# --- reasoning paths, the teacher and the scorer ---


def test_every_strategy_reaches_the_label_and_every_claim_holds(dataset: Path) -> None:
    index = SceneIndex.from_folder(dataset)
    for row in rows(dataset, "train"):
        scene = index.lookup(dataset / row["image"])
        for strategy in STRATEGIES:
            path = plan_path(scene, parse_question(row["question"]), strategy=strategy)
            assert path.answer == row["answer"]
            assert [s["action"] for s in path.steps] == \
                ["continue"] * (len(path.steps) - 1) + ["summary"]
            assert parse_steps(format_chain(path.steps)) == path.steps
            claims = check_claims(scene, path.steps)
            assert claims and all(claim.holds for claim in claims), claims


def test_injected_errors_are_found_and_lower_the_score(dataset: Path) -> None:
    index = SceneIndex.from_folder(dataset)
    scorer = SceneScorer(index)
    rng = random.Random(1)
    lowered = 0
    for row in rows(dataset, "train"):
        scene = index.lookup(dataset / row["image"])
        query = parse_question(row["question"])
        strategy = rng.choice(STRATEGIES)
        clean = plan_path(scene, query, strategy=strategy)
        try:
            flawed = plan_path(scene, query, strategy=strategy,
                               flaws=draw_flaws(scene, query, rng, rng.randint(1, 2)))
        except InvalidInputError:
            continue
        if flawed.steps == clean.steps:
            continue  # the flaw touched nothing this path says
        assert not all(c.holds for c in check_claims(scene, flawed.steps))
        scores = [scorer.score(scene, {"steps": p.steps, "answer": p.answer, "check": None},
                               row["answer"])["score"] for p in (clean, flawed)]
        assert scores[0] == 100 and scores[1] < scores[0]
        lowered += 1
    assert lowered >= 25


def test_per_step_share_scores_a_chain_that_marks_every_cell_no_far_lower() -> None:
    """A counting step that marks every cell "no" keeps most of its claims (few cells match)
    and so most of a per-claim score; per step, that step is simply wrong."""
    scene = Scene((Shape(1, 1, "circle", "red", "small"), Shape(2, 3, "square", "red", "large"),
                   Shape(4, 4, "circle", "blue", "small")))
    query = Query("count", Filter(colour="red"))
    clean = plan_path(scene, query, strategy="cells")
    lazy = [dict(step) for step in clean.steps]
    counting = next(s for s in lazy if s["reasoning"].startswith("Checking each cell"))
    counting["reasoning"] = re.sub(r"(r\dc\d [a-z ]+?) (?:yes|\d+)\b", r"\1 no",
                                   counting["reasoning"])
    assert counting["reasoning"] != next(
        s for s in clean.steps if s["reasoning"].startswith("Checking each cell"))["reasoning"]
    index = SceneIndex({})

    def score(steps: list[Any], share: str) -> int:
        scorer = SceneScorer(index, share=share)  # type: ignore[arg-type]
        return scorer.score(scene, {"steps": steps, "answer": "2", "check": None}, "2")["score"]

    assert score(clean.steps, "claims") == score(clean.steps, "steps") == 100
    per_claim, per_step = score(lazy, "claims"), score(lazy, "steps")
    assert per_claim >= 90
    assert per_step < per_claim - 10
    with pytest.raises(ValueError, match="share"):
        SceneScorer(index, share="words")  # type: ignore[arg-type]


def test_on_plan_scorer_counts_a_right_answer_only_from_a_plan_for_the_question(
        dataset: Path) -> None:
    """A chain about another question that lands on the right answer (luck) keeps its
    claims' share but not the answer's half of the score; a chain on the plan loses nothing."""
    from insightv_research.shapes.reasoning import follows_plan

    from insightv_agents.images import load_images

    index = SceneIndex.from_folder(dataset)
    row = next(r for r in rows(dataset, "train") if parse_question(r["question"]).kind == "count")
    scene = index.lookup(dataset / row["image"])
    query = parse_question(row["question"])
    asked = plan_path(scene, query, strategy="rows", plan_step=True)
    target = query.a
    assert target is not None
    other = Query("count", Filter(colour=next(c for c in COLOURS if c != target.colour)))
    elsewhere = plan_path(scene, other, strategy="cells")
    assert follows_plan(scene, query, asked.steps)
    assert not follows_plan(scene, query, elsewhere.steps)
    paths = [{"steps": p.steps, "answer": row["answer"], "check": None}
             for p in (asked, elsewhere)]  # both answer right
    request = {"question": row["question"], "truth": row["answer"],
               "images": load_images(dataset / row["image"]), "paths": paths}
    plain = SceneScorer(index).score_paths(request)  # type: ignore[arg-type]
    on_plan = SceneScorer(index, on_plan=True).score_paths(request)  # type: ignore[arg-type]
    assert plain[0]["score"] == on_plan[0]["score"] == 100
    assert plain[1]["score"] == 100 and on_plan[1]["score"] == 51
    assert "not by a plan for the question" in (on_plan[1]["comment"] or "")
    unknown = SceneScorer(index, on_plan=True).score_paths(
        {**request, "question": "What is this?"})  # type: ignore[arg-type]
    assert [score["score"] for score in unknown] == [None, None]


def test_reasoning_flaws_change_one_number_and_carry_on() -> None:
    scene = Scene((Shape(1, 1, "circle", "red", "small"), Shape(2, 3, "square", "red", "large"),
                   Shape(4, 4, "circle", "blue", "small")))
    query = Query("total", Filter(colour="red"), Filter(colour="blue"))
    assert plan_path(scene, query).answer == "3"
    miscount = plan_path(scene, query, strategy="cells", flaws=[Flaw("miscount", delta=1)])
    assert miscount.answer == "4" and miscount.used == ["miscount"]
    assert "the number of red shapes is 3" in miscount.steps[1]["reasoning"]
    arithmetic = plan_path(scene, query, flaws=[Flaw("arithmetic", delta=-1)])
    assert arithmetic.steps[-1]["reasoning"].startswith("2 + 1 = 2.")
    omit = plan_path(scene, query, flaws=[Flaw("omit", scene.shapes[0])])
    assert omit.answer == "2" and "row 1, column 1" not in format_chain(omit.steps)


def test_every_path_first_describes_the_grid_it_believes_and_the_scorer_checks_it() -> None:
    scene = Scene((Shape(1, 2, "circle", "red", "small"), Shape(3, 4, "square", "blue", "large")))
    query = Query("count", Filter(colour="red"))
    first = plan_path(scene, query, strategy="rows").steps[0]
    assert first["summary"] == "Describe the image" and first["reasoning"] == (
        "r1c1 empty, r1c2 small red circle, r1c3 empty, r1c4 empty. "
        "r2c1 empty, r2c2 empty, r2c3 empty, r2c4 empty. "
        "r3c1 empty, r3c2 empty, r3c3 empty, r3c4 large blue square. "
        "r4c1 empty, r4c2 empty, r4c3 empty, r4c4 empty.")
    claims = check_claims(scene, [first])
    assert len(claims) == 16 and all(claim.holds for claim in claims)
    seen = Shape(1, 2, "circle", "green", "small")
    flawed = plan_path(scene, query, flaws=[Flaw("misperceive", scene.shapes[0], seen)])
    assert "r1c2 small green circle, r1c3 empty" in flawed.steps[0]["reasoning"]
    wrong = [claim.text for claim in check_claims(scene, flawed.steps[:1]) if not claim.holds]
    assert wrong == ["row 1, column 2: small green circle"]


def test_checks_name_each_cell_by_its_tag_and_the_scorer_checks_copy_mark_and_tally() -> None:
    scene = Scene((Shape(1, 2, "circle", "red", "small"), Shape(3, 4, "square", "red", "large")))
    step = plan_path(scene, Query("count", Filter(colour="red")), strategy="cells").steps[1]
    text = step["reasoning"]
    assert text.startswith("Checking each cell for red shapes: Row 1: r1c1 empty no, "
                           "r1c2 small red circle 1, r1c3 empty no, r1c4 empty no.")
    assert "r3c4 large red square 2." in text

    def wrong(reasoning: str) -> list[str]:
        step_ = {"summary": "", "reasoning": reasoning, "action": "continue"}
        return [claim.text for claim in check_claims(scene, [step_]) if not claim.holds]

    assert wrong(text) == []
    assert wrong(text.replace("r1c2 small red circle 1", "r1c2 small red circle no")) == [
        "row 1, column 2 for red shapes: no"]
    assert wrong(text.replace("r1c2 small red circle", "r1c2 small blue circle")) == [
        "row 1, column 2: small blue circle"]
    assert wrong(text.replace("r3c4 large red square 2", "r3c4 large red square 3")) == [
        "row 3, column 4 for red shapes: 3"]
    rows = plan_path(scene, Query("count", Filter(colour="red")), strategy="rows").steps[1]
    assert "Row 1: r1c1 empty no, r1c2 small red circle yes, r1c3 empty no, r1c4 empty no, " \
           "so 1." in rows["reasoning"]
    skipped = rows["reasoning"].replace("r1c3 empty no, ", "")
    assert wrong(skipped) == ["Row 1 has 1 red shapes"]  # a tally must walk the whole row


def test_teacher_paths_through_the_synthesis_graph_reach_the_label(dataset: Path,
                                                                  tmp_path: Path) -> None:
    index = SceneIndex.from_folder(dataset)
    teacher = SceneTeacher(index=index, flaw_rate=0.0, seed=0)
    graph = create_synthesis_graph(teacher=teacher, scorer=SceneScorer(index), paths=3).compile()
    items, root = load_items(dataset / "test.jsonl")
    write_run_file(tmp_path / "out", {"data_root": str(root), "paths": 3})
    report = asyncio.run(synthesize(graph, items, tmp_path / "out", concurrency=4, fsync=False))
    assert report.written == len(items) and not report.errors
    records = [r for paths in load_records(tmp_path / "out").questions.values() for r in paths]
    assert len(records) == 3 * len(items)
    strategies = set()
    for record in records:
        assert record["status"] == "ok" and record["correct"] is True and record["score"] == 100
        assert all(format_step(step) for step in record["steps"])
        check = record["steps"][1]["reasoning"]
        strategies.add((check.split(":")[0], "Column 1:" in check))
    assert len(strategies) >= 3  # several strategies per question


def test_plan_step_states_the_later_steps_and_changes_nothing_else(dataset: Path,
                                                                    tmp_path: Path) -> None:
    index = SceneIndex.from_folder(dataset)
    for row in rows(dataset, "train")[:20]:
        scene, query = index.lookup(dataset / row["image"]), parse_question(row["question"])
        plain = plan_path(scene, query, strategy="rows")
        planned = plan_path(scene, query, strategy="rows", plan_step=True)
        assert planned.answer == plain.answer == row["answer"]
        assert planned.steps[:1] + planned.steps[2:] == plain.steps
        plan = planned.steps[1]
        assert plan["summary"] == PLAN_SUMMARY and plan["action"] == "continue"
        assert plan["reasoning"].lower() == ", then ".join(
            step["summary"].lower() for step in plain.steps[1:]) + "."
        assert check_claims(scene, planned.steps) == check_claims(scene, plain.steps)
        first = plan_path(scene, query, strategy="rows", plan_step=True, plan_first=True)
        assert first.steps == [plan, *plain.steps] and first.answer == plain.answer
    # Through the synthesis graph, step by step: the plan is a step of its own.
    teacher = SceneTeacher(index=index, flaw_rate=0.0, plan_step=True, seed=0)
    graph = create_synthesis_graph(teacher=teacher, scorer=SceneScorer(index), paths=2,
                                   mode="step").compile()
    ahead = SceneTeacher(index=index, flaw_rate=0.0, plan_step=True, plan_first=True, seed=0)
    assert ahead._identifying_params["plan_first"] is True
    items, root = load_items(dataset / "test.jsonl", limit=5)
    write_run_file(tmp_path / "out", {"data_root": str(root), "paths": 2})
    asyncio.run(synthesize(graph, items, tmp_path / "out", concurrency=2, fsync=False))
    records = [r for paths in load_records(tmp_path / "out").questions.values() for r in paths]
    assert len(records) == 10
    for record in records:
        assert record["correct"] is True and record["score"] == 100
        assert record["steps"][1]["summary"] == PLAN_SUMMARY


def test_seeded_teacher_draws_the_same_paths_in_any_request_order(dataset: Path) -> None:
    from insightv_agents.images import load_images
    from insightv_agents.prompts import DEFAULT_PROMPTS, reasoning_messages

    index = SceneIndex.from_folder(dataset)
    conversations = [reasoning_messages(prompts=DEFAULT_PROMPTS, mode="chain", steps=[],
                                        question=row["question"],
                                        images=load_images(dataset / row["image"]))
                     for row in rows(dataset, "train")[:6]]

    def paths(order: list[int], seed: int = 3) -> dict[int, list[str]]:
        teacher = SceneTeacher(index=index, flaw_rate=0.5, seed=seed)
        drawn: dict[int, list[str]] = {}
        for number in order:  # each question asked 3 times, questions interleaved
            drawn.setdefault(number, []).append(
                str(teacher.invoke(conversations[number]).content))
        return drawn

    forward = paths([0, 1, 2, 3, 4, 5] * 3)
    assert paths([5, 4, 3, 2, 1, 0] * 3) == forward
    assert paths([0] * 3 + [3, 1] * 3 + [5, 2, 4] * 3) == forward
    assert paths([0, 1, 2, 3, 4, 5] * 3, seed=4) != forward


def test_flawed_teacher_paths_score_below_clean_ones(dataset: Path, tmp_path: Path) -> None:
    index = SceneIndex.from_folder(dataset)
    teacher = SceneTeacher(index=index, flaw_rate=0.5, max_flaws=2, seed=1)
    graph = create_synthesis_graph(teacher=teacher, scorer=SceneScorer(index), paths=4).compile()
    items, root = load_items(dataset / "train.jsonl")
    write_run_file(tmp_path / "out", {"data_root": str(root), "paths": 4})
    asyncio.run(synthesize(graph, items, tmp_path / "out", concurrency=4, fsync=False))
    records = [r for paths in load_records(tmp_path / "out").questions.values() for r in paths]
    wrong = [r["score"] for r in records if r["correct"] is False]
    right = [r["score"] for r in records if r["correct"] is True]
    assert wrong and right and max(wrong) <= 50 < min(right)  # the answer weighs half
    # Some flawed paths still reach the right answer, and score below the clean ones.
    assert any(r["score"] < 100 for r in records if r["correct"] is True)


def test_teacher_chain_mode_final_answer_and_n(dataset: Path) -> None:
    from insightv_agents.images import load_images
    from insightv_agents.prompts import DEFAULT_PROMPTS, final_answer_messages, reasoning_messages

    index = SceneIndex.from_folder(dataset)
    row = rows(dataset, "test")[1]
    images = load_images(dataset / row["image"])
    teacher = SceneTeacher(index=index, flaw_rate=0.0, seed=0)
    chain = teacher.invoke(reasoning_messages(prompts=DEFAULT_PROMPTS, mode="chain",
                                              question=row["question"], images=images, steps=[]))
    steps = parse_steps(str(chain.content))
    assert steps[-1]["action"] == "summary" and f"The answer is {row['answer']}." in \
        steps[-1]["reasoning"]
    answer = teacher.invoke(final_answer_messages(prompts=DEFAULT_PROMPTS,
                                                  question=row["question"], images=images,
                                                  steps=steps))
    assert json.loads(str(answer.content)) == {"answer": row["answer"]}
    result = teacher.generate([reasoning_messages(prompts=DEFAULT_PROMPTS, mode="step",
                                                  question=row["question"], images=images,
                                                  steps=[])], n=3)
    assert len(result.generations[0]) == 3
    outside = draw_scene(random_scene(random.Random(99)))
    with pytest.raises(InvalidInputError, match="not a scene of the index"):
        teacher.invoke(reasoning_messages(prompts=DEFAULT_PROMPTS, mode="chain",
                                          question=row["question"],
                                          images=load_images(outside), steps=[]))


def test_bad_dataset_settings_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown categories"):
        make_dataset(tmp_path / "a", categories=["colour"])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="0 or more"):
        make_dataset(tmp_path / "b", sizes={"train": -1})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="not empty"):
        make_dataset(tmp_path / "c", sizes={"test": 2})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]
    with pytest.raises(InvalidInputError, match="not a shapes dataset"):
        SceneIndex.from_folder(tmp_path / "c")


def test_scorer_gives_no_score_for_an_image_outside_its_index(dataset: Path) -> None:
    from insightv_agents.images import load_images

    scorer = SceneScorer(SceneIndex.from_folder(dataset))
    outside = load_images(draw_scene(random_scene(random.Random(99))))
    path = {"steps": [], "answer": "1", "check": None}
    scores = scorer.score_paths({"question": "q", "truth": "1", "images": outside,
                                 "paths": [path, path]})  # type: ignore[typeddict-item]
    assert scores == [{"score": None, "comment": "the image is not a scene of the index"}] * 2


def test_described_scene_reads_a_whole_grid_description_back() -> None:
    from insightv_research.shapes.scenes import describe_grid
    from insightv_research.shapes.scorer import described_scene

    scene = Scene((Shape(1, 2, "circle", "red", "small"), Shape(3, 4, "square", "blue", "large")))
    assert described_scene(describe_grid(scene)) == scene
    assert described_scene(describe_grid(scene).replace("r4c4 empty", "")) is None


def test_tagged_cells_reads_every_tag_in_order_off_grid_ones_too() -> None:
    from insightv_research.shapes.scorer import tagged_cells

    text = "So R1C2 Small Red Circle, then r1c3 empty; r9c9 large blue square and r2c2 nothing."
    assert tagged_cells(text) == [(1, 2, "small red circle"), (1, 3, "empty"),
                                  (9, 9, "large blue square")]
    assert tagged_cells("") == []
