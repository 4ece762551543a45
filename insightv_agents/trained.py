"""Reading a trained output folder: a full model, or a PEFT adapter naming its base model.

Both backends (:class:`~insightv_agents.backends.transformers.ChatTransformersVLM` and
:class:`~insightv_agents.backends.vllm.VLLMServer`) and the trainers use this, so an
output of ``insightv train`` loads anywhere with no manual step.
"""

from __future__ import annotations

import json
from pathlib import Path

from insightv_agents.errors import InvalidInputError
from insightv_agents.files import read_json

ADAPTER_FILE = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_FILE = "insightv_training.json"
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter."""
    return (Path(path).expanduser() / ADAPTER_FILE).is_file()


def resolve_model(path: str | Path) -> tuple[str, str | None]:
    """``(base model, adapter or None)`` for a model folder, a hub id, or an adapter folder.

    Raises:
        InvalidInputError: for a local path (``/``, ``.`` or ``~`` first) that is not a
            folder, weights held only as pickles, or an adapter whose base model cannot be
            found or whose weights are not ``adapter_model.safetensors``.
    """
    if str(path).startswith((".", "/", "~")) and not Path(path).expanduser().is_dir():
        raise InvalidInputError(f"no model folder at {str(path)[:300]}.", field="model")
    if not is_adapter(path):
        _check_safetensors(Path(path).expanduser())
        return str(path), None
    adapter = check_adapter(path)
    config = read_json(adapter / ADAPTER_FILE, what="the adapter's config",
                       fix="Give a PEFT adapter folder.", field="model")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InvalidInputError(f"the adapter in {adapter} names no base model "
                                "(base_model_name_or_path).", field="model")
    if base.startswith((".", "/")) and not Path(base).is_dir():
        raise InvalidInputError(f"the adapter in {adapter} was trained on {base}, which is "
                                "not there any more; pass the base model explicitly.",
                                field="model")
    _check_safetensors(Path(base))
    return base, str(adapter)


def model_name(model: str | Path) -> str:
    """A model's name as trained outputs record it: a local folder by its absolute path, a
    hub id as it is."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.exists() else str(model)


def same_model(first: str | Path, second: str | Path) -> bool:
    """Whether two model names are the same model: the same folder (however written), or
    the same hub id."""
    return model_name(first) == model_name(second)


def check_adapter(path: str | Path) -> Path:
    """The resolved folder of a PEFT adapter whose weights are safetensors
    (``adapter_model.safetensors`` beside ``adapter_config.json``), checked before anything is
    loaded: PEFT and vLLM would otherwise read ``adapter_model.bin``, a pickle.

    Raises:
        InvalidInputError: for a folder that is not such an adapter (``field="adapter"``).
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise InvalidInputError(f"no adapter folder at {str(path)[:300]}.", field="adapter")
    if not (folder / ADAPTER_FILE).is_file():
        raise InvalidInputError(f"{folder} is not a PEFT adapter: it holds no {ADAPTER_FILE}.",
                                field="adapter")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(p.name for pattern in _PICKLES for p in folder.glob(pattern)
                         if p.name != "training_args.bin")
        held = (f" only pickles ({', '.join(pickles[:3])}), which can run code when loaded"
                if pickles else " no weights")
        raise InvalidInputError(
            f"the adapter in {folder} holds{held}; this library loads adapters from "
            f"{ADAPTER_WEIGHTS} only (safetensors). Save it with PEFT's "
            "save_pretrained(folder, safe_serialization=True), its default.", field="adapter")
    return folder


def check_remote_code(base: str | Path, trust_remote_code: bool) -> None:
    """Refuse a local model whose architecture is code shipped in its folder (``auto_map``
    in ``config.json``) unless ``trust_remote_code`` is on."""
    config = Path(base) / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return  # unreadable: the loader says what is wrong
    if auto_map:
        raise InvalidInputError(
            f"the model at {base} ships its own code ({', '.join(sorted(auto_map))} in "
            "config.json), which runs only with trust_remote_code=True; read it first.",
            field="model")


_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_safetensors(folder: Path) -> None:
    """Refuse a local model folder whose weights are only pickles (they can run code when
    loaded); a hub id or a folder with safetensors passes."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLES for p in folder.glob(pattern)
                     if p.name != "training_args.bin")
    if pickles:
        raise InvalidInputError(
            f"{folder} holds weights only as pickles ({', '.join(pickles[:3])}), which can "
            "run code when loaded; this library loads safetensors only. Convert them once "
            "with transformers: from_pretrained(...).save_pretrained(folder, "
            "safe_serialization=True).", field="model")


def adapter_rank(path: str | Path) -> int:
    """The LoRA rank of an adapter folder (``r``), or 0 when it cannot be read."""
    try:
        config = json.loads((Path(path) / ADAPTER_FILE).read_text())
        return max([int(config.get("r") or 0),
                    *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, TypeError):
        return 0


def vllm_lora_rank(*ranks: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds every rank given."""
    needed = max(ranks, default=0)
    return next((rank for rank in _VLLM_LORA_RANKS if rank >= needed), needed)


def model_limit(folder: str | Path) -> int | None:
    """The longest sequence a model folder's config allows (``max_position_embeddings``, of
    its language model where it has one), if it says."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for part in (config.get("text_config"), config):
        limit = part.get("max_position_embeddings") if isinstance(part, dict) else None
        if isinstance(limit, int) and limit > 0:
            return limit
    return None
