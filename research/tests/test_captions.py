"""The caption probe (shapes.captions) and the caption stage that trains until the base sees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from insightv_research.reproduce import (
    CAPTION_PROBE,
    CAPTION_PROBE_FILE,
    CAPTION_REQUEST,
    ReproduceSettings,
    Run,
    results_markdown,
)
from insightv_research.shapes.captions import (
    CaptionAccuracy,
    caption_accuracy,
    cells_right,
    described_cells,
)
from insightv_research.shapes.dataset import make_dataset
from insightv_research.shapes.scenes import SceneIndex, describe_grid

from insightv_agents import InvalidInputError


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    make_dataset(folder, sizes={"train": 6, "dpo": CAPTION_PROBE + 2, "test": 2}, seed=0)
    return folder


def scenes(data: Path) -> list[tuple[Path, Any]]:
    index = SceneIndex.from_folder(data)
    rows = [json.loads(line) for line in (data / "dpo.jsonl").read_text().splitlines()]
    return [(data / row["image"], index.lookup(data / row["image"])) for row in rows]


def test_a_description_is_scored_cell_by_cell_against_its_scene(data: Path) -> None:
    scene = scenes(data)[0][1]
    truth = describe_grid(scene)
    assert cells_right(truth, scene) == (16, 16)
    assert cells_right(truth.replace("\n", " "), scene) == (16, 16)  # layout does not matter
    cells = described_cells(truth)
    tag = next(tag for tag, contents in cells.items() if contents != "empty")
    wrong = truth.replace(f"{tag} {cells[tag]}", f"{tag} empty")
    assert cells_right(wrong, scene) == (15, 16)
    dropped = ", ".join(part for part in truth.split(", ") if not part.startswith("r1c1"))
    assert cells_right(dropped, scene) == (15, 16)  # a cell left out is wrong
    assert cells_right(f"r1c1 small red square, {truth}", scene)[0] == \
        15 + (cells["r1c1"] == "small red square")  # the first mention counts
    assert cells_right("", scene) == (0, 16)


@pytest.mark.slow
def test_caption_accuracy_runs_a_real_model_on_the_pictures(data: Path, tmp_path: Path) -> None:
    from insightv_agents.tiny import build_tiny_idefics3

    model = build_tiny_idefics3(tmp_path / "tiny")
    seen = caption_accuracy(model, scenes(data)[:2], request=CAPTION_REQUEST, max_new_tokens=8)
    assert seen == CaptionAccuracy(cells=0.0, pictures=0.0, n=2)  # untrained: no cell named
    with pytest.raises(InvalidInputError):
        caption_accuracy(model, [], request=CAPTION_REQUEST)


def scripted_caption_stage(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch,
                           cells: list[float], **settings: Any) -> tuple[Run, list[Any]]:
    """Run.pretrain with SFT and the probe scripted: each 'training' writes a finished
    model folder; the probe says ``cells`` in turn."""
    from insightv_agents.trained import TRAINING_FILE

    run = Run(ReproduceSettings(out=tmp_path / "run", **settings), log=lambda line: None)
    (run.out / "data").mkdir(parents=True)
    for name in ("train.jsonl", "dpo.jsonl", "test.jsonl", "images"):
        (run.out / "data" / name).symlink_to(data / name)
    run.index = SceneIndex.from_folder(data)
    trained: list[Any] = []

    def train(model: Path, rows: Any, out: Path, epochs: float, **kwargs: Any) -> None:
        trained.append((Path(model).name, out.name, epochs, len(rows)))
        out.mkdir(parents=True)
        (out / TRAINING_FILE).write_text(json.dumps({"finished": True, "from": str(model)}))

    script = iter(cells)
    probed: list[int] = []

    def seeing(model: Path) -> CaptionAccuracy:
        probed.append(1)
        return CaptionAccuracy(cells=next(script), pictures=0.0, n=CAPTION_PROBE)

    monkeypatch.setattr(run, "train", train)
    monkeypatch.setattr(run, "seeing", seeing)
    run.pretrain(tmp_path / "text")
    return run, trained


def test_the_caption_stage_goes_on_until_the_base_sees(data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run, trained = scripted_caption_stage(tmp_path, data, monkeypatch, [0.69, 0.9, 0.99, 1.0],
                                          caption_cell_target=0.98)
    assert trained == [("text", "part-1", 15, 6), ("part-1", "part-2", 5, 6),
                       ("part-2", "part-3", 5, 6)]  # stops once 0.99 >= 0.98
    base = json.loads((run.models / "base" / "insightv_training.json").read_text())
    assert base["from"].endswith("part-2")  # the last part became the base
    probes = json.loads((run.out / CAPTION_PROBE_FILE).read_text())
    assert [(p["epochs"], p["cells"]) for p in probes] == [(15, 0.69), (20, 0.9), (25, 0.99)]
    assert run.caption_probes() == probes
    # a finished base is not trained again
    run.pretrain(tmp_path / "text")
    assert len(trained) == 3


def test_the_caption_stage_stops_at_its_cap_or_without_a_target(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, trained = scripted_caption_stage(tmp_path / "cap", data, monkeypatch, [0.5] * 10,
                                        caption_cell_target=0.98, max_caption_epochs=27)
    assert [epochs for *_, epochs, _ in trained] == [15, 5, 5]  # a fourth part would pass 27
    run, trained = scripted_caption_stage(tmp_path / "off", data, monkeypatch, [0.5])
    assert [(name, epochs) for _, name, epochs, _ in trained] == [("part-1", 15)]
    assert run.caption_probes() == [{"epochs": 15, "cells": 0.5, "pictures": 0.0}]  # measured
    with pytest.raises(ValueError, match="max_caption_epochs"):
        ReproduceSettings(out=tmp_path / "bad", caption_epochs=20, max_caption_epochs=10,
                          caption_cell_target=0.98)


def test_the_results_say_what_the_caption_probe_measured() -> None:
    results = json.loads((Path(__file__).parents[1] / "docs" / "reproduce-v9.json").read_text())
    assert "Caption probe" not in results_markdown(results)
    results["caption_probe"] = [{"epochs": 15, "cells": 0.6937, "pictures": 0.0},
                                {"epochs": 20, "cells": 0.99, "pictures": 0.85}]
    assert ("Caption probe (held-out cells, pictures whole): 15 epochs 69.4%, 0%; "
            "20 epochs 99.0%, 85%.") in results_markdown(results)
