"""The in-process transformers backend, on a tiny real Idefics3 built offline."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from insightv_agents import ConfigError, InvalidInputError, create_insightv_graph
from insightv_agents.backends.transformers import ChatTransformersVLM
from insightv_agents.testing import build_tiny_idefics3, build_tiny_llava


@pytest.fixture(scope="module")
def tiny_idefics3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def model(tiny_idefics3: Path) -> ChatTransformersVLM:
    return ChatTransformersVLM(model_path=str(tiny_idefics3), max_new_tokens=12)


def image_message(path: Path, text: str = "What is shown?") -> HumanMessage:
    return HumanMessage(content=[{"type": "image_url", "image_url": {"url": str(path)}},
                                 {"type": "text", "text": text}])


def test_built_model_is_safetensors_with_a_real_processor(tiny_idefics3: Path) -> None:
    files = {p.name for p in tiny_idefics3.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"config.json", "tokenizer.json", "processor_config.json"} <= files


def test_chat_template_renders_turns_and_images(model: ChatTransformersVLM,
                                                image_path: Path) -> None:
    conversation, images = model._to_hf([SystemMessage("S"), image_message(image_path, "Q"),
                                         AIMessage("A")])
    text = model._processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                tokenize=False)
    assert text == ("<|im_start|>System:S<end_of_utterance>\n<|im_start|>User:<image>Q"
                    "<end_of_utterance>\n<|im_start|>Assistant:A<end_of_utterance>\n"
                    "<|im_start|>Assistant:")
    assert len(images) == 1 and images[0].mode == "RGB"


def test_generation_with_an_image_is_greedy_and_repeatable(model: ChatTransformersVLM,
                                                           image_path: Path) -> None:
    first = model.invoke([image_message(image_path)])
    second = model.invoke([image_message(image_path)])
    assert isinstance(first.content, str) and first.content == second.content
    assert first.usage_metadata is not None
    assert first.usage_metadata["input_tokens"] > 20  # 20 image tokens plus the text
    assert 1 <= first.usage_metadata["output_tokens"] <= 12


def test_image_changes_the_prompt(model: ChatTransformersVLM, image_path: Path) -> None:
    with_image = model._processor(text=["x"], images=None, return_tensors="pt")
    conversation, images = model._to_hf([image_message(image_path)])
    text = model._processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                tokenize=False)
    inputs = model._processor(text=[text], images=[images], return_tensors="pt")
    assert "pixel_values" in inputs and "pixel_values" not in with_image


def test_n_samples(tiny_idefics3: Path, image_path: Path) -> None:
    sampler = ChatTransformersVLM(model_path=str(tiny_idefics3), max_new_tokens=8,
                                  temperature=1.0, n=3, seed=0)
    [generations] = sampler.generate([[image_message(image_path)]]).generations
    assert len(generations) == 3 and len({g.text for g in generations}) > 1
    second = sampler.generate([[image_message(image_path)]]).generations[0]
    assert [g.text for g in second] != [g.text for g in generations]  # a new sample
    fresh = ChatTransformersVLM(model_path=str(tiny_idefics3), max_new_tokens=8,
                                temperature=1.0, n=3, seed=0)
    replay = [fresh.generate([[image_message(image_path)]]).generations[0] for _ in range(2)]
    assert [[g.text for g in r] for r in replay] == [
        [g.text for g in generations], [g.text for g in second]]  # seeded: repeatable


def test_concurrent_calls_share_a_generation_and_get_their_own_replies(
        tiny_idefics3: Path, image_path: Path) -> None:
    prompts = [[image_message(image_path, "What is shown?" + " Look closely." * k)]
               for k in range(4)]  # prompts of different lengths: the batch is left-padded
    alone = ChatTransformersVLM(model_path=str(tiny_idefics3), max_new_tokens=12,
                                max_batch_size=1)
    expected = [alone.invoke(p) for p in prompts]
    assert alone._calls == 4
    together = ChatTransformersVLM(model_path=str(tiny_idefics3), max_new_tokens=12,
                                   batch_wait_s=0.5)
    replies = together.batch(prompts, config={"max_concurrency": 4})
    assert together._calls < 4  # calls that overlapped were generated together
    assert [r.text for r in replies] == [e.text for e in expected]
    assert [r.usage_metadata["input_tokens"] for r in replies] == [  # type: ignore[index]
        e.usage_metadata["input_tokens"] for e in expected]  # type: ignore[index]
    # different sampling settings never share a batch; each call gets its own settings
    short, long = asyncio.run(_two(together, prompts[0]))
    assert 1 <= short.usage_metadata["output_tokens"] <= 2  # type: ignore[index]
    assert long.text == expected[0].text


async def _two(model: ChatTransformersVLM, prompt: list[Any]) -> list[Any]:
    return list(await asyncio.gather(model.ainvoke(prompt, max_new_tokens=2),
                                     model.ainvoke(prompt)))


def test_a_failing_generation_fails_every_call_it_served(tiny_idefics3: Path,
                                                        image_path: Path) -> None:
    model = ChatTransformersVLM(model_path=str(tiny_idefics3), max_new_tokens=4,
                                batch_wait_s=0.5)

    def broken(**_: Any) -> Any:
        raise RuntimeError("out of memory")

    model._model.generate = broken
    prompts = [[image_message(image_path)]] * 3
    outcomes = model.batch(prompts, config={"max_concurrency": 3}, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "out of memory" in str(o) for o in outcomes)
    assert model._pending == [] and model._in_flight == 0


def test_stop_strings_cut_the_reply(model: ChatTransformersVLM, image_path: Path) -> None:
    full = model.invoke([image_message(image_path)]).text
    assert len(full) >= 2
    stop = full[1:3]
    cut = model.invoke([image_message(image_path)], stop=[stop]).text
    assert stop not in cut and full.startswith(cut)


def test_lora_adapter_is_applied(tiny_idefics3: Path, tmp_path: Path, image_path: Path,
                                 model: ChatTransformersVLM) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_idefics3)
    config = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False,
                        target_modules=r".*text_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj")
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    adapted = ChatTransformersVLM(model_path=str(tiny_idefics3),
                                  adapter_path=str(tmp_path / "adapter"), max_new_tokens=12)
    assert type(adapted._model).__name__.startswith("Peft")
    messages = [image_message(image_path)]
    assert adapted.invoke(messages).text != model.invoke(messages).text


def test_an_adapter_saved_as_a_pickle_is_refused_before_loading(
        tiny_idefics3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = AutoModelForImageTextToText.from_pretrained(tiny_idefics3)
    config = LoraConfig(r=4, target_modules=r".*text_model\.layers\.\d+\.self_attn\.q_proj")
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may be loaded")
    monkeypatch.setattr(AutoProcessor, "from_pretrained", no_loading)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_loading)
    with pytest.raises(InvalidInputError, match=r"only pickles \(adapter_model\.bin\)") as caught:
        ChatTransformersVLM(model_path=str(tiny_idefics3), adapter_path=str(tmp_path / "adapter"))
    assert caught.value.field == "adapter"


def test_bad_options_and_inputs(tiny_idefics3: Path, model: ChatTransformersVLM) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        ChatTransformersVLM(model_path=str(tiny_idefics3), adapter_path="/no/adapter")
    with pytest.raises(ConfigError, match="n > 1 needs temperature"):
        model.invoke("hi", n=2)
    with pytest.raises(ConfigError, match="temperature: Input should be greater than"):
        ChatTransformersVLM(model_path=str(tiny_idefics3), temperature=-1)
    with pytest.raises(ConfigError, match="max_tokens: Input should be greater than"):
        model.invoke("hi", max_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        model.bind(temperature=0.5, top_p=float("nan")).invoke("hi")
    with pytest.raises(InvalidInputError, match="URLs are not allowed"):
        model.invoke([HumanMessage(content=[{"type": "image_url",
                                             "image_url": {"url": "https://x.org/a.png"}}])])


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava"))


def test_llava_generates_with_an_image(tiny_llava: Path, image_path: Path) -> None:
    llava = ChatTransformersVLM(model_path=str(tiny_llava), max_new_tokens=6)
    reply = llava.invoke([image_message(image_path)])
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] >= 16  # the image's 16 patch tokens and text
    assert type(llava._model).__name__ == "LlavaForConditionalGeneration"


@pytest.mark.parametrize("architecture", ["idefics3", "llava"])
def test_graph_runs_end_to_end_with_a_typed_outcome(
        architecture: str, model: ChatTransformersVLM, tiny_llava: Path,
        inputs: dict[str, Any]) -> None:
    if architecture == "llava":
        model = ChatTransformersVLM(model_path=str(tiny_llava), max_new_tokens=12)
    graph = create_insightv_graph(reasoner=model, max_steps=4, max_retries=1).compile()
    out = graph.invoke(inputs)
    assert out["status"] in ("ok", "failed") and len(out["steps"]) <= 4
    assert all(f["kind"] in ("unparsable", "step_cap") for f in out["failures"])
    assert asyncio.run(graph.ainvoke(inputs))["status"] == out["status"]  # greedy: same path


def test_cli_runs_a_local_model_in_process(tiny_idefics3: Path, image_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from insightv_agents.cli import app

    result = CliRunner().invoke(app, ["run", "-i", str(image_path), "-q", "How many?",
                                      "--local-model", str(tiny_idefics3), "--max-steps", "2",
                                      "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] in ("ok", "failed")
    both = CliRunner().invoke(app, ["run", "-i", str(image_path), "-q", "q", "--local-model",
                                    str(tiny_idefics3), "--base-url", "http://127.0.0.1:1/v1"])
    assert both.exit_code == 2 and "not both" in both.output


def test_a_final_assistant_turn_is_continued(model: ChatTransformersVLM,
                                            image_path: Path) -> None:
    conversation, _ = model._to_hf([image_message(image_path, "Q"), AIMessage("<SUMMARY>")])
    assert model._prompt(conversation).endswith("<|im_start|>Assistant:<SUMMARY>")
    reply = model.invoke([image_message(image_path, "Q"), AIMessage("<SUMMARY>")])
    assert isinstance(reply.content, str)


@pytest.mark.slow
def test_stage_beam_runs_in_process(tiny_idefics3: Path, image_path: Path) -> None:
    from insightv_agents import create_stage_beam_graph

    sampler = ChatTransformersVLM(model_path=str(tiny_idefics3), max_new_tokens=8,
                                  temperature=1.0, seed=0)
    out = create_stage_beam_graph(sampler, beam_size=2, max_retries=0).compile().invoke(
        {"image": str(image_path), "question": "How many shapes?"})
    assert [len(r["candidates"]) for r in out["search"]] == [2, 2, 2, 2]
    assert all(len(r["judgements"]) == 1 for r in out["search"])
    assert out["status"] in ("ok", "failed")
    assert out["status"] == "ok" or out["failures"][-1]["kind"] == "no_answer"


def test_built_idefics3_keeps_each_word_one_token_and_writes_it_back(tmp_path: Path) -> None:
    from insightv_research.shapes.scenes import CELL_TAGS
    from transformers import AutoProcessor

    from insightv_agents.tiny import build_idefics3

    folder = build_idefics3(tmp_path / "m", corpus=["r1c2 small red circle, r1c3 empty."] * 4,
                            vocab_size=300, words=CELL_TAGS)
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    text = "r1c2 small red circle, r4c4 empty."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "r1c2" and "r4c4" in \
        tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_the_hf_extra_brings_what_smolvlm_processors_need() -> None:
    """SmolVLM's processor (the Idefics3 family) refuses to build without num2words."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from transformers.utils import is_num2words_available

    specs = [Requirement(spec) for spec in requires("insightv-agents") or []]
    hf = {spec.name for spec in specs if spec.marker and spec.marker.evaluate({"extra": "hf"})}
    assert "num2words" in hf
    assert is_num2words_available()
