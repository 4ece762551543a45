"""Bad-input catalogue cases for options and adapters (the format of ``tests/bad_inputs.py``):
sampling and client options out of range where they enter (``vllm_chat_model``,
``ChatVLLM``, ``ChatTransformersVLM``, ``VLLMServer``, an agent card, the CLI), and LoRA
adapters held only as pickles. Each gets a typed error naming the option (or file) before
any model or server is called."""

from __future__ import annotations

import json
import sys
from typing import Any

from bad_inputs import Case, CommandRefused, Ctx, png
from langchain_core.messages import HumanMessage

from insightv_agents.errors import ConfigError, InvalidInputError


def vllm(c: Ctx, **options: Any) -> Any:
    from insightv_agents.backends.vllm import vllm_chat_model

    return vllm_chat_model(c.url, "m", **options)


def direct(c: Ctx, **options: Any) -> Any:
    from insightv_agents.backends.vllm import ChatVLLM

    return ChatVLLM(base_url=c.url, model="m", api_key="EMPTY", **options)


def local(**options: Any) -> Any:
    from insightv_agents.backends.transformers import ChatTransformersVLM

    return ChatTransformersVLM(**{"model_path": "m", **options})


def server(**options: Any) -> Any:
    from insightv_agents.backends.vllm import VLLMServer

    return VLLMServer(options.pop("model", "m"), python=sys.executable, **options)


def carded(c: Ctx, sampling: dict[str, Any]) -> str:
    """A model folder whose agent card recommends ``sampling``."""
    c.file("carded/model.safetensors", b"")
    c.file("carded/insightv_agent.json", json.dumps({"role": "both", "sampling": sampling}))
    return str(c.tmp / "carded")


def pickled_adapter(c: Ctx) -> str:
    """A LoRA adapter folder whose weights are a pickle (``adapter_model.bin``) only."""
    c.file("lora/adapter_config.json", json.dumps({
        "base_model_name_or_path": "m", "peft_type": "LORA", "r": 8}))
    c.file("lora/adapter_model.bin", b"\x80\x04not really a pickle")
    return str(c.tmp / "lora")


def weights_only(c: Ctx) -> str:
    """A folder holding adapter weights but no ``adapter_config.json``."""
    c.file("bare/adapter_model.safetensors", b"")
    return str(c.tmp / "bare")


def ask(model: Any, **options: Any) -> Any:
    return model.invoke([HumanMessage("Q")], **options)


RUN = ("run", "--base-url")

