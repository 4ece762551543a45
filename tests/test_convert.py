"""`insightv convert`: a LLaVA-NeXT checkpoint in the LLaVA repository's layout (as the
released Insight-V LLaMA-3 agents are) to a transformers folder, checked on a tiny checkpoint
built offline in that layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import png_bytes
from typer.testing import CliRunner

from insightv_agents import ConfigError, InvalidInputError
from insightv_agents.cards import read_card
from insightv_agents.cli import app
from insightv_agents.convert import convert_llava_next
from insightv_agents.tiny import build_tiny_llava_repo_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_llava_repo_checkpoint(tmp_path_factory.mktemp("llava-layout"))


def logits(folder: Path, processor_folder: Path) -> object:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(processor_folder)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "How many shapes?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (50, 40), "red")],
                       return_tensors="pt")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**inputs).logits


def test_the_converted_model_computes_what_the_checkpoint_holds(
        checkpoint: dict[str, Path], tmp_path: Path) -> None:
    """Every weight mapped (none missing, none left over, shapes checked by the converter):
    the converted model's logits on an image and a question are the reference's, exactly."""
    import torch
    from safetensors import safe_open

    out = convert_llava_next(checkpoint["llava"], tmp_path / "out",
                             vision_tower=checkpoint["clip"], role="summary")
    converted = logits(out, out)
    assert torch.equal(converted, logits(checkpoint["reference"], out))  # type: ignore[arg-type]

    def weights(folder: Path) -> dict[str, object]:
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118

    ours, reference = weights(out), weights(checkpoint["reference"])
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[name], reference[name]) for name in ours)  # type: ignore
    card = read_card(out)
    assert card is not None and (card.role, card.profile) == ("summary", "insightv-reference")
    assert card.max_model_len == 2048 and card.sampling.max_tokens == 4096
    assert not list(out.glob("*.bin"))


def test_the_converted_agent_runs_in_process_with_its_card(checkpoint: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from insightv_agents.backends.transformers import ChatTransformersVLM
    from insightv_agents.graphs import create_insightv_graph

    out = convert_llava_next(checkpoint["llava"], tmp_path / "out",
                             vision_tower=checkpoint["clip"])
    agent = ChatTransformersVLM(model_path=str(out), max_new_tokens=8)
    assert agent.agent_card is not None and agent.temperature == 0.2  # the card's sampling
    result = create_insightv_graph(reasoner=agent).compile().invoke(
        {"image": png_bytes(), "question": "How many shapes?"})
    assert result["status"] in ("ok", "failed") and len(agent.agent_card.profile) > 0
    assert len(result["steps"]) >= 1 or result["failures"]  # free text: a random reply reads


def test_a_vision_tower_outside_the_checkpoint_comes_from_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from insightv_agents import convert as module

    paths = build_tiny_llava_repo_checkpoint(tmp_path / "src", vision_tower_inside=False)
    tower = json.loads((paths["clip"] / "config.json").read_text())
    monkeypatch.setitem(module.CLIP_TOWERS, "tiny-clip", {  # a tower whose config is known
        key: tower[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "image_size", "patch_size")})
    with pytest.raises(ConfigError, match="no vision tower weights"):
        convert_llava_next(paths["llava"], tmp_path / "none")
    result = CliRunner().invoke(app, ["convert", "--source", str(paths["llava"]), "--out",
                                      str(tmp_path / "out"), "--vision-tower",
                                      str(paths["clip"])])
    assert result.exit_code == 0, result.output
    assert torch.equal(logits(tmp_path / "out", tmp_path / "out"),  # type: ignore[arg-type]
                       logits(paths["reference"], tmp_path / "out"))
    # a whole CLIP as the hub has it: vision_model.* beside text_model.*
    from safetensors.torch import load_file, save_file

    hub = tmp_path / "hub-clip"
    shutil.copytree(paths["clip"], hub)
    tower = load_file(str(hub / "model.safetensors"))
    save_file({**{f"vision_model.{name}": value for name, value in tower.items()},
               "text_model.embeddings.token_embedding.weight": torch.ones(4, 2),
               "logit_scale": torch.ones(())}, str(hub / "model.safetensors"))
    convert_llava_next(paths["llava"], tmp_path / "from-hub", vision_tower=hub)
    assert torch.equal(logits(tmp_path / "from-hub", tmp_path / "from-hub"),  # type: ignore
                       logits(paths["reference"], tmp_path / "from-hub"))


def test_weights_that_do_not_fit_are_refused_by_name(checkpoint: dict[str, Path],
                                                     tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    def broken(name: str, change: object) -> Path:
        folder = tmp_path / name
        shutil.copytree(checkpoint["llava"], folder)
        weights = load_file(str(folder / "model.safetensors"))
        change(weights)  # type: ignore[operator]
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    def convert(folder: Path) -> None:
        convert_llava_next(folder, tmp_path / f"{folder.name}-out",
                           vision_tower=checkpoint["clip"])

    import torch

    with pytest.raises(InvalidInputError, match=r"map to nothing.*model\.extra_head"):
        convert(broken("extra", lambda w: w.update({"model.extra_head.weight": torch.ones(2)})))
    with pytest.raises(InvalidInputError, match=r"missing model\.image_newline"):
        convert(broken("missing", lambda w: w.pop("model.image_newline")))
    with pytest.raises(InvalidInputError, match=r"shapes model\.multi_modal_projector"):
        convert(broken("shape", lambda w: w.update(
            {"model.mm_projector.2.bias": torch.ones(3)})))


def test_sources_it_does_not_cover_are_refused_before_loading(checkpoint: dict[str, Path],
                                                              tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoint["llava"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(InvalidInputError, match="never loaded"):
        convert_llava_next(pickled, tmp_path / "a", vision_tower=checkpoint["clip"])
    plain = tmp_path / "plain"
    shutil.copytree(checkpoint["llava"], plain)
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InvalidInputError, match="not a LLaVA checkpoint"):
        convert_llava_next(plain, tmp_path / "b")
    onevision = tmp_path / "onevision"
    shutil.copytree(checkpoint["llava"], onevision)
    config = json.loads((onevision / "config.json").read_text())
    (onevision / "config.json").write_text(json.dumps(
        {**config, "mm_vision_tower": "google/siglip-so400m-patch14-384"}))
    with pytest.raises(InvalidInputError, match="SigLIP"):
        convert_llava_next(onevision, tmp_path / "c")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        convert_llava_next(checkpoint["llava"], tmp_path / "taken")
    with pytest.raises(ConfigError, match="unknown vision tower"):
        convert_llava_next(checkpoint["llava"], tmp_path / "d")  # "tiny-clip" is not built in
