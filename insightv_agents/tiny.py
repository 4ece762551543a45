"""Small VLMs of real architectures, built offline: nothing is downloaded.

- :func:`build_tiny_idefics3` / :func:`build_tiny_llava`: tiny random models that exercise
  loading, images, sampling and parsing in tests (replies are random text).
- :func:`build_idefics3`: an Idefics3 (SmolVLM family) of a chosen size with a tokenizer
  trained on a given corpus, to be trained from scratch (the shapes world's demo agents).

All are saved as safetensors with their processor, ready for ``from_pretrained``,
:class:`~insightv_agents.backends.transformers.ChatTransformersVLM` or a vLLM server.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

_IDEFICS3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
    "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]
# Renders SmolVLM-style turns; accepts both "image" and "image_url" parts (vLLM then detects
# the OpenAI content format). Assistant turns are wrapped in generation markers so that
# TRL can train on assistant tokens only.
IDEFICS3_CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for part in content %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}<image>{% endif %}{% endfor %}"
    "{% endif %}{% endmacro %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] | capitalize }}:"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}<end_of_utterance>\n{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}<end_of_utterance>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>Assistant:{% endif %}"
)
_CORPUS = (
    '{"summary": "Count the red shapes", "reasoning": "There are 3 red squares and 1 blue '
    'circle, so 3 + 1 = 4 shapes.", "action": "continue"}\n'
    '{"reasoning_correct": true, "critique": "", "answer": "4"}\n'
    "System: User: Assistant: Question: How many shapes are left of the largest one? "
    "Reasoning process: Step 1: Step 2: final answer yes no left right above below"
)


def build_tiny_idefics3(path: str | Path, *, seed: int = 0, vocab_size: int = 512) -> Path:
    """Build a tiny, randomly initialised Idefics3 (SmolVLM family) model in ``path``, offline.

    A byte-level BPE tokenizer trained on a small corpus, the real ``Idefics3Processor``
    (PIL image processor: 64 px longest edge split into 32 px tiles plus a global view,
    20 image tokens per image) and ``Idefics3ForConditionalGeneration`` with a 2-layer
    vision tower and a 2-layer Llama text model (head_dim 32, as vLLM's CPU attention
    needs), saved as safetensors. About 160k parameters; builds in well under a second.
    Its replies are random text: it exercises loading, images, sampling and parsing.

    Returns:
        The folder, ready for ``from_pretrained``, ``ChatTransformersVLM`` or a vLLM server.
    """
    tokenizer = _idefics3_tokenizer(vocab_size, (_CORPUS,) * 4)
    return _idefics3(
        path, tokenizer, seed=seed, image_seq_len=4,
        images={"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32},
                "do_image_splitting": True},
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text=_tiny_llama(tokenizer))


def build_idefics3(path: str | Path, *, corpus: Iterable[str], image_size: int = 64,
                   vision: dict[str, int] | None = None, text: dict[str, int] | None = None,
                   vocab_size: int = 2048, words: Iterable[str] = (), seed: int = 0) -> Path:
    """Build a randomly initialised Idefics3 of a chosen size in ``path``, offline, for
    training from scratch.

    The tokenizer is a byte-level BPE trained on ``corpus`` (the texts the model will read
    and write); each of ``words`` is one token of its own (byte-level BPE splits letters
    from digits: ``"r1c2"`` would be four). Images are one ``image_size`` px view (no
    splitting) cut into 8 px patches, with a 2 x 2 pixel shuffle: ``(image_size / 16) ** 2``
    image tokens. ``vision`` and ``text`` override the sizes of the vision tower
    (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``)
    and of the Llama text model (the same, plus ``num_key_value_heads``); keep head sizes at
    32 or more for vLLM's CPU attention.
    """
    tokenizer = _idefics3_tokenizer(vocab_size, corpus)
    tokenizer.add_tokens(list(words))
    return _idefics3(
        path, tokenizer, seed=seed, image_seq_len=(image_size // 16) ** 2,
        images={"size": {"longest_edge": image_size},
                "max_image_size": {"longest_edge": image_size}, "do_image_splitting": False},
        vision={"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                "num_attention_heads": 3, **(vision or {}), "image_size": image_size,
                "patch_size": 8},
        text={**_tiny_llama(tokenizer), "hidden_size": 192, "intermediate_size": 512,
              "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
              **(text or {})})


def _idefics3(path: str | Path, tokenizer: Any, *, seed: int, image_seq_len: int,
              images: dict[str, Any], vision: dict[str, Any], text: dict[str, Any]) -> Path:
    """An Idefics3 with these image-processor, vision and text settings, saved in ``path``."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(do_resize=True,
                                                                            **images),
                                  tokenizer=tokenizer, image_seq_len=image_seq_len,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tokenizer.get_vocab()["<image>"])
    torch.manual_seed(seed)
    return _save(Idefics3ForConditionalGeneration(config), processor, tokenizer, folder)


def _idefics3_tokenizer(vocab_size: int, corpus: Iterable[str]) -> Any:
    return _tiny_tokenizer(
        _IDEFICS3_SPECIALS, vocab_size=vocab_size, chat_template=IDEFICS3_CHAT_TEMPLATE,
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>", corpus=corpus,
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>",
                              "image_token": "<image>",
                              "end_of_utterance_token": "<end_of_utterance>",
                              "global_image_token": "<global-img>"})