CASES: list[Case] = [
    # --- vllm_chat_model and ChatVLLM ---
    *[Case("vllm_chat_model", what, ConfigError, says,
           lambda c, options=options: vllm(c, **options))
      for what, options, says in [
          ("temperature=-1", {"temperature": -1.0}, "temperature must be a number from 0"),
          ("temperature=nan", {"temperature": float("nan")}, "temperature"),
          ("max_tokens=0", {"max_tokens": 0}, "max_tokens must be an integer from 1"),
          ("max_tokens=-5", {"max_tokens": -5}, "max_tokens"),
          ("top_p=0", {"top_p": 0.0}, "top_p must be a number above 0 up to 1"),
          ("top_p=1.5", {"top_p": 1.5}, "top_p"),
          ("n=0", {"n": 0}, "n must be an integer from 1"),
          ("timeout=0", {"timeout": 0}, "timeout must be a number above 0"),
          ("timeout=inf", {"timeout": float("inf")}, "timeout"),
          ("max_retries=-1", {"max_retries": -1}, "max_retries must be an integer from 0"),
          ("max_retries=1000", {"max_retries": 1000}, "max_retries"),
          ("vLLM top_k=-5", {"top_k": -5}, "top_k"),
          ("vLLM repetition_penalty=0", {"repetition_penalty": 0}, "repetition_penalty"),
      ]],
    Case("ChatVLLM", "temperature=-1, made directly", ConfigError, "temperature",
         lambda c: direct(c, temperature=-1.0)),
    Case("ChatVLLM", "n=0, made directly", ConfigError, "n must be an integer from 1",
         lambda c: direct(c, n=0)),
    Case("ChatVLLM.invoke", "temperature=-1 at the call", ConfigError, "temperature",
         lambda c: ask(vllm(c, card=None), temperature=-1.0)),
    Case("ChatVLLM.invoke", "max_tokens=0 bound", ConfigError, "max_tokens",
         lambda c: vllm(c, card=None).bind(max_tokens=0).invoke([HumanMessage("Q")])),
    Case("vllm_chat_model card", "a card recommending temperature -1", ConfigError,
         "insightv_agent.json", lambda c: vllm(c, card=carded(c, {"temperature": -1}))),
    Case("vllm_chat_model card", "a card whose max_tokens is a string", ConfigError,
         "sampling.max_tokens", lambda c: vllm(c, card=carded(c, {"max_tokens": "many"}))),
    # --- ChatTransformersVLM (refused before anything is loaded) ---
    Case("ChatTransformersVLM", "temperature=-1", ConfigError, "temperature",
         lambda c: local(temperature=-1.0)),
    Case("ChatTransformersVLM", "temperature=nan", ConfigError, "finite",
         lambda c: local(temperature=float("nan"))),
    Case("ChatTransformersVLM", "max_new_tokens=0", ConfigError, "max_new_tokens",
         lambda c: local(max_new_tokens=0)),
    Case("ChatTransformersVLM", "top_p=0", ConfigError, "top_p", lambda c: local(top_p=0.0)),
    Case("ChatTransformersVLM", "a model folder whose card recommends top_p 2", ConfigError,
         "insightv_agent.json", lambda c: local(model_path=carded(c, {"top_p": 2}))),
    Case("ChatTransformersVLM", "an adapter_path holding only adapter_model.bin",
         InvalidInputError, "adapter_model.safetensors",
         lambda c: local(adapter_path=pickled_adapter(c))),
    Case("ChatTransformersVLM", "a model_path that is an adapter of pickles only",
         InvalidInputError, "only pickles", lambda c: local(model_path=pickled_adapter(c))),
    # --- VLLMServer (refused before vLLM starts) ---
    Case("VLLMServer", "an adapter holding only adapter_model.bin", InvalidInputError,
         "adapter_model.safetensors",
         lambda c: server(adapters={"reason": pickled_adapter(c)})),
    Case("VLLMServer", "an adapter folder with no adapter_config.json", InvalidInputError,
         "adapter_config.json", lambda c: server(adapters={"reason": weights_only(c)})),
    Case("VLLMServer", "a model that is an adapter of pickles only", InvalidInputError,
         "only pickles", lambda c: server(model=pickled_adapter(c))),
    Case("VLLMServer.load_adapter", "an adapter of pickles only", InvalidInputError,
         "adapter_model.safetensors", lambda c: server(runtime_lora=True).load_adapter(
             "round-2", pickled_adapter(c))),
    Case("VLLMServer", "port=70000", ConfigError, "port must be an integer from 1 to 65535",
         lambda c: server(port=70_000)),
    Case("VLLMServer", "max_model_len=0", ConfigError, "max_model_len",
         lambda c: server(max_model_len=0)),
    Case("VLLMServer", "startup_timeout=0", ConfigError, "startup_timeout",
         lambda c: server(startup_timeout=0)),
    Case("VLLMServer", "dtype='float8'", ConfigError, "dtype must be one of",
         lambda c: server(dtype="float8")),
    Case("VLLMServer", "load_format='pt' (pickles)", ConfigError, "pickles",
         lambda c: server(load_format="pt")),
    # --- the CLI ---
    Case("insightv run", "--temperature -1", CommandRefused, "--temperature must be a number",
         lambda c: c.cli(*RUN, c.url, "-i", c.file("a.png", png()), "-q", "q",
                         "--temperature", "-1")),
    Case("insightv run", "--temperature nan (no backend given)", CommandRefused,
         "--temperature", lambda c: c.cli("run", "-i", c.file("a.png", png()), "-q", "q",
                                          "--method", "single", "--temperature", "nan")),
    Case("insightv run", "--local-adapter holding only adapter_model.bin", CommandRefused,
         "adapter_model.safetensors", lambda c: c.cli(
             "run", "--local-model", "m", "--local-adapter", pickled_adapter(c), "-i",
             c.file("a.png", png()), "-q", "q")),
    Case("insightv run", "--local-model whose card recommends max_tokens 0", CommandRefused,
         "insightv_agent.json", lambda c: c.cli(
             "run", "--local-model", carded(c, {"max_tokens": 0}), "-i",
             c.file("a.png", png()), "-q", "q")),
    Case("insightv train sft", "--adapter holding only adapter_model.bin", CommandRefused,
         "safetensors", lambda c: c.cli("train", "sft", "--model", str(c.tmp), "--data",
                                        str(c.tmp), "--output_dir", str(c.tmp / "o"),
                                        "--adapter", pickled_adapter(c))),
    Case("insightv serve", "--adapter holding only adapter_model.bin", CommandRefused,
         "adapter_model.safetensors", lambda c: c.cli(
             "serve", "--model", "m", "--adapter", f"reason={pickled_adapter(c)}")),
    Case("insightv serve", "--port 0", CommandRefused, "port",
         lambda c: c.cli("serve", "--model", "m", "--port", "0")),
    Case("insightv serve", "--max-model-len -1", CommandRefused, "max_model_len",
         lambda c: c.cli("serve", "--model", "m", "--max-model-len", "-1")),
    Case("insightv serve", "--startup-timeout 0", CommandRefused, "startup_timeout",
         lambda c: c.cli("serve", "--model", "m", "--startup-timeout", "0")),
    Case("insightv serve", "--dtype float8", CommandRefused, "dtype",
         lambda c: c.cli("serve", "--model", "m", "--dtype", "float8")),
]
