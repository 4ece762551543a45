"""Convert a LLaVA-NeXT checkpoint in the LLaVA repository's own layout (as the released
Insight-V LLaMA-3 agents are) into a transformers ``LlavaNextForConditionalGeneration`` folder
that ``ChatTransformersVLM`` and vLLM load, with an agent card for the Insight-V reference
formats.

The LLaVA layout: a Llama checkpoint (``LlavaLlamaForCausalLM``) whose ``config.json`` adds
the ``mm_*`` settings (vision tower, projector, layer choice, any-resolution grid), with the
projector (``model.mm_projector.0/2``), ``model.image_newline`` and, when it was trained, the
CLIP vision tower (``model.vision_tower.vision_tower.vision_model.*``) among its weights, as
safetensors. A vision tower that is not in the checkpoint comes from ``vision_tower`` (a
transformers CLIP folder). Every weight is mapped to exactly one weight of the new model, with
its shape checked; none is left over. The tokenizer gains the ``<image>`` token (its embedding
row the mean of the others) and a chat template that places images.

What it covers: LLaVA-NeXT (LLaVA-1.6) with a CLIP vision tower, an ``mlp2x_gelu``
projector and ``spatial_unpad`` merging, on a Llama language model — Insight-V's
LLaVA-NeXT-LLaMA3 agents. Not: the Qwen-based Insight-V agents (their own vision tower and
layout), LLaVA-OneVision (SigLIP, Qwen2), or pickled (``.bin``) checkpoints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from insightv_agents.cards import AgentCard, Sampling
from insightv_agents.errors import ConfigError, InvalidInputError
from insightv_agents.files import output_folder, read_json

IMAGE_TOKEN = "<image>"

# The vision towers the released LLaVA-NeXT checkpoints name, when their weights are in the
# checkpoint and no folder is given: CLIP ViT-L/14 at 336 px (and at 224 px).
CLIP_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "openai/clip-vit-large-patch14": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}

# LLaMA-3 turns, an image part as "<image>\n" before the text of its turn.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ['image', 'image_url'] %}"
    "<image>\n{% endif %}{% endfor %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and message['role'] == 'assistant') %}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_LANGUAGE = re.compile(r"model\.(embed_tokens|layers|norm)\b")
_VISION = "model.vision_tower.vision_tower.vision_model."
_PINPOINT_RANGE = re.compile(r"\((\d+)x(\d+)\),\.\.\.,\((\d+)x(\d+)\)")


def convert_llava_next(source: str | Path, out: str | Path, *,
                       vision_tower: str | Path | None = None,
                       role: Literal["reasoning", "summary", "both"] = "reasoning") -> Path:
    """Write ``source`` (LLaVA repository layout) as a transformers LLaVA-NeXT folder ``out``
    with an agent card (profile ``insightv-reference``, in ``role``).

    Raises:
        InvalidInputError: for a source that is not a LLaVA-NeXT checkpoint this covers, a
            weight that maps to nothing, a weight missing, or a shape that does not fit.
            Also for an ``out`` that is a file (or inside one).
        ConfigError: for an ``out`` that holds something, or a vision tower that cannot be
            found.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    source, target = Path(source), output_folder(out)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target} is not empty; give a new folder.")
    llava = _llava_config(source)
    vision_config = _vision_config(llava, vision_tower, CLIPVisionConfig)
    weights = dict(_source_weights(source))
    if not any(name.startswith(_VISION) for name in weights):
        if vision_tower is None:
            raise ConfigError(f"{source} holds no vision tower weights; give the CLIP folder "
                              f"of {llava.get('mm_vision_tower')!r} as vision_tower.")
        weights |= {_VISION + name: tensor for name, tensor in _tower_weights(vision_tower)}

    tokenizer = AutoTokenizer.from_pretrained(source)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    image_token = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # type: ignore[arg-type]

    text = {key: value for key, value in llava.items()
            if not key.startswith(("mm_", "image_", "architectures", "model_type", "auto_map",
                                   "tokenizer_", "transformers_version", "use_mm_proj",
                                   "unfreeze_mm", "tune_mm", "freeze_mm"))}
    text.update(model_type="llama", vocab_size=len(tokenizer))
    crop = vision_config.image_size
    pinpoints = _pinpoints(llava, crop)
    config = LlavaNextConfig(
        vision_config=vision_config.to_dict(), text_config=text, image_token_index=image_token,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=int(llava.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=_select_strategy(llava),
        projector_hidden_act="gelu", multimodal_projector_bias=True)

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    mapped = _map_weights(weights, image_token)
    expected = model.state_dict()
    _check(mapped, expected)
    model.load_state_dict(mapped, assign=True, strict=True)
    dtype = next(iter(mapped.values())).dtype  # saved as the checkpoint was
    parts: list[Any] = [model.config, model.config.text_config, model.config.vision_config]
    for part in parts:
        part.dtype = dtype
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=LLAMA3_CHAT_TEMPLATE)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    AgentCard(role=role, profile="insightv-reference",
              sampling=Sampling(temperature=0.2, top_p=0.95,
                                max_tokens=4096 if role == "summary" else 1024),
              max_model_len=int(llava.get("tokenizer_model_max_length")
                                or text.get("max_position_embeddings") or 4096),
              description=f"converted from {source.name} (LLaVA repository layout)",
              ).save(target)
    return target


