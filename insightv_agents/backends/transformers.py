"""An in-process vision-language model as a LangChain chat model (transformers, optional PEFT).

``ChatTransformersVLM`` loads any ``AutoModelForImageTextToText`` checkpoint with its
``AutoProcessor`` (Idefics3 / SmolVLM, LLaVA, LLaVA-NeXT, Qwen2-VL, ... as transformers
supports them), optionally applies a PEFT (LoRA) adapter, and generates from LangChain
messages whose content holds text and images. Weights load from safetensors only, and
``trust_remote_code`` is off unless asked for.

Needs the ``hf`` extra: ``pip install 'insightv-agents[hf]'``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Annotated, Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError

from insightv_agents.cards import AgentCard, read_card
from insightv_agents.errors import ConfigError, InvalidInputError, validation_problem
from insightv_agents.images import ImagePolicy, open_image
from insightv_agents.trained import check_adapter, check_remote_code, resolve_model

MAX_NEW_TOKENS = 32_768
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "user"}


def _with_card(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the agent card (given, else the adapter's, else the model folder's)
    and its recommended sampling and precision where ``settings`` has none.

    Raises:
        ConfigError: for a card that cannot be read.
    """
    card = settings.get("agent_card")
    if card is None:
        card = read_card(settings.get("adapter_path")) or read_card(settings.get("model_path"))
    if card is None:
        return settings
    sampling = card.sampling
    recommended = {
        "temperature": None if sampling.temperature is None else min(sampling.temperature, 5.0),
        "top_p": sampling.top_p, "dtype": card.dtype,
        "max_new_tokens": None if sampling.max_tokens is None
        else min(sampling.max_tokens, MAX_NEW_TOKENS)}
    return {**{key: value for key, value in recommended.items() if value is not None},
            **settings, "agent_card": card}


class _Request:
    """One call waiting for its reply: the prompt, and what a batch it joins must share."""

    def __init__(self, text: str, images: list[Image.Image], options: dict[str, Any],
                 stops: list[str]) -> None:
        self.text, self.images, self.options, self.stops = text, images, options, stops
        self.key = (len(images), tuple(sorted(options.items())), tuple(stops))
        self.result: ChatResult | BaseException | None = None


