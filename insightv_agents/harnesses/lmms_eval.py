"""Our methods as lmms-eval models: ``insightv`` (the two agents) and ``llava_cot`` (LLaVA-CoT's
searches over one four-stage model).

Installed with the ``lmms-eval`` extra, both are registered through lmms-eval's
``lmms_eval.models`` entry point (:func:`insightv_agents.harnesses.lmms_eval_models`), so
``lmms-eval eval --model insightv --model_args ...`` finds them. ``--model_args`` are
``insightv eval``'s options::

    pretrained=DIR            a model run in-process (transformers); adapter=DIR beside it
    base_url=URL              a vLLM server (or [URL1,URL2] for a pool of replicas);
                              model=NAME, summary_model=NAME, summary_base_url=URL
    (neither)                 the demo agents (insightv only)
    mode=chain|step, max_steps=16, temperature=T (default: the agent card's)
    search=stage-beam|best-of-n|sentence-beam|single, beam_size=N   (llava_cot)
    concurrency=8             questions in flight at once
    log_dir=DIR               every prediction's reasoning, verdict and search, one folder
                              per task (<DIR>/<task>/predictions.jsonl); a rerun resumes

The answer a task scores is the method's final answer in the form benchmark scorers read
(:func:`~insightv_agents.harnesses.agent.benchmark_answer`). The task's own generation
settings (``max_new_tokens``, ``until``) are not applied: they are written for one short
answer, and the agents' reasoning runs under their own limits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any

from lmms_eval.api.model import lmms
from tqdm import tqdm

from insightv_agents.cards import MAX_TEMPERATURE
from insightv_agents.errors import ConfigError, check_number
from insightv_agents.harnesses.agent import HarnessAgent, HarnessQuestion, HarnessSettings
from insightv_agents.methods import METHODS

# Filled in by lmms-eval itself (``create_from_arg_string``'s additional config): not ours.
_HARNESS_ARGS = ("batch_size", "max_batch_size", "device")


class InsightV(lmms):
    """lmms-eval's ``insightv`` model: the reasoning agent and the summary agent (the method
    ``insightv eval --method insightv`` runs, with the same models)."""

    is_simple = True
    METHOD = "insightv"

    def __init__(self, pretrained: str | None = None, adapter: str | None = None,
                 base_url: str | None = None, model: str = "insightv-reason",
                 summary_base_url: str | None = None, summary_model: str | None = None,
                 mode: str | None = None, max_steps: int = 16,
                 temperature: float | None = None, concurrency: int = 8,
                 log_dir: str | None = None, **rest: Any) -> None:
        super().__init__()
        method, beam_size, temperature = self._method(rest, temperature)
        unknown = sorted(set(rest) - set(_HARNESS_ARGS))
        if unknown:
            raise ConfigError(f"unknown model_args for {type(self).__name__}: "
                              f"{', '.join(unknown)}.")
        if temperature is not None:  # lmms-eval reads "0" as the int 0
            check_number("temperature", temperature, 0, MAX_TEMPERATURE)
        self.settings = HarnessSettings(
            method=method, base_url=_urls(base_url), model=str(model),
            summary_base_url=_urls(summary_base_url), summary_model=_text(summary_model),
            local_model=_text(pretrained), local_adapter=_text(adapter), mode=_text(mode),
            max_steps=max_steps, temperature=None if temperature is None else float(temperature),
            beam_size=beam_size, concurrency=concurrency, log_dir=_text(log_dir))
        self._agent: HarnessAgent | None = HarnessAgent(self.settings, harness="lmms-eval")

    def _method(self, args: dict[str, Any], temperature: float | None
                ) -> tuple[str, int, float | None]:
        """The method, beam size and temperature (``insightv``: no search)."""
        return self.METHOD, 2, temperature

    @property
    def agent(self) -> HarnessAgent:
        """What answers (built again after :meth:`clean`)."""
        if self._agent is None:
            self._agent = HarnessAgent(self.settings, harness="lmms-eval")
        return self._agent

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Each request's answer; all of a task's requests are asked together, at most
        ``concurrency`` at once, each one's images read when its turn comes. A document
        asked again in one call (lmms-eval's ``--repeats``) is named ``split/doc#k``."""
        questions: dict[str, list[tuple[int, HarnessQuestion]]] = {}
        seen: Counter[tuple[str, str]] = Counter()
        for index, request in enumerate(requests):
            context, _, doc_to_visual, doc_id, task, split = request.args
            name = f"{split}/{doc_id}"
            seen[task, name] += 1
            if seen[task, name] > 1:
                name = f"{name}#{seen[task, name]}"
            images = partial(_visuals, doc_to_visual, self.task_dict[task][split], doc_id)
            questions.setdefault(task, []).append(
                (index, HarnessQuestion(id=name, images=images, prompt=context)))
        answers = [""] * len(requests)
        with tqdm(total=len(requests), desc="insightv answering", disable=self.rank != 0) as bar:
            for task, indexed in questions.items():
                rows = self.agent.answer([question for _, question in indexed], group=task,
                                         on_answer=lambda _: bar.update())
                for (index, _), row in zip(indexed, rows, strict=True):
                    answers[index] = row["answer"]
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{type(self).__name__} answers generation tasks "
                                  "(output_type: generate_until) only.")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} answers one-turn questions only.")

    def clean(self) -> None:
        """Free the models (lmms-eval calls this after each evaluation); the next request
        builds them again."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        super().clean()


class LlavaCoT(InsightV):
    """lmms-eval's ``llava_cot`` model: one four-stage model and a LLaVA-CoT search
    (``search=stage-beam`` by default, with ``beam_size``; ``best-of-n``,
    ``sentence-beam``, or ``single`` for no search), as ``insightv eval --method``. A search
    samples its candidates at LLaVA-CoT's temperature, 0.6, unless ``temperature`` is given.
    """

    METHOD = "stage-beam"
    SEARCH_TEMPERATURE = 0.6

    def _method(self, args: dict[str, Any], temperature: float | None
                ) -> tuple[str, int, float | None]:
        search = str(args.pop("search", self.METHOD))
        if search not in METHODS:
            raise ConfigError(f"search must be one of {', '.join(METHODS)}; not {search!r}.")
        if temperature is None and search != "single":
            temperature = self.SEARCH_TEMPERATURE
        return search, args.pop("beam_size", 2), temperature


def _visuals(doc_to_visual: Any, docs: Any, doc_id: int) -> list[Any]:
    return list(doc_to_visual(docs[doc_id]) or [])


def _text(value: Any) -> str | None:
    """A model arg that is text (lmms-eval turns "123" into a number)."""
    return None if value is None else str(value)


def _urls(value: Any) -> tuple[str, ...]:
    """A ``base_url`` model arg: one URL, or ``[URL1,URL2]`` (a pool's replicas)."""
    if value is None:
        return ()
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return tuple(url.strip().strip("'\"") for url in text.split(",") if url.strip())