def _llava_config(source: Path) -> dict[str, Any]:
    llava = read_json(source / "config.json", what="the checkpoint's config",
                      fix="Give a LLaVA checkpoint folder.", field="source")
    if "mm_vision_tower" not in llava and "mm_projector_type" not in llava:
        raise InvalidInputError(f"{source} is not a LLaVA checkpoint (its config has no "
                                "mm_vision_tower).", field="source")
    problems = []
    if llava.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        problems.append(f"projector {llava['mm_projector_type']!r} (only mlp2x_gelu)")
    if not str(llava.get("image_aspect_ratio", "anyres")).startswith("anyres"):
        problems.append(f"image_aspect_ratio {llava.get('image_aspect_ratio')!r} (LLaVA-NeXT "
                        "is anyres)")
    if llava.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        problems.append(f"mm_patch_merge_type {llava.get('mm_patch_merge_type')!r} (only "
                        "spatial_unpad)")
    if "siglip" in str(llava.get("mm_vision_tower", "")).lower():
        problems.append("a SigLIP vision tower (only CLIP)")
    if problems:
        raise InvalidInputError(f"{source} is not a LLaVA-NeXT checkpoint this converts: "
                                f"{'; '.join(problems)}.", field="source")
    return llava


def _vision_config(llava: Mapping[str, Any], folder: str | Path | None, kind: Any) -> Any:
    """The CLIP vision config: the folder's, else the known tower's."""
    if folder is not None:
        path = Path(folder) / "config.json"
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"vision_tower: {path}: {err}") from None
        return kind(**values.get("vision_config", values))
    name = str(llava.get("mm_vision_tower", ""))
    if name not in CLIP_TOWERS:
        raise ConfigError(f"unknown vision tower {name!r}: give its transformers CLIP folder "
                          "as vision_tower.")
    return kind(**CLIP_TOWERS[name])


def _safetensors(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(folder.glob("*.bin"))
        raise InvalidInputError(
            f"{folder} has no safetensors weights"
            + (" (only pickled .bin files, which are never loaded: convert them to "
               "safetensors first)" if pickled else "") + ".", field="source")
    return files


def _source_weights(folder: Path) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for file in _safetensors(folder):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, weights.get_tensor(name)


_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def _tower_weights(folder: str | Path) -> Iterator[tuple[str, Any]]:
    """A CLIP folder's vision weights, named as the vision transformer's own: from a hub
    checkpoint (``vision_model.*``, beside ``text_model.*`` in a whole CLIP) or one that
    transformers saved (no prefix)."""
    weights = dict(_source_weights(Path(folder)))
    prefix = "vision_model." if any(name.startswith("vision_model.") for name in weights) \
        else ""
    for name, tensor in weights.items():
        if name.startswith(prefix) and name[len(prefix):].startswith(_TOWER_PARTS):
            yield name[len(prefix):], tensor


def _map_weights(weights: Mapping[str, Any], image_token: int) -> dict[str, Any]:
    """The LLaVA layout's weights under the names of transformers' LLaVA-NeXT model (in
    memory), the embeddings and the output head grown to the ``<image>`` token.

    Raises:
        InvalidInputError: for a weight that maps to nothing.
    """
    import torch

    mapped: dict[str, Any] = {}
    unknown = []
    for name, tensor in weights.items():
        if name.startswith(_VISION):
            new = "model.vision_tower." + name[len(_VISION):]
        elif name.startswith("model.mm_projector."):
            layer = {"0": "linear_1", "2": "linear_2"}.get(name.split(".")[2])
            new = f"model.multi_modal_projector.{layer}.{name.split('.', 3)[3]}" if layer \
                else ""
        elif name == "model.image_newline":
            new = "model.image_newline"
        elif _LANGUAGE.match(name):
            new = "model.language_model." + name[len("model."):]
        elif name == "lm_head.weight":
            new = "lm_head.weight"
        else:
            new = ""
        if not new:
            unknown.append(name)
            continue
        mapped[new] = tensor
    if unknown:
        raise InvalidInputError(f"{len(unknown)} weight(s) map to nothing in LLaVA-NeXT: "
                                f"{', '.join(sorted(unknown)[:5])}.", field="source")
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        table = mapped.get(name)
        if table is not None and table.shape[0] == image_token:  # grow by the <image> row
            mapped[name] = torch.cat([table, table.float().mean(0, keepdim=True)
                                      .to(table.dtype)])
    return mapped


def _check(mapped: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Every weight of the new model given once, with its shape; nothing else."""
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    wrong = sorted(f"{name} {tuple(mapped[name].shape)} for {tuple(expected[name].shape)}"
                   for name in set(mapped) & set(expected)
                   if tuple(mapped[name].shape) != tuple(expected[name].shape))
    problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
        ([f"left over {', '.join(extra[:5])}"] if extra else []) + \
        ([f"shapes {'; '.join(wrong[:5])}"] if wrong else [])
    if problems:
        raise InvalidInputError(f"the weights do not fit LLaVA-NeXT: {' / '.join(problems)}.",
                                field="source")


def _pinpoints(llava: Mapping[str, Any], crop: int) -> list[list[int]]:
    """The any-resolution grid: a list of [height, width], or LLaVA's "(1x1),...,(3x3)"."""
    value = llava.get("image_grid_pinpoints")
    if value is None:
        return [[crop, crop * 2], [crop * 2, crop], [crop * 2, crop * 2], [crop * 3, crop],
                [crop, crop * 3]]
    if isinstance(value, str):
        match = _PINPOINT_RANGE.fullmatch(value.replace(" ", ""))
        if match is None:
            raise InvalidInputError(f"image_grid_pinpoints {value!r} is not understood.",
                                    field="source")
        low, high = int(match.group(1)), int(match.group(3))
        return [[crop * rows, crop * columns] for rows in range(low, high + 1)
                for columns in range(low, high + 1)]
    return [[int(height), int(width)] for height, width in value]


def _select_strategy(llava: Mapping[str, Any]) -> Literal["default", "full"]:
    feature = llava.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise InvalidInputError(f"mm_vision_select_feature {feature!r} is not understood.",
                                field="source")
    return "default" if feature == "patch" else "full"