class ChatTransformersVLM(BaseChatModel):
    """A local vision-language model served in-process by transformers.

    Args:
        model_path: folder (or hub id, where a hub is reachable) of the model, or a PEFT
            adapter folder (an ``insightv train`` output): its base model is loaded under it.
        adapter_path: optional PEFT adapter folder applied on top of the base model.
        device: ``"auto"`` (CUDA, then MPS, then CPU), or a torch device string.
        dtype: ``"auto"`` (bfloat16 on a GPU that supports it, float32 otherwise), or a
            torch dtype name such as ``"float16"``.
        max_new_tokens, temperature, top_p, top_k, repetition_penalty: sampling settings;
            ``temperature=0`` means greedy decoding.
        n: how many samples each call returns (``generate`` gives them all; ``invoke``
            the first).
        stop: strings that end a generation; the reply is cut before them.
            A conversation that ends with an assistant message is continued from it.
        seed: seeds torch before each generation with ``seed`` plus the number of
            generations before it: a run that makes its calls one at a time in the same
            order samples the same, and the same prompt asked twice gets two different
            samples. (Concurrent calls batch as their timing falls: a seeded run repeats
            exactly only with ``max_batch_size=1`` or calls made one at a time.)
        max_batch_size: concurrent calls (a graph's ``batch``/``abatch``, ``synthesize`` or
            ``evaluate`` with a concurrency above 1, several threads) with the same
            sampling settings and number of images are generated together, this many at
            most, left-padded in one ``generate``: a small model is bound by the per-token
            overhead, not the arithmetic, so batched calls finish sooner with the same
            replies (``benchmarks/batching.py`` measures it). 1 turns batching off.
        batch_wait_s: once calls have overlapped, the one that starts a generation waits up
            to this long for others to join it (callers that just got their replies come
            back within it). Calls made one at a time never wait.
        trust_remote_code: run code shipped with the checkpoint. Off by default.
        agent_card: how the agent is driven (:mod:`~insightv_agents.cards`); default: the
            card in the adapter's or the model's folder, whose recommended sampling and
            precision fill the settings not given. The graphs follow it.

    Examples:
        >>> from insightv_agents.testing import build_tiny_idefics3
        >>> import tempfile
        >>> path = build_tiny_idefics3(tempfile.mkdtemp())
        >>> model = ChatTransformersVLM(model_path=str(path), max_new_tokens=4)
        >>> isinstance(model.invoke("hello").content, str)
        True
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_path: str
    adapter_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = Field(512, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=5.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=64)
    stop: list[str] | None = None
    seed: int | None = None
    trust_remote_code: bool = False
    image_policy: ImagePolicy = Field(default_factory=ImagePolicy)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_s: float = Field(0.02, ge=0.0, le=5.0, allow_inf_nan=False)
    agent_card: AgentCard | None = None

    _model: Any = PrivateAttr(default=None)
    _processor: Any = PrivateAttr(default=None)
    _calls: int = PrivateAttr(default=0)  # generations run (each one batch)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)  # one generation at a time
    _queue: threading.Condition = PrivateAttr(default_factory=threading.Condition)
    _pending: list[_Request] = PrivateAttr(default_factory=list)
    _in_flight: int = PrivateAttr(default=0)
    _overlapped: bool = PrivateAttr(default=False)

    def __init__(self, **settings: Any) -> None:
        try:
            super().__init__(**_with_card(settings))
        except ValidationError as err:
            raise ConfigError(f"ChatTransformersVLM: {validation_problem(err)}") from None
        self._load()

    def _load(self) -> None:
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ConfigError("ChatTransformersVLM needs the hf extra: "
                              "pip install 'insightv-agents[hf]'") from err
        base, adapter = resolve_model(self.model_path)
        if self.adapter_path is not None and adapter is not None:
            raise ConfigError(f"model_path {self.model_path!r} is itself an adapter; "
                              "give its base model as model_path, or no adapter_path.")
        if self.adapter_path is not None:
            if not Path(self.adapter_path).expanduser().is_dir():
                raise ConfigError(f"adapter_path {self.adapter_path!r} is not a folder.")
            adapter = str(check_adapter(self.adapter_path))
        device = _device(torch, self.device)
        dtype = _dtype(torch, self.dtype, device)
        check_remote_code(base, self.trust_remote_code)
        try:
            self._processor = AutoProcessor.from_pretrained(
                base, trust_remote_code=self.trust_remote_code)
            model: Any = AutoModelForImageTextToText.from_pretrained(
                base, dtype=dtype, use_safetensors=True,
                trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as err:
            raise InvalidInputError(f"cannot load the model at {base}: {err}",
                                    field="model") from err
        if adapter is not None:  # checked: PEFT reads its adapter_model.safetensors
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self._model = model.to(device).eval()
        # batched prompts end where the reply starts: pad on the left
        self._processor.tokenizer.padding_side = "left"

    @property
    def _llm_type(self) -> str:
        return "transformers-vlm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "adapter_path": self.adapter_path,
                "temperature": self.temperature, "top_p": self.top_p, "n": self.n}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        conversation, images = self._to_hf(messages)
        options = self._sampling(kwargs)
        stops = [*(self.stop or []), *(stop or [])]
        request = _Request(self._prompt(conversation), images, options, stops)
        with self._queue:
            self._pending.append(request)
            self._in_flight += 1
            self._overlapped = self._overlapped or self._in_flight > 1
            self._queue.notify_all()
        try:
            with self._lock:  # the caller that gets the model generates for the others too
                if request.result is None:
                    self._serve(request)
        finally:
            with self._queue:
                self._in_flight -= 1
        if isinstance(request.result, BaseException):
            raise request.result
        assert request.result is not None
        return request.result

    def _serve(self, request: _Request) -> None:
        """Generate for ``request`` and the waiting calls that can share its batch."""
        with self._queue:
            room = self.max_batch_size - 1
            if self._overlapped and room:
                self._queue.wait_for(lambda: len(self._peers(request)) >= room,
                                     timeout=self.batch_wait_s)
            batch = [request, *self._peers(request)[:room]]
            self._pending = [other for other in self._pending if other not in batch]
        try:
            results = self._run(batch)
        except Exception as err:  # every caller of the batch gets the error
            for member in batch:
                member.result = err
            return
        for member, result in zip(batch, results, strict=True):
            member.result = result

    def _peers(self, request: _Request) -> list[_Request]:
        """The waiting calls that can share ``request``'s batch, oldest first."""
        return [other for other in self._pending
                if other is not request and other.key == request.key]

    def _run(self, batch: list[_Request]) -> list[ChatResult]:
        """One ``generate`` over the batch's prompts (left-padded); a ChatResult for each."""
        import torch

        processor, model = self._processor, self._model
        first = batch[0]
        inputs = processor(text=[member.text for member in batch],
                           images=[member.images for member in batch] if first.images else None,
                           padding=True, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            if self.seed is not None:
                torch.manual_seed(self.seed + self._calls)
            self._calls += 1
            output = model.generate(**inputs, **first.options,
                                    stop_strings=first.stops or None,
                                    tokenizer=processor.tokenizer)
        width = int(inputs["input_ids"].shape[1])
        n = int(first.options["num_return_sequences"])
        pad = _pad_id(processor)
        results = []
        for index, member in enumerate(batch):
            prompt_tokens = int(inputs["attention_mask"][index].sum())
            generations = []
            for sequence in output[index * n:(index + 1) * n, width:]:
                reply = _cut_at_stop(processor.decode(sequence, skip_special_tokens=True),
                                     member.stops)
                new_tokens = int((sequence != pad).sum())
                usage = UsageMetadata(input_tokens=prompt_tokens, output_tokens=new_tokens,
                                      total_tokens=prompt_tokens + new_tokens)
                generations.append(ChatGeneration(message=AIMessage(reply,
                                                                    usage_metadata=usage)))
            results.append(ChatResult(generations=generations))
        return results

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Generation is blocking compute: run it in a worker thread, never on the event loop.
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _sampling(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """``generate``'s sampling options: the model's, with a call's ``overrides``, each
        checked against its field's range (a :class:`ConfigError` otherwise)."""
        given = {field: getattr(self, field) for field in set(_OVERRIDES.values())}
        for key, field in _OVERRIDES.items():  # max_new_tokens wins over max_tokens
            if key in overrides:
                given[field] = _checked(field, key, overrides[key])
        temperature, n = given["temperature"], given["n"]
        options: dict[str, Any] = {
            "max_new_tokens": given["max_new_tokens"], "num_return_sequences": n,
            "repetition_penalty": given["repetition_penalty"],
        }
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=given["top_p"])
            if given["top_k"] is not None:
                options["top_k"] = given["top_k"]
        elif n > 1:
            raise ConfigError("n > 1 needs temperature > 0 (greedy decoding gives one answer).")
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return options

    def _prompt(self, conversation: list[dict[str, Any]]) -> str:
        """The prompt text; a conversation ending with an assistant turn is a prefix that
        the reply continues (no end-of-turn after it, no new assistant header)."""
        prefix = conversation[-1]["role"] == "assistant"
        return str(self._processor.apply_chat_template(
            conversation, add_generation_prompt=not prefix, continue_final_message=prefix,
            tokenize=False))

    def _to_hf(self, messages: list[BaseMessage]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """LangChain messages to the processor's chat format, plus the images in order."""
        conversation: list[dict[str, Any]] = []
        images: list[Image.Image] = []
        for message in messages:
            role = "system" if isinstance(message, SystemMessage) else _ROLES.get(message.type)
            if role is None:
                raise InvalidInputError(f"unsupported message type {message.type!r}.")
            parts: list[dict[str, Any]] = []
            content = message.content
            for part in [content] if isinstance(content, str) else content:
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                else:
                    images.append(self._image(part))
                    parts.append({"type": "image"})
            conversation.append({"role": role, "content": parts})
        return conversation, images

    def _image(self, part: dict[str, Any]) -> Image.Image:
        kind = part.get("type")
        if kind == "image_url":
            url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) \
                else part.get("image_url")
        elif kind == "image" and part.get("base64"):
            url = f"data:{part.get('mime_type', 'image/png')};base64,{part['base64']}"
        elif kind == "image" and part.get("url"):
            url = part["url"]
        else:
            raise InvalidInputError(f"unsupported message content part {kind!r}.")
        return open_image(url, self.image_policy)


_OVERRIDES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "n": "n",
              "repetition_penalty": "repetition_penalty", "max_tokens": "max_new_tokens",
              "max_new_tokens": "max_new_tokens"}
"""The sampling options a call may override (``model.invoke(..., temperature=...)``), and
the field each sets."""


def _checked(field: str, key: str, value: Any) -> Any:
    """``value`` for ``field`` of :class:`ChatTransformersVLM`, validated as the field is."""
    try:
        return _field_adapter(field).validate_python(value)
    except ValidationError as err:
        raise ConfigError(f"{key}: {validation_problem(err)}") from None


@functools.cache
def _field_adapter(field: str) -> TypeAdapter[Any]:
    info = ChatTransformersVLM.model_fields[field]
    constrained: Any = Annotated[info.annotation, *info.metadata]  # the field's type and range
    return TypeAdapter(constrained)


def _device(torch: Any, device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(torch: Any, dtype: str, device: str) -> Any:
    if dtype != "auto":
        try:
            return getattr(torch, dtype)
        except AttributeError as err:
            raise ConfigError(f"unknown dtype {dtype!r}.") from err
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _pad_id(processor: Any) -> int:
    tokenizer = processor.tokenizer
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
               else tokenizer.eos_token_id)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))
    return text[:cut]
