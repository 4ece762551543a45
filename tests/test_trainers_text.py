"""Text-only pre-training (span copies + the run's texts) of a model trained from scratch."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes
from langchain_core.messages import HumanMessage
from pydantic import ValidationError

from insightv_agents.errors import InvalidInputError
from insightv_agents.testing import build_tiny_idefics3
from insightv_agents.trainers.text import (
    TextPretrainSettings,
    _Sequences,
    measure_copying,
    pretrain_text,
)

TEXTS = ['{"summary": "Describe the image", "reasoning": "r1c1 empty, r1c2 small red circle."}',
         "How many blue shapes are there?", "Are there more squares than circles?"]


def test_copy_sequences_mark_only_what_a_copy_of_the_earlier_span_predicts() -> None:
    settings = TextPretrainSettings(output_dir=Path("unused"), seq_len=96, max_gap=20)
    texts = [list(range(10, 60)), list(range(60, 75))]
    sequences = _Sequences(texts, vocab=range(10, 200), settings=settings, seed=3)
    marked = 0
    for _ in range(50):
        ids, copied = sequences.copy()
        assert len(ids) == len(copied) == 96
        for i in (i for i, flag in enumerate(copied) if flag):
            # an induction step: the same (previous, this) pair occurs earlier
            assert any(ids[j - 1] == ids[i - 1] and ids[j] == ids[i] for j in range(1, i - 1))
            marked += 1
        ids, copied = sequences.text()
        assert len(ids) == 96 and not any(copied)
        assert all(10 <= token < 75 for token in ids)
    assert marked > 50 * 10


@pytest.mark.slow
def test_pretrain_text_trains_the_language_part_only_and_resumes(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from insightv_agents.backends.transformers import ChatTransformersVLM
    from insightv_agents.trained import TRAINING_FILE

    base = build_tiny_idefics3(tmp_path / "base")
    settings = TextPretrainSettings(output_dir=tmp_path / "text", steps=30, long_steps=10,
                                    batch_size=4, seq_len=48, max_gap=8, log_every=10,
                                    learning_rate=3e-3)
    lines: list[str] = []
    out = pretrain_text(base, TEXTS * 5, settings, log=lines.append)
    run = json.loads((out / TRAINING_FILE).read_text())
    history = run["log_history"]
    assert [h["step"] for h in history] == [10, 20, 30] and len(lines) == 3
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0 <= run["metrics"]["copy_accuracy"] <= 1
    # The same probe, on the saved model: the run's last measurement, again.
    measured = measure_copying(out, TEXTS * 5, settings)
    assert measured == {key: run["metrics"][key]
                        for key in ("copy_accuracy", "far_copy_accuracy")}
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [k for k in before if "vision" in k or "connector" in k]
    text = [k for k in before if "text_model" in k]
    assert vision and text
    assert all(torch.equal(before[k], after[k]) for k in vision)  # no image was seen
    assert not all(torch.equal(before[k], after[k]) for k in text)
    # A whole model with its processor, loaded as it is.
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    reply = ChatTransformersVLM(model_path=str(out), max_new_tokens=4).invoke(
        [HumanMessage([{"type": "image_url", "image_url": {"url": url}},
                       {"type": "text", "text": "How many?"}])])
    assert isinstance(reply.text, str)
    # Finished: a rerun keeps it as it is.
    stamp = (out / TRAINING_FILE).stat().st_mtime_ns
    assert pretrain_text(base, TEXTS, settings, log=lines.append) == out
    assert (out / TRAINING_FILE).stat().st_mtime_ns == stamp and len(lines) == 3


@pytest.mark.slow
def test_pretrain_text_starts_the_long_phase_once_near_copying_is_there_up_to_the_cap(
        tmp_path: Path) -> None:
    from insightv_agents.trained import TRAINING_FILE

    base = build_tiny_idefics3(tmp_path / "base")
    # 30 steps, the last 10 long. A near target no tiny model reaches: at step 20 and 25 the
    # short phase goes on 5 more steps; at 30 a third would pass the cap of 30 short steps.
    # The long phase then runs its 10 steps (30-40), its decay with it (37-40).
    settings = TextPretrainSettings(output_dir=tmp_path / "text", steps=30, long_steps=10,
                                    batch_size=4, seq_len=48, max_gap=8, log_every=5,
                                    near_copy_target=1.0, max_short_steps=30)
    lines: list[str] = []
    lengths: list[int] = []
    from insightv_agents.trainers import text as text_module

    real_batch = text_module._Sequences.batch

    def batch(self: Any, size: int) -> Any:
        rows = real_batch(self, size)
        lengths.append(len(rows[0]))
        return rows

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text_module._Sequences, "batch", batch)
        out = pretrain_text(base, TEXTS * 5, settings, log=lines.append)
    run = json.loads((out / TRAINING_FILE).read_text())
    assert run["steps"] == 40 and run["extra_short_steps"] == 10
    assert run["extra_long_steps"] == 0
    assert lengths == [48] * 30 + [512] * 10  # 30 short steps, then the 10 long ones
    extended = [line for line in lines if "more short steps" in line]
    assert len(extended) == 2 and extended[0].startswith("  text step 20: copy accuracy")


@pytest.mark.slow
def test_pretrain_text_extends_the_long_phase_until_far_copying_up_to_the_cap(
        tmp_path: Path) -> None:
    from insightv_agents.trained import TRAINING_FILE

    base = build_tiny_idefics3(tmp_path / "base")
    # 30 steps: the last 10 long, the decay over the last 3. A target no tiny model reaches:
    # at step 27 and 32 the long phase goes on 5 more steps; at 37 a third extension would
    # bring the long phase to 25 steps, over the cap of 20.
    settings = TextPretrainSettings(output_dir=tmp_path / "text", steps=30, long_steps=10,
                                    batch_size=4, seq_len=48, max_gap=8, log_every=5,
                                    far_copy_target=1.0, max_long_steps=20)
    lines: list[str] = []
    out = pretrain_text(base, TEXTS * 5, settings, log=lines.append)
    run = json.loads((out / TRAINING_FILE).read_text())
    assert run["steps"] == 40 and run["extra_long_steps"] == 10
    assert run["extra_short_steps"] == 0
    assert [h["step"] for h in run["log_history"]] == list(range(5, 45, 5))
    extended = [line for line in lines if "more long steps" in line]
    assert len(extended) == 2 and extended[0].startswith("  text step 27: far copy accuracy")


def test_text_settings_check_the_long_phase() -> None:
    with pytest.raises(ValidationError, match="last tenth"):
        TextPretrainSettings(output_dir=Path("o"), steps=3000, long_steps=200,
                             far_copy_target=0.5)
    with pytest.raises(ValidationError, match="less than long_steps"):
        TextPretrainSettings(output_dir=Path("o"), far_copy_target=0.5, max_long_steps=300)
    # more long steps than steps: all of them are long
    TextPretrainSettings(output_dir=Path("o"), steps=10, far_copy_target=0.5, max_long_steps=10)
    assert TextPretrainSettings(output_dir=Path("o"), far_copy_target=0.5).max_long_steps == 1200
    with pytest.raises(ValidationError, match="needs a short phase"):
        TextPretrainSettings(output_dir=Path("o"), steps=10, near_copy_target=0.5)
    with pytest.raises(ValidationError, match="less than the short steps planned"):
        TextPretrainSettings(output_dir=Path("o"), near_copy_target=0.5, max_short_steps=2000)
    TextPretrainSettings(output_dir=Path("o"), near_copy_target=0.5, max_short_steps=2600)


def test_pretrain_text_needs_texts(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="at least one text"):
        pretrain_text(tmp_path / "nowhere", [], TextPretrainSettings(output_dir=tmp_path / "o"))
    with pytest.raises(InvalidInputError, match="at least one text"):
        measure_copying(tmp_path / "nowhere", [])


def test_pretrain_text_in_bf16_mixed_computes_in_bfloat16_keeps_float32_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16-mixed: every training step runs under bfloat16 autocast (float32: none does), and
    the saved weights are float32 both times."""
    import torch
    from safetensors.torch import load_file

    base = build_tiny_idefics3(tmp_path / "base")
    real, entered = torch.autocast, []

    def spy(device_type: str, dtype: object = None, enabled: bool = True, **kw: object) -> object:
        entered.append((device_type, dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    for dtype in ("float32", "bf16-mixed"):
        entered.clear()
        settings = TextPretrainSettings(output_dir=tmp_path / dtype, steps=6, long_steps=0,
                                        batch_size=4, seq_len=48, max_gap=8, log_every=6,
                                        dtype=dtype)
        out = pretrain_text(base, TEXTS * 5, settings, log=lambda line: None)
        on = [e for e in entered if e[2]]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        assert on == ([(device, torch.bfloat16, True)] * 6 if dtype == "bf16-mixed" else [])
        weights = load_file(out / "model.safetensors")
        assert {str(tensor.dtype) for tensor in weights.values()} == {"torch.float32"}