# LLaVA-1.5 style turns ("USER: <image>\n... ASSISTANT: ...</s>"), same part handling.
LLAVA_CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}"
    "{% for part in content %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}<image>\n{% endif %}{% endfor %}"
    "{% endif %}{% endmacro %}"
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}</s>{% endgeneration %}"
    "{% else %}{{ render(message['content']) }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(path: str | Path, *, seed: int = 0, vocab_size: int = 512) -> Path:
    """Build a tiny, randomly initialised LLaVA (CLIP vision tower + Llama) in ``path``, offline.

    Like :func:`build_tiny_idefics3`: a trained BPE tokenizer, the real ``LlavaProcessor``
    with a PIL ``CLIPImageProcessor`` (32 px, 16 image tokens) and
    ``LlavaForConditionalGeneration``, saved as safetensors. (vLLM needs torchvision to load
    LLaVA, so on CPU-only machines it runs in transformers only.)
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer(["<unk>", "<s>", "</s>", "<image>"], vocab_size=vocab_size,
                                chat_template=LLAVA_CHAT_TEMPLATE, bos="<s>", eos="</s>",
                                pad="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                            crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "projection_dim": 32},
        text_config=_tiny_llama(tokenizer), image_token_index=tokenizer.get_vocab()["<image>"],
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    return _save(LlavaForConditionalGeneration(config), processor, tokenizer, folder)


def _tiny_tokenizer(specials: list[str], *, vocab_size: int, chat_template: str, bos: str,
                    eos: str, pad: str, extra_special_tokens: dict[str, str],
                    corpus: Iterable[str] = (_CORPUS,) * 4) -> Any:
    """A byte-level BPE tokenizer trained in a moment on ``corpus``, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos,
                                        pad_token=pad, unk_token=pad,
                                        extra_special_tokens=extra_special_tokens)
    tokenizer.chat_template = chat_template
    return tokenizer


def _tiny_llama(tokenizer: Any) -> dict[str, Any]:
    """A 2-layer Llama text config; head_dim 32 (vLLM's CPU attention needs 32 or more)."""
    return {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": len(tokenizer), "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def _save(model: Any, processor: Any, tokenizer: Any, folder: Path) -> Path:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"]


def build_tiny_llava_repo_checkpoint(path: str | Path, *, seed: int = 0,
                                     vocab_size: int = 384,
                                     vision_tower_inside: bool = True) -> dict[str, Path]:
    """Build a tiny LLaVA-NeXT checkpoint in the LLaVA repository's own layout (as the
    released Insight-V LLaMA-3 agents are), offline, for the converter's tests.

    Writes ``path/llava`` (``config.json`` with the ``mm_*`` settings, ``model.safetensors``
    under the LLaVA names, a LLaMA-3-style tokenizer without ``<image>``), ``path/clip`` (the
    vision tower as a transformers CLIP vision folder: its config, and its weights when they
    are not in the checkpoint: ``vision_tower_inside=False``) and ``path/reference`` (the same
    weights as a transformers ``LlavaNextForConditionalGeneration``, the ``<image>`` rows of
    its embeddings and output head the mean of the others, as the converter makes them).
    Returns ``{"llava", "clip", "reference"}``.
    """
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration as LlavaNext

    folder = Path(path)
    tokenizer = _tiny_tokenizer(_LLAMA3_SPECIALS, vocab_size=vocab_size, chat_template="",
                                bos="<|begin_of_text|>", eos="<|eot_id|>",
                                pad="<|end_of_text|>", extra_special_tokens={})
    vocab = len(tokenizer)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    text = {**_tiny_llama(tokenizer), "vocab_size": vocab + 1}
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text,
                             image_token_index=vocab, image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNext(config).eval()
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.lm_head.weight):
            table[vocab] = table[:vocab].mean(0)
    weights: dict[str, Any] = {}
    tower: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.contiguous().clone()
        if name.startswith("model.vision_tower."):
            tower[name[len("model.vision_tower."):]] = tensor
            if vision_tower_inside:
                weights["model.vision_tower.vision_tower.vision_model."
                        + name[len("model.vision_tower."):]] = tensor
        elif name.startswith("model.multi_modal_projector.linear_"):
            layer = {"1": "0", "2": "2"}[name.split(".")[2][-1]]
            weights[f"model.mm_projector.{layer}.{name.rsplit('.', 1)[1]}"] = tensor
        elif name.startswith("model.language_model."):
            weights["model." + name[len("model.language_model."):]] = tensor
        else:  # model.image_newline, lm_head.weight
            weights[name] = tensor
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:vocab].clone()  # the LLaVA checkpoint has no <image>
    llava = folder / "llava"
    llava.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(llava / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(llava)
    (llava / "config.json").write_text(json.dumps({
        **{key: value for key, value in text.items() if key != "model_type"},
        "vocab_size": vocab, "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama", "mm_vision_tower": "tiny-clip",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": pinpoints,
        "mm_patch_merge_type": "spatial_unpad", "tokenizer_model_max_length": 2048,
        "use_mm_proj": True}, indent=2))
    clip = folder / "clip"
    clip.mkdir(parents=True, exist_ok=True)
    vision.save_pretrained(clip)
    if not vision_tower_inside:
        tower_model = CLIPVisionModel(vision)
        tower_model.load_state_dict(tower)
        tower_model.save_pretrained(clip, safe_serialization=True)
    reference = folder / "reference"
    model.save_pretrained(reference, safe_serialization=True)
    return {"llava": llava, "clip": clip, "reference": reference}
